"""``make demo``: trains a small LaVIT end to end on the procedural shapes dataset and evaluates it.

Steps (settings in ``configs/demo.py``; everything under ``--workdir``, default ``runs/demo``):

1. a sentencepiece text tokenizer on the dataset's closed vocabulary (``data/shapes.all_texts``);
2. the EVA encoder pretrained (``pretrain_encoder``: the stand-in for EVA-CLIP, whose weights cannot be
   loaded here): linear heads on its mean-pooled patch features learn the scene's attribute words, and on
   each patch feature the colour of the shape under it (or background). LaVIT
   freezes a pretrained encoder whose features say what the image shows; a random one would give stage 1 a
   target whose patch features share a large common component (a cosine of 0.87 to their mean), so
   reconstructing it measures nothing and its codes carry little;
3. stage 1 (``configs/demo.py:tokenizer``) on ``shapes:N`` images from that encoder, written as a converted
   checkpoint;
4. stage 2 (``configs/demo.py:lm``): captions, VQA pairs (image -> text) and captions -> visual ids;
5. the frozen VAE fitted to the images (there is no released VAE to load; its latent ``scaling_factor`` set
   to 1 / latent std, as SD's), then the detokenizer stage (``configs/demo.py:detokenizer``): UNet + token
   decoder, EMA weights kept;
6. the whole model as one converted checkpoint (``WORKDIR/model``, read with ``LaVIT.from_pretrained``),
   evaluated on held-out scenes: ``recon_cosine`` and ``codebook_usage`` (stage 1 on held-out images),
   ``caption_accuracy`` (attribute words of the generated caption equal to the scene's, mean over count,
   size, colour, shape; also per attribute), ``vqa_accuracy`` (answer's first word exact; also per asked
   attribute), ``t2i_attribute_accuracy`` (the
   deterministic analyser ``shapes.analyse`` on images generated from held-out captions, mean over the four
   attributes); ``WORKDIR/report.json``, ``report.md``, ``samples.png`` and ``loss_curves.png``.

Flags: ``--workdir``, ``--overwrite`` (replace an earlier demo run; without it an existing ``--workdir`` is
refused before any work), ``--steps_scale`` (multiplies every step count: 0.02 for a smoke run),
``--eval_scenes`` / ``--t2i_prompts`` (override the config). The run is written to a temporary sibling
directory that becomes ``--workdir`` only when it finished (a killed run leaves nothing that looks complete,
and is not resumed: run again). A progress line per logged training step, a summary table at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax.core import meta
from PIL import Image, ImageDraw

from lavit_jax import checkpoint, fsutil, vocab
from lavit_jax.data import shapes
from lavit_jax.models import unet as unet_lib
from lavit_jax.models import vae as vae_lib
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer
from lavit_jax.ops.config import freeze
from lavit_jax.train import checkpoints as ckpt_lib
from lavit_jax.train import lm as lm_stage
from lavit_jax.train import tokenizer as tok_stage
from lavit_jax.train import trainer

_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "The demo's config file (get_config(stage)).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory of the run.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing demo run in --workdir.")
_STEPS_SCALE = flags.DEFINE_float("steps_scale", 1.0, "Multiplies every training step count (e.g. 0.02: smoke).")
_EVAL_SCENES = flags.DEFINE_integer("eval_scenes", None, "Held-out scenes to evaluate (default: the config's).")
_T2I = flags.DEFINE_integer("t2i_prompts", None, "Held-out captions for text-to-image (default: the config's).")

MARKER = "demo_run.json"  # marks a directory this program wrote (so --overwrite may replace it)
REPORT_FIELDS = ("recon_cosine", "codebook_usage", "caption_accuracy", "caption_exact_match", "vqa_accuracy",
                 "t2i_attribute_accuracy")
TARGETS = {"recon_cosine": 0.8, "caption_accuracy": 0.8, "vqa_accuracy": 0.8, "t2i_attribute_accuracy": 0.6}


def load_config_file(path: str):
    """The ``get_config`` function of a config file (loaded by path: the library never imports configs/)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: file not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)  # configs/demo.py imports configs.lavit_7b
    spec = importlib.util.spec_from_file_location("lavit_demo_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config


def _scaled(n, scale, low=1):
    return max(low, int(round(n * scale)))


def stage_config(get_config, stage, work, scale):
    c = get_config(stage)
    tr = c.train
    tr.workdir = os.path.join(work, stage)
    for k in ("steps", "warmup_steps", "quantize_start_step", "dead_code_every"):
        if k in tr:
            tr[k] = _scaled(tr[k], scale, low=0 if k != "steps" else 1)
    if "quantize_start_step" in tr:
        tr.quantize_start_step = min(tr.quantize_start_step, tr.steps - 1)
    if "dead_code_every" in tr and tr.dead_code_every == 0:
        tr.dead_code_every = 1
    tr.log_every = max(1, min(tr.log_every, tr.steps // 5 or 1))
    tr.save_every = tr.steps
    tr.keep_checkpoints = 1
    return c


def build_text_tokenizer(folder: str, vocab_size: int) -> str:
    """Trains a sentencepiece BPE model on every text of the dataset; returns its tokenizer.model path."""
    import sentencepiece as spm  # noqa: PLC0415 -- needed only here (requirements-test.txt)

    os.makedirs(folder, exist_ok=True)
    texts = shapes.all_texts()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 4), model_prefix=os.path.join(folder, "tokenizer"),
                                   model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return os.path.join(folder, "tokenizer.model")


# ------------------------------------------------------------------------------------------ encoder, VAE


def _train_scenes(i: int, batch: int, size: int, normalise: bool, patch: int = 0):
    """Batch i of training scenes: (images [batch, size, size, 3] (CLIP-normalised, or in [-1, 1]), attribute
    labels [batch, 4], and with ``patch`` > 0 patch labels [batch, (size // patch)^2]: 1 + the colour's index
    where at least 15% of the patch is foreground, else 0)."""
    from lavit_jax.data.image_io import preprocess  # noqa: PLC0415

    out, labels, dense = [], [], []
    for j in range(batch):
        img, attrs = shapes.scene(shapes.TRAIN_SEEDS[0] + (i * batch + j) % 100_000)
        img = Image.fromarray(img).resize((size, size), Image.BICUBIC)  # as preprocess resizes
        out.append(preprocess(img, size)[0] if normalise else np.asarray(img, np.float32) / 127.5 - 1.0)
        labels.append(shapes.attribute_labels(attrs))
        if patch:
            fg = shapes.foreground(np.asarray(img))
            g = size // patch
            frac = fg[:g * patch, :g * patch].reshape(g, patch, g, patch).mean((1, 3)).reshape(-1)
            dense.append(np.where(frac >= 0.15, 1 + labels[-1][shapes.ATTRIBUTES.index("colour")], 0))
    out, labels = np.stack(out), np.asarray(labels, np.int32)
    return (out, labels, np.asarray(dense, np.int32)) if patch else (out, labels)


def pretrain_encoder(tok_config, steps: int, batch: int, lr: float, seed: int = 0):
    """The stand-in for EVA-CLIP's image-text pretraining (no released encoder to load): the tokenizer's EVA
    encoder, under a linear head on its mean-pooled (standardised) patch features, learns the scene's
    attribute words (a softmax per attribute), and under a linear head on each patch feature, the colour of
    the shape it shows or the background (as CLIP-like encoders' patch features are local: without it the
    pooled objective leaves colour a weak direction of the patch features, which stage 1 then drops).
    Returns (tokenizer params: random init with this encoder, per-step losses)."""
    model = DynamicVisualTokenizer(tok_config)
    s = tok_config.image_size
    key = jax.random.key(seed)
    params = meta.unbox(model.init(key, jnp.zeros((1, s, s, 3)), with_llm_features=False)["params"])
    sizes = [len(shapes.VALUES[a]) for a in shapes.ATTRIBUTES]
    ends = np.cumsum(sizes)
    n_dense = 1 + len(shapes.COLOURS)
    head = {"kernel": jnp.zeros((tok_config.eva_width, int(ends[-1]))), "bias": jnp.zeros((int(ends[-1]),)),
            "patch_kernel": jnp.zeros((tok_config.eva_width, n_dense)), "patch_bias": jnp.zeros((n_dense,))}
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2)))
    trained = {"encoder": params["encoder"], "head": head}
    opt = tx.init(trained)

    @jax.jit
    def step(trained, opt, x, y, y_patch):
        def standardise(f):
            return (f - f.mean(-1, keepdims=True)) / (f.std(-1, keepdims=True) + 1e-6)

        def loss_fn(t):
            f = model.apply({"params": dict(params, encoder=t["encoder"])}, x, method=DynamicVisualTokenizer.encode)
            h = t["head"]
            logits = standardise(f.mean(1)) @ h["kernel"] + h["bias"]
            parts = jnp.split(logits, ends[:-1], axis=-1)
            loss = sum(optax.softmax_cross_entropy_with_integer_labels(z, y[:, k]).mean() for k, z in enumerate(parts))
            dense = standardise(f) @ h["patch_kernel"] + h["patch_bias"]
            return loss + optax.softmax_cross_entropy_with_integer_labels(dense, y_patch).mean()

        loss, g = jax.value_and_grad(loss_fn)(trained)
        up, opt = tx.update(g, opt, trained)
        return optax.apply_updates(trained, up), opt, loss

    losses = []
    for i in range(steps):
        trained, opt, loss = step(trained, opt, *_train_scenes(i, batch, s, True, tok_config.patch_size))
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            print(f"encoder: step {i + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return dict(params, encoder=jax.device_get(trained["encoder"])), losses


def fit_vae(vae_config, resolution: int, steps: int, batch: int, lr: float, kl_weight: float, seed: int = 0):
    """Fits the (frozen-in-training) VAE to shapes images [R, R, 3] in [-1, 1]: MSE + kl_weight * KL.
    Returns (params, per-step losses)."""
    model = vae_lib.AutoencoderKL(vae_config)
    key = jax.random.key(seed)
    params = meta.unbox(model.init(key, jnp.zeros((1, resolution, resolution, 3)))["params"])
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2)))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, k):
        def loss_fn(p):
            mean, logvar = model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode)
            z = vae_lib.sample_latent(mean, logvar, k)
            rec = model.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode)
            kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
            return jnp.mean(jnp.square(rec - x)) + kl_weight * kl

        loss, g = jax.value_and_grad(loss_fn)(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, loss

    losses = []
    for i in range(steps):
        x, _ = _train_scenes(i, batch, resolution, normalise=False)
        params, opt, loss = step(params, opt, x, jax.random.fold_in(key, i))
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            print(f"vae: step {i + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return params, losses


def latent_scaling_factor(vae_config, params, resolution: int, batch: int = 64) -> float:
    """1 / std of the posterior means of a batch of training images: the ``scaling_factor`` that gives the
    diffusion unit-variance latents (how SD-1.5's 0.18215 was chosen)."""
    model = vae_lib.AutoencoderKL(vae_config)
    x, _ = _train_scenes(0, batch, resolution, normalise=False)
    mean, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode))(params, x)
    return float(1.0 / np.std(np.asarray(mean)))


