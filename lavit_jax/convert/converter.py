"""A released LaVIT directory (PyTorch) -> a converted lavit-jax directory (Orbax trees + config files).

``convert(src, out, tokenizer_config, dtype)`` converts every released part present in ``src``
(layout in ``lavit_jax/checkpoint.py``). First, before anything is written, ``preflight`` checks
every part: its files exist and are whole (zip directories, safetensors headers), its configs parse,
the tokenizer widths in the weights match ``tokenizer_config`` and the text tokenizer loads. Then
one part at a time goes into a temporary sibling directory that becomes ``out`` only when the whole
conversion succeeded (``lavit_jax.fsutil.atomic_output_dir``); ``lavit.json`` is written last. The
source is only read, and ``out`` may neither contain it nor lie in it; an existing ``out`` is
replaced (``overwrite``) only when it is a lavit-jax checkpoint. ``tools/convert_torch_weights.py``
is its command line.

Memory: tensors are read one at a time (torch pickles memory-mapped with ``weights_only=True``,
safetensors lazily) and cast to the target dtype as they are read; the resident set is about one
part's params in the target dtype plus one tensor in flight. Nothing in the files is executed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import zipfile

import numpy as np
from tqdm import tqdm

from lavit_jax import checkpoint, fsutil, vocab
from lavit_jax.convert import diffusers as convert_diffusers
from lavit_jax.convert import llama as convert_llama
from lavit_jax.convert import tokenizer as convert_tokenizer
from lavit_jax.convert import torch_io, video_release
from lavit_jax.data.text_tokenizer import FAST_FILE, load_text_tokenizer, save_fast_tokenizer
from lavit_jax.ops.config import as_dict, freeze

LANGUAGE_MODEL_COPY = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                       "special_tokens_map.json")
DIFFUSION_FOLDERS = {folder: name == "highres" for name, folder in checkpoint.DECODER_FOLDERS.items()}


def _bar(items, desc, unit="item"):
    """A tqdm bar on a terminal; plain ``desc: i/n units`` lines on stderr otherwise (logs, pipes)."""
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, file=sys.stderr)
    return _plain_progress(list(items), desc, unit)


def _plain_progress(items, desc, unit):
    t0 = time.time()
    for i, item in enumerate(items):
        yield item
        print(f"{desc}: {i + 1}/{len(items)} {unit}s ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)


class _SaveState:
    active = 0  # saves in flight
    failed = False


class _DropOrbaxNoise(logging.Filter):
    """Orbax's own ERROR records during (or after) a failing save: each repeats the error the save raises."""

    def filter(self, record):
        noisy = (_SaveState.active or _SaveState.failed) and record.levelno >= logging.ERROR
        return not (noisy and f"{os.sep}orbax{os.sep}" in record.pathname)


def _is_loop_closed(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _quiet_failed_saves() -> None:
    """When a save fails (disk full, read-only), Orbax's background threads log the error again and
    their callbacks print one 'Event loop is closed' traceback each, hundreds in all, after the error
    itself has reached the caller. Drops exactly those (installed once per process)."""
    if getattr(sys.excepthook, "_lavit_quiet", False):
        return
    logging.getLogger("absl").addFilter(_DropOrbaxNoise())
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, value, tb):
        if not _is_loop_closed(value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(unraisable):
        if not _is_loop_closed(unraisable.exc_value):
            unraisablehook(unraisable)

    quiet_excepthook._lavit_quiet = True
    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def save_tree(path: str, tree) -> None:
    """``checkpoint.save_tree`` with a write failure as one OSError naming the path and the cause."""
    _quiet_failed_saves()
    _SaveState.active += 1
    try:
        checkpoint.save_tree(path, tree)
    except Exception as e:
        _SaveState.failed = True
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, f"cannot write {path}: {os.strerror(n)}") from e
    finally:
        _SaveState.active -= 1


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
        save_tree(os.path.join(vt_out, name), tree)
        done.append(name)
        del tree
    return {"files": done, "config": as_dict(tokenizer_config)}


