"""EVA-CLIP ViT (ViT-g/14 in LaVIT): the frozen image encoder of the visual tokenizer.

pixels [B, H, W, 3] (CLIP-normalised, NHWC) -> features [B, 1 + (H/p)*(W/p), C], the output of the
last block *before* the final norm, CLS first (LaVIT drops it).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import LayerNorm, Mlp, dense, merge_heads, split_heads
from lavit_jax.ops.scan import apply_layers


class EvaAttention(nn.Module):
    """Fused qkv without bias + separate q_bias, v_bias (key bias zero). x [B,T,C] -> [B,T,C]."""

    width: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        c = self.width
        qkv = dense(3 * c, ("embed", "heads"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="qkv")(x)
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads",))
        q_bias = self.param("q_bias", zeros, (c,), self.param_dtype)
        v_bias = self.param("v_bias", zeros, (c,), self.param_dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = q + q_bias.astype(q.dtype)
        v = v + v_bias.astype(v.dtype)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        out = dot_product_attention(q, k, v, implementation=self.attention_impl)
        out = merge_heads(out)
        return dense(c, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)


class EvaBlock(nn.Module):
    """Pre-LN block: x += attn(norm1(x)); x += mlp(norm2(x)). x [B,T,C] -> ([B,T,C], None)."""

    width: int
    heads: int
    mlp_hidden: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.eps, name="norm1", **kw)(x)
        x = x + EvaAttention(self.width, self.heads, attention_impl=self.attention_impl, name="attn", **kw)(h)
        h = LayerNorm(self.eps, name="norm2", **kw)(x)
        x = x + Mlp(self.mlp_hidden, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class EvaViT(nn.Module):
    """EVA-CLIP vision tower. pixels [B,H,W,3] -> [B, 1+N, C] (pre-final-norm, CLS first)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 40
    heads: int = 16
    mlp_ratio: float = 4.3637
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, pixels):
        b, h, w, _ = pixels.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"pixels {pixels.shape}: expected {self.image_size}x{self.image_size} images (NHWC)")
        p = self.patch_size
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ("conv_h", "conv_w", "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embed_proj",
        )(pixels.astype(self.dtype))
        x = x.reshape(b, -1, self.width)
        n = x.shape[1]
        init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, "pos", "embed"))
        cls = self.param("cls_token", init, (1, 1, self.width), self.param_dtype)
        pos = self.param("pos_embed", init, (1, n + 1, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
        x = x + pos.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        hidden = int(self.width * self.mlp_ratio)
        x, _ = apply_layers(EvaBlock, self.depth, "blocks", x, scan=self.scan_layers, remat=self.remat,
                            block_args=(self.width, self.heads, hidden, self.eps, self.dtype, self.param_dtype,
                                        self.attention_impl))
        return x
