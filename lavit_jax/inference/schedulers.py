"""Diffusion noise schedules as pure functions (DDPM training, DDIM / Euler / Euler-ancestral sampling).

They reproduce the diffusers schedulers built from the same ``scheduler_config.json``: the same
timesteps, sigmas, ``init_noise_sigma``, ``scale_model_input`` and update rules.

Usage::

    cfg = load_scheduler_config(folder, kind="ddim")     # LaVIT loads its schedulers as DDIM
    sched = make_schedule(cfg, num_steps=25)              # host-side, numpy -> a pytree of arrays
    x = noise * sched.init_noise_sigma
    for i in range(num_steps):                            # or inside lax.fori_loop (i may be traced)
        eps = unet(scale_model_input(sched, x, i), sched.timesteps[i])
        x = step(sched, i, eps, x, noise=...)             # noise only for ancestral / DDIM eta > 0

``kind`` is one of ``"ddim"``, ``"euler"``, ``"euler_ancestral"``, ``"ddpm"`` (training only:
``add_noise``, ``velocity``, ``training_target``). Missing config fields take the defaults of the
corresponding diffusers class, as ``<Class>.from_pretrained`` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

KINDS = ("ddim", "euler", "euler_ancestral", "ddpm")
_CLASS_KIND = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DDPMScheduler": "ddpm",
}
_COMMON_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False,
)
_DEFAULTS = {
    "ddim": dict(timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                 thresholding=False),
    "ddpm": dict(timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0, thresholding=False),
    "euler": dict(timestep_spacing="linspace", interpolation_type="linear", use_karras_sigmas=False,
                  use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete",
                  final_sigmas_type="zero"),
    "euler_ancestral": dict(timestep_spacing="linspace"),
}


def scheduler_config(diffusers_config: dict, kind: str | None = None) -> ml_collections.FrozenConfigDict:
    """A diffusers ``scheduler_config.json`` dict -> frozen config with ``kind`` and the class defaults.

    ``kind`` overrides ``_class_name`` (LaVIT builds a ``DDIMScheduler`` from an SDXL Euler config).
    Raises ValueError naming the field for unsupported options.
    """
    d = dict(diffusers_config)
    if kind is None:
        name = d.get("_class_name")
        if name not in _CLASS_KIND:
            raise ValueError(f"scheduler config '_class_name'={name!r}: pass kind= one of {KINDS}")
        kind = _CLASS_KIND[name]
    if kind not in KINDS:
        raise ValueError(f"scheduler kind {kind!r} is not one of {KINDS}")
    out = dict(_COMMON_DEFAULTS)
    out.update(_DEFAULTS[kind])
    for k in out:
        if k in d:
            out[k] = d[k]
    out["kind"] = kind
    if out["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2") and out["trained_betas"] is None:
        raise ValueError(f"scheduler config field 'beta_schedule'={out['beta_schedule']!r} is not supported")
    if out["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        raise ValueError(f"scheduler config field 'timestep_spacing'={out['timestep_spacing']!r} is not supported")
    if out["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"scheduler config field 'prediction_type'={out['prediction_type']!r} is not supported")
    if kind == "euler_ancestral" and out["prediction_type"] == "sample":
        raise ValueError("scheduler config field 'prediction_type'='sample' is not supported by euler_ancestral")
    for flag in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if out.get(flag):
            raise ValueError(f"scheduler config field {flag!r}=True is not supported")
    if kind == "euler":
        if out["interpolation_type"] != "linear":
            raise ValueError(f"scheduler config field 'interpolation_type'={out['interpolation_type']!r} "
                             "is not supported (only 'linear')")
        if out["timestep_type"] != "discrete":
            raise ValueError(f"scheduler config field 'timestep_type'={out['timestep_type']!r} is not supported")
        if out["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"scheduler config field 'final_sigmas_type'={out['final_sigmas_type']!r} "
                             "is not supported")
    if out["trained_betas"] is not None:
        out["trained_betas"] = tuple(float(b) for b in out["trained_betas"])
    return ml_collections.FrozenConfigDict(out)


# --------------------------------------------------------------------------------------------------
# Noise levels
# --------------------------------------------------------------------------------------------------


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def betas(config) -> np.ndarray:
    """[num_train_timesteps] float32 betas."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        b = np.asarray(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        b = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        b = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        b = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(config) -> np.ndarray:
    """[num_train_timesteps] float32 cumulative products of (1 - beta)."""
    return np.cumprod(1.0 - betas(config), dtype=np.float32)


