"""Guided sampling pipeline and the tokens -> image detokenizer against a diffusers-composed reference.

The reference is LaVIT's own loop (pixel_decoding_origin / the SDXL branch) written with diffusers'
PyTorch UNet, VAE and scheduler built from the same tiny configs and weights, fed the same initial noise.
The conditions come from the fixture token decoders (image_tokenizer_tiny: low-res width 48, high-res
48 + 80, pooled 80), computed for the reference by an independent path (numpy codebook rows -> TokenDecoder).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from configs import tiny
from lavit_jax.convert import diffusers as CD
from lavit_jax.convert import tokenizer as CT
from lavit_jax.inference import sampling as diffusion
from lavit_jax.inference import schedulers
from lavit_jax.inference.detokenizer import Detokenizer
from lavit_jax.models import unet as U
from lavit_jax.models import vae as V
from lavit_jax.models.token_decoder import TokenDecoder
from tests import tokenizer_fixture as tfx

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "image_tokenizer_tiny"
VT = FIXTURE / "checkpoint" / "visual_tokenizer"

UNET_LOWRES = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8,
)
UNET_HIGHRES = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80 + 6 * 8,
)
VAE_TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=16,
)
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             set_alpha_to_one=False, steps_offset=1)
STEPS, GUIDANCE = 4, 5.0
# Two images in LLM space: 9 and 5 valid codes, padded with 0.
IDS = np.zeros((2, 9), np.int32)
IDS[0] = 32002 + np.array([3, 17, 127, 0, 64, 64, 5, 99, 42])
IDS[1, :5] = 32002 + np.array([1, 2, 3, 120, 77])
LENGTHS = np.array([9, 5], np.int32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def perturbed(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def tok_config():
    if not VT.is_dir():
        pytest.fail(f"fixture checkpoint missing: {VT}")
    return tiny.get_config().tokenizer


def reference_condition(tok_config, highres):
    """Independent ids -> condition: numpy rows of the stored codebook, then the fixture TokenDecoder."""
    codebook = CT.load_codebook(VT / "tokenizer_encoder.bin")
    codes = np.zeros(IDS.shape + (codebook.shape[1],), np.float32)
    for b in range(2):
        codes[b, : LENGTHS[b]] = codebook[IDS[b, : LENGTHS[b]] - 32002]
    name = "highres_tokenizer_decoder.bin" if highres else "tokenizer_decoder.bin"
    params = CT.load_token_decoder(VT / name, tok_config, highres)
    out = TokenDecoder(tok_config, highres).apply({"params": params}, jnp.asarray(codes), jnp.asarray(LENGTHS))
    return jax.tree.map(lambda a: torch.tensor(np.asarray(a)), out)


def torch_reference(unet, vae, scheduler, cond, noise, *, uncond=None, pooled=None, size=16, steps=None,
                    guidance=None, latents=None, start=0):
    """LaVIT's decoding loop with diffusers modules (float32); from ``latents`` at step ``start`` when given
    (Video-LaVIT's ``image_decoding(noise_used, noise_level)``)."""
    b, s, d = cond.shape
    kwargs = {}
    if uncond is not None:  # low-res: stored negative in zero padding, with its mask
        neg = torch.zeros_like(cond)
        neg[:, : len(uncond)] = uncond
        neg_mask = torch.zeros(b, s, dtype=torch.bool)
        neg_mask[:, : len(uncond)] = True
        context = torch.cat([neg, cond])
        kwargs["encoder_attention_mask"] = torch.cat([neg_mask, torch.ones(b, s, dtype=torch.bool)])
    else:  # high-res: zero negatives, time ids (orig, crop (0, 0), target)
        context = torch.cat([torch.zeros_like(cond), cond])
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(b, 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]),
                                       "time_ids": torch.cat([ids, ids])}
    scheduler.set_timesteps(steps or STEPS)
    g = GUIDANCE if guidance is None else guidance
    latents = noise * scheduler.init_noise_sigma if latents is None else latents
    with torch.no_grad():
        for t in scheduler.timesteps[start:]:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(inp, t, encoder_hidden_states=context, **kwargs).sample
            eps_u, eps_c = eps.chunk(2)
            latents = scheduler.step(eps_u + g * (eps_c - eps_u), t, latents).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1), latents.numpy().transpose(0, 2, 3, 1)