# ------------------------------------------------------------------------------------------ evaluation


def tokenizer_metrics(config, params, images) -> dict:
    """Stage 1 on images [M, S, S, 3] (CLIP-normalised): mean reconstruction cosine of the EVA features (argmax
    keep decisions, nearest codes), the cosine a trivial reconstruction gets (every image's features replaced
    by the per-patch mean over the images: ``mean_feature_cosine``), codebook usage (distinct codes / n_code)
    and keep ratio."""
    model = tok_stage.Stage1Model(tok_stage.model_config(config))

    @jax.jit
    def run(p, x):
        out = model.apply({"params": p}, x, jax.random.key(0), "argmax", method=tok_stage.Stage1Model.features)
        codebook = p["tokenizer"]["quantize"]["embedding"].astype(jnp.float32)
        ids = jnp.argmax(out["zn"] @ codebook.T, axis=-1)
        rec = model.apply({"params": p}, codebook[ids], out["keep"], method=tok_stage.Stage1Model.reconstruct)
        cos = 1.0 - tok_stage.cosine_loss(rec, out["target"])
        mean = jnp.broadcast_to(out["target"].mean(0, keepdims=True), out["target"].shape)
        return cos, 1.0 - tok_stage.cosine_loss(mean, out["target"]), ids, out["keep"]

    cos, base, ids, keep = (np.asarray(v) for v in run(params, jnp.asarray(images)))
    used = np.unique(ids[keep > 0.5])
    return {"recon_cosine": float(cos), "mean_feature_cosine": float(base),
            "codebook_usage": len(used) / config.tokenizer.n_code, "keep_ratio": float(keep.mean())}