def inference_timesteps(config, num_steps: int) -> np.ndarray:
    """The timesteps diffusers' ``set_timesteps(num_steps)`` gives (float32; integer-valued for DDIM)."""
    t_train = config.num_train_timesteps
    if not 1 <= num_steps <= t_train:
        raise ValueError(f"num_steps={num_steps} must be in [1, num_train_timesteps={t_train}]")
    spacing = config.timestep_spacing
    integer = config.kind in ("ddim", "ddpm")
    if spacing == "linspace":
        ts = np.linspace(0, t_train - 1, num_steps, dtype=np.float64 if integer else np.float32)[::-1]
        if integer:
            ts = ts.round()
    elif spacing == "leading":
        ratio = t_train // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1] + config.steps_offset
    else:  # trailing
        ts = np.round(np.arange(t_train, 0, -t_train / num_steps)) - 1
    if integer:
        ts = ts.astype(np.int64)
    return np.ascontiguousarray(ts).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Sampling schedules
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class Schedule:
    """Per-step arrays of a sampling schedule (a pytree; index with the step number, traced or not).

    timesteps [N]: what the UNet is given. DDIM: alpha_t / alpha_prev [N] (cumulative alphas of t and of
    the next, smaller timestep). Euler: sigmas [N + 1]. init_noise_sigma: scalar. ``steps``: the number
    of real steps (a traced int32 scalar) when the arrays are padded to a bucket length N by ``padded``,
    so that schedules of different step counts share one compiled sampler; None when unpadded.
    """

    timesteps: jax.Array
    alpha_t: jax.Array
    alpha_prev: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    steps: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="ddim")
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    clip_sample_range: float | None = struct.field(pytree_node=False, default=None)
    eta: float = struct.field(pytree_node=False, default=0.0)

    @property
    def num_steps(self) -> int:
        """Length of the per-step arrays (the bucket length when padded)."""
        return int(self.timesteps.shape[0])

    @property
    def loop_steps(self):
        """The number of steps to run: the traced ``steps`` when padded, else ``num_steps``."""
        return self.num_steps if self.steps is None else self.steps

    def padded(self, length: int) -> Schedule:
        """The same schedule with its arrays padded (by repeating their last entry) to ``length`` steps."""
        n = self.num_steps
        if length < n:
            raise ValueError(f"cannot pad a {n}-step schedule to {length} steps")

        def pad(x, extra):  # on the host, then one transfer: eager device ops compile once per shape
            x = np.asarray(x)
            return jax.device_put(np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x)

        return self.replace(timesteps=pad(self.timesteps, length - n), alpha_t=pad(self.alpha_t, length - n),
                            alpha_prev=pad(self.alpha_prev, length - n), sigmas=pad(self.sigmas, length - n),
                            steps=jax.device_put(np.int32(n)))

    @property
    def needs_noise(self) -> bool:
        """Whether ``step`` takes fresh noise (ancestral sampling, DDIM with eta > 0)."""
        return self.kind == "euler_ancestral" or (self.kind == "ddim" and self.eta > 0)


def step_bucket(num_steps: int) -> int:
    """The padded schedule length for ``num_steps``: the next power of two, at least 8."""
    return max(8, 1 << (int(num_steps) - 1).bit_length())


