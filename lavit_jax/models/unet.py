"""The diffusers ``UNet2DConditionModel`` in Flax Linen (SD-1.5 and SDXL variants).

Layout is NHWC throughout: ``sample`` [B, H, W, C_in] -> noise prediction [B, H, W, C_out].
Module names follow the diffusers state-dict keys with list indices joined by ``_``
(``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``) so a released
``diffusion_pytorch_model.bin`` maps onto the params by one generic rule (``lavit_jax.convert.diffusers``).

Supported config (the two released variants and small test versions of them): down blocks
``CrossAttnDownBlock2D``/``DownBlock2D``, mid ``UNetMidBlock2DCrossAttn`` (or none), up blocks
``CrossAttnUpBlock2D``/``UpBlock2D``; per-block ``attention_head_dim`` (= number of heads, the
diffusers naming quirk), ``num_attention_heads``, ``cross_attention_dim``, ``layers_per_block``,
``transformer_layers_per_block`` (int, per block, or per layer), ``use_linear_projection``,
``only_cross_attention``, ``addition_embed_type`` None or ``"text_time"``. Anything else raises a
``ValueError`` naming the config field.

Building blocks shared with the VAE (GroupNorm, Conv, ResnetBlock2D, Down/Upsample2D) live here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import LayerNorm, dense, merge_heads, split_heads

Dtype = jnp.dtype

_FEATURE_MAP = ("batch", None, None, None)  # NHWC activations: shard the batch only.
_TOKENS = ("batch", "length", None)


# --------------------------------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------------------------------


def GroupNorm(num_groups: int = 32, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
              name: str | None = None) -> nn.GroupNorm:
    """torch ``GroupNorm`` over the channel (last) axis: ``nn.GroupNorm`` with float32 two-pass statistics,
    output cast to ``dtype``. x: [B, ..., C]."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def conv(features: int, kernel: int = 3, *, stride: int = 1, padding=None, dtype=jnp.float32,
         param_dtype=jnp.float32, name: str | None = None) -> nn.Conv:
    """2-D conv on NHWC with kernel [k, k, in, out] named (conv_h, conv_w, conv_in, conv_out)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> conv, plus shortcut.

    x: [B, H, W, C_in], temb: [B, T] or None -> [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = dense(self.out_channels, ("embed", "mlp"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = (x + h) / self.output_scale_factor
        return nn.with_logical_constraint(out, _FEATURE_MAP)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=1`` (UNet) or 0 with a (0, 1) pad on H and W (VAE).

    x: [B, H, W, C] -> [B, H/2, W/2, C]."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv. x: [B, H, W, C] -> [B, 2H, 2W, C]."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q/to_k/to_v -> softmax(q k^T / sqrt(d) + bias) v -> to_out.0.

    x: [B, T, C], context: [B, S, C_ctx] or None (self-attention), bias: additive [B, 1, 1, S] or None.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, bias=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        ctx = x if context is None else context
        q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_k", **kw)(ctx)
        v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, name="to_v", **kw)(ctx)
        q, k, v = (split_heads(a, self.heads) for a in (q, k, v))
        impl = self.attention_impl
        if impl in (None, "auto") and (self.head_dim % 8 or self.head_dim > 128):
            impl = "xla"  # fused kernels want head widths that are multiples of 8, at most 128
        o = dot_product_attention(q, k, v, bias=bias, implementation=impl)
        o = merge_heads(o)
        return dense(x.shape[-1], ("heads", "embed"), name="to_out_0", **kw)(o)


# --------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------


class _Net0(nn.Module):
    """GEGLU input projection, holding ``proj`` (C -> 2F). x: [B, T, C] -> [B, T, F]."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = dense(2 * self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        h, gate = jnp.split(y, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    """LN -> self-attention (attn1) -> LN -> cross-attention (attn2) -> LN -> GEGLU FF, residuals.

    x: [B, T, C], context: [B, S, D], context_bias: [B, 1, 1, S] or None -> [B, T, C].
    """

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_bias=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(heads=self.heads, head_dim=self.head_dim, attention_impl=self.attention_impl, **kw)
        h = LayerNorm(1e-5, name="norm1", **kw)(x)
        if self.only_cross_attention:
            x = x + Attention(name="attn1", **akw)(h, context, context_bias)
        else:
            x = x + Attention(name="attn1", **akw)(h)
        h = LayerNorm(1e-5, name="norm2", **kw)(x)
        x = x + Attention(name="attn2", **akw)(h, context, context_bias)
        h = LayerNorm(1e-5, name="norm3", **kw)(x)
        x = x + GEGLUFeed(name="ff", **kw)(h)
        return nn.with_logical_constraint(x, _TOKENS)


class GEGLUFeed(nn.Module):
    """Feed-forward ``ff`` with GEGLU: net_0 (proj C -> 8C, gated to 4C) -> net_2 (4C -> C). x: [B, T, C]."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        h = _Net0(c * self.mult, name="net_0", **kw)(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(c, ("mlp", "embed"), name="net_2", **kw)(h)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> N transformer blocks -> proj_out, plus residual.

    x: [B, H, W, C], context: [B, S, D] -> [B, H, W, C].
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_bias=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h.reshape(b, hh * ww, c))
        else:
            h = conv(inner, 1, name="proj_in", **kw)(h).reshape(b, hh * ww, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads, self.head_dim, self.only_cross_attention, self.attention_impl,
                name=f"transformer_blocks_{i}", **kw,
            )(h, context, context_bias)
        if self.use_linear_projection:
            h = dense(c, ("mlp", "embed"), name="proj_out", **kw)(h).reshape(b, hh, ww, c)
        else:
            h = conv(c, 1, name="proj_out", **kw)(h.reshape(b, hh, ww, inner))
        return h + x


