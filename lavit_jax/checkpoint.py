"""Converted checkpoints: the one module that knows their layout, end to end (the runtime reads only these).

Layout of a converted directory (``tools/convert_torch_weights.py`` writes it; ``LaVIT.from_pretrained``,
``train.py`` and ``eval.py`` read it through the loaders here)::

    OUT/lavit.json                       parts present, dtype, tokenizer config, layer layout
    OUT/visual_tokenizer/{tokenizer,lowres_decoder,highres_decoder}/   Orbax trees
    OUT/language_model/{params/, visual_weight/, config.json, tokenizer.model, text_tokenizer.json}
    OUT/pixel_decoding/{unet/, vae/, unet_config.json, vae_config.json, scheduler_config.json,
                        uncond_embeddings.npy}
    OUT/highres_pixel_decoding/{unet/, vae/, unet_config.json, vae_config.json, scheduler_config.json}
    OUT/safety_checker/{params/, config.json[, preprocessor_config.json]}   optional (the release's
                        pixel_decoding/safety_checker + feature_extractor): diffusers' StableDiffusionSafetyChecker

A Video-LaVIT checkpoint (``"model": "video_lavit"`` in the manifest; ``convert/video_release.py`` writes it)
has ``visual_tokenizer/``, ``language_model/`` and ``highres_pixel_decoding/`` (its keyframe decoder, from the
release's ``image_detokenizer/``) as above, and::

    OUT/language_model_sft/{params/, visual_weight/, motion_tokenizer/, config.json, text_tokenizer.json, ...}
                        the understanding LLM, its tokenizer weights (laid over visual_tokenizer/ for
                        understanding) and its own motion tokenizer (when its shards hold one)
    OUT/motion_tokenizer/params/        the motion VQ tokenizer (its config in the manifest entry)
    OUT/video_detokenizer/{unet/, motion_encoder/, vae/, unet_config.json, vae_config.json}
                        3D UNet, motion condition encoder, temporal VAE; the manifest entry holds the motion
                        encoder config, the scheduler config and the release's sampling settings

Repeated layers are stored stacked (the scanned layout, ``"layers": "stacked"`` in the manifest); a
model built with ``scan_layers=False`` gets them unstacked at load time.

A directory is complete only when ``lavit.json`` exists: it is written last, into a temporary
sibling directory that is renamed into place, so a failed run never leaves an output that looks
complete, and an existing output is replaced only after the new one is whole.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lavit_jax import fsutil
from lavit_jax.data.text_tokenizer import load_text_tokenizer
from lavit_jax.inference import schedulers
from lavit_jax.inference.detokenizer import Detokenizer
from lavit_jax.inference.sampling import DiffusionPipeline
from lavit_jax.inference.visual_tokenizer import VisualTokenizer
from lavit_jax.models import llama, unet, vae
from lavit_jax.models.token_decoder import DECODER_STACKS
from lavit_jax.models.tokenizer import TOKENIZER_STACKS
from lavit_jax.ops import quant, scan
from lavit_jax.ops.config import as_dict, freeze

SAFETY_CHECKER = "safety_checker"  # the optional part's folder
MANIFEST = "lavit.json"
FORMAT = "lavit-jax/1"
# Diffusion decoders: name -> converted (and released) folder.
DECODER_FOLDERS = {"lowres": "pixel_decoding", "highres": "highres_pixel_decoding"}


class CheckpointPartError(FileNotFoundError):
    """The converted checkpoint lacks a part a task needs."""


def save_tree(path: str, tree) -> None:
    """Saves a pytree of arrays with Orbax (synchronously)."""
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.abspath(path), tree)
        ckptr.wait_until_finished()
    except BaseException:
        with contextlib.suppress(Exception):  # a failed save: let its writer threads end before cleanup
            ckptr.close()
        raise
    ckptr.close()


def load_tree(path: str, *, dtype=None, sharding=None):
    """Restores a pytree saved by ``save_tree``: numpy arrays on the host, or, with ``dtype`` and/or
    ``sharding``, device arrays restored straight into that dtype and sharding (no host copy, no cast op)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted checkpoint part not found: {path}")
    ckptr = ocp.StandardCheckpointer()
    if dtype is None and sharding is None:
        return ckptr.restore(path)
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, jnp.dtype(dtype) if dtype is not None else m.dtype, sharding=sharding),
        meta)
    return ckptr.restore(path, target)


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{ckpt_dir} is not a converted lavit-jax checkpoint (no {MANIFEST}); "
            "convert the released weights with tools/convert_torch_weights.py")
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ config files


