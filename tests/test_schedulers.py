"""Schedulers against diffusers: timesteps, sigmas, init_noise_sigma, every step of full trajectories."""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from lavit_jax.inference import schedulers as S

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
TORCH = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def pair(kind, steps, **overrides):
    cfg_dict = {**SD15, **overrides}
    accepted = inspect.signature(TORCH[kind].__init__).parameters
    ref = TORCH[kind](**{k: v for k, v in cfg_dict.items() if k in accepted})
    ref.set_timesteps(steps)
    cfg = S.scheduler_config(cfg_dict, kind=kind)
    return ref, S.make_schedule(cfg, steps)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["ddim", "euler", "euler_ancestral"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_timesteps_sigmas_init_sigma(kind, spacing, beta_schedule):
    for steps in (7, 25, 50):
        ref, sched = pair(kind, steps, timestep_spacing=spacing, beta_schedule=beta_schedule)
        np.testing.assert_array_equal(np.asarray(sched.timesteps), ref.timesteps.numpy().astype(np.float32))
        assert rel_err(sched.init_noise_sigma, float(ref.init_noise_sigma)) < 1e-6
        if kind != "ddim":
            assert rel_err(sched.sigmas, ref.sigmas.numpy()) < 1e-6


@pytest.mark.parity
def test_alphas_cumprod_and_zero_snr():
    for kw in ({}, {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"},
               {"rescale_betas_zero_snr": True}):
        ref = DDIMScheduler(**{**SD15, **kw})
        cfg = S.scheduler_config({**SD15, **kw}, kind="ddim")
        assert rel_err(S.alphas_cumprod(cfg), ref.alphas_cumprod.numpy()) < 1e-5, kw


def fake_model(x, i, base):
    """A model output depending on the current sample, computed the same way in numpy and torch."""
    return base[i] + 0.3 * x


def run_trajectory(kind, steps, prediction_type="epsilon", seed=0, **overrides):
    ref, sched = pair(kind, steps, prediction_type=prediction_type, **overrides)
    rng = np.random.default_rng(seed)
    shape = (2, 4, 6, 6)
    x0 = rng.standard_normal(shape).astype(np.float32)
    base = rng.standard_normal((steps,) + shape).astype(np.float32)
    xt = torch.tensor(x0) * ref.init_noise_sigma
    xj = jnp.asarray(x0) * sched.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        inp_t = ref.scale_model_input(xt, t)
        inp_j = S.scale_model_input(sched, xj, i)
        assert rel_err(inp_j, inp_t.numpy()) < 1e-5, (kind, i, "scale_model_input")
        assert float(sched.timesteps[i]) == float(t)
        mt = torch.tensor(base[i]) + 0.3 * inp_t
        mj = jnp.asarray(base[i]) + 0.3 * inp_j
        if kind == "euler_ancestral":
            gen = torch.Generator().manual_seed(1000 + i)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i)).numpy()
            xt = ref.step(mt, t, xt, generator=gen).prev_sample
            xj = S.step(sched, i, mj, xj, noise=jnp.asarray(noise))
        else:
            xt = ref.step(mt, t, xt).prev_sample
            xj = S.step(sched, i, mj, xj)
        assert rel_err(xj, xt.numpy()) < 1e-4, (kind, prediction_type, i)
    return np.asarray(xj)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["ddim", "euler", "euler_ancestral"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_full_trajectory_every_step(kind, prediction_type):
    run_trajectory(kind, 25, prediction_type)


@pytest.mark.parity
def test_ddim_clip_and_sample_prediction_and_trailing():
    run_trajectory("ddim", 10, "sample", clip_sample=True, timestep_spacing="trailing")
    run_trajectory("ddim", 10, "epsilon", set_alpha_to_one=True, timestep_spacing="linspace")


@pytest.mark.parity
def test_ddim_eta_with_variance_noise():
    ref, _ = pair("ddim", 10)
    cfg = S.scheduler_config(SD15, kind="ddim")
    sched = S.make_schedule(cfg, 10, eta=0.7)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    xt, xj = torch.tensor(x), jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        m = rng.standard_normal(x.shape).astype(np.float32)
        nz = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.tensor(m), t, xt, eta=0.7, variance_noise=torch.tensor(nz)).prev_sample
        xj = S.step(sched, i, jnp.asarray(m), xj, noise=jnp.asarray(nz))
        assert rel_err(xj, xt.numpy()) < 1e-4, i


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_add_noise_and_targets(prediction_type):
    ref = DDPMScheduler(**{k: v for k, v in SD15.items() if k != "set_alpha_to_one"}, prediction_type=prediction_type)
    cfg = S.scheduler_config({**SD15, "prediction_type": prediction_type, "_class_name": "DDPMScheduler"})
    assert cfg.kind == "ddpm"
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 4, 6, 6)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    ac = S.alphas_cumprod(cfg)
    ref_noisy = ref.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    assert rel_err(S.add_noise(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), ref_noisy) < 1e-5
    if prediction_type == "epsilon":
        ref_target = noise
    elif prediction_type == "v_prediction":
        ref_target = ref.get_velocity(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    else:
        ref_target = x0
    got = S.training_target(cfg, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(got, ref_target) < 1e-5


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.scheduler_config({**SD15, "timestep_spacing": "karras"}, kind="ddim")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.scheduler_config({**SD15, "use_karras_sigmas": True}, kind="euler")
    with pytest.raises(ValueError, match="_class_name"):
        S.scheduler_config({**SD15, "_class_name": "PNDMScheduler"})
    sched = S.make_schedule(S.scheduler_config(SD15, kind="euler_ancestral"), 5)
    with pytest.raises(ValueError, match="needs noise"):
        S.step(sched, 0, jnp.zeros((1, 2)), jnp.zeros((1, 2)))