def text_to_image_ids(model, prompts, dcfg, max_tokens: int):
    """The LLM stage of text-to-image: prompts -> (visual ids [B, N] in LLM space, padded with 0; lengths [B],
    0 where the LLM generated no visual token)."""
    from lavit_jax.inference import llm_tasks  # noqa: PLC0415

    lm, params, tok = model.language_model
    cfg = llm_tasks.image_generation_config(guidance_scale=dcfg.llm_guidance, top_k=dcfg.top_k, min_new_tokens=1,
                                            max_new_tokens=max_tokens)
    out = llm_tasks.text_to_image_ids(lm, params, tok, prompts, jax.random.key(0), config=cfg)
    codes, lengths = (np.asarray(x) for x in llm_tasks.image_codes_from_ids(out.tokens))
    valid = np.arange(codes.shape[1])[None] < lengths[:, None]
    return np.where(valid, codes + vocab.VISUAL_OFFSET, 0).astype(np.int32), lengths.astype(np.int32)


def evaluate(model_dir, stage1_config, stage1_params, dcfg, n_scenes, n_prompts):
    """The held-out metrics (see the module docstring) and the samples for the grid."""
    from lavit_jax.data.image_io import preprocess  # noqa: PLC0415
    from lavit_jax.inference.lavit import LaVIT  # noqa: PLC0415

    scenes = [shapes.scene(shapes.heldout_seed(i)) for i in range(n_scenes)]
    imgs = [s[0] for s in scenes]
    truths = [s[1] for s in scenes]
    size = stage1_config.tokenizer.image_size
    pixels = np.concatenate([preprocess(Image.fromarray(im), size) for im in imgs])
    out = tokenizer_metrics(stage1_config, stage1_params, pixels)
    model = LaVIT.from_pretrained(model_dir, compilation_cache=False)
    t0 = time.time()
    caps = model.caption(imgs, prompt=shapes.CAPTION_PROMPT, min_new_tokens=1, max_new_tokens=8)  # keep: seeded
    print(f"eval: {len(caps)} captions ({time.time() - t0:.0f}s)", flush=True)
    matches = [shapes.attribute_matches(shapes.parse_caption(c), t) for c, t in zip(caps, truths, strict=True)]
    out["caption_accuracy"] = float(np.mean(matches))
    out["caption_exact_match"] = float(np.mean([all(m) for m in matches]))
    out["caption_per_attribute"] = dict(zip(shapes.ATTRIBUTES, np.mean(matches, axis=0).tolist(), strict=True))
    q_imgs, questions, answers, asked = [], [], [], []
    for im, t in zip(imgs, truths, strict=True):
        for attr, (q, a) in zip(shapes.QUESTIONS, shapes.vqa_pairs(t), strict=True):  # vqa_pairs: QUESTIONS order
            q_imgs.append(im)
            questions.append(q)
            answers.append(a)
            asked.append(attr)
    t0 = time.time()
    got = model.vqa(q_imgs, questions, min_new_tokens=1, max_new_tokens=4)
    got = [str(a) for a in (got.answers if hasattr(got, "answers") else got)]
    print(f"eval: {len(got)} VQA answers ({time.time() - t0:.0f}s)", flush=True)
    right = np.asarray([(g.split() or [""])[0] == a for g, a in zip(got, answers, strict=True)], np.float64)
    out["vqa_accuracy"] = float(right.mean())
    asked = np.asarray(asked)
    out["vqa_per_attribute"] = {a: float(right[asked == a].mean()) for a in shapes.ATTRIBUTES}
    prompts = [shapes.example_text(t, 0) for t in truths[:n_prompts]]  # as text->image trained on them
    t0 = time.time()
    ids, lengths = text_to_image_ids(model, prompts, dcfg, (size // stage1_config.tokenizer.patch_size) ** 2)
    empty = lengths == 0  # no visual token generated: nothing to decode, every attribute counts as wrong
    gen = model.decode_ids(np.where(empty[:, None] & (np.arange(ids.shape[1]) == 0), vocab.VISUAL_OFFSET, ids),
                           np.maximum(lengths, 1), decoder="lowres", steps=dcfg.diffusion_steps,
                           guidance=dcfg.guidance, seed=0, safety_checker=False)
    print(f"eval: {len(gen)} generated images ({time.time() - t0:.0f}s)", flush=True)
    analysed = [shapes.analyse(np.asarray(g)) if not e else {a: None for a in shapes.ATTRIBUTES}
                for g, e in zip(gen, empty, strict=True)]
    out["t2i_attribute_accuracy"] = float(np.mean([shapes.attribute_matches(a, t)
                                                   for a, t in zip(analysed, truths, strict=False)]))
    out["t2i_per_attribute"] = {a: float(np.mean([an[a] == t[a] for an, t in zip(analysed, truths, strict=False)]))
                                for a in shapes.ATTRIBUTES}
    samples = dict(images=imgs, captions=caps, prompts=prompts, generated=gen, analysed=analysed)
    out["t2i_no_visual_tokens"] = int(empty.sum())
    out["examples"] = [{"seed": shapes.heldout_seed(i), "truth": shapes.caption(truths[i]), "caption": caps[i]}
                       for i in range(min(8, n_scenes))]
    return out, samples


# ------------------------------------------------------------------------------------------ pictures


def sample_grid(samples, n: int, cell: int = 96) -> Image.Image:
    """Row pairs: held-out images with their generated captions; prompts with their generated images."""
    n = min(n, len(samples["images"]), len(samples["generated"]))
    w, h = cell * n, 2 * (cell + 28)
    grid = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(grid)
    for i in range(n):
        x = i * cell
        grid.paste(Image.fromarray(samples["images"][i]).resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, 2))
        d.text((x + 2, cell), samples["captions"][i][:18], fill="black")
        y = cell + 28
        d.text((x + 2, y), samples["prompts"][i][:18], fill="black")
        gen = samples["generated"][i].convert("RGB").resize((cell - 8, cell - 8), Image.NEAREST)
        grid.paste(gen, (x + 4, y + 14))
    return grid


def loss_curves(curves: dict, width: int = 300, height: int = 180) -> Image.Image:
    """One panel per curve ({name: [(step, loss)]}), drawn with PIL."""
    img = Image.new("RGB", (width * len(curves), height), "white")
    d = ImageDraw.Draw(img)
    for k, (name, pts) in enumerate(curves.items()):
        x0 = k * width
        d.rectangle([x0 + 30, 20, x0 + width - 10, height - 25], outline="black")
        d.text((x0 + 35, 4), name, fill="black")
        pts = [(s, v) for s, v in pts if v is not None and np.isfinite(v)]
        if len(pts) < 2:
            continue
        s = np.asarray([p[0] for p in pts], np.float64)
        v = np.asarray([p[1] for p in pts], np.float64)
        lo, hi = float(v.min()), float(v.max())
        hi = hi if hi > lo else lo + 1e-6
        xs = x0 + 30 + (s - s.min()) / max(s.max() - s.min(), 1) * (width - 40)
        ys = height - 25 - (v - lo) / (hi - lo) * (height - 45)
        d.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill="blue", width=2)
        d.text((x0 + 2, 20), f"{hi:.3g}", fill="black")
        d.text((x0 + 2, height - 35), f"{lo:.3g}", fill="black")
        d.text((x0 + width - 60, height - 18), f"step {int(s.max())}", fill="black")
    return img


