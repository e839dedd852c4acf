"""Small shared layers whose parameters carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype

default_kernel_init = nn.initializers.truncated_normal(0.02)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    name: str | None = None,
    kernel_init=default_kernel_init,
) -> nn.Dense:
    """``nn.Dense`` with kernel [in, out] named ``axes`` and bias named ``axes[1]``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def LayerNorm(eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """``nn.LayerNorm`` as torch computes it: statistics in float32 with the two-pass variance, output
    cast to ``dtype``; scale/bias named ``norm``. x: [..., C] -> [..., C]."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2. x: [..., C] -> [..., out or C]."""

    hidden: int
    out: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = self.out or x.shape[-1]
        h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
        return dense(out, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)


def split_heads(x, num_heads: int):
    """[B, T, H*D] -> [B, T, H, D]."""
    b, t, c = x.shape
    return x.reshape(b, t, num_heads, c // num_heads)


def merge_heads(x):
    """[B, T, H, D] -> [B, T, H*D]."""
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
