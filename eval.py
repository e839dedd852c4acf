"""Evaluation entry point. Stage 1: the visual tokenizer on a folder of images.

    python eval.py --config configs/tiny.py --checkpoint DIR --data_dir IMAGES [--limit N]

DIR is a released checkpoint (``visual_tokenizer/``), a converted one (``lavit.json``) or a
train.py workdir (its latest Orbax step). Prints JSON: tokens kept per image (mean/min/max), code
usage (distinct codes, perplexity) and, where a feature-reconstruction decoder is available
(train.py workdirs), the cosine similarity of the reconstructed encoder features.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags


def define_flags():
    """Command-line flags (defined only when run as a script, so eval.py can be imported)."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_string("checkpoint", None, "Converted (tools/convert_torch_weights.py) or train.py checkpoint dir.")
    flags.DEFINE_string("data_dir", None, "Image folder (or synthetic:N).")
    flags.DEFINE_integer("limit", 256, "At most this many images.")
    flags.DEFINE_integer("batch_size", 8, "Batch size.")


def load_params(config, ckpt):
    """(tokenizer params, stage-1 decoder params or None) from a converted or a train.py checkpoint directory."""
    from lavit_jax import checkpoint

    if os.path.isfile(os.path.join(ckpt, checkpoint.MANIFEST)):
        return checkpoint.load_visual_tokenizer(ckpt, scan_layers=config.tokenizer.scan_layers).params, None
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.abspath(ckpt))
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"--checkpoint {ckpt}: neither a converted checkpoint (lavit.json) nor a train.py "
                                "workdir (convert released weights with tools/convert_torch_weights.py)")
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return state["params"]["tokenizer"], state["params"]["decoder"]


def evaluate(config, ckpt, data_dir, limit=256, batch_size=8):
    from lavit_jax.data.input_pipeline import image_batches
    from lavit_jax.models.token_decoder import TokenDecoder
    from lavit_jax.models.tokenizer import DynamicVisualTokenizer
    from lavit_jax.ops.config import freeze
    from lavit_jax.train import tokenizer as st

    tc = freeze(config.tokenizer)
    params, dec = load_params(config, ckpt)
    model = DynamicVisualTokenizer(tc)

    @jax.jit
    def run(p, d, x):
        out = model.apply({"params": p}, x, with_llm_features=False)
        res = {"lengths": out["lengths"], "codes": out["codes"]}
        if d is not None:
            rec = TokenDecoder(tc).apply({"params": d}, out["quantized"], out["lengths"], features_only=True)
            res["cos"] = 1.0 - st.cosine_loss(rec, out["eva_features"][:, 1:])
        return res

    it = iter(image_batches(data_dir, tc.image_size, batch_size))
    lengths, codes, cos = [], [], []
    for _ in range(max(1, limit // batch_size)):
        r = jax.device_get(run(params, dec, jnp.asarray(next(it))))
        lengths.extend(r["lengths"].tolist())
        codes.extend(int(c) for row, n in zip(r["codes"], r["lengths"], strict=True) for c in row[:n])
        if "cos" in r:
            cos.append(float(r["cos"]))
    counts = np.bincount(np.asarray(codes, np.int64), minlength=tc.n_code).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {
        "images": len(lengths), "tokens_kept_mean": float(np.mean(lengths)), "tokens_kept_min": int(min(lengths)),
        "tokens_kept_max": int(max(lengths)), "distinct_codes": int((counts > 0).sum()),
        "code_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "feature_cosine": float(np.mean(cos)) if cos else None,
    }


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.checkpoint or not f.data_dir:
        raise app.UsageError("--checkpoint and --data_dir are required")
    print(json.dumps(evaluate(f.config, f.checkpoint, f.data_dir, f.limit, f.batch_size), indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
