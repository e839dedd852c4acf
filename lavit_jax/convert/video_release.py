"""The Video-LaVIT release's own parts -> converted lavit-jax parts (``converter.convert`` calls these).

Released (``rain1011/Video-LaVIT-v1``) -> converted::

    motion_tokenizer.bin                      -> motion_tokenizer/{params/}          (float32, as the release)
    video_3d_unet.bin (unet.*, motion_encoder.*) + video_detokenizer/{unet/config.json, vae/, scheduler/}
                                              -> video_detokenizer/{unet/, motion_encoder/, vae/,
                                                 unet_config.json, vae_config.json}  (UNet in --dtype, rest float32)
    language_model_sft/ (HF shards holding the LLaMA keys and, in the same shards, model.visual_tokenizer.*
                        and model.motion_tokenizer.*; or a LaVIT-style visual_weight.bin)
                                              -> language_model_sft/{params/, visual_weight/, motion_tokenizer/,
                                                 config.json, tokenizer files, text_tokenizer.json}
    image_detokenizer/ (SDXL-style keyframe decoder) -> highres_pixel_decoding/ (as LaVIT's highres decoder)

The motion tokenizer and motion condition encoder sizes that the weights do not store (heads, blocks per
stage, grids) come from the config file (``configs/video_lavit.py``: ``motion_tokenizer``,
``detokenizer.motion_encoder``, ``detokenizer.sampling``); every width the weights do store is checked
against it first. Unlike the release's non-strict load of ``video_3d_unet.bin``, a missing or unexpected
key is an error listing them all.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import llama as convert_llama
from lavit_jax.convert import motion_tokenizer as convert_motion
from lavit_jax.convert import tokenizer as convert_tokenizer
from lavit_jax.convert import torch_io
from lavit_jax.convert import video_detokenizer as convert_video
from lavit_jax.ops.config import as_dict, freeze

MOTION_FILE = convert_motion.MOTION_TOKENIZER_FILE
UNET_FILE = convert_video.VIDEO_3D_UNET_FILE
DETOKENIZER_DIR = convert_video.DETOKENIZER_DIR
SFT_DIR = checkpoint.SFT_LANGUAGE_MODEL
IMAGE_DETOKENIZER_DIR = "image_detokenizer"
SFT_VISUAL_PREFIX = "model.visual_tokenizer."
SFT_MOTION_PREFIX = "model.motion_tokenizer."
# converted part -> where it lives in the release (a file or a folder)
SOURCES = {checkpoint.MOTION_TOKENIZER: MOTION_FILE, checkpoint.VIDEO_DETOKENIZER: UNET_FILE, SFT_DIR: SFT_DIR}


def is_video_release(src: str) -> bool:
    return any(os.path.exists(os.path.join(src, p)) for p in (MOTION_FILE, UNET_FILE, SFT_DIR))


def video_configs(config, config_name: str):
    """(motion tokenizer, motion encoder, sampling) configs of a config file, frozen; a clear error if absent."""
    missing = [f for f in ("motion_tokenizer", "detokenizer") if f not in config]
    if missing or "motion_encoder" not in config.detokenizer or "sampling" not in config.detokenizer:
        raise ValueError(f"{config_name}: a Video-LaVIT release needs the motion_tokenizer, detokenizer.motion_encoder "
                         "and detokenizer.sampling sections (pass --config configs/video_lavit.py)")
    mt = freeze(config.motion_tokenizer, scan_layers=True)
    me = freeze(config.detokenizer.motion_encoder, scan_layers=True)
    return mt, me, config.detokenizer.sampling


# ------------------------------------------------------------------------------------------ preflight


def _check_width(wrong: list, field: str, want, got, where: str):
    if got is not None and got != want:
        wrong.append(f"{field} = {want} but {where} has {got}")


def check_motion_widths(shapes: dict, mt_cfg, path: str, config_name: str, prefix: str = "") -> None:
    """The motion tokenizer's stored widths against the config (one error listing every field)."""
    wrong = []
    _check_width(wrong, "motion_tokenizer.width", mt_cfg.width, (shapes.get(prefix + "encoder.in_proj.weight")
                                                                 or (None,))[0], "encoder.in_proj.weight")
    q = shapes.get(prefix + "quantize.embedding.weight")
    if q is not None:
        _check_width(wrong, "motion_tokenizer.n_code", mt_cfg.n_code, q[0], "quantize.embedding.weight")
        _check_width(wrong, "motion_tokenizer.code_dim", mt_cfg.code_dim, q[1], "quantize.embedding.weight")
    blocks = {int(k[len(prefix):].split(".")[2]) for k in shapes
              if k.startswith(prefix + "encoder.blocks.") and k[len(prefix):].split(".")[2].isdigit()}
    if blocks:
        _check_width(wrong, "motion_tokenizer.blocks_per_stage x 4", mt_cfg.blocks_per_stage * 4, max(blocks) + 1,
                     "encoder.blocks.*")
    if wrong:
        raise ValueError(f"{path} does not match {config_name}: " + "; ".join(wrong))


