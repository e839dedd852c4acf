"""Video-LaVIT's video detokenizer: keyframe + motion tokens -> 24 frames, under ``jit``.

    det = load_video_detokenizer(root, cfg.motion_tokenizer, cfg.detokenizer.motion_encoder)  # convert/
    settings = VideoSampling.from_config(cfg.detokenizer.sampling)           # configs/video_lavit.py
    out = reconstruct_from_token(det, keyframe, codes, settings, height=320, width=576)
    out["frames_uint8"]                                                      # [B, 24, 320, 576, 3] uint8

As the release's ``VideoDetokenizer.reconstruct_from_token(decode_from_token=True)``:
1. motion latents [B, F, h, w, 2]: the motion tokenizer decodes the 135 codes, PyTorch-bicubic to the
   latent size (h, w) = (H, W) / vae_scale_factor, / motion_scale;
2. motion context [B, F, gh*gw, D]: the latents bicubic-resized to the condition grid (16 x 16), then
   the motion condition encoder;
3. keyframe latents: the keyframe [B, H, W, 3] in [-1, 1] plus ``noise_aug`` x N(0, 1) (the first noise
   draw), the temporal VAE's posterior mode, unscaled, repeated over the F frames;
4. classifier-free guidance batches [uncond; cond] with the motion context, keyframe latents and motion
   latents all zeroed in uncond; added time ids (fps, motion_bucket_id, noise_aug) for both halves;
5. SVD's Euler sampler (v-prediction, Karras sigmas, continuous timesteps 0.25 ln sigma, the
   scheduler config's spacing) from N(0, 1) x init_noise_sigma (the second draw); the UNet sees
   [scaled latents, keyframe latents, motion latents] on the channel axis (4 + 4 + 2); guidance
   ``u + g_f (c - u)`` with g rising linearly per frame from min_guidance to max_guidance;
6. the temporal VAE decodes latents / scaling_factor ``decode_chunk`` frames at a time; frames in
   [-1, 1] -> uint8 by ``round(clip(x / 2 + 0.5, 0, 1) * 255)``.
Latents stay float32 whatever the UNet dtype. Three compiled functions: the conditions (steps 1-4),
one guided step (``jit_step``, driven from Python once per step: the step is nearly all the work, and
the loop gives ``progress`` bars and ``trajectory`` for free) and the VAE decode (``jit_decode``).
``trajectory=True`` also returns every step's UNet output and latents.

The scheduler: ``svd_scheduler_config`` / ``svd_schedule`` extend ``schedulers.make_schedule``'s Euler
with what SVD's ``EulerDiscreteScheduler`` config adds (``use_karras_sigmas``, ``sigma_min``/``sigma_max``,
``timestep_type``); the update and ``scale_model_input`` are ``schedulers``'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from lavit_jax.inference import schedulers
from lavit_jax.models.motion_encoder import MotionConditionEncoder, to_grid
from lavit_jax.models.motion_tokenizer import MotionTokenizer
from lavit_jax.models.vae_temporal import AutoencoderKLTemporalDecoder, decode_video
from lavit_jax.models.video_unet import UNetSpatioTemporalConditionModel

# --------------------------------------------------------------------------------------------------
# SVD's Euler schedule
# --------------------------------------------------------------------------------------------------

_KARRAS_RHO = 7.0  # diffusers' _convert_to_karras (the EDM paper's rho)


def svd_scheduler_config(diffusers_config: dict) -> ml_collections.FrozenConfigDict:
    """An ``EulerDiscreteScheduler`` ``scheduler_config.json`` dict -> frozen config (kind 'euler') with
    ``use_karras_sigmas``, ``sigma_min``, ``sigma_max`` and ``timestep_type`` ('discrete'/'continuous').

    Everything else is validated by ``schedulers.scheduler_config``; raises ValueError naming the field.
    """
    d = dict(diffusers_config)
    name = d.get("_class_name", "EulerDiscreteScheduler")
    if name != "EulerDiscreteScheduler":
        raise ValueError(f"scheduler config '_class_name'={name!r}: the video detokenizer samples with "
                         "EulerDiscreteScheduler")
    karras = bool(d.pop("use_karras_sigmas", False))
    timestep_type = d.pop("timestep_type", "discrete")
    sigma_min, sigma_max = d.pop("sigma_min", None), d.pop("sigma_max", None)
    if timestep_type not in ("discrete", "continuous"):
        raise ValueError(f"scheduler config field 'timestep_type'={timestep_type!r} is not supported")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if v is not None and not float(v) > 0:
            raise ValueError(f"scheduler config field {name!r}={v!r} must be positive")
    base = schedulers.scheduler_config(d, kind="euler").to_dict()
    base.update(use_karras_sigmas=karras, timestep_type=timestep_type,
                sigma_min=None if sigma_min is None else float(sigma_min),
                sigma_max=None if sigma_max is None else float(sigma_max))
    return ml_collections.FrozenConfigDict(base)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: the fractional train timestep of each sigma (log-linear interpolation)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def svd_schedule(config, num_steps: int) -> schedulers.Schedule:
    """The Euler schedule diffusers' ``EulerDiscreteScheduler.set_timesteps(num_steps)`` gives for ``config``
    (from ``svd_scheduler_config``): timesteps [N], sigmas [N + 1], init_noise_sigma."""
    ts = schedulers.inference_timesteps(config, num_steps)
    ac = schedulers.alphas_cumprod(config)
    train_sigmas = ((1 - ac) / ac) ** 0.5  # float32
    log_sigmas = np.log(train_sigmas)
    sig = np.interp(ts.astype(np.float64), np.arange(len(train_sigmas)), train_sigmas)
    if config.use_karras_sigmas:
        smin = config.sigma_min if config.sigma_min is not None else float(sig[-1])
        smax = config.sigma_max if config.sigma_max is not None else float(sig[0])
        ramp = np.linspace(0, 1, num_steps)
        lo, hi = smin ** (1 / _KARRAS_RHO), smax ** (1 / _KARRAS_RHO)
        sig = (hi + ramp * (lo - hi)) ** _KARRAS_RHO
        ts = _sigma_to_t(sig, log_sigmas).astype(np.float32)
    last = 0.0
    if config.final_sigmas_type == "sigma_min":
        last = ((1 - ac[0]) / ac[0]) ** 0.5
    sigmas = np.concatenate([sig, [last]]).astype(np.float32)
    if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
        ts = (np.float32(0.25) * np.log(sigmas[:-1])).astype(np.float32)
    smax = sigmas.max()
    if config.timestep_spacing in ("linspace", "trailing"):
        init = smax
    else:
        init = (smax**2 + np.float32(1)) ** np.float32(0.5)
    zeros = jnp.zeros((num_steps,), jnp.float32)
    return schedulers.Schedule(
        timesteps=jnp.asarray(ts, jnp.float32), alpha_t=zeros, alpha_prev=zeros, sigmas=jnp.asarray(sigmas),
        init_noise_sigma=jnp.float32(init), kind="euler", prediction_type=config.prediction_type,
    )


# --------------------------------------------------------------------------------------------------
# Settings and the detokenizer bundle
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How ``reconstruct_from_token`` samples (the release's values: ``configs/video_lavit.video_sampling_config``)."""

    num_frames: int
    steps: int
    min_guidance: float
    max_guidance: float
    fps: int
    motion_bucket_id: int
    noise_aug: float
    decode_chunk: int

    @classmethod
    def from_config(cls, cfg, **overrides) -> VideoSampling:
        """From a config with these fields (extra fields ignored); ``overrides`` replace single values."""
        values = {f.name: cfg[f.name] for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"VideoSampling: unknown fields {sorted(unknown)}")
        return cls(**values)

    def __post_init__(self):
        if self.num_frames < 1 or self.steps < 1 or self.decode_chunk < 1:
            raise ValueError(f"video sampling: num_frames, steps and decode_chunk must be positive ({self})")