def load_json_config(path, filename: str, parse, what: str):
    """Reads ``filename`` inside folder ``path`` (or the file ``path``) and returns ``parse(dict)``.

    A missing file, invalid JSON or a value ``parse`` rejects (ValueError) gives an error naming the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return parse(json.load(f))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def read_unet_config(path) -> ml_collections.FrozenConfigDict:
    """A diffusers-style UNet ``config.json`` (a file or its folder)."""
    return load_json_config(path, "config.json", unet.unet_config, "UNet config")


def read_vae_config(path) -> ml_collections.FrozenConfigDict:
    """A diffusers-style VAE ``config.json`` (a file or its folder)."""
    return load_json_config(path, "config.json", vae.vae_config, "VAE config")


def read_scheduler_config(path, kind: str | None = None) -> ml_collections.FrozenConfigDict:
    """A diffusers-style ``scheduler_config.json`` (a file or its folder)."""
    return load_json_config(path, "scheduler_config.json", lambda d: schedulers.scheduler_config(d, kind),
                            "scheduler config")


def read_llama_config(path, **runtime) -> ml_collections.FrozenConfigDict:
    """An HF LLaMA ``config.json`` (a file or its folder) plus run-time knobs (``llama.llama_config``)."""
    return load_json_config(path, "config.json", lambda d: llama.llama_config(d, os.fspath(path), **runtime),
                            "LLaMA config")


def to_device(tree, dtype=None):
    """numpy tree -> jax arrays (optionally cast to ``dtype`` on the host; ``jax.device_put`` compiles nothing)."""
    np_dtype = None if dtype is None else jnp.dtype(dtype)
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a, dtype=np_dtype)), tree)


# ------------------------------------------------------------------------------------------ parts


def part_entry(ckpt_dir: str, part: str, task: str = "this task", manifest: dict | None = None) -> dict:
    """The manifest entry of ``part``; a ``CheckpointPartError`` naming the part and the task if absent."""
    manifest = manifest if manifest is not None else read_manifest(ckpt_dir)
    entry = manifest.get("parts", {}).get(part)
    if entry is None:
        have = ", ".join(manifest.get("parts", {})) or "none"
        raise CheckpointPartError(f"checkpoint {ckpt_dir} has no {part}/ part, needed for {task} "
                                  f"(converted parts: {have})")
    return entry


def tokenizer_config(ckpt_dir: str, **runtime) -> ml_collections.FrozenConfigDict:
    """The converted visual tokenizer's config with run-time overrides (dtype, attention_impl, remat, scan_layers)."""
    cfg = dict(part_entry(ckpt_dir, "visual_tokenizer", "the visual tokenizer")["config"])
    cfg["unet_dims_highres"] = tuple(cfg["unet_dims_highres"])
    cfg.setdefault("scan_layers", True)
    cfg.setdefault("remat", "none")
    return freeze(cfg, **runtime)