def make_schedule(config, num_steps: int, *, eta: float = 0.0) -> Schedule:
    """The sampling schedule for ``num_steps`` steps (``config.kind`` ddim, euler or euler_ancestral).

    The arrays are host (numpy) arrays: index them with a traced step inside ``jit`` (they become
    arguments), or pad them to a bucket with ``padded``.
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 sampling step")
    kind = config.kind
    if kind not in ("ddim", "euler", "euler_ancestral"):
        raise ValueError(f"scheduler kind {kind!r} has no sampling schedule here (ddim, euler, euler_ancestral)")
    if eta and kind != "ddim":
        raise ValueError(f"eta={eta} applies to DDIM only, not {kind!r}")
    ac = alphas_cumprod(config)
    ts = inference_timesteps(config, num_steps)
    zeros = np.zeros((num_steps,), np.float32)
    if kind == "ddim":
        t_int = ts.astype(np.int64)
        prev = t_int - config.num_train_timesteps // num_steps
        final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
        alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
        clip = float(config.clip_sample_range) if config.clip_sample else None
        return Schedule(
            timesteps=ts, alpha_t=ac[t_int].astype(np.float32), alpha_prev=alpha_prev,
            sigmas=np.zeros((num_steps + 1,), np.float32), init_noise_sigma=np.float32(1.0), kind=kind,
            prediction_type=config.prediction_type, clip_sample_range=clip, eta=float(eta),
        )
    if kind == "euler" and config.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = 2.0**-24
    train_sigmas = ((1 - ac) / ac) ** 0.5  # float32
    sig = np.interp(ts.astype(np.float64), np.arange(len(train_sigmas)), train_sigmas)
    last = 0.0
    if kind == "euler" and config.final_sigmas_type == "sigma_min":
        last = ((1 - ac[0]) / ac[0]) ** 0.5
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    smax = sig.max()
    init = smax if config.timestep_spacing in ("linspace", "trailing") else (smax**2 + np.float32(1)) ** np.float32(0.5)
    return Schedule(
        timesteps=ts, alpha_t=zeros, alpha_prev=zeros, sigmas=sig, init_noise_sigma=np.float32(init), kind=kind,
        prediction_type=config.prediction_type,
    )


def scale_model_input(schedule: Schedule, sample, i):
    """The UNet input at step ``i``: sample / sqrt(sigma_i^2 + 1) for Euler, unchanged for DDIM."""
    if schedule.kind == "ddim":
        return sample
    sigma = schedule.sigmas[i]
    return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def _ddim_step(s: Schedule, i, model_output, sample, noise):
    a_t, a_prev = s.alpha_t[i], s.alpha_prev[i]
    b_t = 1 - a_t
    if s.prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t)
        eps = model_output
    elif s.prediction_type == "sample":
        x0 = model_output
        eps = (sample - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    else:  # v_prediction
        x0 = jnp.sqrt(a_t) * sample - jnp.sqrt(b_t) * model_output
        eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * sample
    if s.clip_sample_range is not None:
        x0 = jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range)
    std = 0.0
    if s.eta > 0:
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = s.eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if s.eta > 0:
        prev = prev + std * noise
    return prev, x0


def _euler_x0(s: Schedule, sigma, model_output, sample):
    if s.prediction_type == "epsilon":
        return sample - sigma * model_output
    if s.prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    return model_output


def step(schedule: Schedule, i, model_output, sample, noise=None, *, return_x0: bool = False):
    """One update x_t -> x_{t-1} at step ``i`` (float32 math, result in ``model_output.dtype``).

    noise: a standard normal array shaped like ``sample``, needed when ``schedule.needs_noise``.
    Returns prev_sample, or (prev_sample, predicted x0) with ``return_x0``.
    """
    if schedule.needs_noise and noise is None:
        raise ValueError(f"{schedule.kind} step (eta={schedule.eta}) needs noise")
    out_dtype = model_output.dtype
    mo = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    nz = None if noise is None else noise.astype(jnp.float32)
    if schedule.kind == "ddim":
        prev, x0 = _ddim_step(schedule, i, mo, x, nz)
    elif schedule.kind == "euler":
        sigma = schedule.sigmas[i]
        x0 = _euler_x0(schedule, sigma, mo, x)
        prev = x + (x - x0) / sigma * (schedule.sigmas[i + 1] - sigma)
    else:  # euler_ancestral
        s_from, s_to = schedule.sigmas[i], schedule.sigmas[i + 1]
        x0 = _euler_x0(schedule, s_from, mo, x)
        s_up = jnp.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_down = jnp.sqrt(s_to**2 - s_up**2)
        prev = x + (x - x0) / s_from * (s_down - s_from) + nz * s_up
    prev = prev.astype(out_dtype)
    return (prev, x0) if return_x0 else prev


# --------------------------------------------------------------------------------------------------
# DDPM training
# --------------------------------------------------------------------------------------------------


def _expand(coef, like):
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def add_noise_at(schedule: Schedule, i: int, x0, noise):
    """diffusers' ``scheduler.add_noise(x0, noise, timesteps[i])`` for a sampling schedule: DDIM
    sqrt(a_t) x0 + sqrt(1 - a_t) noise; Euler (ancestral) x0 + sigma_i noise."""
    if schedule.kind == "ddim":
        a = jnp.asarray(schedule.alpha_t, jnp.float32)[i]
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    return x0 + jnp.asarray(schedule.sigmas, jnp.float32)[i] * noise


def add_noise(alphas_cumprod_table, x0, noise, timesteps):
    """Forward process q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise. timesteps: int [B]."""
    ac = jnp.asarray(alphas_cumprod_table, jnp.float32)[timesteps]
    return (_expand(jnp.sqrt(ac), x0) * x0 + _expand(jnp.sqrt(1 - ac), x0) * noise).astype(x0.dtype)


def velocity(alphas_cumprod_table, x0, noise, timesteps):
    """v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0. timesteps: int [B]."""
    ac = jnp.asarray(alphas_cumprod_table, jnp.float32)[timesteps]
    return (_expand(jnp.sqrt(ac), x0) * noise - _expand(jnp.sqrt(1 - ac), x0) * x0).astype(x0.dtype)


def training_target(config, x0, noise, timesteps):
    """What the UNet learns to predict: noise (epsilon), velocity (v_prediction) or x0 (sample)."""
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "v_prediction":
        return velocity(alphas_cumprod(config), x0, noise, timesteps)
    return x0


def sample_training_timesteps(key, batch: int, num_train_timesteps: int):
    """Uniform integer timesteps in [0, T) for a batch. -> int32 [B]."""
    return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