def convert_language_model(src: str, out: str, tokenizer_config, dtype: str, log, folder: str = "language_model",
                           ignore_prefixes=(), read_visual_weight: bool = True) -> dict:
    """language_model/ (or ``folder``) -> OUT/<folder>/{params/, visual_weight/, config.json, tokenizer.model,
    text_tokenizer.json}.

    ``visual_weight.bin`` (stage-2 merger + projector) becomes a partial tokenizer param tree that is
    laid over the tokenizer params for understanding. Keys under ``ignore_prefixes`` are not the LLM's.
    """
    lm_src = os.path.join(src, folder)
    lm_out = os.path.join(out, folder)
    _require(lm_src, ("config.json", "tokenizer.model"))
    cfg = checkpoint.read_llama_config(lm_src)
    files = convert_llama.hf_shard_files(lm_src)
    params = convert_llama.llama_params(lm_src, cfg, dtype, progress=lambda it, desc: _bar(it, desc, "shard"),
                                        ignore_prefixes=ignore_prefixes)
    os.makedirs(lm_out, exist_ok=True)
    save_tree(os.path.join(lm_out, "params"), params)
    del params
    for name in LANGUAGE_MODEL_COPY:
        if os.path.isfile(os.path.join(lm_src, name)):
            shutil.copyfile(os.path.join(lm_src, name), os.path.join(lm_out, name))
    save_fast_tokenizer(lm_src, os.path.join(lm_out, FAST_FILE))  # read without transformers at run time
    entry = {"config": as_dict(cfg), "shards": [os.path.basename(f) for f in files], "visual_weight": False}
    vw = os.path.join(lm_src, "visual_weight.bin")
    if read_visual_weight and os.path.isfile(vw):
        save_tree(os.path.join(lm_out, "visual_weight"),
                             convert_tokenizer.load_visual_weight(vw, tokenizer_config, dtype))
        entry["visual_weight"] = True
    elif not ignore_prefixes:
        log(f"  {folder}: visual_weight.bin absent; understanding will use tokenizer_encoder.bin's merger")
    return entry


def convert_pixel_decoding(src: str, out: str, tokenizer_config, dtype: str, log,
                           folder: str = "pixel_decoding", source: str | None = None) -> dict:
    """pixel_decoding/ (SD-1.5) or highres_pixel_decoding/ (SDXL) -> OUT/<folder>/{unet/, vae/,
    unet_config.json, vae_config.json, scheduler_config.json[, uncond_embeddings.npy]}. ``source``: the
    released folder when it is named otherwise (Video-LaVIT's ``image_detokenizer/``).

    The UNet is stored in ``dtype``; the VAE always in float32 (LaVIT decodes in float32).
    """
    highres = DIFFUSION_FOLDERS[folder]
    p_src = os.path.join(src, source or folder)
    p_out = os.path.join(out, folder)
    unet_cfg, vae_cfg, uncond = check_pixel_decoding(p_src, highres)
    os.makedirs(p_out, exist_ok=True)
    steps = ["unet", "vae", "scheduler"] + ([] if highres else ["uncond_embeddings"])
    for step in _bar(steps, folder, "part"):
        if step == "unet":
            tree = convert_diffusers.load_unet_params(os.path.join(p_src, "unet"), unet_cfg, dtype)
            save_tree(os.path.join(p_out, "unet"), tree)
            shutil.copyfile(os.path.join(p_src, "unet", "config.json"), os.path.join(p_out, "unet_config.json"))
            del tree
        elif step == "vae":
            tree = convert_diffusers.load_vae_params(os.path.join(p_src, "vae"), vae_cfg, "float32")
            save_tree(os.path.join(p_out, "vae"), tree)
            shutil.copyfile(os.path.join(p_src, "vae", "config.json"), os.path.join(p_out, "vae_config.json"))
            del tree
        elif step == "scheduler":
            shutil.copyfile(os.path.join(p_src, "scheduler", "scheduler_config.json"),
                            os.path.join(p_out, "scheduler_config.json"))
        else:
            np.save(os.path.join(p_out, "uncond_embeddings.npy"), uncond.astype(np.float32))
    return {"files": steps, "highres": highres}


def check_pixel_decoding(p_src: str, highres: bool):
    """Checks a diffusion folder's files and configs -> (unet config, vae config, uncond embeddings [L, D] or
    None for SDXL). The uncond embeddings (a small bare tensor) are read whole: a corrupt file is named here,
    before anything is converted."""
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
    if highres:
        return unet_cfg, vae_cfg, None
    path = os.path.join(p_src, "uncond_embeddings.bin")
    check_weight_file(path)
    uncond = convert_diffusers.load_uncond_embeddings(path)
    width = unet_cfg.cross_attention_dim[0]
    if uncond.shape[-1] != width:
        raise ValueError(f"{path}: width {uncond.shape[-1]} != UNet cross_attention_dim {width}")
    return unet_cfg, vae_cfg, uncond


