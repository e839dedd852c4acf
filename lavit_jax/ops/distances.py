"""Vector-quantisation maths shared by the codebook model and the sharded nearest-code search."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||_2, eps) along the last axis (torch ``F.normalize``), computed in float32."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, eps)).astype(x.dtype)


def squared_distances(z, codebook):
    """||z||^2 + ||e||^2 - 2 z.e, as the reference computes it. z [M,d], codebook [K,d] -> [M,K]."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    return (
        jnp.sum(z * z, axis=1, keepdims=True)
        + jnp.sum(e * e, axis=1)[None, :]
        - 2.0 * jnp.einsum("md,kd->mk", z, e, precision=jax.lax.Precision.HIGHEST)
    )
