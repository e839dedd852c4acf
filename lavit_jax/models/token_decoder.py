"""Token decoders: kept visual codes -> diffusion condition (LaVIT's ``VQDecoder``s).

codes [B, N, code_dim] (kept codes compacted to the front, zero-padded) + lengths [B] ->
- low-res: condition [B, Q, unet_dim_lowres] for the SD-1.5 UNet;
- high-res: (prompt_embeds [B, Q, sum(unet_dims_highres)], pooled [B, pooled_dim]) for SDXL.
Q = (image_size / patch_size)^2 = 256 learned queries.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import LayerNorm, Mlp, dense, merge_heads, split_heads
from lavit_jax.ops.scan import apply_layers


class DecoderSelfAttention(nn.Module):
    """Full self-attention with a fused qkv (bias). x [B,Q,C] -> [B,Q,C]."""

    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = jnp.split(dense(3 * c, ("embed", "heads"), name="qkv", **kw)(x), 3, axis=-1)
        out = dot_product_attention(*(split_heads(t, self.heads) for t in (q, k, v)),
                                    implementation=self.attention_impl)
        return dense(c, ("heads", "embed"), name="proj", **kw)(merge_heads(out))


class DecoderCrossAttention(nn.Module):
    """Queries attend to codes; padded codes get the reference's additive -10000.

    x [B,Q,C], codes [B,N,C], mask [B,N] (1 = valid) -> [B,Q,C].
    """

    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, codes, mask):
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = split_heads(dense(c, ("embed", "heads"), name="query", **kw)(x), self.heads)
        k = split_heads(dense(c, ("embed", "heads"), name="key", **kw)(codes), self.heads)
        v = split_heads(dense(c, ("embed", "heads"), name="value", **kw)(codes), self.heads)
        bias = ((1.0 - mask.astype(jnp.float32)) * -10000.0)[:, None, None, :]
        out = dot_product_attention(q, k, v, bias=bias, implementation="xla")
        return dense(c, ("heads", "embed"), name="proj", **kw)(merge_heads(out))


class DecoderBlock(nn.Module):
    """x += self_attn(norm0 x); x += cross_attn(norm1 x, codes); x += mlp(norm2 x). -> (x, None)."""

    heads: int
    mlp_hidden: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, codes, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + DecoderSelfAttention(self.heads, attention_impl=self.attention_impl, name="self_attn", **kw)(
            LayerNorm(self.eps, name="norm0", **kw)(x))
        x = x + DecoderCrossAttention(self.heads, name="cross_attn", **kw)(
            LayerNorm(self.eps, name="norm1", **kw)(x), codes, mask)
        x = x + Mlp(self.mlp_hidden, name="mlp", **kw)(LayerNorm(self.eps, name="norm2", **kw)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class AttentionPool(nn.Module):
    """CLIP-style attention pool: mean token prepended, positional embedding, MHA, token 0, c_proj.

    x [B, Q, D] -> [B, out_dim].
    """

    heads: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, q, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pos = self.param("positional_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5), ("pos", "embed")),
                         (q + 1, d), self.param_dtype)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + pos.astype(x.dtype)
        query = split_heads(dense(d, ("embed", "heads"), name="q_proj", **kw)(x[:, :1]), self.heads)
        key = split_heads(dense(d, ("embed", "heads"), name="k_proj", **kw)(x), self.heads)
        value = split_heads(dense(d, ("embed", "heads"), name="v_proj", **kw)(x), self.heads)
        out = merge_heads(dot_product_attention(query, key, value, implementation="xla"))[:, 0]
        return dense(self.out_dim, ("heads", "out"), name="c_proj", **kw)(out)


class TokenDecoder(nn.Module):
    """LaVIT token decoder; ``highres`` picks the SDXL head. See the module docstring for shapes."""

    config: ml_collections.ConfigDict
    highres: bool = False

    @nn.compact
    def __call__(self, codes, lengths, features_only: bool = False):
        """``features_only``: return the decode_task_layer output [B, Q, decoder_out_dim] (the
        stage-1 reconstruction of the encoder features) instead of the UNet condition."""
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        c = cfg.width
        num_queries = (cfg.image_size // cfg.patch_size) ** 2
        b, n, _ = codes.shape
        if n > num_queries:
            raise ValueError(f"codes {codes.shape}: at most {num_queries} codes per image")
        mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.float32)
        x = dense(c, ("code_dim", "embed"), name="in_proj", **kw)(codes.astype(dtype))
        x = x * mask[..., None].astype(x.dtype)  # the reference pads with zeros after in_proj
        init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, "pos", "embed"))
        pos = self.param("pos_embed", init, (1, num_queries, c), param_dtype)
        query = self.param("query_embed", init, (1, num_queries, c), param_dtype)
        x = x + pos[:, :n].astype(x.dtype)
        h = jnp.broadcast_to(query.astype(dtype), (b, num_queries, c))
        block_args = (cfg.heads, int(c * cfg.mlp_ratio), cfg.tokenizer_layernorm_eps)
        h, _ = apply_layers(DecoderBlock, cfg.decoder_depth, "blocks", h, x, mask, scan=cfg.scan_layers,
                            remat=cfg.remat, block_args=block_args,
                            block_kwargs=dict(attention_impl=cfg.attention_impl, **kw))
        h = LayerNorm(cfg.tokenizer_layernorm_eps, name="norm", **kw)(h)
        h = dense(c, ("embed", "mlp"), name="decode_task_layer_0", **kw)(h)
        h = dense(cfg.decoder_out_dim, ("mlp", "embed"), name="decode_task_layer_2", **kw)(jnp.tanh(h))
        if features_only:
            return h
        if not self.highres:
            return dense(cfg.unet_dim_lowres, ("embed", "out"), name="unet_proj", **kw)(h)
        d1, d2 = cfg.unet_dims_highres
        prompt = jnp.concatenate([
            dense(d1, ("embed", "out"), name="unet_proj_1", **kw)(h),
            dense(d2, ("embed", "out"), name="unet_proj_2", **kw)(h),
        ], axis=-1)
        pooled = AttentionPool(cfg.heads, cfg.pooled_dim, name="unet_attnpool", **kw)(h)
        return prompt, pooled


# (parent path, name) of the repeated layers: stacked on a leading axis when ``scan_layers``.
DECODER_STACKS = (((), "blocks"),)