def load_visual_tokenizer(ckpt_dir: str, *, understanding: bool = False, decoders: bool = True, mesh=None,
                          understanding_part: str = "language_model", **runtime) -> VisualTokenizer:
    """The converted visual tokenizer with its token decoders (none read with ``decoders=False``).

    ``understanding`` lays the stage-2 merger + projector (``language_model/visual_weight``; Video-LaVIT's
    SFT model: ``understanding_part="language_model_sft"``) over the tokenizer params, as the reference
    does for understanding.
    """
    config = tokenizer_config(ckpt_dir, **runtime)
    entry = part_entry(ckpt_dir, "visual_tokenizer", "the visual tokenizer")
    root = os.path.join(ckpt_dir, "visual_tokenizer")
    params = scan.relayout(load_tree(os.path.join(root, "tokenizer")), TOKENIZER_STACKS, config.scan_layers)
    if understanding and part_entry(ckpt_dir, understanding_part, "understanding").get("visual_weight"):
        over = load_tree(os.path.join(ckpt_dir, understanding_part, "visual_weight"))
        params = _merge(params, scan.relayout(over, TOKENIZER_STACKS, config.scan_layers))
    dec = {name: scan.relayout(load_tree(os.path.join(root, f"{name}_decoder")), DECODER_STACKS, config.scan_layers)
           for name in DECODER_FOLDERS if decoders and f"{name}_decoder" in entry["files"]}
    return VisualTokenizer(config, params, dec, mesh)


def load_understanding_weights(ckpt_dir: str, *, scan_layers: bool = True) -> dict | None:
    """The stage-2 merger + projector (``language_model/visual_weight``) as a partial tokenizer param tree
    (numpy), or None if the checkpoint has none."""
    if not part_entry(ckpt_dir, "language_model", "the language model").get("visual_weight"):
        return None
    over = load_tree(os.path.join(ckpt_dir, "language_model", "visual_weight"))
    return scan.relayout(over, TOKENIZER_STACKS, scan_layers)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_language_model(ckpt_dir: str, *, dtype=None, part: str = "language_model", **runtime):
    """(LlamaForCausalLM, params in ``dtype`` (default: stored), TextTokenizer) of the converted LLM
    (``part="language_model_sft"``: Video-LaVIT's understanding model).

    ``weights="int8"`` (a run-time knob, as ``attention_impl``): the projections and LM head are quantised at
    load (``ops.quant.quantize_params``: int8 kernels + per-channel float32 scales)."""
    entry = part_entry(ckpt_dir, part, "the language model")
    root = os.path.join(ckpt_dir, part)
    dtype = jnp.dtype(dtype or read_manifest(ckpt_dir).get("dtype", "float32"))
    cfg = llama.llama_config(entry["config"], os.path.join(root, "config.json"),
                             **{"dtype": dtype.name, "param_dtype": dtype.name, **runtime})
    params = load_tree(os.path.join(root, "params"), dtype=dtype)  # straight into the compute dtype, on device
    params = scan.relayout(params, llama.LLAMA_STACKS, cfg.scan_layers)
    if cfg.weights == "int8":
        params = quant.quantize_params(params)
    return llama.LlamaForCausalLM(cfg), params, load_text_tokenizer(root)


def available_decoders(ckpt_dir: str) -> list[str]:
    """Decoders whose token decoder and diffusion folder were both converted."""
    manifest = read_manifest(ckpt_dir)
    parts = manifest.get("parts", {})
    vt = parts.get("visual_tokenizer", {})
    return [d for d, folder in DECODER_FOLDERS.items() if folder in parts and f"{d}_decoder" in vt.get("files", [])]


def decoder_geometry(ckpt_dir: str, decoder: str) -> tuple[int, int]:
    """(native image side in px: the UNet's ``sample_size`` (64 if unset) x the VAE factor, the factor image sides
    must be multiples of: VAE x UNet downsampling) of a converted decoder, from its configs (no weights read)."""
    root = os.path.join(ckpt_dir, DECODER_FOLDERS[decoder])
    unet_cfg = read_unet_config(os.path.join(root, "unet_config.json"))
    vae_cfg = read_vae_config(os.path.join(root, "vae_config.json"))
    vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
    return (unet_cfg.sample_size or 64) * vae_factor, vae_factor * 2 ** (len(unet_cfg.block_out_channels) - 1)