# --------------------------------------------------------------------------------------------------
# Time embeddings
# --------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding as diffusers ``get_timestep_embedding``. timesteps: [N] -> [N, dim] float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2. x: [B, D_in] -> [B, features]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x)
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Fields that must keep their default (value) because this implementation has no other path.
_UNSUPPORTED_DEFAULTS = {
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "dual_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "act_fn": "silu",
    "attention_type": "default",
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "mid_block_only_cross_attention": None,
    "addition_embed_type_num_heads": 64,
    "downsample_padding": 1,
}


def _per_block(value, n: int, field: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"UNet config field {field!r}: {len(value)} entries for {n} down blocks")
        return list(value)
    return [value] * n


def unet_config(diffusers_config: dict) -> ml_collections.FrozenConfigDict:
    """Normalises a diffusers ``unet/config.json`` dict into per-block lists (frozen ConfigDict).

    Raises ValueError naming the field for anything this implementation does not support.
    """
    d = dict(diffusers_config)
    for field, default in _UNSUPPORTED_DEFAULTS.items():
        if field in d and d[field] != default and not (default is None and d[field] in (None, False)):
            raise ValueError(f"UNet config field {field!r}={d[field]!r} is not supported (only {default!r})")
    if d.get("norm_num_groups") is None:
        raise ValueError("UNet config field 'norm_num_groups' must be set (GroupNorm everywhere)")
    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    n = len(down)
    for t in down:
        if t not in _DOWN_TYPES:
            raise ValueError(f"UNet config field 'down_block_types': {t!r} is not supported ({_DOWN_TYPES})")
    for t in up:
        if t not in _UP_TYPES:
            raise ValueError(f"UNet config field 'up_block_types': {t!r} is not supported ({_UP_TYPES})")
    if len(up) != n:
        raise ValueError(f"UNet config: {len(up)} up_block_types for {n} down_block_types")
    mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"UNet config field 'mid_block_type': {mid!r} is not supported")
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(channels) != n:
        raise ValueError(f"UNet config field 'block_out_channels': {len(channels)} entries for {n} down blocks")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # the diffusers naming quirk
    heads = _per_block(heads, n, "attention_head_dim")
    cross = _per_block(d.get("cross_attention_dim", 1280), n, "cross_attention_dim")
    layers = _per_block(d.get("layers_per_block", 2), n, "layers_per_block")
    tlayers = _per_block(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    tlayers = [list(t) if isinstance(t, list | tuple) else [t] * layers[i] for i, t in enumerate(tlayers)]
    rev_t = d.get("reverse_transformer_layers_per_block")
    if rev_t is None:
        rev_t = [[t[0]] * (layers[n - 1 - i] + 1) if len(set(t)) == 1 else None for i, t in
                 enumerate(reversed(tlayers))]
        if any(r is None for r in rev_t):
            raise ValueError("UNet config: per-layer 'transformer_layers_per_block' needs "
                             "'reverse_transformer_layers_per_block'")
    else:
        rev_t = [list(t) if isinstance(t, list | tuple) else [t] * (layers[n - 1 - i] + 1)
                 for i, t in enumerate(rev_t)]
    only_cross = _per_block(d.get("only_cross_attention", False), n, "only_cross_attention")
    add_type = d.get("addition_embed_type")
    if add_type not in (None, "text_time"):
        raise ValueError(f"UNet config field 'addition_embed_type': {add_type!r} is not supported (None, 'text_time')")
    if add_type == "text_time":
        for f in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not d.get(f):
                raise ValueError(f"UNet config: addition_embed_type 'text_time' needs field {f!r}")
    for i, (c, h) in enumerate(zip(channels, heads)):
        if c % h:
            raise ValueError(f"UNet config: block {i} has {c} channels, not divisible by {h} attention heads")
    return ml_collections.FrozenConfigDict(dict(
        in_channels=int(d.get("in_channels", 4)),
        out_channels=int(d.get("out_channels", 4)),
        sample_size=d.get("sample_size"),
        center_input_sample=bool(d.get("center_input_sample", False)),
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=float(d.get("freq_shift", 0)),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block=mid is not None,
        block_out_channels=tuple(int(c) for c in channels),
        layers_per_block=tuple(int(x) for x in layers),
        transformer_layers_per_block=tuple(tuple(int(x) for x in t) for t in tlayers),
        reverse_transformer_layers_per_block=tuple(tuple(int(x) for x in t) for t in rev_t),
        num_heads=tuple(int(h) for h in heads),
        cross_attention_dim=tuple(int(c) for c in cross),
        only_cross_attention=tuple(bool(o) for o in only_cross),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        norm_num_groups=int(d["norm_num_groups"]),
        norm_eps=float(d.get("norm_eps", 1e-5)),
        mid_block_scale_factor=float(d.get("mid_block_scale_factor", 1.0)),
        resnet_out_scale_factor=float(d.get("resnet_out_scale_factor", 1.0)),
        time_embedding_dim=int(d.get("time_embedding_dim") or channels[0] * 4),
        addition_embed_type=add_type,
        addition_time_embed_dim=int(d.get("addition_time_embed_dim") or 0),
        projection_class_embeddings_input_dim=int(d.get("projection_class_embeddings_input_dim") or 0),
    ))


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (has_attention) or ``DownBlock2D``: resnets (+ transformers), downsampler.

    x: [B, H, W, C_in] -> ([B, H', W', C], skip outputs of every layer and of the downsampler).
    """

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: Sequence[int]
    only_cross_attention: bool
    add_downsample: bool
    output_scale_factor: float = 1.0
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, context, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.out_channels
        skips = []
        for j in range(self.num_layers):
            x = ResnetBlock2D(ch, self.groups, self.eps, self.output_scale_factor, name=f"resnets_{j}", **kw)(x, emb)
            if self.has_attention:
                x = Transformer2DModel(self.heads, ch // self.heads, self.transformer_layers[j], self.groups,
                                       self.use_linear_projection, self.only_cross_attention, self.attention_impl,
                                       name=f"attentions_{j}", **kw)(x, context, bias)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(ch, 1, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet -> transformer -> resnet. x: [B, H, W, C] -> same."""

    heads: int
    transformer_layers: int
    output_scale_factor: float = 1.0
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, context, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = x.shape[-1]
        x = ResnetBlock2D(ch, self.groups, self.eps, self.output_scale_factor, name="resnets_0", **kw)(x, emb)
        x = Transformer2DModel(self.heads, ch // self.heads, self.transformer_layers, self.groups,
                               self.use_linear_projection, False, self.attention_impl, name="attentions_0",
                               **kw)(x, context, bias)
        return ResnetBlock2D(ch, self.groups, self.eps, self.output_scale_factor, name="resnets_1", **kw)(x, emb)


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (has_attention) or ``UpBlock2D``: each layer concatenates the last skip,
    resnet (+ transformer); then an upsampler. x: [B, H, W, C'] -> [B, 2H, 2W, C] (or [B, H, W, C] last).
    """

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: Sequence[int]
    only_cross_attention: bool
    add_upsample: bool
    output_scale_factor: float = 1.0
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    attention_impl: str | None = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, emb, context, bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.out_channels
        skips = list(skips)
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock2D(ch, self.groups, self.eps, self.output_scale_factor, name=f"resnets_{j}", **kw)(x, emb)
            if self.has_attention:
                x = Transformer2DModel(self.heads, ch // self.heads, self.transformer_layers[j], self.groups,
                                       self.use_linear_projection, self.only_cross_attention, self.attention_impl,
                                       name=f"attentions_{j}", **kw)(x, context, bias)
        if self.add_upsample:
            x = Upsample2D(ch, name="upsamplers_0", **kw)(x)
        return x


class UNet2DConditionModel(nn.Module):
    """Conditional UNet. sample [B, H, W, C_in], timesteps scalar or [B], encoder_hidden_states [B, S, D],
    encoder_attention_mask [B, S] bool (True = attend) or None, text_embeds [B, P] and time_ids [B, 6]
    (``text_time`` only) -> [B, H, W, C_out]. H and W must be multiples of 2**(num_blocks - 1).
    """

    config: ml_collections.FrozenConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, encoder_attention_mask=None,
                 text_embeds=None, time_ids=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        b, hgt, wid, _ = sample.shape
        factor = 2 ** (n - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"UNet sample size {hgt}x{wid} must be a multiple of {factor}")
        groups, eps = cfg.norm_num_groups, cfg.norm_eps

        # Conditioning: additive -10000 bias on masked context positions, as diffusers does.
        context = encoder_hidden_states.astype(self.dtype)
        bias = None
        if encoder_attention_mask is not None:
            bias = (1.0 - encoder_attention_mask.astype(jnp.float32)) * -10000.0
            bias = bias[:, None, None, :]

        # Time embedding (+ SDXL text_time embedding).
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embedding_dim, name="time_embedding", **kw)(t_emb.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (addition_embed_type 'text_time') needs text_embeds and time_ids")
            tid = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), tid], axis=-1)
            if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"text_embeds {text_embeds.shape[-1]} + time_ids {time_ids.shape[-1]}x"
                    f"{cfg.addition_time_embed_dim} = {add.shape[-1]} features, but the UNet config's "
                    f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
            emb = emb + TimestepEmbedding(cfg.time_embedding_dim, name="add_embedding", **kw)(add.astype(self.dtype))

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        skips = [x]

        blk = dict(groups=groups, eps=eps, use_linear_projection=cfg.use_linear_projection,
                   attention_impl=self.attention_impl, **kw)

        for i, block_type in enumerate(cfg.down_block_types):
            x, res = DownBlock(
                cfg.block_out_channels[i], cfg.layers_per_block[i], block_type == "CrossAttnDownBlock2D",
                cfg.num_heads[i], cfg.transformer_layers_per_block[i], cfg.only_cross_attention[i],
                add_downsample=i < n - 1, output_scale_factor=cfg.resnet_out_scale_factor,
                name=f"down_blocks_{i}", **blk,
            )(x, emb, context, bias)
            skips.extend(res)

        if cfg.mid_block:
            x = MidBlock(cfg.num_heads[-1], cfg.transformer_layers_per_block[-1][0], cfg.mid_block_scale_factor,
                         name="mid_block", **blk)(x, emb, context, bias)

        rev_channels = cfg.block_out_channels[::-1]
        rev_heads = cfg.num_heads[::-1]
        rev_layers = cfg.layers_per_block[::-1]
        rev_only_cross = cfg.only_cross_attention[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            num = rev_layers[i] + 1
            res, skips = skips[-num:], skips[:-num]
            x = UpBlock(
                rev_channels[i], num, block_type == "CrossAttnUpBlock2D", rev_heads[i],
                cfg.reverse_transformer_layers_per_block[i], rev_only_cross[i], add_upsample=i < n - 1,
                output_scale_factor=cfg.resnet_out_scale_factor, name=f"up_blocks_{i}", **blk,
            )(x, res, emb, context, bias)

        x = GroupNorm(groups, eps, name="conv_norm_out", **kw)(x)
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(x))


def init_unet_params(model: UNet2DConditionModel, key, sample_hw: Sequence[int] | None = None, batch: int = 1,
                     context_len: int = 8):
    """Boxed (logically partitioned) params for ``model`` from random init."""
    cfg = model.config
    h, w = sample_hw or (2 ** (len(cfg.block_out_channels) - 1),) * 2
    args = dummy_unet_inputs(cfg, batch, (h, w), context_len)
    return model.init(key, *args)["params"]


def dummy_unet_inputs(cfg, batch: int, hw: Sequence[int], context_len: int):
    """Zero inputs of the right shapes: (sample, timesteps, context, mask, text_embeds, time_ids)."""
    sample = jnp.zeros((batch, hw[0], hw[1], cfg.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    ctx = jnp.zeros((batch, context_len, cfg.cross_attention_dim[0]), jnp.float32)
    mask = jnp.ones((batch, context_len), bool)
    text_embeds = time_ids = None
    if cfg.addition_embed_type == "text_time":
        n_ids = 6
        pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        text_embeds = jnp.zeros((batch, pooled), jnp.float32)
        time_ids = jnp.zeros((batch, n_ids), jnp.float32)
    return sample, t, ctx, mask, text_embeds, time_ids


def example_inputs(config, batch: int = 1):
    """Small example inputs for ``UNet2DConditionModel.init`` (only their shapes matter)."""
    hw = (2 ** (len(config.block_out_channels) - 1),) * 2
    return dummy_unet_inputs(config, batch, hw, 1)