def preflight(src: str, present, tokenizer_config, config, config_name: str, log=print) -> None:
    """Checks every video part before anything is written; raises naming the file or config field."""
    from lavit_jax.convert import converter

    mt_cfg, me_cfg, _ = video_configs(config, config_name)
    if checkpoint.MOTION_TOKENIZER in present:
        path = os.path.join(src, MOTION_FILE)
        check_motion_widths(converter._state_dict_shapes(path), mt_cfg, path, config_name)
    if checkpoint.VIDEO_DETOKENIZER in present:
        det = os.path.join(src, DETOKENIZER_DIR)
        converter._require(src, [MOTION_FILE])
        converter._require(det, ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"])
        unet_cfg = convert_video.read_video_unet_config(os.path.join(det, "unet"), motion_grid=tuple(me_cfg.grid))
        convert_video.read_temporal_vae_config(os.path.join(det, "vae"))
        convert_video.read_svd_scheduler_config(os.path.join(det, "scheduler"))
        for path in converter._diffusers_weight_files(os.path.join(det, "vae")):
            converter.check_weight_file(path)
        path = os.path.join(src, UNET_FILE)
        shapes = converter._state_dict_shapes(path)
        wrong = []
        _check_width(wrong, "detokenizer.motion_encoder.width", me_cfg.width,
                     (shapes.get("motion_encoder.in_proj.weight") or (None,))[0], "motion_encoder.in_proj.weight")
        _check_width(wrong, "detokenizer.motion_encoder.out_dim", me_cfg.out_dim,
                     (shapes.get("motion_encoder.out_proj.weight") or (None,))[0], "motion_encoder.out_proj.weight")
        if wrong:
            raise ValueError(f"{path} does not match {config_name}: " + "; ".join(wrong))
        if unet_cfg.cross_attention_dim[0] != me_cfg.out_dim:
            raise ValueError(f"{det}/unet/config.json: cross_attention_dim {unet_cfg.cross_attention_dim[0]} != "
                             f"{config_name} detokenizer.motion_encoder.out_dim {me_cfg.out_dim}")
    if SFT_DIR in present:
        lm = os.path.join(src, SFT_DIR)
        converter._require(lm, ("config.json", "tokenizer.model"))
        checkpoint.read_llama_config(lm)
        for path in convert_llama.hf_shard_files(lm):
            converter.check_weight_file(path)


# ------------------------------------------------------------------------------------------ parts


def convert_motion_tokenizer(src: str, out: str, tokenizer_config, dtype: str, log, *, config, config_name) -> dict:
    mt_cfg, _, _ = video_configs(config, config_name)
    params = convert_motion.load_motion_tokenizer(os.path.join(src, MOTION_FILE), mt_cfg, dtype="float32")
    from lavit_jax.convert.converter import save_tree

    save_tree(os.path.join(out, checkpoint.MOTION_TOKENIZER, "params"), params)
    return {"config": as_dict(mt_cfg)}


def convert_video_detokenizer(src: str, out: str, tokenizer_config, dtype: str, log, *, config, config_name) -> dict:
    from lavit_jax.convert.converter import save_tree

    _, me_cfg, sampling = video_configs(config, config_name)
    det = os.path.join(src, DETOKENIZER_DIR)
    d_out = os.path.join(out, checkpoint.VIDEO_DETOKENIZER)
    unet_cfg = convert_video.read_video_unet_config(os.path.join(det, "unet"), motion_grid=tuple(me_cfg.grid))
    unet_params, me_params = convert_video.load_video_3d_unet(os.path.join(src, UNET_FILE), unet_cfg, me_cfg)
    unet_params = _cast_floats(unet_params, dtype)
    save_tree(os.path.join(d_out, "unet"), unet_params)
    save_tree(os.path.join(d_out, "motion_encoder"), me_params)
    del unet_params, me_params
    _, vae_params = convert_video.load_temporal_vae(os.path.join(det, "vae"), dtype="float32")
    save_tree(os.path.join(d_out, "vae"), vae_params)
    shutil.copyfile(os.path.join(det, "unet", "config.json"), os.path.join(d_out, "unet_config.json"))
    shutil.copyfile(os.path.join(det, "vae", "config.json"), os.path.join(d_out, "vae_config.json"))
    scheduler = checkpoint.load_json_config(os.path.join(det, "scheduler"), "scheduler_config.json", dict,
                                            "scheduler config")
    return {"motion_encoder_config": as_dict(me_cfg), "scheduler_config": scheduler,
            "sampling": as_dict(sampling), "unet_dtype": dtype}


def _cast_floats(tree, dtype: str):
    import jax
    import jax.numpy as jnp

    np_dtype = np.dtype(jnp.dtype(dtype))
    return jax.tree.map(lambda a: np.asarray(a).astype(np_dtype), tree)


def _prefixed(files, prefixes) -> list[dict[str, np.ndarray]]:
    """For each prefix, {key without it: array} of the shards' tensors under it (one pass, a tensor at a time)."""
    out = [{} for _ in prefixes]
    for path in files:
        for key, value in torch_io.iter_tensors(path):
            for found, prefix in zip(out, prefixes, strict=True):
                if key.startswith(prefix):
                    found[key[len(prefix):]] = np.asarray(value)
    return out


def convert_language_model_sft(src: str, out: str, tokenizer_config, dtype: str, log, *, config,
                               config_name) -> dict:
    """language_model_sft/ -> the LLaMA as ``language_model/`` plus its understanding tokenizer weights
    (``visual_weight/``) and motion tokenizer (``motion_tokenizer/``) when its shards hold them."""
    from lavit_jax.convert import converter

    lm_src, lm_out = os.path.join(src, SFT_DIR), os.path.join(out, SFT_DIR)
    files = convert_llama.hf_shard_files(lm_src)
    # the release's tokenizers in the SFT shards; its visual one is preferred over a visual_weight.bin beside them
    visual, motion = _prefixed(files, (SFT_VISUAL_PREFIX, SFT_MOTION_PREFIX))
    if visual and "vit_proj.weight" not in visual:
        raise ValueError(f"{lm_src}: its {SFT_VISUAL_PREFIX}* keys have no vit_proj.weight (the understanding "
                         "projector)")
    entry = converter.convert_language_model(src, out, tokenizer_config, dtype, log, folder=SFT_DIR,
                                             ignore_prefixes=(SFT_VISUAL_PREFIX, SFT_MOTION_PREFIX),
                                             read_visual_weight=not visual)
    if visual:
        tree = convert_tokenizer.visual_weight_from_state_dict(visual, tokenizer_config, dtype,
                                                               source=f"{lm_src} ({SFT_VISUAL_PREFIX}*)")
        converter.save_tree(os.path.join(lm_out, "visual_weight"), tree)
        entry["visual_weight"] = True
    elif not entry["visual_weight"]:
        raise ValueError(f"{lm_src}: neither {SFT_VISUAL_PREFIX}* keys in its shards nor a visual_weight.bin: the "
                         "understanding projector (vit_proj) is missing")
    del visual
    entry["motion_tokenizer"] = bool(motion)
    if motion:
        mt_cfg, _, _ = video_configs(config, config_name)
        source = f"{lm_src} ({SFT_MOTION_PREFIX}*)"
        check_motion_widths({k: np.shape(v) for k, v in motion.items()}, mt_cfg, source, config_name)
        tree = convert_motion.convert_state_dict(motion, mt_cfg, source=source, dtype="float32")
        converter.save_tree(os.path.join(lm_out, "motion_tokenizer"), tree)
    return entry


def convert_image_detokenizer(src: str, out: str, tokenizer_config, dtype: str, log, **_) -> dict:
    from lavit_jax.convert import converter

    return converter.convert_pixel_decoding(src, out, tokenizer_config, dtype, log, folder="highres_pixel_decoding",
                                            source=IMAGE_DETOKENIZER_DIR)
