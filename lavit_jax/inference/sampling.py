"""Guided diffusion sampling under one ``jit``, LaVIT's conditions and negatives, diffusers-folder loading.

The sampling loop is a ``lax.fori_loop`` over the schedule: each step runs the UNet once on the
batch [uncond; cond] (2B), applies classifier-free guidance ``u + g * (c - u)`` and the scheduler
update. ``sample_images`` adds the VAE decode (float32 by default) in the same compiled function.

LaVIT conditions (DESIGN.md "Token decoder"):
- low-res (SD-1.5 UNet): cond = token decoder output [B, 256, 768] with an all-true mask; the
  negative is the stored ``uncond_embeddings.bin`` [1, L, 768] written into zero padding [B, 256, 768]
  with a mask that is true on its first L positions (``lowres_condition``).
- high-res (SDXL UNet): negatives are zeros for both prompt embeds and pooled embeds; time ids
  (orig_h, orig_w, 0, 0, h, w) for both halves (``highres_condition``).

Progress bars: the default path has no host callback. With ``progress=True`` the same fori_loop is
compiled with a ``jax.debug.callback`` per step that advances a tqdm bar (a separate compiled variant:
still one jit, one dispatch).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lavit_jax.convert.torch_io import (
    WeightFileError,
    assign_params,
    index_shard_files,
    load_weight_file,
    param_shapes,
)
from lavit_jax.inference import schedulers
from lavit_jax.models.unet import UNet2DConditionModel, diffusers_rule, dummy_unet_inputs, load_unet_config
from lavit_jax.models.vae import AutoencoderKL, decode_to_images, load_vae_config

# --------------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class GuidedCondition:
    """UNet conditioning for [uncond; cond] stacked on the batch axis (2B rows, negatives first).

    context [2B, S, D]; mask [2B, S] bool or None; text_embeds [2B, P] and time_ids [2B, 6] (SDXL) or None.
    """

    context: jax.Array
    mask: jax.Array | None = None
    text_embeds: jax.Array | None = None
    time_ids: jax.Array | None = None

    @property
    def batch(self) -> int:
        return self.context.shape[0] // 2


def lowres_condition(cond, uncond_embeddings) -> GuidedCondition:
    """SD-1.5 condition. cond [B, S, D]; uncond_embeddings [L, D] or [1, L, D] with L <= S.

    The negative is zeros [B, S, D] with the first L rows replaced by ``uncond_embeddings``, masked to
    those L positions; the positive attends to all S positions.
    """
    cond = jnp.asarray(cond)
    b, s, d = cond.shape
    u = jnp.asarray(uncond_embeddings)
    if u.ndim == 3:
        u = u[0]
    if u.ndim != 2 or u.shape[1] != d or u.shape[0] > s:
        raise ValueError(f"uncond_embeddings shape {tuple(jnp.shape(uncond_embeddings))} does not fit a "
                         f"condition of shape [{b}, {s}, {d}] (need [L, {d}] with L <= {s})")
    n = u.shape[0]
    neg = jnp.zeros_like(cond).at[:, :n].set(u.astype(cond.dtype))
    neg_mask = jnp.broadcast_to(jnp.arange(s) < n, (b, s))
    return GuidedCondition(
        context=jnp.concatenate([neg, cond]),
        mask=jnp.concatenate([neg_mask, jnp.ones((b, s), bool)]),
    )


def sdxl_time_ids(batch: int, height: int, width: int, original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0)):
    """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, h, w) -> float32 [batch, 6]."""
    oh, ow = original_size or (height, width)
    row = jnp.asarray([oh, ow, crop_top_left[0], crop_top_left[1], height, width], jnp.float32)
    return jnp.broadcast_to(row, (batch, 6))


def highres_condition(prompt_embeds, pooled, height: int, width: int,
                      original_size: tuple[int, int] | None = None) -> GuidedCondition:
    """SDXL condition. prompt_embeds [B, S, D], pooled [B, P]; zero negatives, shared time ids."""
    prompt_embeds, pooled = jnp.asarray(prompt_embeds), jnp.asarray(pooled)
    b = prompt_embeds.shape[0]
    ids = sdxl_time_ids(b, height, width, original_size)
    return GuidedCondition(
        context=jnp.concatenate([jnp.zeros_like(prompt_embeds), prompt_embeds]),
        text_embeds=jnp.concatenate([jnp.zeros_like(pooled), pooled]),
        time_ids=jnp.concatenate([ids, ids]),
    )


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def guided_sample(unet: UNet2DConditionModel, params, schedule: schedulers.Schedule, condition: GuidedCondition,
                  latents, guidance_scale, key=None, progress: Callable | None = None):
    """Runs the whole sampler in one ``lax.fori_loop`` (jit this, or call ``sample_latents``).

    latents: initial latents [B, h, w, C] already multiplied by ``schedule.init_noise_sigma``.
    key: PRNG key for ancestral noise (step i uses ``fold_in(key, i)``); unused by deterministic samplers.
    progress: optional host function ``progress(i)`` called after each step via ``jax.debug.callback``.
    Returns float32 latents [B, h, w, C].
    """
    if schedule.needs_noise and key is None:
        raise ValueError(f"{schedule.kind} sampling (eta={schedule.eta}) needs a PRNG key")
    g = jnp.asarray(guidance_scale, jnp.float32)

    def body(i, x):
        inp = schedulers.scale_model_input(schedule, jnp.concatenate([x, x]), i)
        eps = unet.apply({"params": params}, inp, schedule.timesteps[i], condition.context, condition.mask,
                         condition.text_embeds, condition.time_ids).astype(jnp.float32)
        eps_uncond, eps_cond = jnp.split(eps, 2)
        guided = eps_uncond + g * (eps_cond - eps_uncond)
        noise = None
        if schedule.needs_noise:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        x = schedulers.step(schedule, i, guided, x, noise)
        if progress is not None:
            jax.debug.callback(progress, i)
        return x

    return jax.lax.fori_loop(0, schedule.num_steps, body, latents.astype(jnp.float32))


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("progress", "vae_float32"))
def _sample_and_decode(unet, vae, unet_params, vae_params, schedule, condition, latents, guidance_scale, key,
                       progress=None, vae_float32=True):
    z = guided_sample(unet, unet_params, schedule, condition, latents, guidance_scale, key, progress)
    return decode_to_images(vae, vae_params, z, float32=vae_float32), z


@partial(jax.jit, static_argnums=(0,), static_argnames=("progress",))
def sample_latents(unet, unet_params, schedule, condition, latents, guidance_scale, key=None, progress=None):
    """Jitted ``guided_sample`` (the UNet module and ``progress`` are static)."""
    return guided_sample(unet, unet_params, schedule, condition, latents, guidance_scale, key, progress)


def initial_noise(key, batch: int, height: int, width: int, unet: UNet2DConditionModel, vae_scale_factor: int = 8):
    """Standard normal latents [batch, height/f, width/f, in_channels] (before init_noise_sigma)."""
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {vae_scale_factor}")
    shape = (batch, height // vae_scale_factor, width // vae_scale_factor, unet.config.in_channels)
    return jax.random.normal(key, shape, jnp.float32)


# The active tqdm bar. The compiled loop calls ``_progress_tick`` (a fixed function, so a progress-enabled
# variant compiles once); the host side decides which bar it advances.
_ACTIVE_BAR: list = []


def _progress_tick(i):
    if _ACTIVE_BAR:
        _ACTIVE_BAR[-1].update(1)


@struct.dataclass
class DiffusionPipeline:
    """UNet + VAE + scheduler config, with their params. ``generate`` returns images in [0, 1]."""

    unet_params: dict
    vae_params: dict
    unet: UNet2DConditionModel = struct.field(pytree_node=False)
    vae: AutoencoderKL = struct.field(pytree_node=False)
    scheduler_config: object = struct.field(pytree_node=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def generate(self, condition: GuidedCondition, *, num_steps: int = 25, guidance_scale: float = 5.0,
                 seed: int = 0, height: int | None = None, width: int | None = None, noise=None,
                 progress: bool = False, vae_float32: bool = True, eta: float = 0.0):
        """Samples latents for ``condition`` and decodes them.

        noise: optional standard-normal latents [B, h, w, C] (else drawn from ``seed``); height/width
        default to the UNet's ``sample_size`` times the VAE factor. Returns (images [B, H, W, 3] float32 in
        [0, 1], final latents [B, h, w, C]).
        """
        schedule = schedulers.make_schedule(self.scheduler_config, num_steps, eta=eta)
        key = jax.random.key(seed)
        noise_key, step_key = jax.random.split(key)
        if noise is None:
            f = self.vae_scale_factor
            size = self.unet.config.sample_size or 64
            height = height or size * f
            width = width or size * f
            noise = initial_noise(noise_key, condition.batch, height, width, self.unet, f)
        latents = jnp.asarray(noise, jnp.float32) * schedule.init_noise_sigma
        if not progress:
            return _sample_and_decode(self.unet, self.vae, self.unet_params, self.vae_params, schedule, condition,
                                      latents, guidance_scale, step_key, vae_float32=vae_float32)
        from tqdm.auto import tqdm

        with tqdm(total=num_steps, desc="diffusion") as bar:
            _ACTIVE_BAR.append(bar)
            try:
                images, z = _sample_and_decode(self.unet, self.vae, self.unet_params, self.vae_params, schedule,
                                               condition, latents, guidance_scale, step_key,
                                               progress=_progress_tick, vae_float32=vae_float32)
                jax.block_until_ready(images)
            finally:
                _ACTIVE_BAR.pop()
        return images, z


def to_pil(images) -> list:
    """float images [B, H, W, 3] in [0, 1] -> list of PIL images (rounded to uint8 as diffusers does)."""
    from PIL import Image

    arr = np.asarray(jax.device_get(images), np.float32)
    arr = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------------------------------
# Loading diffusers folders
# --------------------------------------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusers_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a diffusers model folder: ``diffusion_pytorch_model.{safetensors,bin}`` or their
    sharded ``*.index.json`` form. Torch pickles are read with ``weights_only=True``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise WeightFileError(f"diffusers model folder not found: {folder}")
    for name in _WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_weight_file(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            out: dict[str, np.ndarray] = {}
            for shard in index_shard_files(index):
                out.update(load_weight_file(shard))
            return out
    raise WeightFileError(f"no weights in {folder} (looked for {', '.join(_WEIGHT_NAMES)} and *.index.json)")


def params_from_state_dict(model, init_args, state_dict, *, source: str, dtype=jnp.float32):
    """Flax params for ``model`` (UNet or VAE) from a diffusers state dict {key: array}.

    init_args: example inputs for ``model.init`` (only their shapes matter). Raises one
    ``WeightMismatchError`` listing every missing, unexpected and mis-shaped key.
    """
    shapes = param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args)["params"]))
    params = assign_params(state_dict, diffusers_rule(shapes), shapes, source=source, dtype=np.float32)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def unet_init_args(config, batch: int = 1):
    """Small example inputs for ``UNet2DConditionModel.init``."""
    hw = (2 ** (len(config.block_out_channels) - 1),) * 2
    return dummy_unet_inputs(config, batch, hw, 1)


def vae_init_args(config):
    """Small example inputs for ``AutoencoderKL.init``."""
    f = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, f, f, config.in_channels), jnp.float32),)


def _assign(model, init_args, folder, dtype):
    sd = load_diffusers_state_dict(folder)
    return params_from_state_dict(model, init_args, sd, source=os.fspath(folder), dtype=dtype)


def load_unet(folder: str | os.PathLike, *, dtype=jnp.float32, attention_impl: str | None = "auto"):
    """(UNet2DConditionModel, params) from a diffusers ``unet/`` folder; params cast to ``dtype``."""
    cfg = load_unet_config(folder)
    model = UNet2DConditionModel(cfg, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
    return model, _assign(model, unet_init_args(cfg), folder, dtype)


def load_vae(folder: str | os.PathLike, *, dtype=jnp.float32):
    """(AutoencoderKL, params) from a diffusers ``vae/`` folder; params cast to ``dtype``."""
    cfg = load_vae_config(folder)
    model = AutoencoderKL(cfg, dtype=dtype, param_dtype=dtype)
    return model, _assign(model, vae_init_args(cfg), folder, dtype)


def load_uncond_embeddings(path: str | os.PathLike) -> np.ndarray:
    """LaVIT's ``uncond_embeddings.bin`` (a bare tensor [1, L, 768], read with weights_only=True) -> [L, 768]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"uncond embeddings not found: {path}")
    import torch

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if isinstance(t, dict) and len(t) == 1:
        t = next(iter(t.values()))
    if not hasattr(t, "detach") or t.ndim not in (2, 3) or (t.ndim == 3 and t.shape[0] != 1):
        raise WeightFileError(f"{path}: expected a tensor [1, L, D] or [L, D], got "
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
    sched = schedulers.load_scheduler_config(os.path.join(folder, "scheduler"), kind=scheduler_kind)
    return DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet, vae=vae,
                             scheduler_config=sched)