def convert_highres_pixel_decoding(src: str, out: str, tokenizer_config, dtype: str, log) -> dict:
    return convert_pixel_decoding(src, out, tokenizer_config, dtype, log, folder="highres_pixel_decoding")


# The release keeps diffusers' safety checker (and its CLIP feature_extractor) under pixel_decoding/; both
# decoders use it (``lavit_for_generation.py``, ``check_safety``).
SAFETY_SOURCE = "pixel_decoding/safety_checker"
FEATURE_EXTRACTOR_SOURCE = "pixel_decoding/feature_extractor"


def convert_safety_checker(src: str, out: str, tokenizer_config, dtype: str, log) -> dict:
    """pixel_decoding/safety_checker/ (transformers-style CLIP vision weights + concept embeddings, diffusers'
    StableDiffusionSafetyChecker) [+ pixel_decoding/feature_extractor/] -> OUT/safety_checker/{params/,
    config.json[, preprocessor_config.json]}, float32 (the checker's threshold test is precision-sensitive)."""
    from lavit_jax.convert import clip as convert_clip
    from lavit_jax.inference import safety_checker as sc

    p_src = os.path.join(src, SAFETY_SOURCE)
    p_out = os.path.join(out, checkpoint.SAFETY_CHECKER)
    _require(p_src, ["config.json"])
    config = convert_clip.load_clip_config(p_src)
    model = sc.StableDiffusionSafetyChecker(config, scan_layers=True)
    shapes = convert_clip.unrolled_param_shapes(model, *sc.init_args(config))
    params = convert_clip.load_safety_checker_params(p_src, shapes, scan_layers=True)
    os.makedirs(p_out, exist_ok=True)
    save_tree(os.path.join(p_out, "params"), params)
    shutil.copyfile(os.path.join(p_src, "config.json"), os.path.join(p_out, "config.json"))
    files = ["params", "config.json"]
    pre = os.path.join(src, FEATURE_EXTRACTOR_SOURCE, "preprocessor_config.json")
    if os.path.isfile(pre):
        shutil.copyfile(pre, os.path.join(p_out, "preprocessor_config.json"))
        files.append("preprocessor_config.json")
    return {"files": files}


PARTS = {
    "visual_tokenizer": convert_visual_tokenizer,
    "language_model": convert_language_model,
    "pixel_decoding": convert_pixel_decoding,
    "highres_pixel_decoding": convert_highres_pixel_decoding,
    checkpoint.SAFETY_CHECKER: convert_safety_checker,
}
# Where each part lives in the released directory (default: a folder of the part's name).
PART_SOURCES = {checkpoint.SAFETY_CHECKER: SAFETY_SOURCE}


# ------------------------------------------------------------------------------------------ preflight


FORMAT_FAMILY = checkpoint.FORMAT.split("/")[0] + "/"
CHECKPOINT_KIND = f"a lavit-jax checkpoint ({checkpoint.MANIFEST} with format {FORMAT_FAMILY}*)"