def _save_png(img: Image.Image, path: str) -> None:
    tmp = path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def summary_table(report: dict) -> str:
    rows = [("metric", "value", "target")]
    for k in REPORT_FIELDS:
        t = TARGETS.get(k)
        rows.append((k, f"{report[k]:.3f}", f">= {t}" if t else ""))
    rows.append(("wall time", f"{report['wall_time_s']:.0f} s", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


# ------------------------------------------------------------------------------------------ the run


def run(config_path: str, workdir: str, overwrite: bool, scale: float, eval_scenes=None, t2i_prompts=None) -> dict:
    """The whole demo (see the module docstring); returns the report."""
    get_config = load_config_file(config_path)
    dcfg = get_config("demo")
    if scale <= 0:
        raise ValueError(f"--steps_scale={scale}: must be > 0")
    n_scenes = eval_scenes if eval_scenes is not None else dcfg.eval_scenes
    n_prompts = min(t2i_prompts if t2i_prompts is not None else dcfg.t2i_prompts, n_scenes)
    if n_scenes < 1 or n_prompts < 1:
        raise ValueError(f"--eval_scenes={n_scenes} / --t2i_prompts={n_prompts}: must be >= 1")
    t_start = time.time()
    replaceable = lambda p: os.path.isfile(os.path.join(p, MARKER))  # noqa: E731
    with fsutil.atomic_output_dir(workdir, overwrite, replaceable=replaceable, kind="a demo run (with demo_run.json)",
                                  flag="--workdir") as work:
        timings = {}
        with open(os.path.join(work, MARKER), "w") as f:
            json.dump({"config": os.path.abspath(config_path), "steps_scale": scale}, f)
        t0 = time.time()
        tok_model = build_text_tokenizer(os.path.join(work, "text_tokenizer"), dcfg.text_vocab)

        # ---- the encoder, then stage 1
        c1 = stage_config(get_config, "tokenizer", work, scale)
        tok_cfg = freeze(c1.tokenizer)
        enc_steps = _scaled(dcfg.encoder_steps, scale)
        print(f"== encoder pretraining (the EVA-CLIP stand-in), {enc_steps} steps", flush=True)
        p0, enc_losses = pretrain_encoder(tok_cfg, enc_steps, dcfg.encoder_batch, dcfg.encoder_lr)
        ck0 = os.path.join(work, "ckpt_encoder")
        checkpoint.write_checkpoint(ck0, tokenizer_config=tok_cfg, tokenizer=p0)
        c1.train.init_from = ck0
        timings["encoder_s"] = time.time() - t0
        t0 = time.time()
        print(f"== stage 1: visual tokenizer, {c1.train.steps} steps on {c1.train.data_dir}", flush=True)
        state1, hist1 = trainer.train(c1)
        p1 = jax.device_get(state1.params)
        dec_model = TokenDecoder(tok_cfg, highres=False)
        n = (tok_cfg.image_size // tok_cfg.patch_size) ** 2
        dec0 = meta.unbox(jax.jit(dec_model.init)(jax.random.key(1), jnp.zeros((1, n, tok_cfg.code_dim)),
                                                  jnp.full((1,), n, jnp.int32))["params"])
        ck1 = os.path.join(work, "ckpt_stage1")
        checkpoint.write_checkpoint(ck1, tokenizer_config=tok_cfg, tokenizer=p1["tokenizer"],
                                    decoders={"lowres": jax.device_get(dec0)})
        timings["stage1_s"] = time.time() - t0

        # ---- stage 2
        t0 = time.time()
        c2 = stage_config(get_config, "lm", work, scale)
        c2.train.tokenizer_from = ck1
        c2.train.text_tokenizer = tok_model
        print(f"== stage 2: LLM, {c2.train.steps} steps", flush=True)
        state2, hist2 = trainer.train(c2)
        p2 = jax.device_get(state2.params)
        visual_weight = {k: p2["visual_tokenizer"][k] for k in lm_stage.TRAINED_VISUAL}
        lm_part = dict(params=p2["llm"], config=lm_stage.llm_config(c2), tokenizer_model=tok_model,
                       visual_weight=visual_weight)
        timings["stage2_s"] = time.time() - t0

        # ---- VAE fit, then the detokenizer stage
        t0 = time.time()
        c3 = stage_config(get_config, "detokenizer", work, scale)
        d = c3.detokenizer
        vae_cfg = vae_lib.vae_config(d.vae.to_dict())
        unet_cfg = unet_lib.unet_config(d.unet.to_dict())
        print(f"== VAE fit, {_scaled(dcfg.vae_steps, scale)} steps", flush=True)
        vae_params, vae_losses = fit_vae(vae_cfg, int(d.resolution), _scaled(dcfg.vae_steps, scale), dcfg.vae_batch,
                                         dcfg.vae_lr, dcfg.vae_kl_weight)
        d.vae.scaling_factor = latent_scaling_factor(vae_cfg, vae_params, int(d.resolution))
        print(f"vae: latent scaling_factor {d.vae.scaling_factor:.4f}", flush=True)
        unet0 = unet_lib.UNet2DConditionModel(unet_cfg)
        f = 2 ** (len(vae_cfg.block_out_channels) - 1)
        lat = jnp.zeros((1, d.resolution // f, d.resolution // f, unet_cfg.in_channels))
        width = tok_cfg.unet_dim_lowres
        unet_params = meta.unbox(jax.jit(unet0.init)(jax.random.key(2), lat, jnp.zeros((1,), jnp.int32),
                                                     jnp.zeros((1, n, width)))["params"])
        rng = np.random.default_rng(0)
        uncond = (0.1 * rng.standard_normal((1, width))).astype(np.float32)  # the sampler's negative
        pix = dict(unet=jax.device_get(unet_params), vae=jax.device_get(vae_params), unet_config=d.unet.to_dict(),
                   vae_config=d.vae.to_dict(), scheduler_config=d.scheduler.to_dict(), uncond=uncond)
        ck2 = os.path.join(work, "ckpt_detok_init")
        checkpoint.write_checkpoint(ck2, tokenizer_config=tok_cfg, tokenizer=p1["tokenizer"],
                                    decoders={"lowres": jax.device_get(dec0)}, pixel_decoding=pix)
        c3.train.init_from = ck2
        print(f"== detokenizer: UNet + token decoder, {c3.train.steps} steps", flush=True)
        state3, hist3 = trainer.train(c3)
        ema = jax.device_get(state3.ema)
        timings["detokenizer_s"] = time.time() - t0

        # ---- the whole model, evaluated on held-out scenes
        t0 = time.time()
        model_dir = os.path.join(work, "model")
        checkpoint.write_checkpoint(model_dir, tokenizer_config=tok_cfg, tokenizer=p1["tokenizer"],
                                    decoders={"lowres": ema["decoder"]}, language_model=lm_part,
                                    pixel_decoding=dict(pix, unet=ema["unet"]))
        print(f"== evaluation on {n_scenes} held-out scenes ({n_prompts} text-to-image prompts)", flush=True)
        metrics, samples = evaluate(model_dir, c1, p1, dcfg, n_scenes, n_prompts)
        timings["eval_s"] = time.time() - t0
        curves = {"encoder loss": list(enumerate(enc_losses, 1)),
                  "stage 1 loss": [(r["step"], r.get("loss")) for r in hist1],
                  "stage 1 recon cosine": [(r["step"], r.get("rec_cosine")) for r in hist1],
                  "stage 2 loss": [(r["step"], r.get("loss")) for r in hist2],
                  "VAE loss": list(enumerate(vae_losses, 1)),
                  "detokenizer loss": [(r["step"], r.get("loss")) for r in hist3]}
        _save_png(sample_grid(samples, dcfg.grid_samples), os.path.join(work, "samples.png"))
        _save_png(loss_curves(curves), os.path.join(work, "loss_curves.png"))
        report = {k: metrics[k] for k in REPORT_FIELDS}
        report.update(
            mean_feature_cosine=metrics["mean_feature_cosine"], keep_ratio=metrics["keep_ratio"],
            caption_per_attribute=metrics["caption_per_attribute"],
            vqa_per_attribute=metrics["vqa_per_attribute"],
            t2i_per_attribute=metrics["t2i_per_attribute"],
            t2i_no_visual_tokens=metrics["t2i_no_visual_tokens"],
            targets=TARGETS, examples=metrics["examples"], eval_scenes=n_scenes, t2i_prompts=n_prompts,
            steps={"encoder": enc_steps, "tokenizer": c1.train.steps, "lm": c2.train.steps,
                   "vae": _scaled(dcfg.vae_steps, scale), "detokenizer": c3.train.steps},
            final_loss={"encoder": enc_losses[-1], "tokenizer": hist1[-1]["loss"], "lm": hist2[-1]["loss"],
                        "vae": vae_losses[-1], "detokenizer": hist3[-1]["loss"]},
            timings_s={k: round(v, 1) for k, v in timings.items()}, steps_scale=scale,
            devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}", model_dir=os.path.join(workdir, "model"),
            wall_time_s=round(time.time() - t_start, 1))
        with open(os.path.join(work, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        table = summary_table(report)
        with open(os.path.join(work, "report.md"), "w") as f:
            f.write(f"# lavit-jax demo\n\n```\n{table}\n```\n\nsamples.png: held-out images with generated "
                    "captions (top), held-out captions with generated images (bottom). loss_curves.png: "
                    "training losses.\n")
    print(f"\n{table}\nreport: {os.path.join(workdir, 'report.json')}", flush=True)
    return report


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    ckpt_lib.quiet_orbax()
    try:
        run(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value, _STEPS_SCALE.value, _EVAL_SCENES.value, _T2I.value)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
