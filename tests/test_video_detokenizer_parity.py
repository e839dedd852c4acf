"""Parity of the Video-LaVIT video detokenizer: fixtures of the official modules, and diffusers.

Fixture part (data-driven over every Video-LaVIT fixture set, sizes from its config.json, the set's
checkpoint loaded through ``convert.video_detokenizer``): the motion condition encoder, one forward of
the motion-conditioned 3D UNet, and the short sampling loop of ``reconstruct_from_token`` with the
fixture's recorded noise draws. Channels-first reference arrays are moved channels-last.

The loop's per-step checks feed each step the reference's own previous latents (teacher forcing): the
loop amplifies float differences (the reference itself moves ``float_noise['det_noise_pred']`` between
thread counts), so a free-running comparison of late UNet outputs would test that chaos rather than
the step. The free-running loop is checked on its latents and decoded frames; the uint8 frames from
the reference's final latents (count of differing entries <= the fixture's floor) and, free-running,
wherever the float frames are not within tolerance of a rounding boundary.

diffusers part (tiny random modules): the plain ``UNetSpatioTemporalConditionModel``, the
``AutoencoderKLTemporalDecoder`` (encode, decode, chunked decode) and SVD's ``EulerDiscreteScheduler``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder as TorchTemporalVAE
from diffusers import EulerDiscreteScheduler
from diffusers import UNetSpatioTemporalConditionModel as TorchSVDUNet

from configs import video_lavit
from lavit_jax.convert import torch_io
from lavit_jax.convert import video_detokenizer as CV
from lavit_jax.inference import video_sampling as VS
from lavit_jax.models import motion_encoder as ME
from lavit_jax.models import vae_temporal as VT
from lavit_jax.models import video_unet as VU
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze
from tests.conftest import video_fixture_dirs

VIDEO_FIXTURES = video_fixture_dirs()
def jit_call(fn, *args):
    return jax.jit(fn)(*args)


def _close(ours, ref, floor: float = 0.0, rel: float = 1e-4, what: str = ""):
    """max |ours - ref| <= max(rel x max |ref|, the fixture's float-noise floor)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    tol = max(rel * np.abs(ref).max(), floor)
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g}"


def _frames_last(x):
    """Reference [B, F, C, h, w] (any leading axes) -> ours [B, F, h, w, C]."""
    return np.ascontiguousarray(np.moveaxis(x, -3, -1))


def fixture_configs(cfg: dict):
    """(motion tokenizer, motion encoder) configs: the released ones with the set's sizes."""
    tok, cond = cfg["tokenizer"], cfg["cond"]
    mt = video_lavit.motion_tokenizer_config()
    mt.width, mt.heads, mt.blocks_per_stage = tok["dim"], tok["heads"], tok["blocks_per_stage"]
    mt.n_code, mt.code_dim, mt.mlp_ratio, mt.layernorm_eps = tok["n_code"], tok["code_dim"], tok["mlp_ratio"], \
        tok["layernorm_eps"]
    mt.in_channels, mt.input_frames, mt.input_height, mt.input_width = tok["input"]
    me = video_lavit.motion_encoder_config()
    me.width, me.heads, me.depth, me.out_dim = cond["dim"], cond["heads"], cond["depth"], cond["out"]
    me.mlp_ratio, me.layernorm_eps, me.add_temp_pos = cond["mlp_ratio"], cond["layernorm_eps"], cond["add_temp_pos"]
    me.grid = tuple(cond["input_hw"])
    return freeze(mt), freeze(me)


def fixture_settings(cfg: dict) -> VS.VideoSampling:
    s = cfg["sample"]
    return VS.VideoSampling.from_config(
        video_lavit.video_sampling_config(), num_frames=cfg["tokenizer"]["input"][1], steps=s["steps"],
        min_guidance=s["min_guidance"], max_guidance=s["max_guidance"], noise_aug=s["noise_aug"],
        fps=cfg["added_time_ids"]["fps"], motion_bucket_id=cfg["added_time_ids"]["motion_bucket_id"])


# --------------------------------------------------------------------------------------------------
# Fixture sets
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=VIDEO_FIXTURES or [None],
                ids=lambda p: p.name if p is not None else "no-video-fixture")
