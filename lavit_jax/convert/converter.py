"""A released LaVIT directory (PyTorch) -> a converted lavit-jax directory (Orbax trees + config files).

``convert(src, out, tokenizer_config, dtype)`` converts every released part present in ``src``
(layout in ``lavit_jax/checkpoint.py``), one part at a time, into a temporary directory that becomes
``out`` only when the whole conversion succeeded; ``lavit.json`` is written last. The source is only
read. ``tools/convert_torch_weights.py`` is its command line.

Memory: tensors are read one at a time (torch pickles memory-mapped with ``weights_only=True``,
safetensors lazily) and cast to the target dtype as they are read; the resident set is about one
part's params in the target dtype plus one tensor in flight. Nothing in the files is executed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import diffusers as convert_diffusers
from lavit_jax.convert import llama as convert_llama
from lavit_jax.convert import tokenizer as convert_tokenizer
from lavit_jax.ops.config import as_dict, freeze

LANGUAGE_MODEL_COPY = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                       "special_tokens_map.json")
DIFFUSION_FOLDERS = {folder: name == "highres" for name, folder in checkpoint.DECODER_FOLDERS.items()}


def _bar(items, desc, unit="item"):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)


def _require(folder: str, names) -> None:
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")


def convert_visual_tokenizer(src: str, out: str, tokenizer_config, dtype: str, log) -> dict:
    """visual_tokenizer/ -> OUT/visual_tokenizer/{tokenizer,lowres_decoder,highres_decoder}."""
    files = convert_tokenizer.VISUAL_TOKENIZER_FILES
    vt_src = os.path.join(src, "visual_tokenizer")
    vt_out = os.path.join(out, "visual_tokenizer")
    _require(vt_src, [files["encoder"], files["tokenizer"]])
    done = []
    for name in _bar(["tokenizer", "lowres_decoder", "highres_decoder"], "visual_tokenizer", "file"):
        if name == "tokenizer":
            tree = convert_tokenizer.load_visual_tokenizer(vt_src, tokenizer_config, dtype)
        else:
            path = os.path.join(vt_src, files[name])
            if not os.path.isfile(path):
                log(f"  visual_tokenizer: {os.path.basename(path)} absent, {name} not converted")
                continue
            tree = convert_tokenizer.load_token_decoder(path, tokenizer_config, name == "highres_decoder", dtype)
        checkpoint.save_tree(os.path.join(vt_out, name), tree)
        done.append(name)
        del tree
    return {"files": done, "config": as_dict(tokenizer_config)}


def convert_language_model(src: str, out: str, tokenizer_config, dtype: str, log) -> dict:
    """language_model/ -> OUT/language_model/{params/, visual_weight/, config.json, tokenizer.model}.

    ``visual_weight.bin`` (stage-2 merger + projector) becomes a partial tokenizer param tree that is
    laid over the tokenizer params for understanding.
    """
    lm_src = os.path.join(src, "language_model")
    lm_out = os.path.join(out, "language_model")
    _require(lm_src, ("config.json", "tokenizer.model"))
    cfg = checkpoint.read_llama_config(lm_src)
    files = convert_llama.hf_shard_files(lm_src)
    params = convert_llama.llama_params(lm_src, cfg, dtype, progress=lambda it, desc: _bar(it, desc, "shard"))
    os.makedirs(lm_out, exist_ok=True)
    checkpoint.save_tree(os.path.join(lm_out, "params"), params)
    del params
    for name in LANGUAGE_MODEL_COPY:
        if os.path.isfile(os.path.join(lm_src, name)):
            shutil.copyfile(os.path.join(lm_src, name), os.path.join(lm_out, name))
    entry = {"config": as_dict(cfg), "shards": [os.path.basename(f) for f in files], "visual_weight": False}
    vw = os.path.join(lm_src, "visual_weight.bin")
    if os.path.isfile(vw):
        checkpoint.save_tree(os.path.join(lm_out, "visual_weight"),
                             convert_tokenizer.load_visual_weight(vw, tokenizer_config, dtype))
        entry["visual_weight"] = True
    else:
        log("  language_model: visual_weight.bin absent; understanding will use tokenizer_encoder.bin's merger")
    return entry


def convert_pixel_decoding(src: str, out: str, tokenizer_config, dtype: str, log,
                           folder: str = "pixel_decoding") -> dict:
    """pixel_decoding/ (SD-1.5) or highres_pixel_decoding/ (SDXL) -> OUT/<folder>/{unet/, vae/,
    unet_config.json, vae_config.json, scheduler_config.json[, uncond_embeddings.npy]}.

    The UNet is stored in ``dtype``; the VAE always in float32 (LaVIT decodes in float32).
    """
    highres = DIFFUSION_FOLDERS[folder]
    p_src = os.path.join(src, folder)
    p_out = os.path.join(out, folder)
    need = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    if not highres:
        need.append("uncond_embeddings.bin")
    _require(p_src, need)
    unet_cfg = checkpoint.read_unet_config(os.path.join(p_src, "unet"))
    vae_cfg = checkpoint.read_vae_config(os.path.join(p_src, "vae"))
    checkpoint.read_scheduler_config(os.path.join(p_src, "scheduler"), kind="ddim")  # validates
    if highres != (unet_cfg.get("addition_embed_type") == "text_time"):
        raise ValueError(f"{p_src}/unet/config.json: expected an {'SDXL' if highres else 'SD-1.5'}-style UNet "
                         f"(addition_embed_type {'text_time' if highres else 'none'})")
    os.makedirs(p_out, exist_ok=True)
    steps = ["unet", "vae", "scheduler"] + ([] if highres else ["uncond_embeddings"])
    for step in _bar(steps, folder, "part"):
        if step == "unet":
            tree = convert_diffusers.load_unet_params(os.path.join(p_src, "unet"), unet_cfg, dtype)
            checkpoint.save_tree(os.path.join(p_out, "unet"), tree)
            shutil.copyfile(os.path.join(p_src, "unet", "config.json"), os.path.join(p_out, "unet_config.json"))
            del tree
        elif step == "vae":
            tree = convert_diffusers.load_vae_params(os.path.join(p_src, "vae"), vae_cfg, "float32")
            checkpoint.save_tree(os.path.join(p_out, "vae"), tree)
            shutil.copyfile(os.path.join(p_src, "vae", "config.json"), os.path.join(p_out, "vae_config.json"))
            del tree
        elif step == "scheduler":
            shutil.copyfile(os.path.join(p_src, "scheduler", "scheduler_config.json"),
                            os.path.join(p_out, "scheduler_config.json"))
        else:
            u = convert_diffusers.load_uncond_embeddings(os.path.join(p_src, "uncond_embeddings.bin"))
            width = unet_cfg.cross_attention_dim[0]
            if u.shape[-1] != width:
                raise ValueError(f"{p_src}/uncond_embeddings.bin: width {u.shape[-1]} != UNet cross_attention_dim "
                                 f"{width}")
            np.save(os.path.join(p_out, "uncond_embeddings.npy"), u.astype(np.float32))
    return {"files": steps, "highres": highres}


def convert_highres_pixel_decoding(src: str, out: str, tokenizer_config, dtype: str, log) -> dict:
    return convert_pixel_decoding(src, out, tokenizer_config, dtype, log, folder="highres_pixel_decoding")


PARTS = {
    "visual_tokenizer": convert_visual_tokenizer,
    "language_model": convert_language_model,
    "pixel_decoding": convert_pixel_decoding,
    "highres_pixel_decoding": convert_highres_pixel_decoding,
}


def convert(src: str, out: str, tokenizer_config, dtype: str = "bfloat16", overwrite: bool = False,
            log=print) -> dict:
    """Converts every part present in ``src``; returns the manifest written to OUT/lavit.json.

    ``tokenizer_config`` gives the visual tokenizer's widths (``configs/lavit_7b.py`` for the release).
    """
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory not found: {src}")
    if os.path.abspath(out) == src or os.path.abspath(out).startswith(src + os.sep):
        raise ValueError(f"--out {out} must not be inside --src {src}: the source is never modified")
    tokenizer_config = freeze(tokenizer_config, scan_layers=True)  # stored in the stacked layout
    present = [p for p in PARTS if os.path.isdir(os.path.join(src, p))]
    absent = [p for p in PARTS if p not in present]
    if not present:
        raise FileNotFoundError(f"{src}: none of the released parts found ({', '.join(PARTS)})")
    for p in absent:
        log(f"absent in source, not converted: {p}/")
    manifest = {"format": checkpoint.FORMAT, "dtype": dtype, "source": src, "layers": "stacked", "parts": {},
                "absent": absent}
    with checkpoint.atomic_output_dir(out, overwrite) as tmp:
        for part in present:
            t0 = time.time()
            manifest["parts"][part] = PARTS[part](src, tmp, tokenizer_config, dtype, log)
            log(f"converted {part}/ in {time.time() - t0:.1f}s")
        with open(os.path.join(tmp, checkpoint.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
    return manifest
