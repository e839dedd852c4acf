"""Guided diffusion sampling under one ``jit``, with LaVIT's conditions and negatives.

The sampling loop is a ``lax.fori_loop`` over the schedule: each step runs the UNet once on the
batch [uncond; cond] (2B), applies classifier-free guidance ``u + g * (c - u)`` and the scheduler
update. ``sample_images`` adds the VAE decode (float32 by default) in the same compiled function.

LaVIT conditions (DESIGN.md "Token decoder"):
- low-res (SD-1.5 UNet): cond = token decoder output [B, 256, 768] with an all-true mask; the
  negative is the stored ``uncond_embeddings.bin`` [1, L, 768] written into zero padding [B, 256, 768]
  with a mask that is true on its first L positions (``lowres_condition``).
- high-res (SDXL UNet): negatives are zeros for both prompt embeds and pooled embeds; time ids
  (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for both halves (``highres_condition``).

Progress bars: the default path is one compiled program with no host callback. With ``progress=True``
the same loop body is compiled once as a single step (the step index is traced) and driven from
Python, one dispatch per step, advancing a tqdm bar.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from PIL import Image
from tqdm.auto import tqdm

from lavit_jax.compile_cache import cached_jit
from lavit_jax.inference import schedulers
from lavit_jax.models.unet import UNet2DConditionModel
from lavit_jax.models.vae import AutoencoderKL, decode_to_images, vae_to_latents

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
                  crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None):
    """SDXL micro-conditioning -> float32 [batch, 6] in diffusers' ``_get_add_time_ids`` order
    ``original_size + crops_coords_top_left + target_size`` = (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w). Defaults as the release: original = target = (height, width), crop (0, 0)."""
    oh, ow = original_size or (height, width)
    top, left = crops_coords_top_left or (0, 0)
    th, tw = target_size or (height, width)
    row = jnp.asarray([oh, ow, top, left, th, tw], jnp.float32)
    return jnp.broadcast_to(row, (batch, 6))


def highres_condition(prompt_embeds, pooled, height: int, width: int,
                      original_size: tuple[int, int] | None = None,
                      crops_coords_top_left: tuple[int, int] | None = None,
                      target_size: tuple[int, int] | None = None) -> GuidedCondition:
    """SDXL condition. prompt_embeds [B, S, D], pooled [B, P]; zero negatives, shared time ids."""
    prompt_embeds, pooled = jnp.asarray(prompt_embeds), jnp.asarray(pooled)
    b = prompt_embeds.shape[0]
    ids = sdxl_time_ids(b, height, width, original_size, crops_coords_top_left, target_size)
    return GuidedCondition(
        context=jnp.concatenate([jnp.zeros_like(prompt_embeds), prompt_embeds]),
        text_embeds=jnp.concatenate([jnp.zeros_like(pooled), pooled]),
        time_ids=jnp.concatenate([ids, ids]),
    )


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def guided_step(unet: UNet2DConditionModel, params, schedule: schedulers.Schedule, condition: GuidedCondition,
                i, x, guidance_scale, key=None):
    """One guided sampler step: UNet on [x; x] with [uncond; cond], ``u + g * (c - u)``, scheduler update.

    x [B, h, w, C] float32 -> [B, h, w, C]; ``i`` (traced) indexes the schedule; ancestral noise uses
    ``fold_in(key, i)``.
    """
    inp = schedulers.scale_model_input(schedule, jnp.concatenate([x, x]), i)
    eps = unet.apply({"params": params}, inp, schedule.timesteps[i], condition.context, condition.mask,
                     condition.text_embeds, condition.time_ids).astype(jnp.float32)
    eps_uncond, eps_cond = jnp.split(eps, 2)
    guided = eps_uncond + jnp.asarray(guidance_scale, jnp.float32) * (eps_cond - eps_uncond)
    noise = None
    if schedule.needs_noise:
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    return schedulers.step(schedule, i, guided, x, noise)


def guided_sample(unet: UNet2DConditionModel, params, schedule: schedulers.Schedule, condition: GuidedCondition,
                  latents, guidance_scale, key=None, start_step=0):
    """Runs the whole sampler in one ``lax.fori_loop`` (jit this, or call ``sample_latents``).

    latents: initial latents [B, h, w, C] already multiplied by ``schedule.init_noise_sigma`` (or noised to
    step ``start_step`` by ``noised_latents``: the loop then runs from that step, traced).
    key: PRNG key for ancestral noise; unused by deterministic samplers. Returns float32 latents.
    """
    if schedule.needs_noise and key is None:
        raise ValueError(f"{schedule.kind} sampling (eta={schedule.eta}) needs a PRNG key")
    return jax.lax.fori_loop(
        jnp.asarray(start_step, jnp.int32), schedule.loop_steps,
        lambda i, x: guided_step(unet, params, schedule, condition, i, x, guidance_scale, key),
        latents.astype(jnp.float32))


@cached_jit(static_argnames=("unet", "vae", "vae_dtype"))
def _sample_and_decode(unet, vae, unet_params, vae_params, schedule, condition, latents, guidance_scale, key,
                       start_step, vae_dtype="float32"):
    z = guided_sample(unet, unet_params, schedule, condition, latents, guidance_scale, key, start_step)
    return decode_to_images(vae, vae_params, z, dtype=vae_dtype), z


_jit_step = jax.jit(guided_step, static_argnames=("unet",))
_jit_decode = jax.jit(decode_to_images, static_argnames=("model", "dtype"))


@partial(jax.jit, static_argnames=("unet",))
def sample_latents(unet, unet_params, schedule, condition, latents, guidance_scale, key=None):
    """Jitted ``guided_sample`` (the UNet module is static)."""
    return guided_sample(unet, unet_params, schedule, condition, latents, guidance_scale, key)


def initial_noise(key, batch: int, height: int, width: int, unet: UNet2DConditionModel, vae_scale_factor: int = 8):
    """Standard normal latents [batch, height/f, width/f, in_channels] (before init_noise_sigma)."""
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {vae_scale_factor}")
    shape = (batch, height // vae_scale_factor, width // vae_scale_factor, unet.config.in_channels)
    return jax.random.normal(key, shape, jnp.float32)


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

    @property
    def default_size(self) -> int:
        """The UNet's native image size: its ``sample_size`` (64 if unset) times the VAE factor."""
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    def generate(self, condition: GuidedCondition, *, num_steps: int = 25, guidance_scale: float = 5.0,
                 seed: int = 0, height: int | None = None, width: int | None = None, noise=None,
                 progress: bool = False, vae_dtype: str | None = "float32", eta: float = 0.0, latents=None,
                 start_step: int = 0):
        """Samples latents for ``condition`` and decodes them (the VAE in ``vae_dtype``, None: the VAE's own).

        noise: optional standard-normal latents [B, h, w, C] (else drawn from ``seed``); height/width
        default to the UNet's ``sample_size`` times the VAE factor. ``latents`` (with ``start_step``): start
        from these latents, already noised to step ``start_step`` of the ``num_steps`` schedule
        (``noised_latents``), instead of from noise. Returns (images [B, H, W, 3] float32 in [0, 1], final
        latents [B, h, w, C]).
        """
        if not 0 <= int(start_step) < num_steps:
            raise ValueError(f"start_step={start_step} must be in [0, num_steps={num_steps})")
        if start_step and latents is None:
            raise ValueError("start_step needs the latents noised to that step (noised_latents)")
        # Padded to a bucket with the real count traced: other step counts reuse the compiled sampler.
        schedule = schedulers.make_schedule(self.scheduler_config, num_steps, eta=eta)
        schedule = schedule.padded(schedulers.step_bucket(num_steps))
        key = jax.random.key(seed)
        noise_key, step_key = jax.random.split(key)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
        else:
            if noise is None:
                height = height or self.default_size
                width = width or self.default_size
                noise = initial_noise(noise_key, condition.batch, height, width, self.unet, self.vae_scale_factor)
            latents = jnp.asarray(noise, jnp.float32) * schedule.init_noise_sigma
        if not progress:
            return _sample_and_decode(self.unet, self.vae, self.unet_params, self.vae_params, schedule, condition,
                                      latents, guidance_scale, step_key, jnp.int32(start_step), vae_dtype=vae_dtype)
        z = latents
        for i in tqdm(range(int(start_step), num_steps), desc="diffusion", unit="step"):
            z = _jit_step(self.unet, self.unet_params, schedule, condition, jnp.int32(i), z, guidance_scale, step_key)
        return _jit_decode(self.vae, self.vae_params, z, dtype=vae_dtype), z