def fixture_set(request):
    d = request.param
    if d is None:
        pytest.fail("no Video-LaVIT fixture set: ../shared/fixtures/video/*/io.npz or $LAVIT_VIDEO_FIXTURES")
    io = dict(np.load(d / "io.npz"))
    cfg = json.loads((d / "config.json").read_text())
    mt, me = fixture_configs(cfg)
    det = CV.load_video_detokenizer(d / "checkpoint", mt, me)
    return d, io, cfg, cfg["float_noise"], det


@pytest.fixture(scope="module")
def sampled(fixture_set):
    """The free-running loop, steps 1.. teacher-forced, and the decode of the reference's final latents."""
    d, io, cfg, noise, det = fixture_set
    s = cfg["sample"]
    settings = fixture_settings(cfg)
    out = VS.reconstruct_from_token(
        det, io["det_keyframe"].transpose(0, 2, 3, 1), io["det_motion_tokens"], settings,
        height=s["height"], width=s["width"], aug_noise=io["det_noise_aug"].transpose(0, 2, 3, 1),
        initial_noise=_frames_last(io["det_initial_noise"]), trajectory=True)
    ref_latents = _frames_last(io["det_latents"])
    b, f = ref_latents.shape[1:3]
    guidance = jnp.broadcast_to(out["guidance"][None, :, None, None, None], (b, f, 1, 1, 1))
    # Step 0 starts from the recorded noise in both runs: teacher forcing begins at step 1. The same
    # compiled step as the loop's (same shapes).
    forced = [(out["step_latents"][0], out["noise_pred"][0])]
    forced += [VS.jit_step(det, out["schedule"], out["condition"], jnp.int32(i), jnp.asarray(ref_latents[i - 1]),
                           guidance) for i in range(1, out["schedule"].num_steps)]
    ref_frames, ref_uint8 = VS.jit_decode(det, jnp.asarray(ref_latents[-1]), decode_chunk=settings.decode_chunk)
    res = dict(out, forced_latents=jnp.stack([x for x, _ in forced]), forced_pred=jnp.stack([p for _, p in forced]),
               ref_frames=ref_frames, ref_uint8=ref_uint8)
    return io, noise, jax.tree.map(np.asarray, {k: v for k, v in res.items() if k not in ("schedule", "condition")}), \
        out["schedule"]


@pytest.mark.parity
def test_motion_condition_encoder(fixture_set):
    """to_grid (the bicubic to 16 x 16) and the encoder; its unrolled layout (scan_layers=False) agrees."""
    _, io, cfg, noise, det = fixture_set
    grid = tuple(det.motion_encoder.config.grid)
    motion = jnp.asarray(np.moveaxis(io["cond_motion_input"], 1, -1))  # [B, 2, T, h, w] -> [B, T, h, w, 2]
    motion16 = jax.jit(lambda m: ME.to_grid(m, grid))(motion)
    _close(motion16, np.moveaxis(io["cond_motion_16"], 1, -1), noise["cond_motion_16"])
    assert det.motion_encoder_params["blocks"]["norm0"]["scale"].shape[0] == cfg["cond"]["depth"]
    cfg_unrolled = freeze(det.motion_encoder.config, scan_layers=False)
    unrolled_params = scan.relayout(det.motion_encoder_params, ME.MOTION_ENCODER_STACKS, False)
    assert "blocks" not in unrolled_params and f"blocks_{cfg['cond']['depth'] - 1}" in unrolled_params

    @jax.jit
    def both(p, q, m):
        return (det.motion_encoder.apply({"params": p}, m),
                ME.MotionConditionEncoder(cfg_unrolled).apply({"params": q}, m))

    out, unrolled = both(det.motion_encoder_params, unrolled_params, motion16)
    _close(out, io["cond_output"], noise["cond_output"])
    _close(unrolled, out, rel=1e-6)


@pytest.mark.parity
def test_unet_forward(fixture_set):
    _, io, _, noise, det = fixture_set
    args = (det.unet_params, jnp.asarray(_frames_last(io["unet_sample"])), jnp.asarray(io["unet_timestep"]),
            jnp.asarray(io["cond_output"]), jnp.asarray(io["unet_added_time_ids"]))
    out = jit_call(lambda p, *a: det.unet.apply({"params": p}, *a), *args)
    _close(out, _frames_last(io["unet_output"]), noise["unet_output"])


@pytest.mark.parity
def test_schedule_and_guidance(sampled):
    io, noise, out, schedule = sampled
    _close(schedule.timesteps, io["det_timesteps"], noise["det_timesteps"])
    _close(schedule.sigmas, io["det_sigmas"], noise["det_sigmas"])
    _close(schedule.init_noise_sigma, io["det_init_noise_sigma"], noise["det_init_noise_sigma"])
    ref_g = io["det_guidance_scale"]
    _close(out["guidance"], ref_g.reshape(ref_g.shape[-1]), noise["det_guidance_scale"])


