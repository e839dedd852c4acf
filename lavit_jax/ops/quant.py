"""Int8 weight-only quantisation: symmetric, one scale per output channel.

A float kernel W [..., in, out] (leading axes: stacked layers) becomes ``q = round(W / s)`` int8 in
[-127, 127] with ``s = max|W[..., :, j]| / 127`` per output channel j (float32, [..., out]).
``Int8Dense`` computes ``(x @ q) * s``: the weights are read as int8 (half of bf16's bytes, the decode
step's bound), the int8 -> compute-dtype convert is fused into the matmul by XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

WEIGHT_MODES = ("float", "int8")  # a model's ``weights`` knob: its kernels as stored, or int8 + scales
QMAX = 127


@jax.jit
def quantize_kernel(kernel):
    """kernel [..., in, out] float -> {"kernel": int8 [..., in, out], "scale": float32 [..., out]}."""
    w = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return {"kernel": q, "scale": scale}


def dequantize_kernel(qk) -> jax.Array:
    """{"kernel", "scale"} -> the float32 kernel they stand for [..., in, out]."""
    return qk["kernel"].astype(jnp.float32) * qk["scale"][..., None, :]


def quantize_params(params, names=None):
    """Every Dense ``{"kernel": W}`` in a param tree -> ``quantize_kernel(W)`` (other leaves as they are).

    names: the module names to quantise (default: every module holding a ``kernel``).
    """
    def walk(tree, name=None):
        if not isinstance(tree, dict):
            return tree
        if "kernel" in tree and not isinstance(tree["kernel"], dict) and (names is None or name in names):
            return {**{k: v for k, v in tree.items() if k != "kernel"}, **quantize_kernel(tree["kernel"])}
        return {k: walk(v, k) for k, v in tree.items()}

    return walk(params)


class Int8Dense(nn.Module):
    """Bias-free Dense on an int8 kernel [in, out] with float32 scales [out]: x [..., in] -> [..., out] in ``dtype``.

    Params ``kernel`` (int8) and ``scale`` carry the logical axis names ``axes`` and ``axes[1]``.
    """

    features: int
    axes: tuple
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes),
                            (x.shape[-1], self.features), jnp.int8)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axes[1],)),
                           (self.features,), jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * scale).astype(self.dtype)
