"""diffusers model folders (``unet/``, ``vae/``, ``scheduler/``) and LaVIT's ``uncond_embeddings.bin`` -> Flax.

diffusers keys map onto our module names by one rule: list indices joined with ``_``
(``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``), 4-D weights
are convs, 2-D linears, 1-D norm scales; pre-0.14 VAE attention names are renamed.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import torch_io
from lavit_jax.inference.sampling import DiffusionPipeline
from lavit_jax.models import unet as unet_lib
from lavit_jax.models import vae as vae_lib

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# Old-style diffusers attention names (VAE checkpoints written before diffusers 0.14).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_path(key: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1`` -> ("down_blocks_0", "resnets_1", "conv1")."""
    parts: list[str] = []
    for p in key.split("."):
        p = _LEGACY_ATTENTION.get(p, p)
        for q in p.split("."):
            if q.isdigit() and parts:
                parts[-1] = f"{parts[-1]}_{q}"
            else:
                parts.append(q)
    return tuple(parts)


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
    return torch_io.linear_t(w.reshape(w.shape[0], w.shape[1]))


def diffusers_rule(shapes: dict[tuple[str, ...], tuple[int, ...]]):
    """Rule for ``torch_io.assign_params``: diffusers key -> (Flax path, transform) by name and rank.

    A 1x1 conv weight whose Flax param is a Dense kernel (legacy VAE attention) is squeezed.
    """

    def rule(key: str):
        if not key.endswith((".weight", ".bias")):
            return diffusers_path(key), np.asarray
        stem, leaf = key.rsplit(".", 1)
        path = diffusers_path(stem)
        if leaf == "bias":
            return path + ("bias",), np.asarray
        kernel = path + ("kernel",)
        if kernel in shapes and len(shapes[kernel]) == 2:
            return kernel, (lambda w: _squeeze_1x1(w) if w.ndim == 4 else torch_io.linear_t(w))
        if kernel in shapes and len(shapes[kernel]) == 4:
            return kernel, torch_io.conv_t
        return path + ("scale",), np.asarray

    return rule


def load_diffusers_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a diffusers model folder: ``diffusion_pytorch_model.{safetensors,bin}`` or their
    sharded ``*.index.json`` form. Torch pickles are read with ``weights_only=True``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise torch_io.WeightFileError(f"diffusers model folder not found: {folder}")
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return torch_io.load_weight_file(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            out: dict[str, np.ndarray] = {}
            for shard in torch_io.index_shard_files(index):
                out.update(torch_io.load_weight_file(shard))
            return out
    raise torch_io.WeightFileError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)} and *.index.json)")


def params_from_state_dict(model, init_args, state_dict, *, source: str, dtype=jnp.float32):
    """Flax params (numpy, in ``dtype``) for ``model`` (UNet or VAE) from a diffusers state dict.

    The one diffusers param assembly: ``init_args`` are example inputs for ``model.init`` (only their
    shapes matter); every missing, unexpected and mis-shaped key is reported in one error.
    """
    shapes = torch_io.param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"]))
    return torch_io.assign_params(state_dict, diffusers_rule(shapes), shapes, source=source,
                                  dtype=np.dtype(jnp.dtype(dtype)))


def load_unet_params(folder, config, dtype=jnp.float32) -> dict:
    """UNet params (numpy, ``dtype``) from a diffusers ``unet/`` folder."""
    model = unet_lib.UNet2DConditionModel(config)
    return params_from_state_dict(model, unet_lib.example_inputs(config), load_diffusers_state_dict(folder),
                                  source=os.fspath(folder), dtype=dtype)


def load_vae_params(folder, config, dtype=jnp.float32) -> dict:
    """AutoencoderKL params (numpy, ``dtype``) from a diffusers ``vae/`` folder."""
    model = vae_lib.AutoencoderKL(config)
    return params_from_state_dict(model, vae_lib.example_inputs(config), load_diffusers_state_dict(folder),
                                  source=os.fspath(folder), dtype=dtype)


def load_unet(folder: str | os.PathLike, *, dtype=jnp.float32, attention_impl: str | None = "auto"):
    """(UNet2DConditionModel, params) from a diffusers ``unet/`` folder; params cast to ``dtype``."""
    cfg = checkpoint.read_unet_config(folder)
    model = unet_lib.UNet2DConditionModel(cfg, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
    return model, jax.tree.map(lambda a: jnp.asarray(a, dtype), load_unet_params(folder, cfg, dtype))


def load_vae(folder: str | os.PathLike, *, dtype=jnp.float32):
    """(AutoencoderKL, params) from a diffusers ``vae/`` folder; params cast to ``dtype``."""
    cfg = checkpoint.read_vae_config(folder)
    model = vae_lib.AutoencoderKL(cfg, dtype=dtype, param_dtype=dtype)
    return model, jax.tree.map(lambda a: jnp.asarray(a, dtype), load_vae_params(folder, cfg, dtype))


def load_uncond_embeddings(path: str | os.PathLike) -> np.ndarray:
    """LaVIT's ``uncond_embeddings.bin`` (a bare tensor [1, L, 768], read with weights_only=True) -> [L, 768]."""
    t = torch_io.load_torch_object(path)
    if isinstance(t, dict) and len(t) == 1:
        t = next(iter(t.values()))
    if not hasattr(t, "detach") or t.ndim not in (2, 3) or (t.ndim == 3 and t.shape[0] != 1):
        raise torch_io.WeightFileError(f"{os.fspath(path)}: expected a tensor [1, L, D] or [L, D], got "
                                       f"{getattr(t, 'shape', type(t).__name__)}")
    arr = t.detach().float().numpy()
    return arr[0] if arr.ndim == 3 else arr


def load_pipeline(folder: str | os.PathLike, *, dtype=jnp.bfloat16, scheduler_kind: str = "ddim",
                  attention_impl: str | None = "auto") -> DiffusionPipeline:
    """A diffusers pipeline folder (``unet/``, ``vae/``, ``scheduler/``) -> DiffusionPipeline.

    The UNet runs in ``dtype``; the VAE params are kept in float32 (LaVIT decodes in float32).
    ``scheduler_kind`` defaults to DDIM as LaVIT does, whatever class the folder's config names.
    """
    folder = os.fspath(folder)
    unet, unet_params = load_unet(os.path.join(folder, "unet"), dtype=dtype, attention_impl=attention_impl)
    vae, vae_params = load_vae(os.path.join(folder, "vae"), dtype=jnp.float32)
    sched = checkpoint.read_scheduler_config(os.path.join(folder, "scheduler"), kind=scheduler_kind)
    return DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet, vae=vae,
                             scheduler_config=sched)