@pytest.mark.parity
def test_condition_latents(sampled):
    io, noise, out, _ = sampled
    _close(out["motion_latents"], _frames_last(io["det_motion_latents"]), noise["det_motion_latents"])
    _close(out["image_latents"], io["det_image_latents"].transpose(0, 2, 3, 1), noise["det_image_latents"])


@pytest.mark.parity
def test_noise_pred_per_step(sampled):
    """Each step's UNet output ([uncond; cond], before guidance) from the reference's previous latents."""
    io, noise, out, _ = sampled
    ref = _frames_last(io["det_noise_pred"])
    assert out["forced_pred"].shape == ref.shape
    for step in range(ref.shape[0]):
        _close(out["forced_pred"][step], ref[step], noise["det_noise_pred"], what=f"step {step}")


@pytest.mark.parity
def test_latents_per_step(sampled):
    """Each step's latents: teacher-forced, and free-running from the recorded initial noise."""
    io, noise, out, _ = sampled
    ref = _frames_last(io["det_latents"])
    assert out["step_latents"].shape == ref.shape
    for step in range(ref.shape[0]):
        _close(out["forced_latents"][step], ref[step], noise["det_latents"], what=f"teacher-forced step {step}")
        _close(out["step_latents"][step], ref[step], noise["det_latents"], what=f"free-running step {step}")
    np.testing.assert_array_equal(out["latents"], out["step_latents"][-1])


@pytest.mark.parity
def test_frames_float(sampled):
    io, noise, out, _ = sampled
    ref = np.moveaxis(io["det_frames_float"], 1, -1)  # [B, C, F, H, W] -> [B, F, H, W, C]
    n = ref.shape[1]
    _close(out["frames"][:, :n], ref, noise["det_frames_float"])
    _close(out["ref_frames"][:, :n], ref, noise["det_frames_float"])


@pytest.mark.parity
def test_frames_uint8(sampled):
    io, noise, out, _ = sampled
    ref = io["det_frames_uint8"].astype(np.int64)  # [B, F, H, W, 3]
    n = ref.shape[1]
    from_ref = out["ref_uint8"][:, :n].astype(np.int64)
    assert np.abs(from_ref - ref).max() <= 1
    assert np.count_nonzero(from_ref != ref) <= noise["det_frames_uint8"]
    # Free-running: equal wherever the float frame is farther than the float tolerance from a rounding boundary.
    ours = out["frames_uint8"][:, :n].astype(np.int64)
    assert np.abs(ours - ref).max() <= 1
    ref_float = io["det_frames_float"]
    tol = max(1e-4 * np.abs(ref_float).max(), noise["det_frames_float"]) * 127.5  # in uint8 steps
    v = np.clip(out["frames"][:, :n].astype(np.float64) / 2 + 0.5, 0, 1) * 255
    clear = np.abs(v - np.floor(v) - 0.5) > tol
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ours[clear], ref[clear])