def load_config_file(path: str):
    """``get_config()`` of a config file (``configs/*.py``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("lavit_config", path)
    if spec is None:
        raise ValueError(f"config file {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
    config = mod.get_config()
    if "tokenizer" not in config:
        raise ValueError(f"config file {path}: get_config() has no 'tokenizer' section (the tokenizer widths)")
    return config


def is_converted_checkpoint(path: str) -> bool:
    """True when ``path`` holds a lavit-jax checkpoint: ``lavit.json`` whose ``format`` is ours."""
    try:
        with open(os.path.join(path, checkpoint.MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(FORMAT_FAMILY)


def check_weight_file(path: str) -> None:
    """Cheap structural check that a weight file is whole: the safetensors header and data extent, or the
    zip directory of a torch pickle (a truncated zip has none). Legacy pickles are checked when read."""
    if not os.path.isfile(path):
        raise torch_io.WeightFileError(f"weight file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise torch_io.WeightFileError(f"weight file {path} is empty")
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith(".safetensors"):
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise torch_io.WeightFileError(f"weight file {path} is truncated or corrupt (bad safetensors header)")
            try:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise torch_io.WeightFileError(f"weight file {path} is corrupt (safetensors header: "
                                               f"{type(e).__name__})") from e
            if 8 + n + end > size:
                raise torch_io.WeightFileError(f"weight file {path} is truncated: {size} bytes, its header "
                                               f"describes {8 + n + end}")
            return
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise torch_io.WeightFileError(f"weight file {path} is truncated or corrupt ({e})") from e
        if any(i.header_offset + i.compress_size > size for i in infos):
            raise torch_io.WeightFileError(f"weight file {path} is truncated")
    elif head[:1] != b"\x80":  # a legacy torch pickle starts with the pickle protocol opcode
        raise torch_io.WeightFileError(f"weight file {path} is not a torch checkpoint (neither torch.save's zip "
                                       "format nor a pickle)")


def _state_dict_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a torch pickle, memory-mapped (tensor data is not read)."""
    check_weight_file(path)
    try:
        sd = torch_io.load_torch_object(path, mmap=True)
    except torch_io.WeightFileError:
        sd = torch_io.load_torch_object(path)  # a legacy (non-zip) pickle cannot be memory-mapped
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise torch_io.WeightFileError(f"weight file {path} holds a {type(sd).__name__}, not a state dict")
    return {str(k): tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def _depth(shapes, prefix: str) -> int | None:
    idx = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    idx = [int(i) for i in idx if i.isdigit()]
    return max(idx) + 1 if idx else None


def _dim(shapes, key: str, axis: int = 0) -> int | None:
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) > axis else None


def tokenizer_widths(vt_src: str) -> dict[str, tuple[object, str]]:
    """The visual tokenizer config fields the released files fix: {field: (value, file)}.

    Head counts are not among them (the fused qkv weights do not record them); MLP widths appear as
    ``*_mlp_hidden`` (``int(width * mlp_ratio)`` in the config).
    """
    files = convert_tokenizer.VISUAL_TOKENIZER_FILES
    found: dict[str, tuple[object, str]] = {}

    def put(field, value, name):
        if value is not None:
            found[field] = (value, name)

    name = files["encoder"]
    enc = _state_dict_shapes(os.path.join(vt_src, name))
    patch = _dim(enc, "patch_embed.proj.weight", 2)
    put("eva_width", _dim(enc, "patch_embed.proj.weight"), name)
    put("patch_size", patch, name)
    n_pos = _dim(enc, "pos_embed", 1)
    if patch and n_pos and math.isqrt(n_pos - 1) ** 2 == n_pos - 1:
        put("image_size", math.isqrt(n_pos - 1) * patch, name)
    put("eva_depth", _depth(enc, "blocks."), name)
    put("eva_mlp_hidden", _dim(enc, "blocks.0.mlp.fc1.weight"), name)
    name = files["tokenizer"]
    tok = _state_dict_shapes(os.path.join(vt_src, name))
    put("width", _dim(tok, "causal_encoder.norm.weight"), name)
    put("merger_depth", _depth(tok, "causal_encoder.blocks."), name)
    put("mlp_hidden", _dim(tok, "causal_encoder.blocks.0.mlp.fc1.weight"), name)
    put("n_code", _dim(tok, convert_tokenizer.CODEBOOK_KEY), name)
    put("code_dim", _dim(tok, convert_tokenizer.CODEBOOK_KEY, 1), name)
    put("llm_embed_dim", _dim(tok, "vit_proj.weight"), name)
    for kind in ("lowres_decoder", "highres_decoder"):
        name = files[kind]
        if not os.path.isfile(os.path.join(vt_src, name)):
            continue
        dec = _state_dict_shapes(os.path.join(vt_src, name))
        put("decoder_depth", _depth(dec, "blocks."), name)
        put("decoder_out_dim", _dim(dec, "decode_task_layer.2.weight"), name)
        if kind == "lowres_decoder":
            put("unet_dim_lowres", _dim(dec, "unet_proj.weight"), name)
        else:
            d1, d2 = _dim(dec, "unet_proj_1.weight"), _dim(dec, "unet_proj_2.weight")
            if d1 is not None and d2 is not None:
                put("unet_dims_highres", (d1, d2), name)
            put("pooled_dim", _dim(dec, "unet_attnpool.c_proj.weight"), name)
    return found