def load_pipeline(ckpt_dir: str, decoder: str, *, dtype=None, attention_impl: str | None = "xla",
                  scheduler_kind: str = "ddim") -> DiffusionPipeline:
    """The converted UNet (``dtype``, default: stored) + float32 VAE + scheduler of ``decoder``."""
    folder = DECODER_FOLDERS[decoder]
    part_entry(ckpt_dir, folder, f"image decoding with the {decoder} decoder")
    root = os.path.join(ckpt_dir, folder)
    dtype = jnp.dtype(dtype or read_manifest(ckpt_dir).get("dtype", "float32"))
    unet_cfg = read_unet_config(os.path.join(root, "unet_config.json"))
    vae_cfg = read_vae_config(os.path.join(root, "vae_config.json"))
    sched = read_scheduler_config(os.path.join(root, "scheduler_config.json"), kind=scheduler_kind)
    model = unet.UNet2DConditionModel(unet_cfg, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
    return DiffusionPipeline(unet_params=load_tree(os.path.join(root, "unet"), dtype=dtype),
                             vae_params=load_tree(os.path.join(root, "vae"), dtype=jnp.float32),
                             unet=model, vae=vae.AutoencoderKL(vae_cfg), scheduler_config=sched)


def load_detokenizer(ckpt_dir: str, decoder: str, *, tokenizer: VisualTokenizer | None = None, dtype=None,
                     attention_impl: str | None = "xla") -> Detokenizer:
    """Token decoder + diffusion pipeline of ``decoder`` ('lowres' SD-1.5 or 'highres' SDXL)."""
    if decoder not in DECODER_FOLDERS:
        raise ValueError(f"decoder {decoder!r} is not one of {tuple(DECODER_FOLDERS)}")
    vt = tokenizer or load_visual_tokenizer(ckpt_dir)
    if decoder not in vt.decoder_params:
        name = "highres_tokenizer_decoder.bin" if decoder == "highres" else "tokenizer_decoder.bin"
        raise CheckpointPartError(f"checkpoint {ckpt_dir} has no {decoder} token decoder "
                                  f"(visual_tokenizer/{name} was not converted)")
    pipe = load_pipeline(ckpt_dir, decoder, dtype=dtype, attention_impl=attention_impl)
    uncond = None
    if decoder == "lowres":
        uncond = np.load(os.path.join(ckpt_dir, DECODER_FOLDERS[decoder], "uncond_embeddings.npy"))
    return Detokenizer(vt.config, vt.params["quantize"]["embedding"], vt.decoder_params[decoder], pipe, decoder, uncond)


def load_safety_checker(ckpt_dir: str):
    """The converted safety checker (``inference.safety_checker.SafetyChecker``, float32, stacked layers)."""
    from lavit_jax.convert import clip as convert_clip
    from lavit_jax.inference import safety_checker as sc

    part_entry(ckpt_dir, SAFETY_CHECKER, "the safety checker")
    root = os.path.join(ckpt_dir, SAFETY_CHECKER)
    config = convert_clip.load_clip_config(root)
    model = sc.StableDiffusionSafetyChecker(config, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=True)
    pre = {}
    if os.path.isfile(os.path.join(root, "preprocessor_config.json")):
        with open(os.path.join(root, "preprocessor_config.json")) as f:
            pre = json.load(f)
    size = pre.get("size")
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = pre.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return sc.SafetyChecker(model, load_tree(os.path.join(root, "params"), dtype=jnp.float32), size=size,
                            crop_size=crop)


# ------------------------------------------------------------------------------------------ Video-LaVIT

MOTION_TOKENIZER = "motion_tokenizer"
VIDEO_DETOKENIZER = "video_detokenizer"
SFT_LANGUAGE_MODEL = "language_model_sft"


def motion_tokenizer_config(ckpt_dir: str, **runtime) -> ml_collections.FrozenConfigDict:
    """The converted motion tokenizer's config with run-time overrides (dtype, attention_impl, ...)."""
    cfg = dict(part_entry(ckpt_dir, MOTION_TOKENIZER, "the motion tokenizer")["config"])
    for k in ("down_strides", "down_pads", "up_factors"):
        cfg[k] = _tuples(cfg[k])
    return freeze(cfg, **runtime)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def load_motion_tokenizer(ckpt_dir: str, *, sft: bool = False, **runtime):
    """(MotionTokenizer, params on device) of ``motion_tokenizer/``, or with ``sft`` the SFT model's own
    (``language_model_sft/motion_tokenizer``, the one its understanding path tokenizes with) when it has one."""
    from lavit_jax.models.motion_tokenizer import MOTION_TOKENIZER_STACKS, MotionTokenizer

    config = motion_tokenizer_config(ckpt_dir, **runtime)
    path = os.path.join(ckpt_dir, MOTION_TOKENIZER, "params")
    if sft and part_entry(ckpt_dir, SFT_LANGUAGE_MODEL, "video understanding").get("motion_tokenizer"):
        path = os.path.join(ckpt_dir, SFT_LANGUAGE_MODEL, "motion_tokenizer")
    params = scan.relayout(load_tree(path), MOTION_TOKENIZER_STACKS, config.scan_layers)
    return MotionTokenizer(config), to_device(params)


def _video_entry(ckpt_dir: str) -> dict:
    return part_entry(ckpt_dir, VIDEO_DETOKENIZER, "video decoding")


def video_sampling_settings(ckpt_dir: str, **overrides):
    """The video detokenizer's sampling settings stored at conversion (``VideoSampling``), with ``overrides``
    (None values ignored)."""
    from lavit_jax.inference.video_sampling import VideoSampling

    return VideoSampling.from_config(_video_entry(ckpt_dir)["sampling"], **overrides)


def video_size_factor(ckpt_dir: str) -> int:
    """What video sides must be multiples of: the temporal VAE x the 3D UNet downsampling (configs only)."""
    root = os.path.join(ckpt_dir, VIDEO_DETOKENIZER)
    with open(os.path.join(root, "unet_config.json")) as f:
        unet_blocks = len(json.load(f)["block_out_channels"])
    with open(os.path.join(root, "vae_config.json")) as f:
        vae_blocks = len(json.load(f)["block_out_channels"])
    return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)