@pytest.mark.parity
def test_converter_reports_every_mismatch(fixture_set):
    d, _, _, _, det = fixture_set
    path = d / "checkpoint" / CV.VIDEO_3D_UNET_FILE
    sd = torch_io.load_torch_file(path)
    del sd["unet.conv_in.bias"]
    del sd["motion_encoder.pos_embed"]
    sd["unet.down_blocks.0.resnets.0.time_mixer.mix_factor"] = np.zeros((2,), np.float32)
    sd["vae.decoder.conv_in.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(torch_io.WeightMismatchError) as e:
        CV.convert_video_3d_unet(sd, det.unet.config, det.motion_encoder.config, source=str(path))
    msg = str(e.value)
    for part in (str(path), "unet/conv_in/bias", "motion_encoder/pos_embed", "vae.decoder.conv_in.weight",
                 "unet.down_blocks.0.resnets.0.time_mixer.mix_factor"):
        assert part in msg, (part, msg)


def test_bad_sizes_raise(fixture_set):
    *_, det = fixture_set
    with pytest.raises(ValueError, match="multiples of"):
        det.latent_size(120, 128)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        VU.video_unet_config(dict(addition_time_embed_dim=16, projection_class_embeddings_input_dim=40))
    with pytest.raises(ValueError, match="down_block_types"):
        VU.video_unet_config(dict(down_block_types=["CrossAttnDownBlock2D"] * 4))


# --------------------------------------------------------------------------------------------------
# diffusers counterparts on tiny random modules
# --------------------------------------------------------------------------------------------------

# One level: diffusers' own DownBlockSpatioTemporal / UpBlockSpatioTemporal and the mid block's transformer
# with the plain (shared) context, 2 transformer layers; the CrossAttn blocks and the samplers run in the
# fixture set's UNet.
SVD_UNET_TINY = dict(
    sample_size=8, in_channels=6, out_channels=4, block_out_channels=(64,),
    down_block_types=("DownBlockSpatioTemporal",), up_block_types=("UpBlockSpatioTemporal",),
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, layers_per_block=1,
    cross_attention_dim=16, transformer_layers_per_block=2, num_attention_heads=4, num_frames=3,
)


def _perturbed(module):
    torch.manual_seed(0)
    with torch.no_grad():  # move norms, zero-initialised layers and mix factors off their defaults
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parity
def test_plain_unet_matches_diffusers():
    torch.manual_seed(0)
    tm = _perturbed(TorchSVDUNet(**SVD_UNET_TINY))
    cfg = VU.video_unet_config(dict(tm.config), motion_conditioning=False)
    shapes = CV.unet_param_shapes(cfg)
    params = torch_io.assign_params({k: v.numpy() for k, v in tm.state_dict().items()},
                                    CV.diffusers_rank_rule(shapes), shapes, source="diffusers")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 8, 8)).astype(np.float32)  # [B, F, C, H, W]
    ctx = rng.standard_normal((2, 1, 16)).astype(np.float32)
    ids = np.array([[6, 127, 0.02], [12, 40, 0.1]], np.float32)
    t = np.float32(1.3)
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(ids)).sample.numpy()
    model = VU.UNetSpatioTemporalConditionModel(cfg)
    out = jit_call(lambda p, *a: model.apply({"params": p}, *a), params, jnp.asarray(_frames_last(x)),
                   jnp.float32(t), jnp.asarray(ctx), jnp.asarray(ids))
    _close(out, _frames_last(ref))


@pytest.mark.parity
def test_temporal_vae_matches_diffusers():
    """encode (mean, logvar) and decode_video's chunks = diffusers' chunk loop. layers_per_block 2 (the
    release's): the mid block applies its attention (the fixture set covers 1, where it does not, and the
    down/up samplers of several blocks)."""
    tv = _perturbed(TorchTemporalVAE(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), block_out_channels=(32,),
        layers_per_block=2, latent_channels=4, scaling_factor=0.18215))
    cfg = VT.temporal_vae_config(dict(tv.config))
    params = CV.temporal_vae_params_from_state_dict({k: v.numpy() for k, v in tv.state_dict().items()}, cfg,
                                                    source="diffusers")
    model = VT.AutoencoderKLTemporalDecoder(cfg)
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    lat = rng.standard_normal((1, 5, 4, 8, 8)).astype(np.float32)  # diffusion latents [B, F, C, h, w]
    with torch.no_grad():
        post = tv.encode(torch.tensor(img)).latent_dist
        z = torch.tensor(lat[0]) / 0.18215
        chunks = [tv.decode(z[i:i + 2], num_frames=len(z[i:i + 2])).sample for i in range(0, 5, 2)]
        ref_frames = torch.cat(chunks).numpy()

    def run(p, x, latents):
        mean, logvar = model.apply({"params": p}, x, method=VT.AutoencoderKLTemporalDecoder.encode)
        return mean, logvar, VT.decode_video(model, p, latents, 2)

    mean, logvar, frames = jit_call(run, params, jnp.asarray(img.transpose(0, 2, 3, 1)), jnp.asarray(_frames_last(lat)))
    _close(mean, post.mean.numpy().transpose(0, 2, 3, 1))
    _close(logvar, post.logvar.numpy().transpose(0, 2, 3, 1))
    _close(frames[0], ref_frames.transpose(0, 2, 3, 1))


SVD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="v_prediction", interpolation_type="linear", sigma_min=0.002, sigma_max=700.0,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)


