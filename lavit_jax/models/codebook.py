"""The l2-normalised visual codebook and its nearest-code quantizer.

z [..., d] -> (quantized [..., d], ids [...]): z is l2-normalised, the nearest of K codebook rows by
squared distance is picked, and that row is returned. Kept as its own module so that stage-1
training can add EMA / k-means updates of ``embedding`` without touching the tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from lavit_jax.ops.distances import l2_normalize, squared_distances


def nearest_code(z, codebook):
    """z [..., d] (already normalised) -> ids [...] int32 of the nearest codebook rows."""
    flat = z.reshape(-1, z.shape[-1])
    ids = jnp.argmin(squared_distances(flat, codebook), axis=1).astype(jnp.int32)
    return ids.reshape(z.shape[:-1])


def lookup(codebook, ids):
    """Raw codebook rows for ids. codebook [K,d], ids [...] -> [..., d]."""
    return jnp.take(codebook, ids, axis=0)


class Codebook(nn.Module):
    """Nearest-code vector quantizer over a [n_code, code_dim] codebook (``quantize.embedding.weight``)."""

    n_code: int
    code_dim: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        def init(key, shape, dtype):
            return l2_normalize(jax.random.normal(key, shape, jnp.float32)).astype(dtype)

        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("codes", "code_dim")), (self.n_code, self.code_dim),
            self.param_dtype,
        )

    def __call__(self, z):
        """z [..., d] -> (quantized [..., d] float32, ids [...] int32). z is l2-normalised first."""
        zn = l2_normalize(z.astype(jnp.float32))
        ids = nearest_code(zn, self.embedding)
        return lookup(self.embedding, ids).astype(jnp.float32), ids

    def lookup(self, ids):
        """ids [...] -> codebook rows [..., d]."""
        return lookup(self.embedding, ids)


def ema_update(ema, z, ids, mask, decay: float = 0.99, eps: float = 1e-5):
    """One EMA codebook update (as in VQ-VAE-2 / BEiT-v2, l2-normalised codes).

    ema: dict(cluster_size [K], embed_sum [K,d]); z [M,d] normalised encoder outputs, ids [M],
    mask [M] (1 = a real token). Returns (new ema, new codebook [K,d] l2-normalised). Codes that
    were never used keep their Laplace-smoothed average.
    """
    k = ema["cluster_size"].shape[0]
    onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32) * mask.astype(jnp.float32)[:, None]
    counts = onehot.sum(0)
    sums = jnp.einsum("mk,md->kd", onehot, z.astype(jnp.float32))
    cluster_size = decay * ema["cluster_size"] + (1 - decay) * counts
    embed_sum = decay * ema["embed_sum"] + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    codebook = l2_normalize(embed_sum / smoothed[:, None])
    return {"cluster_size": cluster_size, "embed_sum": embed_sum}, codebook