def load_video_detokenizer(ckpt_dir: str, *, unet_dtype=None, attention_impl: str | None = "auto"):
    """The converted video detokenizer (``inference.video_sampling.VideoDetokenizer``): motion tokenizer and
    motion condition encoder in float32, the 3D UNet in ``unet_dtype`` (default: stored), the temporal VAE in
    float32."""
    from lavit_jax.inference import video_sampling
    from lavit_jax.models import vae_temporal, video_unet
    from lavit_jax.models.motion_encoder import MOTION_ENCODER_STACKS

    entry = _video_entry(ckpt_dir)
    root = os.path.join(ckpt_dir, VIDEO_DETOKENIZER)
    unet_dtype = jnp.dtype(unet_dtype or read_manifest(ckpt_dir).get("dtype", "float32"))
    me_cfg = freeze(entry["motion_encoder_config"])
    me_cfg = freeze(me_cfg, grid=tuple(me_cfg.grid))
    unet_cfg = load_json_config(os.path.join(root, "unet_config.json"), "config.json",
                                lambda d: video_unet.video_unet_config(d, motion_grid=tuple(me_cfg.grid)),
                                "video UNet config")
    vae_cfg = load_json_config(os.path.join(root, "vae_config.json"), "config.json", vae_temporal.temporal_vae_config,
                               "temporal VAE config")
    mt_model, mt_params = load_motion_tokenizer(ckpt_dir)
    me_params = scan.relayout(load_tree(os.path.join(root, "motion_encoder")), MOTION_ENCODER_STACKS,
                              me_cfg.scan_layers)
    return video_sampling.build_video_detokenizer(
        motion_tokenizer_config=mt_model.config, motion_encoder_config=me_cfg, unet_config=unet_cfg,
        vae_config=vae_cfg, scheduler_config=video_sampling.svd_scheduler_config(entry["scheduler_config"]),
        motion_tokenizer_params=mt_params, motion_encoder_params=to_device(me_params),
        unet_params=load_tree(os.path.join(root, "unet"), dtype=unet_dtype),
        vae_params=load_tree(os.path.join(root, "vae"), dtype=jnp.float32), unet_dtype=unet_dtype,
        attention_impl=attention_impl)


