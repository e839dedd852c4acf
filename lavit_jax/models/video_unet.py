"""The SVD ``UNetSpatioTemporalConditionModel`` in Flax Linen, with Video-LaVIT's motion conditioning.

Layout is channels-last: ``sample`` [B, F, H, W, C_in] -> [B, F, H, W, C_out]; inside, frames are
folded into the batch ([B*F, H, W, C]) for the spatial layers and unfolded for the temporal ones.
Module names follow the diffusers keys with list indices joined by ``_``
(``down_blocks.0.resnets.0.temporal_res_block.conv1.weight`` ->
``down_blocks_0/resnets_0/temporal_res_block/conv1/kernel``).

Two conditioning modes (``config.motion_conditioning``):
- motion (Video-LaVIT, ``video_3d_unet.bin``): ``encoder_hidden_states`` are the motion features
  [B, F, gh*gw, D] on the ``motion_grid`` (16 x 16). Each frame's spatial cross-attention attends to
  its own gh*gw tokens; the temporal cross-attention of the frames at each position attends to the F
  motion features at that position, after a torch legacy-nearest resize of the grid to the block's
  h x w (scale factors h/gh, w/gw; skipped when the sizes already agree).
- plain (diffusers SVD): ``encoder_hidden_states`` [B, S, D] shared by every frame; the temporal
  cross-attention attends to the same S tokens.

Blocks: ``CrossAttnDownBlockSpatioTemporal`` / ``DownBlockSpatioTemporal``, ``UNetMidBlockSpatioTemporal``,
``UpBlockSpatioTemporal`` / ``CrossAttnUpBlockSpatioTemporal``; each resnet is a 2-D ResnetBlock2D
followed by a temporal resnet (Conv3d kernel (3, 1, 1)) blended by a learned ``time_mixer``.
The time embedding adds the sinusoidally embedded ``added_time_ids`` (fps, motion bucket, noise
augmentation). GroupNorms have 32 groups, as in diffusers.

The building blocks shared with the temporal VAE decoder (``SpatioTemporalResBlock``, ``AlphaBlender``,
``conv3d``) live here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.unet import (
    Attention,
    BasicTransformerBlock,
    Downsample2D,
    GEGLUFeed,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    timestep_embedding,
)
from lavit_jax.ops.layers import LayerNorm, dense
from lavit_jax.ops.resize import resize_nearest

Dtype = jnp.dtype

GROUPS = 32  # diffusers' SVD blocks hard-code 32 GroupNorm groups
_FEATURE_MAP = ("batch", None, None, None)
_VIDEO_MAP = ("batch", None, None, None, None)
_TOKENS = ("batch", "length", None)

DOWN_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_TYPES = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")

# GroupNorm eps of the resnets per block type, as diffusers 0.42 builds them (the release's
# CrossAttn blocks and the mid block come from Video-LaVIT's copy of the same code).
RESNET_EPS = {
    "CrossAttnDownBlockSpatioTemporal": 1e-6,
    "DownBlockSpatioTemporal": 1e-5,
    "mid": 1e-5,
    "UpBlockSpatioTemporal": 1e-6,
    "CrossAttnUpBlockSpatioTemporal": 1e-6,
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _per_block(value, n: int, field: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"video UNet config field {field!r}: {len(value)} entries for {n} down blocks")
        return list(value)
    return [value] * n


def video_unet_config(diffusers_config: dict, *, motion_conditioning: bool = True,
                      motion_grid: Sequence[int] = (16, 16)) -> ml_collections.FrozenConfigDict:
    """A diffusers ``UNetSpatioTemporalConditionModel`` ``config.json`` dict -> frozen per-block config.

    ``motion_conditioning`` selects Video-LaVIT's motion cross-attention (context [B, F, gh*gw, D] on
    ``motion_grid``) or diffusers' plain SVD conditioning (context [B, S, D]). Raises ValueError naming
    the field for anything this implementation does not support.
    """
    d = dict(diffusers_config)
    down = list(d.get("down_block_types", ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)))
    up = list(d.get("up_block_types", ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3))
    n = len(down)
    for t in down:
        if t not in DOWN_TYPES:
            raise ValueError(f"video UNet config field 'down_block_types': {t!r} is not supported ({DOWN_TYPES})")
    for t in up:
        if t not in UP_TYPES:
            raise ValueError(f"video UNet config field 'up_block_types': {t!r} is not supported ({UP_TYPES})")
    if len(up) != n:
        raise ValueError(f"video UNet config: {len(up)} up_block_types for {n} down_block_types")
    channels = [int(c) for c in d.get("block_out_channels", (320, 640, 1280, 1280))]
    if len(channels) != n:
        raise ValueError(f"video UNet config field 'block_out_channels': {len(channels)} entries for {n} down blocks")
    heads = [int(h) for h in _per_block(d.get("num_attention_heads", (5, 10, 20, 20)), n, "num_attention_heads")]
    cross = [int(c) for c in _per_block(d.get("cross_attention_dim", 1024), n, "cross_attention_dim")]
    layers = [int(x) for x in _per_block(d.get("layers_per_block", 2), n, "layers_per_block")]
    tlayers = _per_block(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    if any(isinstance(t, list | tuple) for t in tlayers):
        raise ValueError("video UNet config field 'transformer_layers_per_block': per-layer lists are not supported")
    tlayers = [int(t) for t in tlayers]
    for i, (c, h) in enumerate(zip(channels, heads)):
        if c % GROUPS:
            raise ValueError(f"video UNet config field 'block_out_channels': {c} (block {i}) is not a multiple "
                             f"of the {GROUPS} GroupNorm groups")
        if c % h:
            raise ValueError(f"video UNet config: block {i} has {c} channels, not divisible by {h} attention heads")
    add_dim = int(d.get("addition_time_embed_dim", 256))
    proj_dim = int(d.get("projection_class_embeddings_input_dim", 768))
    if add_dim < 1 or proj_dim % add_dim:
        raise ValueError(f"video UNet config: projection_class_embeddings_input_dim {proj_dim} is not a multiple "
                         f"of addition_time_embed_dim {add_dim}")
    grid = tuple(int(g) for g in motion_grid)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"video UNet motion_grid {tuple(motion_grid)}: expected (h, w)")
    return ml_collections.FrozenConfigDict(dict(
        in_channels=int(d.get("in_channels", 8)),
        out_channels=int(d.get("out_channels", 4)),
        sample_size=d.get("sample_size"),
        num_frames=int(d.get("num_frames", 25)),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(channels),
        layers_per_block=tuple(layers),
        transformer_layers_per_block=tuple(tlayers),
        num_heads=tuple(heads),
        cross_attention_dim=tuple(cross),
        addition_time_embed_dim=add_dim,
        projection_class_embeddings_input_dim=proj_dim,
        num_time_ids=proj_dim // add_dim,
        time_embedding_dim=channels[0] * 4,
        motion_conditioning=bool(motion_conditioning),
        motion_grid=grid,
    ))


# --------------------------------------------------------------------------------------------------
# Temporal building blocks
# --------------------------------------------------------------------------------------------------


def conv3d(features: int, kernel: Sequence[int], *, dtype=jnp.float32, param_dtype=jnp.float32,
           name: str | None = None) -> nn.Conv:
    """3-D conv on [B, T, H, W, C] with 'same' padding, kernel [kt, kh, kw, in, out]."""
    return nn.Conv(
        features, tuple(kernel), padding=tuple((k // 2, k // 2) for k in kernel), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, "conv_h", "conv_w", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class AlphaBlender(nn.Module):
    """``alpha * x_spatial + (1 - alpha) * x_temporal`` with alpha = sigmoid(``mix_factor``).

    Videos only (diffusers' ``image_only_indicator`` all zero), so 'learned_with_images' and 'learned'
    agree; ``switch`` (the temporal VAE) uses 1 - alpha. Shapes: any, equal.
    """

    alpha: float = 0.5
    switch: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_spatial, x_temporal):
        mix = self.param("mix_factor", nn.with_logical_partitioning(nn.initializers.constant(self.alpha), (None,)),
                         (1,), self.param_dtype)
        a = jax.nn.sigmoid(mix.astype(jnp.float32)).astype(x_spatial.dtype)
        if self.switch:
            a = 1.0 - a
        return a * x_spatial + (1.0 - a) * x_temporal


class TemporalResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3d (3,1,1) -> (+ per-frame time embedding) -> GroupNorm -> SiLU -> Conv3d.

    x [B, F, H, W, C_in], temb [B, F, T] or None -> [B, F, H, W, out_channels] (plus shortcut).
    """

    out_channels: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(GROUPS, self.eps, name="norm1", **kw)(x)
        h = conv3d(self.out_channels, (3, 1, 1), name="conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = dense(self.out_channels, ("embed", "mlp"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, :, None, None, :]
        h = GroupNorm(GROUPS, self.eps, name="norm2", **kw)(h)
        h = conv3d(self.out_channels, (3, 1, 1), name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv3d(self.out_channels, (1, 1, 1), name="conv_shortcut", **kw)(x)
        return nn.with_logical_constraint(x + h, _VIDEO_MAP)


class SpatioTemporalResBlock(nn.Module):
    """ResnetBlock2D per frame, then a TemporalResnetBlock across frames, blended by ``time_mixer``.

    x [B*F, H, W, C_in], temb [B*F, T] or None -> [B*F, H, W, out_channels].
    """

    out_channels: int
    num_frames: int
    eps: float = 1e-6
    temporal_eps: float | None = None
    merge_factor: float = 0.5
    switch: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.out_channels, GROUPS, self.eps, name="spatial_res_block", **kw)(x, temb)
        bf, h, w, c = x.shape
        b = bf // self.num_frames
        x5 = x.reshape(b, self.num_frames, h, w, c)
        t5 = None if temb is None else temb.reshape(b, self.num_frames, -1)
        eps_t = self.eps if self.temporal_eps is None else self.temporal_eps
        xt = TemporalResnetBlock(self.out_channels, eps_t, name="temporal_res_block", **kw)(x5, t5)
        out = AlphaBlender(self.merge_factor, self.switch, param_dtype=self.param_dtype, name="time_mixer")(x5, xt)
        return nn.with_logical_constraint(out.reshape(bf, h, w, c), _FEATURE_MAP)


class TimePositionEmbedding(nn.Module):
    """``TimestepEmbedding(in, 4 * in, out_dim=in)``: linear_1 -> SiLU -> linear_2. x [N, C] -> [N, C]."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="linear_1", **kw)(x)
        return dense(x.shape[-1], ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


class TemporalBasicTransformerBlock(nn.Module):
    """Per spatial position, over the frames: LN -> GEGLU ``ff_in`` (+ residual) -> self-attention (attn1)
    -> cross-attention (attn2) -> GEGLU ``ff``, each with a residual.

    x [B*F, S, C], context [B*S, L, D] -> [B*F, S, C].
    """

    heads: int
    head_dim: int
    num_frames: int
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(heads=self.heads, head_dim=self.head_dim, attention_impl=self.attention_impl, **kw)
        bf, s, c = x.shape
        f = self.num_frames
        b = bf // f
        x = x.reshape(b, f, s, c).transpose(0, 2, 1, 3).reshape(b * s, f, c)
        x = GEGLUFeed(name="ff_in", **kw)(LayerNorm(1e-5, name="norm_in", **kw)(x)) + x
        x = Attention(name="attn1", **akw)(LayerNorm(1e-5, name="norm1", **kw)(x)) + x
        x = Attention(name="attn2", **akw)(LayerNorm(1e-5, name="norm2", **kw)(x), context) + x
        x = GEGLUFeed(name="ff", **kw)(LayerNorm(1e-5, name="norm3", **kw)(x)) + x
        return x.reshape(b, s, f, c).transpose(0, 2, 1, 3).reshape(bf, s, c)


def motion_time_context(context, grid: Sequence[int], height: int, width: int):
    """Motion features [B, F, gh*gw, D] -> temporal cross-attention context [B*height*width, F, D].

    The grid is resized to (height, width) by torch legacy 'nearest' with scale factors
    (height/gh, width/gw) in float32 (Video-LaVIT's ``interplate_time_context``).
    """
    b, f, s, d = context.shape
    gh, gw = grid
    if s != gh * gw:
        raise ValueError(f"motion context [B, F, S, D] = {tuple(context.shape)}: S must be {gh}x{gw} = {gh * gw}")
    x = context.reshape(b, f, gh, gw, d)
    if (gh, gw) != (height, width):
        x = resize_nearest(x.astype(jnp.float32), (height, width), scales=(height / gh, width / gw),
                           axes=(2, 3)).astype(context.dtype)
    return x.reshape(b, f, height * width, d).transpose(0, 2, 1, 3).reshape(b * height * width, f, d)


class TransformerSpatioTemporalModel(nn.Module):
    """GroupNorm -> proj_in -> N x (spatial BasicTransformerBlock, + frame embedding, temporal block,
    ``time_mixer`` blend) -> proj_out, plus residual.

    x [B*F, H, W, C]; context [B, F, gh*gw, D] (motion) or [B, S, D] (plain) -> [B*F, H, W, C].
    """

    heads: int
    head_dim: int
    num_frames: int
    num_layers: int = 1
    motion_grid: tuple[int, int] | None = None  # None: plain SVD conditioning
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bf, hh, ww, c = x.shape
        f = self.num_frames
        b = bf // f
        inner = self.heads * self.head_dim
        if self.motion_grid is not None:
            space_ctx = context.reshape(b * f, context.shape[2], context.shape[3])
            time_ctx = motion_time_context(context, self.motion_grid, hh, ww)
        else:
            space_ctx = jnp.repeat(context, f, axis=0)
            time_ctx = jnp.broadcast_to(context[:, None], (b, hh * ww) + context.shape[1:])
            time_ctx = time_ctx.reshape((b * hh * ww,) + context.shape[1:])

        h = GroupNorm(GROUPS, 1e-6, name="norm", **kw)(x).reshape(bf, hh * ww, c)
        h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h)
        frame_ids = jnp.tile(jnp.arange(f), b)
        t_emb = timestep_embedding(frame_ids, c, True, 0.0).astype(self.dtype)
        emb = TimePositionEmbedding(4 * c, name="time_pos_embed", **kw)(t_emb)[:, None, :]
        mixer = AlphaBlender(0.5, param_dtype=self.param_dtype, name="time_mixer")
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, attention_impl=self.attention_impl,
                                      name=f"transformer_blocks_{i}", **kw)(h, space_ctx)
            mix = TemporalBasicTransformerBlock(self.heads, self.head_dim, f, self.attention_impl,
                                                name=f"temporal_transformer_blocks_{i}", **kw)(h + emb, time_ctx)
            h = nn.with_logical_constraint(mixer(h, mix), _TOKENS)
        h = dense(c, ("mlp", "embed"), name="proj_out", **kw)(h).reshape(bf, hh, ww, c)
        return h + x


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------


class _BlockArgs(nn.Module):
    """Fields shared by the down / mid / up blocks."""

    num_frames: int
    heads: int
    transformer_layers: int
    motion_grid: tuple[int, int] | None
    attention_impl: str | None
    dtype: Dtype
    param_dtype: Dtype

    def resnet(self, ch: int, eps: float, name: str):
        return SpatioTemporalResBlock(ch, self.num_frames, eps, name=name, dtype=self.dtype,
                                      param_dtype=self.param_dtype)

    def transformer(self, ch: int, name: str):
        return TransformerSpatioTemporalModel(self.heads, ch // self.heads, self.num_frames, self.transformer_layers,
                                              self.motion_grid, self.attention_impl, name=name, dtype=self.dtype,
                                              param_dtype=self.param_dtype)


class DownBlock(_BlockArgs):
    """``CrossAttnDownBlockSpatioTemporal`` / ``DownBlockSpatioTemporal``: resnets (+ transformers), downsampler.

    x [B*F, H, W, C_in] -> ([B*F, H', W', C], skip outputs of every layer and of the downsampler)."""

    out_channels: int = 0
    num_layers: int = 1
    has_attention: bool = True
    add_downsample: bool = True
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x, emb, context):
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(self.out_channels, self.eps, f"resnets_{j}")(x, emb)
            if self.has_attention:
                x = self.transformer(self.out_channels, f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 1, name="downsamplers_0", dtype=self.dtype,
                             param_dtype=self.param_dtype)(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockArgs):
    """``UNetMidBlockSpatioTemporal``: resnet -> transformer -> resnet. x [B*F, H, W, C] -> same."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, emb, context):
        ch = x.shape[-1]
        x = self.resnet(ch, self.eps, "resnets_0")(x, emb)
        x = self.transformer(ch, "attentions_0")(x, context)
        return self.resnet(ch, self.eps, "resnets_1")(x, emb)


class UpBlock(_BlockArgs):
    """``UpBlockSpatioTemporal`` / ``CrossAttnUpBlockSpatioTemporal``: per layer concatenate the last skip,
    resnet (+ transformer); then an upsampler. x [B*F, H, W, C'] -> [B*F, 2H, 2W, C] (or H, W last)."""

    out_channels: int = 0
    num_layers: int = 1
    has_attention: bool = True
    add_upsample: bool = True
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x, skips, emb, context):
        skips = list(skips)
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.resnet(self.out_channels, self.eps, f"resnets_{j}")(x, emb)
            if self.has_attention:
                x = self.transformer(self.out_channels, f"attentions_{j}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class UNetSpatioTemporalConditionModel(nn.Module):
    """sample [B, F, H, W, C_in], timesteps scalar or [B], encoder_hidden_states (motion: [B, F, gh*gw, D];
    plain: [B, S, D]), added_time_ids [B, num_time_ids] -> [B, F, H, W, C_out].

    H and W must be multiples of 2**(num_blocks - 1).
    """

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_time_ids):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        b, f, hgt, wid, cin = sample.shape
        factor = 2 ** (n - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"video UNet sample size {hgt}x{wid} must be a multiple of {factor}")
        if cin != cfg.in_channels:
            raise ValueError(f"video UNet sample [B, F, H, W, C] = {tuple(sample.shape)}: config in_channels is "
                             f"{cfg.in_channels}")
        ctx = encoder_hidden_states.astype(self.dtype)
        want = 4 if cfg.motion_conditioning else 3
        if ctx.ndim != want or ctx.shape[0] != b or (cfg.motion_conditioning and ctx.shape[1] != f):
            shape = "[B, F, gh*gw, D]" if cfg.motion_conditioning else "[B, S, D]"
            raise ValueError(f"video UNet encoder_hidden_states {tuple(ctx.shape)}: expected {shape} for sample "
                             f"{tuple(sample.shape)}")
        if added_time_ids.shape != (b, cfg.num_time_ids):
            raise ValueError(f"video UNet added_time_ids {tuple(added_time_ids.shape)}: expected "
                             f"[{b}, {cfg.num_time_ids}] (projection_class_embeddings_input_dim / "
                             "addition_time_embed_dim)")

        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], True, 0.0)
        emb = TimestepEmbedding(cfg.time_embedding_dim, name="time_embedding", **kw)(t_emb.astype(self.dtype))
        tid = timestep_embedding(added_time_ids.reshape(-1), cfg.addition_time_embed_dim, True, 0.0).reshape(b, -1)
        emb = emb + TimestepEmbedding(cfg.time_embedding_dim, name="add_embedding", **kw)(tid.astype(self.dtype))
        emb = jnp.repeat(emb, f, axis=0)  # [B*F, T]

        x = sample.astype(self.dtype).reshape(b * f, hgt, wid, cin)
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        skips = [x]
        grid = tuple(cfg.motion_grid) if cfg.motion_conditioning else None
        blk = dict(num_frames=f, motion_grid=grid, attention_impl=self.attention_impl, **kw)

        for i, block_type in enumerate(cfg.down_block_types):
            x, res = DownBlock(
                heads=cfg.num_heads[i], transformer_layers=cfg.transformer_layers_per_block[i],
                out_channels=cfg.block_out_channels[i], num_layers=cfg.layers_per_block[i],
                has_attention=block_type == "CrossAttnDownBlockSpatioTemporal", add_downsample=i < n - 1,
                eps=RESNET_EPS[block_type], name=f"down_blocks_{i}", **blk,
            )(x, emb, ctx)
            skips.extend(res)

        x = MidBlock(heads=cfg.num_heads[-1], transformer_layers=cfg.transformer_layers_per_block[-1],
                     eps=RESNET_EPS["mid"], name="mid_block", **blk)(x, emb, ctx)

        rev_channels = cfg.block_out_channels[::-1]
        rev_heads = cfg.num_heads[::-1]
        rev_layers = cfg.layers_per_block[::-1]
        rev_tlayers = cfg.transformer_layers_per_block[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            num = rev_layers[i] + 1
            res, skips = skips[-num:], skips[:-num]
            x = UpBlock(
                heads=rev_heads[i], transformer_layers=rev_tlayers[i], out_channels=rev_channels[i], num_layers=num,
                has_attention=block_type == "CrossAttnUpBlockSpatioTemporal", add_upsample=i < n - 1,
                eps=RESNET_EPS[block_type], name=f"up_blocks_{i}", **blk,
            )(x, res, emb, ctx)

        x = GroupNorm(GROUPS, 1e-5, name="conv_norm_out", **kw)(x)
        x = conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(x))
        return x.reshape(b, f, hgt, wid, cfg.out_channels)


def example_inputs(config, batch: int = 1, frames: int = 1):
    """Small example inputs for ``UNetSpatioTemporalConditionModel.init`` (only their shapes matter):
    (sample, timesteps, encoder_hidden_states, added_time_ids)."""
    hw = 2 ** (len(config.block_out_channels) - 1)
    sample = jnp.zeros((batch, frames, hw, hw, config.in_channels), jnp.float32)
    d = config.cross_attention_dim[0]
    if config.motion_conditioning:
        gh, gw = config.motion_grid
        ctx = jnp.zeros((batch, frames, gh * gw, d), jnp.float32)
    else:
        ctx = jnp.zeros((batch, 1, d), jnp.float32)
    return sample, jnp.zeros((batch,), jnp.float32), ctx, jnp.zeros((batch, config.num_time_ids), jnp.float32)
