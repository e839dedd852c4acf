"""Hand-written collectives (``jax.shard_map``) for the two places where GSPMD would gather a
vocabulary-sized axis onto every device.

- ``vocab_parallel_cross_entropy``: LM loss with the head's vocabulary sharded over ``'tensor'``; each
  shard computes only its slice of the logits, and the log-sum-exp and the label logit are combined
  with ``pmax`` / ``psum`` over ``'tensor'`` (Megatron's vocab-parallel cross entropy).
- ``sharded_nearest_code``: nearest codebook row with the codebook's K rows sharded over ``'tensor'``;
  each shard searches its rows, then a cross-shard min with index (lowest index on ties, as argmin).

Both take a mesh from ``lavit_jax.ops.sharding.make_mesh`` (axes data, fsdp, tensor); the batch /
row axis is split over the mesh axes of the logical ``batch`` rule, and differentiating through them
(``jax.grad``) gives the gradients of the unsharded computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lavit_jax.ops.distances import squared_distances
from lavit_jax.ops.sharding import DEFAULT_RULES

BATCH_AXES = dict(DEFAULT_RULES)["batch"]  # mesh axes of the batch: ('data', 'fsdp')
VOCAB_AXIS = dict(DEFAULT_RULES)["vocab"]  # mesh axis of the vocabulary / codebook rows: 'tensor'


def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))


def vocab_parallel_cross_entropy(
    hidden, lm_head_kernel, labels, weights, mesh: Mesh, *, batch_axes=BATCH_AXES, vocab_axis=VOCAB_AXIS
):
    """Cross entropy of ``hidden @ lm_head_kernel`` without full-vocabulary logits on any device.

    hidden [B, T, C] (batch split over ``batch_axes``), lm_head_kernel [C, V] (V split over
    ``vocab_axis``), labels [B, T] int in [0, V), weights [B, T] -> (mean, per_token):
    per_token [B, T] float32 is ``logsumexp(logits) - logits[label]`` (unweighted), mean is
    ``sum(weights * per_token) / sum(weights)`` (0 when all weights are 0). Logits are accumulated in
    float32. B must divide by the batch axes' size and V by the vocab axis' size.
    """
    b, t, c = hidden.shape
    if lm_head_kernel.ndim != 2 or lm_head_kernel.shape[0] != c:
        raise ValueError(f"lm_head_kernel has shape {lm_head_kernel.shape}, expected [C={c}, V]")
    v = lm_head_kernel.shape[1]
    for name, a in (("labels", labels), ("weights", weights)):
        if a.shape != (b, t):
            raise ValueError(f"{name} has shape {a.shape}, expected [B, T] = {(b, t)}")
    n_vocab, n_batch = _axis_size(mesh, vocab_axis), _axis_size(mesh, batch_axes)
    if v % n_vocab:
        raise ValueError(f"lm_head_kernel: vocabulary {v} does not split over mesh axis {vocab_axis!r} ({n_vocab})")
    if b % n_batch:
        raise ValueError(f"hidden: batch {b} does not split over mesh axes {batch_axes} ({n_batch})")
    v_local = v // n_vocab

    def local(h, w, y):
        # h [b, T, C], w [C, V/n] (this shard's columns), y [b, T] global ids.
        logits = jnp.einsum("btc,cv->btv", h, w, preferred_element_type=jnp.float32)
        # The max only stabilises the exponentials; it cancels in the loss, so no gradient through it.
        m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), vocab_axis)
        sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), vocab_axis)
        lse = m + jnp.log(sum_exp)
        local_label = y - jax.lax.axis_index(vocab_axis) * v_local
        owned = (local_label >= 0) & (local_label < v_local)
        picked = jnp.take_along_axis(logits, jnp.clip(local_label, 0, v_local - 1)[..., None], axis=-1)[..., 0]
        label_logit = jax.lax.psum(jnp.where(owned, picked, 0.0), vocab_axis)
        return lse - label_logit

    per_token = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(batch_axes, None, None), P(None, vocab_axis), P(batch_axes, None)),
        out_specs=P(batch_axes, None),
    )(hidden, lm_head_kernel, labels.astype(jnp.int32))
    w = weights.astype(jnp.float32)
    total = jnp.sum(w)
    mean = jnp.sum(w * per_token) / jnp.where(total == 0, 1.0, total)
    return mean, per_token


def sharded_nearest_code(z, codebook, mesh: Mesh, *, batch_axes=BATCH_AXES, code_axis=VOCAB_AXIS):
    """z [M, d], codebook [K, d] (rows split over ``code_axis``) -> ids [M] int32 of the nearest rows.

    Same distances and tie-breaking (lowest index) as ``lavit_jax.models.codebook.nearest_code``;
    z's rows are split over ``batch_axes`` (padded to a multiple of their size). K must divide by
    the code axis' size.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z {z.shape} and codebook {codebook.shape} must be [M, d] and [K, d] with the same d")
    m, k = z.shape[0], codebook.shape[0]
    n_code, n_batch = _axis_size(mesh, code_axis), _axis_size(mesh, batch_axes)
    if k % n_code:
        raise ValueError(f"codebook: {k} rows do not split over mesh axis {code_axis!r} ({n_code})")
    k_local = k // n_code
    pad = (-m) % n_batch
    if pad:
        z = jnp.pad(z, ((0, pad), (0, 0)))

    def local(zs, e):
        dist = squared_distances(zs, e)  # [m, K/n]
        local_min = jnp.min(dist, axis=1)
        ids = jnp.argmin(dist, axis=1).astype(jnp.int32) + jax.lax.axis_index(code_axis).astype(jnp.int32) * k_local
        best = jax.lax.pmin(local_min, code_axis)
        # Among the shards holding the minimum, the lowest global index (each shard's argmin is its lowest).
        return jax.lax.pmin(jnp.where(local_min == best, ids, jnp.int32(k)), code_axis)

    ids = jax.shard_map(
        local, mesh=mesh, in_specs=(P(batch_axes, None), P(code_axis, None)), out_specs=P(batch_axes)
    )(z, codebook)
    return ids[:m]