# ------------------------------------------------------------------------------------------ writing


def write_checkpoint(out_dir: str, *, tokenizer_config, tokenizer, decoders=None, language_model=None,
                     pixel_decoding=None, overwrite: bool = False) -> dict:
    """Writes trained params as a converted checkpoint (the layout above), atomically; returns the manifest.

    tokenizer: the visual tokenizer's params (stacked layers); decoders: {'lowres' | 'highres': token decoder
    params}; language_model: dict(params, config (llama config), tokenizer_model (path of a sentencepiece
    file), visual_weight (partial tokenizer tree or None)); pixel_decoding: dict(unet, vae (params),
    unet_config, vae_config, scheduler_config (diffusers-style dicts), uncond (array [L, D])). float32.
    An existing ``out_dir`` is replaced only with ``overwrite`` and only when it holds a checkpoint.
    """
    def is_checkpoint(path):
        return os.path.isfile(os.path.join(path, MANIFEST))

    manifest = {"format": FORMAT, "dtype": "float32", "layers": "stacked", "parts": {}}
    with fsutil.atomic_output_dir(out_dir, overwrite, replaceable=is_checkpoint, kind="a lavit-jax checkpoint",
                                  flag="checkpoint") as tmp:
        vt = os.path.join(tmp, "visual_tokenizer")
        save_tree(os.path.join(vt, "tokenizer"), tokenizer)
        files = ["tokenizer"]
        for name, tree in (decoders or {}).items():
            save_tree(os.path.join(vt, f"{name}_decoder"), tree)
            files.append(f"{name}_decoder")
        cfg = as_dict(tokenizer_config)
        manifest["parts"]["visual_tokenizer"] = {"files": files, "config": cfg}
        if language_model is not None:
            lm = os.path.join(tmp, "language_model")
            save_tree(os.path.join(lm, "params"), language_model["params"])
            lcfg = as_dict(language_model["config"])
            with open(os.path.join(lm, "config.json"), "w") as f:
                json.dump(lcfg, f, indent=1)
            with open(language_model["tokenizer_model"], "rb") as src, \
                    open(os.path.join(lm, "tokenizer.model"), "wb") as dst:
                dst.write(src.read())
            vw = language_model.get("visual_weight")
            if vw is not None:
                save_tree(os.path.join(lm, "visual_weight"), vw)
            manifest["parts"]["language_model"] = {"config": lcfg, "shards": [], "visual_weight": vw is not None}
        if pixel_decoding is not None:
            pd = os.path.join(tmp, DECODER_FOLDERS["lowres"])
            save_tree(os.path.join(pd, "unet"), pixel_decoding["unet"])
            save_tree(os.path.join(pd, "vae"), pixel_decoding["vae"])
            for name in ("unet_config", "vae_config", "scheduler_config"):
                with open(os.path.join(pd, f"{name}.json"), "w") as f:
                    json.dump(as_dict(pixel_decoding[name]), f, indent=1)
            np.save(os.path.join(pd, "uncond_embeddings.npy"), np.asarray(pixel_decoding["uncond"], np.float32))
            manifest["parts"][DECODER_FOLDERS["lowres"]] = {
                "files": ["unet", "vae", "scheduler", "uncond_embeddings"], "highres": False}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
    return manifest
