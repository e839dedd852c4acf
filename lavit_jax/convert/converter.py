"""Per-part conversion of a released LaVIT directory (PyTorch) into lavit-jax Orbax trees + config files.

Used by ``tools/convert_torch_weights.py``; each ``convert_*`` reads one released part and writes its
converted form under ``out`` (layout in ``lavit_jax/checkpoint.py``), returning the part's manifest entry.

Memory: tensors are read one at a time. Torch pickles are memory-mapped (``torch.load(mmap=True,
weights_only=True)``) so a shard's bytes are clean, evictable file pages rather than a second copy in
RAM, safetensors are read tensor by tensor; each tensor is transposed and cast to the target dtype as
soon as it is read. The resident set is therefore about one part's params in the target dtype plus one
tensor in flight. Nothing in the files is executed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import torch_io as W

LANGUAGE_MODEL_COPY = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                       "special_tokens_map.json")
DIFFUSION_FOLDERS = {"pixel_decoding": False, "highres_pixel_decoding": True}  # folder -> highres


def _bar(items, desc, unit):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, numpy array) of one weight file, one tensor at a time, without running code.

    ``.safetensors`` are opened lazily; torch pickles are memory-mapped (older non-zip pickles fall back
    to a plain ``weights_only`` load). A missing/truncated/corrupt file raises ``WeightFileError`` naming it.
    """
    if not os.path.isfile(path):
        raise W.WeightFileError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            f = safe_open(path, framework="pt")
            keys = list(f.keys())
        except Exception as e:
            raise W.WeightFileError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:
                raise W.WeightFileError(f"cannot read tensor {k!r} of {path}: {type(e).__name__}: {e}") from e
            yield k, W.tensor_to_numpy(t)
        return
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        sd = None
    if sd is None:  # not a zip pickle (mmap needs one), or corrupt: the plain loader names the problem
        yield from W.load_torch_file(path).items()
        return
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise W.WeightFileError(f"weight file {path} holds a {type(sd).__name__}, not a state dict")
    for k in list(sd):
        v = sd.pop(k)
        if not hasattr(v, "detach"):
            raise W.WeightFileError(f"weight file {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        yield str(k), W.tensor_to_numpy(v)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def _require(folder: str, names) -> None:
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")


# ------------------------------------------------------------------------------------------ language model


def convert_language_model(src: str, out: str, config, dtype: str, log) -> dict:
    """language_model/ -> OUT/language_model/{params/, visual_weight/, config.json, tokenizer.model}.

    Shards are read one after another, each tensor cast to ``dtype`` and transposed as it is read.
    ``visual_weight.bin`` (stage-2 merger + projector) becomes a partial tokenizer param tree that
    ``LaVIT`` lays over the tokenizer params for understanding.
    """
    from lavit_jax.models import llama

    lm_src = os.path.join(src, "language_model")
    lm_out = os.path.join(out, "language_model")
    _require(lm_src, ("config.json", "tokenizer.model"))
    cfg = llama.llama_config_from_hf(lm_src)
    shapes = llama.flax_param_shapes(cfg)
    np_dtype = _np_dtype(dtype)
    files = llama.hf_shard_files(lm_src)
    converted: dict[str, np.ndarray] = {}
    for path in _bar(files, "language_model", "shard"):
        for key, value in iter_tensors(path):
            r = llama.hf_key_rule(key)
            if r is None:
                continue
            converted[key] = r[1](value).astype(np_dtype, copy=False)
            del value

    def rule(key):
        r = llama.hf_key_rule(key)
        return None if r is None else (r[0], W.identity)

    tree = W.assign_params(converted, rule, shapes, source=lm_src, dtype=None)
    converted.clear()
    params = dict(tree.pop("model"))
    params.update(tree)
    os.makedirs(lm_out, exist_ok=True)
    checkpoint.save_tree(os.path.join(lm_out, "params"), params)
    del params, tree
    for name in LANGUAGE_MODEL_COPY:
        if os.path.isfile(os.path.join(lm_src, name)):
            shutil.copyfile(os.path.join(lm_src, name), os.path.join(lm_out, name))
    entry = {"config": cfg.to_dict(), "shards": [os.path.basename(f) for f in files], "visual_weight": False}
    vw = os.path.join(lm_src, "visual_weight.bin")
    if os.path.isfile(vw):
        checkpoint.save_tree(os.path.join(lm_out, "visual_weight"), convert_visual_weight(vw, config.tokenizer, dtype))
        entry["visual_weight"] = True
    else:
        log("  language_model: visual_weight.bin absent; understanding will use tokenizer_encoder.bin's merger")
    return entry


def convert_visual_weight(path: str, tokenizer_config, dtype) -> dict:
    """``visual_weight.bin`` -> the partial DynamicVisualTokenizer param tree it overrides (checked keys/shapes)."""
    from lavit_jax.models import tokenizer as T

    sd = W.load_torch_file(path)
    shapes = T.tokenizer_param_shapes(tokenizer_config)
    rule = T.released_key_rule(sd)
    mapped = {rule(k)[0] for k in sd}
    return W.assign_params(sd, rule, shapes, source=path, dtype=_np_dtype(dtype),
                           ignore_missing=[p for p in shapes if p not in mapped])


# ------------------------------------------------------------------------------------------ pixel decoding


def diffusers_params(folder: str, model, init_args, dtype) -> dict:
    """Flax params of ``model`` from a diffusers folder, each tensor cast to ``dtype`` as it is assigned."""
    from lavit_jax.inference import sampling as diffusion
    from lavit_jax.models.unet import diffusers_rule

    shapes = W.param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"]))
    sd = diffusion.load_diffusers_state_dict(folder)
    return W.assign_params(sd, diffusers_rule(shapes), shapes, source=folder, dtype=_np_dtype(dtype))


def convert_pixel_decoding(src: str, out: str, config, dtype: str, log, folder: str = "pixel_decoding") -> dict:
    """pixel_decoding/ (SD-1.5) or highres_pixel_decoding/ (SDXL) -> OUT/<folder>/{unet/, vae/,
    unet_config.json, vae_config.json, scheduler_config.json[, uncond_embeddings.npy]}.

    The UNet is stored in ``dtype``; the VAE always in float32 (LaVIT decodes in float32).
    """
    from lavit_jax.inference import sampling as diffusion
    from lavit_jax.inference import schedulers
    from lavit_jax.models.unet import UNet2DConditionModel, load_unet_config
    from lavit_jax.models.vae import AutoencoderKL, load_vae_config

    highres = DIFFUSION_FOLDERS[folder]
    p_src = os.path.join(src, folder)
    p_out = os.path.join(out, folder)
    need = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    if not highres:
        need.append("uncond_embeddings.bin")
    _require(p_src, need)
    unet_cfg = load_unet_config(os.path.join(p_src, "unet"))
    vae_cfg = load_vae_config(os.path.join(p_src, "vae"))
    schedulers.load_scheduler_config(os.path.join(p_src, "scheduler"), kind="ddim")  # validates
    if highres != (unet_cfg.get("addition_embed_type") == "text_time"):
        raise ValueError(f"{p_src}/unet/config.json: expected an {'SDXL' if highres else 'SD-1.5'}-style UNet "
                         f"(addition_embed_type {'text_time' if highres else 'none'})")
    os.makedirs(p_out, exist_ok=True)
    steps = ["unet", "vae", "scheduler"] + ([] if highres else ["uncond_embeddings"])
    for step in _bar(steps, folder, "part"):
        if step == "unet":
            model = UNet2DConditionModel(unet_cfg)
            tree = diffusers_params(os.path.join(p_src, "unet"), model, diffusion.unet_init_args(unet_cfg), dtype)
            checkpoint.save_tree(os.path.join(p_out, "unet"), tree)
            shutil.copyfile(os.path.join(p_src, "unet", "config.json"), os.path.join(p_out, "unet_config.json"))
            del tree
        elif step == "vae":
            model = AutoencoderKL(vae_cfg)
            tree = diffusers_params(os.path.join(p_src, "vae"), model, diffusion.vae_init_args(vae_cfg), "float32")
            checkpoint.save_tree(os.path.join(p_out, "vae"), tree)
            shutil.copyfile(os.path.join(p_src, "vae", "config.json"), os.path.join(p_out, "vae_config.json"))
            del tree
        elif step == "scheduler":
            shutil.copyfile(os.path.join(p_src, "scheduler", "scheduler_config.json"),
                            os.path.join(p_out, "scheduler_config.json"))
        else:
            u = diffusion.load_uncond_embeddings(os.path.join(p_src, "uncond_embeddings.bin"))
            width = unet_cfg.cross_attention_dim
            width = width[0] if isinstance(width, (tuple, list)) else width
            if u.shape[-1] != width:
                raise ValueError(f"{p_src}/uncond_embeddings.bin: width {u.shape[-1]} != UNet cross_attention_dim "
                                 f"{width}")
            np.save(os.path.join(p_out, "uncond_embeddings.npy"), u.astype(np.float32))
    return {"files": steps, "highres": highres}


def convert_highres_pixel_decoding(src: str, out: str, config, dtype: str, log) -> dict:
    return convert_pixel_decoding(src, out, config, dtype, log, folder="highres_pixel_decoding")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
