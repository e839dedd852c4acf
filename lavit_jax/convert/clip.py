"""transformers ``CLIPModel`` and diffusers ``StableDiffusionSafetyChecker`` weights -> Flax params.

A model folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (or a sharded
``*.index.json`` form of either; ``variant="fp16"`` reads ``model.fp16.safetensors`` etc.). Torch pickles
are read with ``weights_only=True``. Keys map onto ``lavit_jax.models.clip`` by name: ``embeddings.`` and
``encoder.`` are dropped, ``layers.N`` becomes ``layers_N`` (then stacked into ``layers`` for a scanned
model); Linear weights are transposed, the patch conv goes OIHW -> HWIO, LayerNorm weights become
``scale``. The ``position_ids`` buffers of old checkpoints are ignored, and the safety checker's legacy
``vision_model.vision_model.`` prefix is read as ``vision_model.``. Every missing, unexpected or
mis-shaped key is reported in one ``WeightMismatchError`` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.convert.torch_io import (
    WeightFileError,
    assign_params,
    conv_t,
    identity,
    index_shard_files,
    linear_t,
    load_weight_file,
    param_shapes,
)
from lavit_jax.models.clip import CLIPModel, clip_config_from_hf, dummy_inputs
from lavit_jax.ops.scan import relayout

_NORMS = ("layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm", "final_layer_norm")
_DROPPED = ("embeddings", "encoder")
_LEGACY_SAFETY_PREFIX = "vision_model.vision_model."
# (parent path, name) of the repeated encoder layers, stacked in the scanned layout.
CLIP_STACKS = ((("vision_model",), "layers"), (("text_model",), "layers"))
SAFETY_CHECKER_STACKS = ((("vision_model",), "layers"),)


def _if_ndim(transform, ndim):
    """Applies ``transform`` only to arrays of rank ``ndim`` (others pass through and are reported mis-shaped)."""
    return lambda w: transform(w) if w.ndim == ndim else w


def clip_key_to_flax(key: str):
    """transformers CLIP key -> (Flax path, transform), or None for the ignored ``position_ids`` buffers."""
    if key.endswith("position_ids"):
        return None
    parts: list[str] = []
    for p in key.split("."):
        if p in _DROPPED:
            continue
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf != "weight":
        return tuple(parts), identity  # biases, class_embedding, logit_scale, concept embeds, ...
    stem = tuple(parts[:-1])
    if owner in _NORMS:
        return stem + ("scale",), identity
    if owner == "patch_embedding":
        return stem + ("kernel",), _if_ndim(conv_t, 4)
    if owner == "token_embedding":
        return stem + ("embedding",), identity
    if owner == "position_embedding":
        return stem, identity
    return stem + ("kernel",), _if_ndim(linear_t, 2)


def safety_checker_key_to_flax(key: str):
    """diffusers safety checker key (current or legacy ``vision_model.vision_model.`` form) -> Flax path."""
    if key.startswith(_LEGACY_SAFETY_PREFIX):
        key = key[len("vision_model."):]
    return clip_key_to_flax(key)


def load_clip_config(path: str | os.PathLike):
    """``config.json`` of a transformers CLIP / safety checker folder (or the file) -> ``clip_config_from_hf``.

    A missing file, invalid JSON or an unsupported field gives an error naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP config not found: {path}")
    with open(path) as f:
        try:
            return clip_config_from_hf(json.load(f))
        except ValueError as e:  # json.JSONDecodeError included
            raise ValueError(f"{path}: {e}") from e


def _weight_names(variant: str | None) -> tuple[str, ...]:
    if variant:
        return (f"model.{variant}.safetensors", f"pytorch_model.{variant}.bin")
    return ("model.safetensors", "pytorch_model.bin")


def read_state_dict(path: str | os.PathLike, variant: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """(state dict, source) of a transformers model folder or of one weight file; ``source`` names the file
    (the ``*.index.json`` for sharded weights) for error messages."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return load_weight_file(path), path
    if not os.path.isdir(path):
        raise WeightFileError(f"model folder not found: {path}")
    names = _weight_names(variant)
    for name in names:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return load_weight_file(file), file
        index = file + ".index.json"
        if os.path.isfile(index):
            out: dict[str, np.ndarray] = {}
            for shard in index_shard_files(index):
                out.update(load_weight_file(shard))
            return out, index
    raise WeightFileError(f"no weights in {path} (looked for {', '.join(names)} and their *.index.json)")


def unrolled_param_shapes(model, *init_args) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {Flax path: shape} of ``model``'s params in the unrolled layout (``layers_i``), whatever its
    ``scan_layers``; no arrays are allocated."""
    model = model.clone(scan_layers=False)
    return param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"]))


def clip_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config, *, source: str,
                                scan_layers: bool = True, dtype=np.float32):
    """Flax params (numpy tree) of ``CLIPModel(config, scan_layers=...)`` from a transformers ``CLIPModel``
    state dict; ``source`` (the file) is named in errors."""
    shapes = unrolled_param_shapes(CLIPModel(config), *dummy_inputs(config))
    params = assign_params(state_dict, clip_key_to_flax, shapes, source=source, dtype=dtype)
    return relayout(params, CLIP_STACKS, scanned=scan_layers)


def load_clip(path: str | os.PathLike, *, dtype=jnp.float32, attention_impl: str | None = "auto",
              scan_layers: bool = True, variant: str | None = None):
    """(CLIPModel, params) from a transformers CLIP folder; params and compute in ``dtype``."""
    config = load_clip_config(path)
    state_dict, source = read_state_dict(path, variant)
    params = clip_params_from_state_dict(state_dict, config, source=source, scan_layers=scan_layers)
    model = CLIPModel(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl, scan_layers=scan_layers)
    return model, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def safety_checker_params_from_state_dict(state_dict: Mapping[str, np.ndarray], shapes, *, source: str,
                                          scan_layers: bool = True, dtype=np.float32):
    """Flax params (numpy tree) of a safety checker from a diffusers ``StableDiffusionSafetyChecker`` state
    dict. ``shapes``: the checker's flat param shapes in the unrolled layout (``unrolled_param_shapes``)."""
    params = assign_params(state_dict, safety_checker_key_to_flax, shapes, source=source, dtype=dtype)
    return relayout(params, SAFETY_CHECKER_STACKS, scanned=scan_layers)


def load_safety_checker_params(path: str | os.PathLike, shapes, *, scan_layers: bool = True,
                               variant: str | None = None, dtype=np.float32):
    """Safety checker params (numpy tree) from a diffusers ``safety_checker/`` folder (or one weight file)."""
    state_dict, source = read_state_dict(path, variant)
    return safety_checker_params_from_state_dict(state_dict, shapes, source=source, scan_layers=scan_layers,
                                                 dtype=dtype)