@pytest.mark.parity
@pytest.mark.parametrize("variant", [
    {}, {"timestep_spacing": "trailing"}, {"timestep_type": "discrete", "sigma_max": 10.0},
    {"use_karras_sigmas": False, "timestep_type": "discrete", "sigma_min": None, "sigma_max": None},
])
def test_svd_scheduler_matches_diffusers(variant):
    """Timesteps, sigmas, init_noise_sigma and a whole Euler trajectory against EulerDiscreteScheduler.

    (Discrete Karras timesteps need sigma_max inside the training range: above it several steps map to
    timestep 999, and diffusers' step-index lookup then starts at the second of them.)"""
    config = {**SVD_SCHEDULER, **variant}
    rng = np.random.default_rng(0)
    for steps in (3, 25):
        ref = EulerDiscreteScheduler(**config)
        ref.set_timesteps(steps)
        sched = VS.svd_schedule(VS.svd_scheduler_config(config), steps)
        _close(sched.timesteps, ref.timesteps.numpy().astype(np.float32), rel=1e-6)
        _close(sched.sigmas, ref.sigmas.numpy(), rel=1e-6)
        _close(sched.init_noise_sigma, float(ref.init_noise_sigma), rel=1e-6)
        x = rng.standard_normal((2, 4)).astype(np.float32) * float(ref.init_noise_sigma)
        xt, xj = torch.tensor(x), jnp.asarray(x)
        for i, t in enumerate(ref.timesteps):
            inp_t = ref.scale_model_input(xt, t)
            inp_j = VS.schedulers.scale_model_input(sched, xj, i)
            _close(inp_j, inp_t.numpy(), rel=1e-5)
            v = rng.standard_normal((2, 4)).astype(np.float32)
            xt = ref.step(torch.tensor(v), t, xt).prev_sample
            xj = VS.schedulers.step(sched, i, jnp.asarray(v), xj)
            _close(xj, xt.numpy())


def test_scheduler_config_errors():
    with pytest.raises(ValueError, match="timestep_type"):
        VS.svd_scheduler_config({**SVD_SCHEDULER, "timestep_type": "other"})
    with pytest.raises(ValueError, match="interpolation_type"):
        VS.svd_scheduler_config({**SVD_SCHEDULER, "interpolation_type": "log_linear"})
    with pytest.raises(ValueError, match="_class_name"):
        VS.svd_scheduler_config({**SVD_SCHEDULER, "_class_name": "DDIMScheduler"})


def test_released_motion_encoder_shapes():
    """The released condition encoder's parameter listing (no weights needed): 12 blocks of width 512,
    the 16 x 16 grid's pos_embed, out_proj to the UNet's 1024-d context; stacked under scan."""
    config = freeze(video_lavit.motion_encoder_config())
    shapes = CV.motion_encoder_param_shapes(config)
    assert shapes[("pos_embed",)] == (1, 256, 512)
    assert shapes[("in_proj", "kernel")] == (2, 512)
    assert shapes[("out_proj", "kernel")] == (512, 1024)
    assert shapes[("blocks_11", "temporal_attention", "qkv", "kernel")] == (512, 1536)
    assert ("blocks_12", "norm0", "scale") not in shapes and ("temp_pos",) not in shapes
    path, _ = CV.motion_key_to_flax("blocks.11.temporal_attention.qkv.weight", 2)
    assert path == ("blocks_11", "temporal_attention", "qkv", "kernel")
    stacked = jax.eval_shape(lambda m: ME.MotionConditionEncoder(config).init(jax.random.key(0), m),
                             *ME.example_inputs(config))["params"]
    kernel = stacked["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.value.shape == (12, 512, 2048) and kernel.names == ("layers", "embed", "mlp")


def test_released_sampling_settings():
    """The release's sampler settings from configs/video_lavit.py, and their checks."""
    s = VS.VideoSampling.from_config(video_lavit.get_config().detokenizer.sampling)
    assert (s.num_frames, s.steps, s.decode_chunk, s.fps, s.motion_bucket_id) == (24, 25, 8, 6, 127)
    assert (s.min_guidance, s.max_guidance, s.noise_aug) == (1.0, 4.0, 0.02)
    g = VS.linear_guidance(24, 1.0, 4.0)
    np.testing.assert_array_equal(g, torch.linspace(1.0, 4.0, 24).numpy())
    with pytest.raises(ValueError, match="unknown fields"):
        VS.VideoSampling.from_config(video_lavit.video_sampling_config(), guidance=3.0)
    with pytest.raises(ValueError, match="positive"):
        VS.VideoSampling.from_config(video_lavit.video_sampling_config(), steps=0)