def noise_nhwc(seed):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parity
def test_lowres_detokenizer_from_released_folder_matches_reference(tok_config, tmp_path):
    """A released-layout folder (SD-1.5 style, PNDM scheduler config loaded as DDIM like LaVIT) -> images."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "visual_tokenizer").mkdir(parents=True)
    for f in ("tokenizer_encoder.bin", "tokenizer_decoder.bin"):
        (ckpt / "visual_tokenizer" / f).symlink_to(VT / f)
    unet = perturbed(TorchUNet(**UNET_LOWRES), 0)
    vae = perturbed(TorchVAE(**VAE_TINY), 1)
    unet.save_pretrained(ckpt / "pixel_decoding" / "unet", safe_serialization=False)
    vae.save_pretrained(ckpt / "pixel_decoding" / "vae", safe_serialization=False)
    PNDMScheduler(**SCHED, skip_prk_steps=True).save_pretrained(ckpt / "pixel_decoding" / "scheduler")
    uncond = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(5))
    torch.save(uncond, ckpt / "pixel_decoding" / "uncond_embeddings.bin")

    detok = tfx.released_detokenizer(ckpt, tok_config, "lowres", dtype=jnp.float32, attention_impl="xla")
    # the default image size follows the checkpoint: UNet sample_size x VAE downsampling factor
    vae_factor = 2 ** (len(VAE_TINY["block_out_channels"]) - 1)
    assert detok.default_size == UNET_LOWRES["sample_size"] * vae_factor
    assert detok.pipeline.scheduler_config.kind == "ddim"
    noise = noise_nhwc(0)
    images, latents = detok.generate(IDS, LENGTHS, steps=STEPS, guidance=GUIDANCE, size=16, noise=noise)

    ref_sched = DDIMScheduler.from_pretrained(ckpt / "pixel_decoding", subfolder="scheduler")
    cond = reference_condition(tok_config, highres=False)
    ref_images, ref_latents = torch_reference(unet, vae, ref_sched, cond, torch.tensor(noise.transpose(0, 3, 1, 2)),
                                              uncond=uncond[0])
    assert images.shape == (2, 16, 16, 3)
    assert rel_err(latents, ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4
    # guidance is live: the guided result differs from the unguided one (guidance 1 = cond only)
    _, plain = detok.generate(IDS, LENGTHS, steps=STEPS, guidance=1.0, size=16, noise=noise)
    assert rel_err(plain, ref_latents) > 1e-3
    pil = detok(IDS, LENGTHS, steps=STEPS, guidance=GUIDANCE, size=16, noise=noise)
    assert len(pil) == 2 and pil[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(pil[1]), (np.asarray(images[1]) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def highres_parts(tok_config):
    unet_t = perturbed(TorchUNet(**UNET_HIGHRES), 2)
    vae_t = perturbed(TorchVAE(**{**VAE_TINY, "scaling_factor": 0.13025}), 3)
    unet_cfg, vae_cfg = U.unet_config(dict(unet_t.config)), V.vae_config(dict(vae_t.config))
    unet = U.UNet2DConditionModel(unet_cfg, attention_impl="xla")
    vae = V.AutoencoderKL(vae_cfg)
    sd = {k: v.numpy() for k, v in unet_t.state_dict().items()}
    unet_params = CD.params_from_state_dict(unet, U.example_inputs(unet_cfg), sd, source="unet")
    sd = {k: v.numpy() for k, v in vae_t.state_dict().items()}
    vae_params = CD.params_from_state_dict(vae, V.example_inputs(vae_cfg), sd, source="vae")
    return unet_t, vae_t, unet, unet_params, vae, vae_params


@pytest.mark.parity
def test_highres_detokenizer_euler_with_progress_matches_reference(tok_config, highres_parts, capsys):
    """SDXL-style UNet (text_time) with an Euler sampler, run through the progress-bar variant."""
    unet_t, vae_t, unet, unet_params, vae, vae_params = highres_parts
    euler_cfg = {**SCHED, "timestep_spacing": "leading", "_class_name": "EulerDiscreteScheduler"}
    pipe = diffusion.DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet, vae=vae,
                                       scheduler_config=schedulers.scheduler_config(euler_cfg))
    codebook = CT.load_codebook(VT / "tokenizer_encoder.bin")
    dec_params = CT.load_token_decoder(VT / "highres_tokenizer_decoder.bin", tok_config, True)
    detok = Detokenizer(tok_config, codebook, dec_params, pipe, "highres")
    noise = noise_nhwc(1)
    images, latents = detok.generate(IDS, LENGTHS, steps=STEPS, guidance=GUIDANCE, noise=noise, progress=True)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err  # the tqdm bar saw every step

    prompt, pooled = reference_condition(tok_config, highres=True)
    ref_sched = EulerDiscreteScheduler.from_config(euler_cfg)
    ref_images, ref_latents = torch_reference(unet_t, vae_t, ref_sched, prompt,
                                              torch.tensor(noise.transpose(0, 3, 1, 2)), pooled=pooled, size=16)
    assert rel_err(latents, ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4


@pytest.mark.parity
@pytest.mark.parity
@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_keyframe_regeneration_from_a_frame_matches_the_release(tok_config, highres_parts, kind):
    """Video-LaVIT's long-video keyframes: ``regenerate_noise`` (VAE mode x scaling, ``add_noise`` at
    timesteps[level], x init_noise_sigma) then ``image_decoding`` from timesteps[level:], with diffusers."""
    unet_t, vae_t, unet, unet_params, vae, vae_params = highres_parts
    name = "EulerDiscreteScheduler" if kind == "euler" else "DDIMScheduler"
    cfg = {**SCHED, "timestep_spacing": "leading", "_class_name": name}
    pipe = diffusion.DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet, vae=vae,
                                       scheduler_config=schedulers.scheduler_config(cfg))
    codebook = CT.load_codebook(VT / "tokenizer_encoder.bin")
    dec_params = CT.load_token_decoder(VT / "highres_tokenizer_decoder.bin", tok_config, True)
    detok = Detokenizer(tok_config, codebook, dec_params, pipe, "highres")
    steps, level = 6, int(0.85 * 6)
    frame = np.random.default_rng(7).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    noise = noise_nhwc(2)
    start = diffusion.noised_latents(pipe, frame, steps, level, noise=noise)
    images, latents = detok.generate(IDS, LENGTHS, steps=steps, guidance=GUIDANCE, latents=start, start_step=level)

    ref_sched = (EulerDiscreteScheduler if kind == "euler" else DDIMScheduler).from_config(cfg)
    with torch.no_grad():
        x0 = vae_t.encode(torch.tensor(frame.transpose(0, 3, 1, 2))).latent_dist.mode() * vae_t.config.scaling_factor
        ref_sched.set_timesteps(steps)
        t = torch.tensor([ref_sched.timesteps[level].item()] * 2, dtype=torch.long)
        ref_start = ref_sched.add_noise(x0, torch.tensor(noise.transpose(0, 3, 1, 2)), t) * ref_sched.init_noise_sigma
    assert rel_err(start, ref_start.numpy().transpose(0, 2, 3, 1)) < 1e-5
    prompt, pooled = reference_condition(tok_config, highres=True)
    ref_images, ref_latents = torch_reference(unet_t, vae_t, ref_sched, prompt, None, pooled=pooled, size=16,
                                              steps=steps, latents=ref_start, start=level)
    assert rel_err(latents, ref_latents) < 1e-4
    assert rel_err(images, ref_images) < 1e-4
    with pytest.raises(ValueError, match="start_step"):
        detok.generate(IDS, LENGTHS, steps=steps, start_step=level)


def test_step_counts_share_one_compiled_sampler(tok_config, highres_parts):
    """Step counts within a bucket (here 3, 5 and 7 -> 8) reuse the compiled sampler, and each still equals
    diffusers' sampler run for exactly that many steps."""
    unet_t, vae_t, unet, unet_params, vae, vae_params = highres_parts
    pipe = diffusion.DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet, vae=vae,
                                       scheduler_config=schedulers.scheduler_config(SCHED, kind="ddim"))
    codebook = CT.load_codebook(VT / "tokenizer_encoder.bin")
    dec_params = CT.load_token_decoder(VT / "highres_tokenizer_decoder.bin", tok_config, True)
    detok = Detokenizer(tok_config, codebook, dec_params, pipe, "highres")
    noise = noise_nhwc(2)
    detok.generate(IDS, LENGTHS, steps=2, guidance=GUIDANCE, noise=noise)  # compiles the 8-step bucket
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        latents = {n: detok.generate(IDS, LENGTHS, steps=n, guidance=g, noise=noise)[1]
                   for n, g in ((3, GUIDANCE), (5, 2.5), (7, GUIDANCE))}
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    prompt, pooled = reference_condition(tok_config, highres=True)
    for n, g in ((3, GUIDANCE), (5, 2.5)):
        ref_sched = DDIMScheduler.from_config(SCHED)
        _, ref = torch_reference(unet_t, vae_t, ref_sched, prompt, torch.tensor(noise.transpose(0, 3, 1, 2)),
                                 pooled=pooled, size=16, steps=n, guidance=g)
        assert rel_err(latents[n], ref) < 1e-4, n