@cached_jit(static_argnames=("vae",))
def _encode_mode(vae, vae_params, images):
    mean, _ = vae.apply({"params": vae_params}, images, method=vae.encode)
    return vae_to_latents(mean, vae.config)


def noised_latents(pipe: DiffusionPipeline, images, num_steps: int, start_step: int, seed: int = 0, noise=None,
                   eta: float = 0.0):
    """Images [B, H, W, 3] in [-1, 1] -> their latents noised to step ``start_step`` of the ``num_steps``
    schedule, as Video-LaVIT's ``regenerate_noise`` makes them: the VAE posterior mode x scaling factor,
    the scheduler's ``add_noise`` at that step's timestep (``noise`` standard normal, else drawn from
    ``seed``), then x ``init_noise_sigma`` (the release multiplies once more; 1 for DDIM). For
    ``DiffusionPipeline.generate(latents=..., start_step=...)``."""
    schedule = schedulers.make_schedule(pipe.scheduler_config, num_steps, eta=eta)
    if not 0 <= int(start_step) < num_steps:
        raise ValueError(f"start_step={start_step} must be in [0, num_steps={num_steps})")
    x0 = _encode_mode(pipe.vae, pipe.vae_params, jnp.asarray(images, jnp.float32))
    if noise is None:
        noise = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    x = schedulers.add_noise_at(schedule, int(start_step), x0, jnp.asarray(noise, jnp.float32))
    return x * schedule.init_noise_sigma


def to_pil(images) -> list:
    """float images [B, H, W, 3] in [0, 1] -> list of PIL images (rounded to uint8 as diffusers does)."""
    arr = np.asarray(jax.device_get(images), np.float32)
    arr = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