def check_tokenizer_widths(vt_src: str, config, config_name: str) -> None:
    """A short ValueError listing every width the weights fix that ``config`` gets wrong."""
    fields = ("eva_width", "patch_size", "image_size", "eva_depth", "width", "merger_depth", "n_code", "code_dim",
              "llm_embed_dim", "decoder_depth", "decoder_out_dim", "unet_dim_lowres", "pooled_dim")
    expected = {k: getattr(config, k) for k in fields}
    expected["unet_dims_highres"] = tuple(config.unet_dims_highres)
    expected["eva_mlp_hidden"] = int(config.eva_width * config.eva_mlp_ratio)
    expected["mlp_hidden"] = int(config.width * config.mlp_ratio)
    label = {"eva_mlp_hidden": "int(eva_width * eva_mlp_ratio)", "mlp_hidden": "int(width * mlp_ratio)"}
    wrong: dict[str, list[str]] = {}
    for field, (value, name) in tokenizer_widths(vt_src).items():
        want = expected.get(field)
        if want is not None and tuple(np.atleast_1d(want)) != tuple(np.atleast_1d(value)):
            wrong.setdefault(name, []).append(f"{label.get(field, field)} {value} (config: {want})")
    if wrong:
        raise ValueError(
            f"--config {config_name} does not fit {vt_src}; --config sets the tokenizer widths: pass a config file "
            "whose tokenizer has the weights' values (configs/lavit_7b.py is the release, configs/tiny.py the test "
            "fixture; head counts, which the weights do not store, come from it too). The weights have "
            + "; ".join(f"{name}: {', '.join(items)}" for name, items in wrong.items()))


def _diffusers_weight_files(folder: str) -> list[str]:
    for name in convert_diffusers.WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
        if os.path.isfile(path + ".index.json"):
            return torch_io.index_shard_files(path + ".index.json")
    raise torch_io.WeightFileError(f"no weights in {folder} (looked for "
                                   f"{', '.join(convert_diffusers.WEIGHT_NAMES)} and *.index.json)")


