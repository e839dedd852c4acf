"""diffusers' ``AutoencoderKLTemporalDecoder`` (the SVD VAE) in Flax Linen, channels-last.

``encode``: images [N, H, W, 3] in [-1, 1] -> (mean, logvar) [N, H/f, W/f, latent_channels], the
ordinary ``AutoencoderKL`` encoder (+ ``quant_conv``), frame by frame.
``decode``: latents [N, h, w, latent_channels] (unscaled VAE space) -> images [N, H, W, 3], the N
latents being the consecutive frames of one video: every resnet of the decoder is a
``SpatioTemporalResBlock`` (temporal Conv3d (3, 1, 1) across the N frames, blended with 1 - alpha),
and a final ``time_conv_out`` Conv3d mixes the output frames. There is no ``post_quant_conv``.
Decoding a long video in chunks (as the release does, 8 frames at a time) therefore changes the
result at chunk borders; ``decode_video`` reproduces that.

The decoder's mid block holds ``layers_per_block`` resnets and one attention applied between the
first two resnets, as diffusers builds it: with ``layers_per_block`` 1 the attention has weights but
is never applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.unet import GroupNorm, Upsample2D, conv
from lavit_jax.models.vae import Encoder, VAEAttention
from lavit_jax.models.video_unet import GROUPS, SpatioTemporalResBlock, conv3d

Dtype = jnp.dtype


def temporal_vae_config(diffusers_config: dict) -> ml_collections.FrozenConfigDict:
    """A diffusers ``AutoencoderKLTemporalDecoder`` ``config.json`` dict -> frozen config.

    Raises ValueError naming the field for anything this implementation does not support.
    """
    d = dict(diffusers_config)
    channels = [int(c) for c in d.get("block_out_channels", (64,))]
    down = list(d.get("down_block_types", ("DownEncoderBlock2D",)))
    if any(t != "DownEncoderBlock2D" for t in down) or len(down) != len(channels):
        raise ValueError(f"temporal VAE config field 'down_block_types' {down} is not supported "
                         f"(one DownEncoderBlock2D per block_out_channels entry)")
    for c in channels:
        if c % GROUPS:
            raise ValueError(f"temporal VAE config field 'block_out_channels': {c} is not a multiple of the "
                             f"{GROUPS} GroupNorm groups")
    return ml_collections.FrozenConfigDict(dict(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        latent_channels=int(d.get("latent_channels", 4)),
        block_out_channels=tuple(channels),
        layers_per_block=int(d.get("layers_per_block", 1)),
        norm_num_groups=GROUPS,
        sample_size=d.get("sample_size"),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        force_upcast=bool(d.get("force_upcast", True)),
        mid_block_add_attention=True,  # the encoder's
    ))


def _st_resnet(ch: int, num_frames: int, name: str, kw: dict) -> SpatioTemporalResBlock:
    """The decoder's resnets: eps 1e-6 (spatial) / 1e-5 (temporal), 'learned' mix starting at 0, switched."""
    return SpatioTemporalResBlock(ch, num_frames, 1e-6, temporal_eps=1e-5, merge_factor=0.0, switch=True, name=name,
                                  **kw)


class MidBlockTemporalDecoder(nn.Module):
    """resnets_0, then attentions_0 and resnets_1, as diffusers' ``MidBlockTemporalDecoder`` runs them
    (its ``zip(resnets[1:], attentions)`` stops after one pair). x [N, h, w, C] (N frames) -> same.

    The weights diffusers builds but never applies (the attention when ``num_layers`` is 1, resnets
    from index 2) are created at init so that every released key has a home.
    """

    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch, n = x.shape[-1], x.shape[0]
        attention = VAEAttention(GROUPS, name="attentions_0", **kw)
        resnets = [_st_resnet(ch, n, f"resnets_{j}", kw) for j in range(self.num_layers)]
        x = resnets[0](x)
        if self.num_layers >= 2:
            x = resnets[1](attention(x))
        elif self.is_initializing():
            attention(x)
        if self.is_initializing():
            for r in resnets[2:]:
                r(x)
        return x


class TemporalDecoder(nn.Module):
    """latents [N, h, w, latent_channels] (one video of N frames) -> images [N, h*f, w*f, out_channels]."""

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = cfg.block_out_channels[::-1]
        x = conv(ch[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlockTemporalDecoder(cfg.layers_per_block, name="mid_block", **kw)(x)
        for i, c in enumerate(ch):
            x = _UpBlock(c, cfg.layers_per_block + 1, i < len(ch) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = GroupNorm(GROUPS, 1e-6, name="conv_norm_out", **kw)(x)
        x = conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(x))
        n, h, w, c = x.shape
        x = conv3d(cfg.out_channels, (3, 1, 1), name="time_conv_out", **kw)(x.reshape(1, n, h, w, c))
        return x.reshape(n, h, w, c)


class _UpBlock(nn.Module):
    """``UpBlockTemporalDecoder``: spatio-temporal resnets, then an optional nearest-2x upsample + conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _st_resnet(self.out_channels, x.shape[0], f"resnets_{j}", kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class AutoencoderKLTemporalDecoder(nn.Module):
    """The SVD VAE. ``__call__`` encodes (mean) and decodes the N images as one video, for initialisation.

    ``model.apply(v, images, method=AutoencoderKLTemporalDecoder.encode)`` -> (mean, logvar);
    ``model.apply(v, latents, method=AutoencoderKLTemporalDecoder.decode)`` -> images, the N latents
    being one video's consecutive frames.
    """

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = conv(2 * cfg.latent_channels, 1, **kw)
        self.decoder = TemporalDecoder(cfg, **kw)

    def encode(self, images):
        """images [N, H, W, C_in] in [-1, 1] -> (mean, logvar) [N, H/f, W/f, latent_channels] float32;
        logvar clipped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``."""
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """latents [N, h, w, latent_channels] (unscaled; N consecutive frames) -> images [N, H, W, C_out]."""
        return self.decoder(latents)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def decode_video(model: AutoencoderKLTemporalDecoder, params, latents, chunk: int):
    """Diffusion latents [B, F, h, w, c] -> frames [B, F, H, W, 3] float32 in [-1, 1] (unclipped).

    As the release's ``decode_latents``: divide by ``scaling_factor``, flatten B*F, decode ``chunk``
    frames per call (each chunk is one video to the temporal layers; a shorter last chunk is its own).
    Equal-size chunks share one compiled decoder (``lax.map``).
    """
    b, f = latents.shape[:2]
    z = (latents / model.config.scaling_factor).reshape((b * f,) + latents.shape[2:]).astype(model.dtype)
    n = b * f
    chunk = max(1, min(int(chunk), n))
    full = (n // chunk) * chunk

    def dec(x):
        return model.apply({"params": params}, x, method=AutoencoderKLTemporalDecoder.decode)

    parts = []
    if full:
        zc = z[:full].reshape((full // chunk, chunk) + z.shape[1:])
        out = jax.lax.map(dec, zc)
        parts.append(out.reshape((full,) + out.shape[2:]))
    if full < n:
        parts.append(dec(z[full:]))
    frames = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return frames.astype(jnp.float32).reshape((b, f) + frames.shape[1:])


def example_inputs(config, frames: int = 2):
    """Small example inputs for ``AutoencoderKLTemporalDecoder.init``."""
    f = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((frames, f, f, config.in_channels), jnp.float32),)
