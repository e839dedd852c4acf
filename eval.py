"""Evaluation entry point. Stage 1: the visual tokenizer on a folder of images.

    python eval.py --config configs/tiny.py --checkpoint DIR --data_dir IMAGES [--limit N]

DIR is a converted checkpoint (``lavit.json``, from tools/convert_torch_weights.py) or a train.py
workdir (its latest Orbax step); it is only read. IMAGES is a folder of images (searched
recursively, taken in path order) or ``synthetic:N``; the first ``--limit`` distinct images are
evaluated once each. Keep decisions: ``--keep_mode argmax`` (deterministic, the default) or
``gumbel`` (the reference's hard sample, seeded by ``--seed``). Prints JSON: the images evaluated,
the keep mode, tokens kept per image (mean/min/max), code usage (distinct codes, perplexity) and,
where a feature-reconstruction decoder is available (train.py workdirs), the cosine similarity of
the reconstructed encoder features. Errors print one line ``error: ...`` (exit status 2), before any
weights are read; the libraries' INFO logs (Orbax) appear only with ``--verbosity 0``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lavit_jax import checkpoint
from lavit_jax.data.image_io import preprocess
from lavit_jax.data.input_pipeline import list_images, synthetic_image
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer
from lavit_jax.ops.config import freeze
from lavit_jax.train import tokenizer as st

KEEP_MODES = ("argmax", "gumbel")


def define_flags():
    """Command-line flags (defined only when run as a script, so eval.py can be imported)."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_string("checkpoint", None, "Converted (tools/convert_torch_weights.py) or train.py checkpoint dir.")
    flags.DEFINE_string("data_dir", None, "Image folder (or synthetic:N).")
    flags.DEFINE_integer("limit", 256, "At most this many distinct images.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Batch size.", lower_bound=1)
    flags.DEFINE_enum("keep_mode", "argmax", KEEP_MODES, "Tokenizer keep decisions.")
    flags.DEFINE_integer("seed", 0, "Seed of the gumbel keep decisions.", lower_bound=0)


def image_source(data_dir: str, limit: int):
    """(the first ``limit`` distinct items, loader item -> image) of ``--data_dir``; errors name the flag."""
    if data_dir.startswith("synthetic:"):
        n = data_dir.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--data_dir {data_dir}: expected synthetic:N with N >= 1")
        return list(range(min(int(n), limit))), synthetic_image
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir}: image folder not found")
    try:
        files = list_images(data_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"--data_dir {data_dir}: no images in it") from None
    return files[:limit], str


def check_checkpoint(ckpt) -> str:
    """'converted' or 'workdir'; an error naming --checkpoint otherwise. Never creates anything."""
    if not ckpt:
        raise ValueError("--checkpoint is required")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--checkpoint {ckpt}: directory not found")
    if os.path.isfile(os.path.join(ckpt, checkpoint.MANIFEST)):
        return "converted"
    if not any(n.isdigit() for n in os.listdir(ckpt)):
        raise FileNotFoundError(f"--checkpoint {ckpt}: neither a converted checkpoint ({checkpoint.MANIFEST}) nor a "
                                "train.py workdir (convert released weights with tools/convert_torch_weights.py)")
    return "workdir"


def load_params(config, ckpt):
    """(tokenizer params, stage-1 decoder params or None) from a converted or a train.py checkpoint directory."""
    if check_checkpoint(ckpt) == "converted":
        return checkpoint.load_visual_tokenizer(ckpt, scan_layers=config.tokenizer.scan_layers).params, None
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    mgr = ocp.CheckpointManager(os.path.abspath(ckpt), options=options)
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"--checkpoint {ckpt}: a train.py workdir without a saved step")
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return state["params"]["tokenizer"], state["params"]["decoder"]


def evaluate(config, ckpt, data_dir, limit=256, batch_size=8, keep_mode="argmax", seed=0):
    if keep_mode not in KEEP_MODES:
        raise ValueError(f"--keep_mode {keep_mode!r}: expected one of {', '.join(KEEP_MODES)}")
    items, load = image_source(data_dir, limit)
    check_checkpoint(ckpt)
    tc = freeze(config.tokenizer)
    params, dec = load_params(config, ckpt)
    model = DynamicVisualTokenizer(tc)
    decoder = TokenDecoder(st.feature_decoder_config(tc))  # the stage-1 feature decoder

    @jax.jit
    def run(p, d, x, rng):
        out = model.apply({"params": p}, x, mode=keep_mode, rng=rng, with_llm_features=False)
        res = {"lengths": out["lengths"], "codes": out["codes"]}
        if d is not None:
            rec = decoder.apply({"params": d}, out["quantized"], out["lengths"], features_only=True)
            res["cos"] = 1.0 - jax.vmap(st.cosine_loss)(rec, out["eva_features"][:, 1:])  # per image
        return res

    key = jax.random.key(seed)
    lengths, codes, cos = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = np.stack([preprocess(load(item), tc.image_size)[0] for item in chunk])
        pad = batch_size - len(chunk)  # the last batch is padded (one compiled shape); padding is not counted
        if pad:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        r = jax.device_get(run(params, dec, jnp.asarray(pixels), jax.random.fold_in(key, start)))
        n = len(chunk)
        lengths.extend(r["lengths"][:n].tolist())
        codes.extend(int(c) for row, k in zip(r["codes"][:n], r["lengths"][:n], strict=True) for c in row[:k])
        if "cos" in r:
            cos.extend(r["cos"][:n].tolist())
    counts = np.bincount(np.asarray(codes, np.int64), minlength=tc.n_code).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    result = {
        "images": len(lengths), "keep_mode": keep_mode, "tokens_kept_mean": float(np.mean(lengths)),
        "tokens_kept_min": int(min(lengths)), "tokens_kept_max": int(max(lengths)),
        "distinct_codes": int((counts > 0).sum()), "code_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "feature_cosine": float(np.mean(cos)) if cos else None,
    }
    if keep_mode == "gumbel":
        result["seed"] = seed
    return result


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    f = flags.FLAGS
    if not f["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        if not f.data_dir:
            raise ValueError("--data_dir is required (an image folder or synthetic:N)")
        image_source(f.data_dir, f.limit)  # both checked before any weights are read
        check_checkpoint(f.checkpoint)
        result = evaluate(f.config, f.checkpoint, f.data_dir, f.limit, f.batch_size, f.keep_mode, f.seed)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