def preflight(src: str, parts, tokenizer_config, config_name: str = "the tokenizer config", log=print,
              sources=None) -> None:
    """Checks every part in ``parts`` before anything is converted; raises naming the file or field.
    ``sources``: {part: released folder} where a part's folder is named otherwise (default ``PART_SOURCES``)."""
    sources = PART_SOURCES if sources is None else sources
    if "visual_tokenizer" in parts:
        files = convert_tokenizer.VISUAL_TOKENIZER_FILES
        vt_src = os.path.join(src, "visual_tokenizer")
        _require(vt_src, [files["encoder"], files["tokenizer"]])
        check_tokenizer_widths(vt_src, tokenizer_config, config_name)
    if "language_model" in parts:
        lm_src = os.path.join(src, "language_model")
        _require(lm_src, ("config.json", "tokenizer.model"))
        cfg = checkpoint.read_llama_config(lm_src)
        for path in convert_llama.hf_shard_files(lm_src):
            check_weight_file(path)
        vw = os.path.join(lm_src, "visual_weight.bin")
        if os.path.isfile(vw):
            check_weight_file(vw)
        try:
            text = load_text_tokenizer(lm_src)
        except (OSError, ValueError) as e:
            raise ValueError(f"{lm_src}/tokenizer.model: not a readable sentencepiece model "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        if text.vocab_size < vocab.TEXT_VOCAB:
            log(f"warning: {lm_src}/tokenizer.model has {text.vocab_size} pieces, fewer than the "
                f"{vocab.TEXT_VOCAB} text ids of the LLM: ids {text.vocab_size}..{vocab.TEXT_VOCAB - 1} have no text")
        if cfg.vocab_size < vocab.VISUAL_OFFSET:
            raise ValueError(f"{lm_src}/config.json: vocab_size {cfg.vocab_size} is smaller than LaVIT's "
                             f"{vocab.VISUAL_OFFSET} text + special ids")
    for folder, highres in DIFFUSION_FOLDERS.items():
        if folder not in parts:
            continue
        p_src = os.path.join(src, sources.get(folder, folder))
        check_pixel_decoding(p_src, highres)
        for sub in ("unet", "vae"):
            for path in _diffusers_weight_files(os.path.join(p_src, sub)):
                check_weight_file(path)


DTYPES = ("bfloat16", "float32")


def _release_parts(src: str, video_config, config_name: str):
    """(part -> converter, part -> released folder or file) for the release at ``src``: LaVIT's parts, plus
    Video-LaVIT's (``convert/video_release.py``) when ``src`` holds them."""
    parts, sources = dict(PARTS), dict(PART_SOURCES)
    if not video_release.is_video_release(src):
        return parts, sources, False
    if video_config is None:
        raise ValueError(f"{src} is a Video-LaVIT release: pass its config (--config configs/video_lavit.py)")
    video_release.video_configs(video_config, config_name)  # the sections it needs, before anything else
    kw = dict(config=video_config, config_name=config_name)
    for part, fn in ((checkpoint.SFT_LANGUAGE_MODEL, video_release.convert_language_model_sft),
                     (checkpoint.MOTION_TOKENIZER, video_release.convert_motion_tokenizer),
                     (checkpoint.VIDEO_DETOKENIZER, video_release.convert_video_detokenizer),
                     ("highres_pixel_decoding", video_release.convert_image_detokenizer)):
        parts[part] = functools.partial(fn, **kw)
    sources.update(video_release.SOURCES)
    sources["highres_pixel_decoding"] = video_release.IMAGE_DETOKENIZER_DIR
    return parts, sources, True


def convert(src: str, out: str, tokenizer_config, dtype: str = "bfloat16", overwrite: bool = False,
            log=print, config_name: str = "the tokenizer config", video_config=None) -> dict:
    """Converts every part present in ``src``; returns the manifest written to OUT/lavit.json.

    ``tokenizer_config`` gives the visual tokenizer's widths and head counts (``configs/lavit_7b.py``
    for the release); ``config_name`` names it in messages. A Video-LaVIT release also needs
    ``video_config`` (the whole ``configs/video_lavit.py`` config: its motion tokenizer, motion encoder and
    sampling sections). Everything is checked before anything is written; ``overwrite`` replaces an
    existing lavit-jax checkpoint at ``out``, nothing else.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = os.path.abspath(os.fspath(src))
    if not os.path.exists(src):
        raise FileNotFoundError(f"source directory not found: {src}")
    if not os.path.isdir(src):
        raise NotADirectoryError(f"--src {src} is not a directory (pass the released checkpoint's folder)")
    out = os.path.abspath(os.fspath(out))
    fsutil.check_disjoint(out, src)
    fsutil.check_output_dir(out, overwrite, is_converted_checkpoint, CHECKPOINT_KIND)
    parts, sources, video = _release_parts(src, video_config, config_name)
    present = [p for p in parts if os.path.exists(os.path.join(src, sources.get(p, p)))]
    absent = [p for p in parts if p not in present]
    if not present:
        raise FileNotFoundError(f"{src}: none of the released parts found ({', '.join(parts)})")
    for p in absent:
        name = sources.get(p, p)
        log(f"absent in source, not converted: {name}{'' if '.' in os.path.basename(name) else '/'}")
    tokenizer_config = freeze(tokenizer_config, scan_layers=True)  # stored in the stacked layout
    if "visual_tokenizer" in present:
        t = tokenizer_config
        log(f"tokenizer config: {config_name} (eva_width {t.eva_width}, eva_depth {t.eva_depth}, eva_heads "
            f"{t.eva_heads}, width {t.width}, heads {t.heads}, n_code {t.n_code})")
    preflight(src, present, tokenizer_config, config_name, log, sources)
    if video:
        video_release.preflight(src, present, tokenizer_config, video_config, config_name, log)
    manifest = {"format": checkpoint.FORMAT, "model": "video_lavit" if video else "lavit", "dtype": dtype,
                "source": src, "config_file": config_name, "layers": "stacked", "parts": {}, "absent": absent}
    with fsutil.atomic_output_dir(out, overwrite, replaceable=is_converted_checkpoint, kind=CHECKPOINT_KIND,
                                  protect=[src], log=log) as tmp:
        for part in present:
            t0 = time.time()
            manifest["parts"][part] = parts[part](src, tmp, tokenizer_config, dtype, log)
            log(f"converted {part}/ in {time.time() - t0:.1f}s")
        path = os.path.join(tmp, checkpoint.MANIFEST)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
    return manifest
