"""AutoencoderKL against diffusers: encode (mean/logvar), decode, scaling, float32 decode, loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from lavit_jax.convert import diffusers as CD
from lavit_jax.models import vae as V

VAE_TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=16, scaling_factor=0.13025,
)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vae_pair():
    torch.manual_seed(0)
    tm = TorchVAE(**VAE_TINY).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = V.vae_config(dict(tm.config))
    model = V.AutoencoderKL(cfg)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = CD.params_from_state_dict(model, V.example_inputs(cfg), sd, source="test")
    return tm, model, params


@pytest.mark.parity
def test_vae_encode_decode_match_diffusers(vae_pair):
    tm, model, params = vae_pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(torch.tensor(x)).latent_dist
        ref_mean, ref_logvar = post.mean.numpy(), post.logvar.numpy()
        z = torch.tensor(np.random.default_rng(1).standard_normal(ref_mean.shape).astype(np.float32))
        ref_dec = tm.decode(z).sample.numpy()
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=V.AutoencoderKL.encode))
    mean, logvar = encode(params, x.transpose(0, 2, 3, 1))
    assert mean.shape == (2, 8, 8, 4)
    assert rel_err(nchw(mean), ref_mean) < 1e-4
    assert rel_err(nchw(logvar), ref_logvar) < 1e-4
    # decode in diffusion-latent space: decode_to_images divides by the scaling factor, maps to [0, 1]
    latents = jnp.asarray(z.numpy().transpose(0, 2, 3, 1)) * model.config.scaling_factor
    images = jax.jit(lambda p, l: V.decode_to_images(model, p, l))(params, latents)
    ref_images = np.clip(ref_dec / 2 + 0.5, 0, 1)
    assert rel_err(nchw(images), ref_images) < 1e-4
    # sampling from the latent distribution uses exp(logvar / 2)
    key = jax.random.key(0)
    draw = V.sample_latent(mean, logvar, key)
    eps = jax.random.normal(key, mean.shape)
    ref_draw = ref_mean + np.exp(0.5 * ref_logvar) * nchw(eps)
    assert rel_err(nchw(draw), ref_draw) < 1e-4


@pytest.mark.parity
def test_bf16_model_float32_decode(vae_pair):
    tm, model, params = vae_pair
    bf16 = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 8, 8, 4)).astype(np.float32))
    with torch.no_grad():
        ref = tm.decode(torch.tensor(nchw(z)) / model.config.scaling_factor).sample.numpy()
    ref = np.clip(ref / 2 + 0.5, 0, 1)
    # float32 decode of bf16-stored params: only the bf16 rounding of the weights remains
    out32 = V.decode_to_images(bf16, p16, z, dtype="float32")
    assert out32.dtype == jnp.float32
    assert rel_err(nchw(out32), ref) < 2e-2


def test_load_vae_folder_legacy_attention_names(vae_pair, tmp_path):
    tm, model, params = vae_pair
    tm.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded_model, loaded = CD.load_vae(tmp_path / "vae")
    assert loaded_model.config.scaling_factor == pytest.approx(0.13025)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Checkpoints from before diffusers 0.14 name the mid-block attention query/key/value/proj_attn.
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    from_legacy = CD.params_from_state_dict(model, V.example_inputs(model.config), legacy, source="old")
    for a, b in zip(jax.tree.leaves(from_legacy), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vae_config_errors():
    with pytest.raises(ValueError, match="down_block_types"):
        V.vae_config({**VAE_TINY, "down_block_types": ("DownEncoderBlock2D",)})
    with pytest.raises(ValueError, match="latents_mean"):
        V.vae_config({**VAE_TINY, "latents_mean": [0.0] * 4})
