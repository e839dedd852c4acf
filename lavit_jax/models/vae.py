"""The diffusers ``AutoencoderKL`` (SD-1.5 / SDXL VAE) in Flax Linen, NHWC.

``encode``: images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels];
``decode``: latents [B, H/f, W/f, latent_channels] -> images [B, H, W, 3] (f = 2**(blocks - 1)).
The latent scaling (``scaling_factor``, optional ``shift_factor``) is applied by ``latents_to_vae`` /
``vae_to_latents``, not inside the module, as in diffusers. Module names follow the diffusers keys,
so ``unet.diffusers_rule`` loads a ``vae/diffusion_pytorch_model.bin`` (old ``query/key/value/proj_attn``
attention names included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.unet import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv
from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import dense

Dtype = jnp.dtype


def vae_config(diffusers_config: dict) -> ml_collections.FrozenConfigDict:
    """Normalises a diffusers ``vae/config.json`` dict. Raises ValueError naming unsupported fields."""
    d = dict(diffusers_config)
    down = list(d.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(d.get("up_block_types", ("UpDecoderBlock2D",)))
    channels = list(d.get("block_out_channels", (64,)))
    if any(t != "DownEncoderBlock2D" for t in down) or len(down) != len(channels):
        raise ValueError(f"VAE config field 'down_block_types' {down} is not supported "
                         f"(one DownEncoderBlock2D per block_out_channels entry)")
    if any(t != "UpDecoderBlock2D" for t in up) or len(up) != len(channels):
        raise ValueError(f"VAE config field 'up_block_types' {up} is not supported "
                         f"(one UpDecoderBlock2D per block_out_channels entry)")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"VAE config field 'act_fn'={d['act_fn']!r} is not supported (only 'silu')")
    for field in ("latents_mean", "latents_std"):
        if d.get(field) is not None:
            raise ValueError(f"VAE config field {field!r} is not supported")
    return ml_collections.FrozenConfigDict(dict(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        latent_channels=int(d.get("latent_channels", 4)),
        block_out_channels=tuple(int(c) for c in channels),
        layers_per_block=int(d.get("layers_per_block", 1)),
        norm_num_groups=int(d.get("norm_num_groups", 32)),
        sample_size=d.get("sample_size"),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=float(d.get("shift_factor") or 0.0),
        force_upcast=bool(d.get("force_upcast", True)),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
    ))


class VAEAttention(nn.Module):
    """VAE mid-block attention: GroupNorm -> single-head attention over H*W (with biases) + residual.

    x: [B, H, W, C] -> [B, H, W, C]. Params: group_norm, to_q, to_k, to_v, to_out_0.
    """

    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, 1e-6, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q = dense(c, ("embed", "heads"), name="to_q", **kw)(y)[:, :, None, :]
        k = dense(c, ("embed", "heads"), name="to_k", **kw)(y)[:, :, None, :]
        v = dense(c, ("embed", "heads"), name="to_v", **kw)(y)[:, :, None, :]
        o = dot_product_attention(q, k, v, implementation="xla")[:, :, 0, :]
        o = dense(c, ("heads", "embed"), name="to_out_0", **kw)(o)
        return o.reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
    """resnet -> (attention) -> resnet, no time embedding. x: [B, H, W, C] -> same."""

    groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, 1e-6, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, self.groups, 1e-6, name="resnets_1", **kw)(x)


class EncoderBlock(nn.Module):
    """``DownEncoderBlock2D``: resnets then an optional (0,1)-padded stride-2 conv."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 0, name="downsamplers_0", **kw)(x)
        return x


class DecoderBlock(nn.Module):
    """``UpDecoderBlock2D``: resnets then an optional nearest-2x upsample + conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """images [B, H, W, C_in] -> moments [B, H/f, W/f, 2 * latent_channels]."""

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels
        x = conv(ch[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
        for i, c in enumerate(ch):
            x = EncoderBlock(c, cfg.layers_per_block, i < len(ch) - 1, cfg.norm_num_groups,
                             name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C_out]."""

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels[::-1]
        x = conv(ch[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        x = VAEMidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, c in enumerate(ch):
            x = DecoderBlock(c, cfg.layers_per_block + 1, i < len(ch) - 1, cfg.norm_num_groups,
                             name=f"up_blocks_{i}", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x)
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """KL autoencoder. ``__call__`` runs encode (mean) then decode, for initialisation.

    Use ``model.apply(v, x, method=AutoencoderKL.encode)`` -> (mean, logvar) and
    ``model.apply(v, z, method=AutoencoderKL.decode)`` -> images.
    """

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, **kw)

    def encode(self, images):
        """images [B, H, W, C_in] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels].

        logvar is clipped to [-30, 20] as in diffusers' ``DiagonalGaussianDistribution``.
        """
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """latents [B, h, w, latent_channels] (unscaled VAE space) -> images [B, h*f, w*f, C_out]."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_latent(mean, logvar, key):
    """A draw from N(mean, exp(logvar)): mean + exp(logvar / 2) * noise. Shapes [B, h, w, c]."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def vae_to_latents(z, config):
    """VAE latent space -> diffusion latent space: (z - shift_factor) * scaling_factor."""
    return (z - config.shift_factor) * config.scaling_factor


def latents_to_vae(latents, config):
    """Diffusion latents -> VAE latent space: latents / scaling_factor + shift_factor."""
    return latents / config.scaling_factor + config.shift_factor


def decode_to_images(model: AutoencoderKL, params, latents, *, dtype: str | None = "float32"):
    """Diffusion latents [B, h, w, c] -> images [B, H, W, 3] in [0, 1], float32.

    ``dtype`` runs the decoder (params and activations) in that dtype whatever the model's (e.g.
    "float32", as the release's reconstruction does); None runs it in the model's dtype (the release's
    generation: the VAE in the model precision).
    """
    if dtype is not None:
        model = model.clone(dtype=jnp.dtype(dtype))
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        latents = latents.astype(dtype)
    z = latents_to_vae(latents, model.config)
    images = model.apply({"params": params}, z, method=AutoencoderKL.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def example_inputs(config):
    """Small example inputs for ``AutoencoderKL.init``."""
    f = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, f, f, config.in_channels), jnp.float32),)