def linear_guidance(num_frames: int, lo: float, hi: float) -> np.ndarray:
    """Per-frame guidance [F] float32 as ``torch.linspace(lo, hi, F)`` computes it (both ends exact)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if num_frames == 1:
        return np.array([lo32], np.float32)
    step = (hi32 - lo32) / np.float32(num_frames - 1)
    i = np.arange(num_frames)
    up = lo32 + step * i.astype(np.float32)
    down = hi32 - step * (num_frames - 1 - i).astype(np.float32)
    return np.where(i < num_frames // 2, up, down).astype(np.float32)


@struct.dataclass
class VideoDetokenizer:
    """The video detokenizer's modules (static) and params (pytree leaves)."""

    motion_tokenizer_params: dict
    motion_encoder_params: dict
    unet_params: dict
    vae_params: dict
    motion_tokenizer: MotionTokenizer = struct.field(pytree_node=False)
    motion_encoder: MotionConditionEncoder = struct.field(pytree_node=False)
    unet: UNetSpatioTemporalConditionModel = struct.field(pytree_node=False)
    vae: AutoencoderKLTemporalDecoder = struct.field(pytree_node=False)
    scheduler_config: ml_collections.FrozenConfigDict = struct.field(pytree_node=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latents for a (height, width) video; raises ValueError for a bad size."""
        f = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height < f or width < f or height % f or width % f:
            raise ValueError(f"video size {width}x{height} (width x height): both must be positive multiples of {f} "
                             f"(VAE factor {self.vae_scale_factor} x UNet depth)")
        return height // self.vae_scale_factor, width // self.vae_scale_factor


def build_video_detokenizer(*, motion_tokenizer_config, motion_encoder_config, unet_config, vae_config,
                            scheduler_config, motion_tokenizer_params, motion_encoder_params, unet_params, vae_params,
                            unet_dtype=jnp.float32, attention_impl: str | None = "auto") -> VideoDetokenizer:
    """The modules for the configs around the given params (on device): the 3D UNet computes in ``unet_dtype``."""
    unet_dtype = jnp.dtype(unet_dtype)
    return VideoDetokenizer(
        motion_tokenizer_params=motion_tokenizer_params, motion_encoder_params=motion_encoder_params,
        unet_params=unet_params, vae_params=vae_params,
        motion_tokenizer=MotionTokenizer(motion_tokenizer_config),
        motion_encoder=MotionConditionEncoder(motion_encoder_config),
        unet=UNetSpatioTemporalConditionModel(unet_config, dtype=unet_dtype, param_dtype=unet_dtype,
                                              attention_impl=attention_impl),
        vae=AutoencoderKLTemporalDecoder(vae_config),
        scheduler_config=scheduler_config,
    )


@struct.dataclass
class VideoCondition:
    """UNet inputs shared by every step, for [uncond; cond] (2B rows, negatives first).

    context [2B, F, S, D]; image_latents [2B, F, h, w, 4]; motion_latents [2B, F, h, w, 2]; time_ids [2B, 3].
    """

    context: jax.Array
    image_latents: jax.Array
    motion_latents: jax.Array
    time_ids: jax.Array


def _cfg_pair(x):
    return jnp.concatenate([jnp.zeros_like(x), x])


def video_condition(det: VideoDetokenizer, keyframe, codes, aug_noise, *, height: int, width: int, num_frames: int,
                    fps: float, motion_bucket_id: float, noise_aug: float):
    """Steps 1-4: keyframe [B, H, W, 3] in [-1, 1], motion codes [B, N], aug_noise [B, H, W, 3] ->
    (VideoCondition, motion latents [B, F, h, w, 2], keyframe latents [B, h, w, 4])."""
    h, w = det.latent_size(height, width)
    motion = det.motion_tokenizer.apply({"params": det.motion_tokenizer_params}, codes, h, w,
                                        method=MotionTokenizer.reconstruct_from_token)
    if motion.shape[1] != num_frames:
        raise ValueError(f"the motion tokenizer decodes {motion.shape[1]} frames, sampling asks for {num_frames}")
    grid = tuple(det.motion_encoder.config.grid)
    context = det.motion_encoder.apply({"params": det.motion_encoder_params}, to_grid(motion, grid))
    image = keyframe.astype(jnp.float32) + noise_aug * aug_noise.astype(jnp.float32)
    image_latents, _ = det.vae.apply({"params": det.vae_params}, image.astype(det.vae.dtype),
                                     method=AutoencoderKLTemporalDecoder.encode)
    b = keyframe.shape[0]
    frames_latents = jnp.broadcast_to(image_latents[:, None], (b, num_frames) + image_latents.shape[1:])
    ids = jnp.broadcast_to(jnp.asarray([fps, motion_bucket_id, noise_aug], jnp.float32), (2 * b, 3))
    cond = VideoCondition(context=_cfg_pair(context), image_latents=_cfg_pair(frames_latents),
                          motion_latents=_cfg_pair(motion.astype(jnp.float32)), time_ids=ids)
    return cond, motion, image_latents


def guided_video_step(det: VideoDetokenizer, schedule: schedulers.Schedule, cond: VideoCondition, i, x, guidance):
    """One step: UNet on [x; x] (scaled) + conditions, per-frame guidance, Euler update.

    x [B, F, h, w, 4] float32, guidance [B, F, 1, 1, 1] -> (x_next, UNet output [2B, F, h, w, 4] float32)."""
    inp = schedulers.scale_model_input(schedule, jnp.concatenate([x, x]), i)
    inp = jnp.concatenate([inp, cond.image_latents, cond.motion_latents], axis=-1)
    pred = det.unet.apply({"params": det.unet_params}, inp, schedule.timesteps[i], cond.context,
                          cond.time_ids).astype(jnp.float32)
    uncond, c = jnp.split(pred, 2)
    guided = uncond + guidance * (c - uncond)
    return schedulers.step(schedule, i, guided, x), pred


def frames_to_uint8(frames):
    """Frames in [-1, 1] -> uint8 as diffusers' ``VaeImageProcessor.postprocess`` + ``numpy_to_pil``."""
    return jnp.round(jnp.clip(frames / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def decode_frames(det: VideoDetokenizer, latents, decode_chunk: int):
    """Final latents [B, F, h, w, 4] -> (frames [B, F, H, W, 3] float32 in [-1, 1], uint8 frames)."""
    frames = decode_video(det.vae, det.vae_params, latents, decode_chunk)
    return frames, frames_to_uint8(frames)


# The three compiled functions ``reconstruct_from_token`` calls (module-level: shared by every detokenizer
# of the same config).
CONDITION_STATIC = ("height", "width", "num_frames", "fps", "motion_bucket_id", "noise_aug")
jit_condition = jax.jit(video_condition, static_argnames=CONDITION_STATIC)
jit_step = jax.jit(guided_video_step)
jit_decode = jax.jit(decode_frames, static_argnames=("decode_chunk",))


def reconstruct_from_token(det: VideoDetokenizer, keyframe, codes, settings: VideoSampling, *, height: int,
                           width: int, seed: int = 0, aug_noise=None, initial_noise=None, trajectory: bool = False,
                           progress: bool = False) -> dict:
    """Keyframe [B, H, W, 3] in [-1, 1] (H, W = height, width) + motion codes [B, N] (0..n_code-1) -> dict:

    frames [B, F, H, W, 3] float32 in [-1, 1] (the VAE output), frames_uint8, latents [B, F, h, w, 4],
    motion_latents [B, F, h, w, 2], image_latents [B, h, w, 4], condition (VideoCondition), schedule,
    guidance [F], and with ``trajectory`` noise_pred [S, 2B, F, h, w, 4] and step_latents [S, B, F, h, w, 4].
    ``aug_noise`` [B, H, W, 3] / ``initial_noise`` [B, F, h, w, 4] are the two standard-normal draws
    (default: from ``seed``).
    """
    keyframe = jnp.asarray(keyframe, jnp.float32)
    codes = jnp.asarray(codes, jnp.int32)
    b = keyframe.shape[0]
    h, w = det.latent_size(height, width)
    if keyframe.shape != (b, height, width, 3):
        raise ValueError(f"keyframe [B, H, W, 3] = {tuple(keyframe.shape)}: expected [{b}, {height}, {width}, 3]")
    if codes.ndim != 2 or codes.shape[0] != b:
        raise ValueError(f"motion codes [B, N] = {tuple(codes.shape)}: expected {b} rows")
    f = settings.num_frames
    k_aug, k_init = jax.random.split(jax.random.key(seed))
    if aug_noise is None:
        aug_noise = jax.random.normal(k_aug, keyframe.shape, jnp.float32)
    if initial_noise is None:
        initial_noise = jax.random.normal(k_init, (b, f, h, w, det.unet.config.out_channels), jnp.float32)
    aug_noise, initial_noise = jnp.asarray(aug_noise, jnp.float32), jnp.asarray(initial_noise, jnp.float32)
    if aug_noise.shape != keyframe.shape:
        raise ValueError(f"aug_noise {tuple(aug_noise.shape)}: expected the keyframe's shape {tuple(keyframe.shape)}")
    if initial_noise.shape != (b, f, h, w, det.unet.config.out_channels):
        raise ValueError(f"initial_noise {tuple(initial_noise.shape)}: expected "
                         f"{(b, f, h, w, det.unet.config.out_channels)}")
    schedule = svd_schedule(det.scheduler_config, settings.steps)
    g = linear_guidance(f, settings.min_guidance, settings.max_guidance)
    guidance = jnp.broadcast_to(jnp.asarray(g)[None, :, None, None, None], (b, f, 1, 1, 1))
    cond, motion, image_latents = jit_condition(
        det, keyframe, codes, aug_noise, height=height, width=width, num_frames=f, fps=float(settings.fps),
        motion_bucket_id=float(settings.motion_bucket_id), noise_aug=float(settings.noise_aug))
    x = initial_noise * schedule.init_noise_sigma
    preds, xs = [], []
    for i in tqdm(range(settings.steps), desc="video diffusion", unit="step", disable=not progress):
        x, pred = jit_step(det, schedule, cond, jnp.int32(i), x, guidance)
        if trajectory:
            preds.append(pred)
            xs.append(x)
    frames, frames_uint8 = jit_decode(det, x, decode_chunk=settings.decode_chunk)
    out = dict(frames=frames, frames_uint8=frames_uint8, latents=x, motion_latents=motion, image_latents=image_latents,
               condition=cond, schedule=schedule, guidance=jnp.asarray(g))
    if trajectory:
        out["noise_pred"], out["step_latents"] = jnp.stack(preds), jnp.stack(xs)
    return out