def test_conditions_and_errors():
    cond = jnp.ones((2, 5, 4))
    lowres = diffusion.lowres_condition(cond, 2 * jnp.ones((1, 3, 4)))
    assert lowres.context.shape == (4, 5, 4)
    np.testing.assert_array_equal(np.asarray(lowres.context[:2, :3]), 2.0)
    np.testing.assert_array_equal(np.asarray(lowres.context[:2, 3:]), 0.0)
    np.testing.assert_array_equal(np.asarray(lowres.mask[:2]), [[True] * 3 + [False] * 2] * 2)
    assert bool(lowres.mask[2:].all())
    with pytest.raises(ValueError, match="uncond_embeddings"):
        diffusion.lowres_condition(cond, jnp.ones((6, 4)))
    hi = diffusion.highres_condition(jnp.ones((1, 5, 8)), jnp.ones((1, 3)), 1024, 768, original_size=(512, 512))
    np.testing.assert_array_equal(np.asarray(hi.time_ids), [[512, 512, 0, 0, 1024, 768]] * 2)
    assert float(jnp.abs(hi.context[0]).max()) == 0.0 and float(jnp.abs(hi.text_embeds[0]).max()) == 0.0
    with pytest.raises(CD.torch_io.WeightFileError, match="no weights"):
        CD.load_diffusers_state_dict(pathlib.Path(__file__).parent)
