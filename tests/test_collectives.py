"""Hand-written collectives on 8 simulated CPU devices against their unsharded references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lavit_jax.models.codebook import l2_normalize, nearest_code
from lavit_jax.ops.collectives import sharded_nearest_code, vocab_parallel_cross_entropy
from lavit_jax.ops.sharding import make_mesh

MESHES = [(1, 4, 2), (2, 1, 4), (8, 1, 1)]
TOL = 1e-5


def reference_loss(hidden, kernel, labels, weights):
    logits = jnp.einsum("btc,cv->btv", hidden, kernel)  # full [B, T, V]
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(weights * per_token) / jnp.sum(weights), per_token


def lm_inputs(b=8, t=5, c=16, v=96, seed=0):
    r = np.random.default_rng(seed)
    hidden = r.standard_normal((b, t, c)).astype(np.float32)
    kernel = (r.standard_normal((c, v)) * 0.5).astype(np.float32)
    labels = r.integers(0, v, (b, t)).astype(np.int32)
    labels[0, :4] = [0, v - 1, v // 2 - 1, v // 2]  # first/last ids and a shard boundary
    weights = (r.random((b, t)) > 0.3).astype(np.float32)
    weights[1] = r.random(t)  # non-binary weights too
    return hidden, kernel, labels, weights


@pytest.mark.parametrize("shape", MESHES)
def test_vocab_parallel_cross_entropy_loss_and_grads(shape):
    mesh = make_mesh(shape)
    hidden, kernel, labels, weights = lm_inputs()

    def sharded(h, w):
        return vocab_parallel_cross_entropy(h, w, labels, weights, mesh)

    (mean, per_token), (dh, dw) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(
        hidden, kernel
    )
    (ref_mean, ref_tok), (rdh, rdw) = jax.value_and_grad(
        lambda h, w: reference_loss(h, w, labels, weights), argnums=(0, 1), has_aux=True
    )(hidden, kernel)
    np.testing.assert_allclose(np.asarray(per_token), np.asarray(ref_tok), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(mean), float(ref_mean), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(rdh), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(rdw), atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 1, 4)])
def test_vocab_parallel_cross_entropy_never_holds_full_vocab(shape):
    # In the compiled forward + backward no array has the full vocabulary (96) as a dimension; the
    # per-device logits are [B / batch shards, T, V / tensor shards].
    mesh = make_mesh(shape)
    hidden, kernel, labels, weights = lm_inputs()
    fn = jax.jit(jax.grad(lambda h, w: vocab_parallel_cross_entropy(h, w, labels, weights, mesh)[0], argnums=(0, 1)))
    hlo = fn.lower(hidden, kernel).compile().as_text()
    dims = {tuple(int(x) for x in s.split(",") if x) for s in re.findall(r"f32\[([0-9,]*)\]", hlo)}
    n_batch, n_vocab = shape[0] * shape[1], shape[2]
    assert (8 // n_batch, 5, 96 // n_vocab) in dims
    assert not [d for d in dims if 96 in d]


def test_vocab_parallel_cross_entropy_large_logits_and_sharded_inputs():
    # Logits in the hundreds (the max subtraction matters) and inputs already placed on the mesh.
    mesh = make_mesh((2, 1, 4))
    hidden, kernel, labels, weights = lm_inputs(seed=1)
    kernel = kernel * 60.0
    h = jax.device_put(hidden, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    w = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))
    mean, per_token = jax.jit(lambda h, w: vocab_parallel_cross_entropy(h, w, labels, weights, mesh))(h, w)
    ref_mean, ref_tok = reference_loss(hidden, kernel, labels, weights)
    assert np.all(np.isfinite(np.asarray(per_token)))
    np.testing.assert_allclose(np.asarray(per_token), np.asarray(ref_tok), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(mean), float(ref_mean), atol=TOL, rtol=0)


def test_vocab_parallel_cross_entropy_bad_shapes():
    mesh = make_mesh((1, 4, 2))
    hidden, kernel, labels, weights = lm_inputs(v=95)
    with pytest.raises(ValueError, match="lm_head_kernel: vocabulary 95"):
        vocab_parallel_cross_entropy(hidden, kernel, labels, weights, mesh)
    hidden, kernel, labels, weights = lm_inputs(b=6)
    with pytest.raises(ValueError, match="hidden: batch 6"):
        vocab_parallel_cross_entropy(hidden, kernel, labels, weights, mesh)
    with pytest.raises(ValueError, match="weights"):
        vocab_parallel_cross_entropy(hidden, kernel, labels, weights[:, :2], mesh)


def codebook_inputs(m=37, k=32, d=8, seed=0):
    r = np.random.default_rng(seed)
    codebook = np.array(l2_normalize(jnp.asarray(r.standard_normal((k, d)), jnp.float32)))
    # Exact duplicates: within one shard (3 and 5), across shards (2 and 29, 9 and 17), last row (31 = 4).
    for dst, src in ((5, 3), (29, 2), (17, 9), (31, 4)):
        if dst < k:
            codebook[dst] = codebook[src]
    z = np.array(l2_normalize(jnp.asarray(r.standard_normal((m, d)), jnp.float32)))
    z[:4] = codebook[[3, 2, 9, 4]]  # rows sitting exactly on a duplicated code
    z[4:8] = codebook[[29, 17, 31, 5]]
    return z, codebook


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_nearest_code_equals_argmin(shape):
    mesh = make_mesh(shape)
    z, codebook = codebook_inputs()
    ids = np.asarray(jax.jit(lambda z, e: sharded_nearest_code(z, e, mesh))(z, codebook))
    ref = np.asarray(nearest_code(jnp.asarray(z), jnp.asarray(codebook)))
    assert ids.dtype == np.int32 and ids.shape == (37,)
    np.testing.assert_array_equal(ids, ref)
    # Ties go to the lowest index, whichever shard holds the copies.
    np.testing.assert_array_equal(ids[:8], [3, 2, 9, 4, 2, 9, 4, 3])


def test_sharded_nearest_code_all_rows_equal():
    # Every code identical: the answer is 0 for every row, on every mesh.
    z, _ = codebook_inputs(m=16)
    codebook = np.tile(z[:1], (32, 1))
    for shape in MESHES:
        mesh = make_mesh(shape)
        ids = np.asarray(jax.jit(lambda z, e, mesh=mesh: sharded_nearest_code(z, e, mesh))(z, codebook))
        np.testing.assert_array_equal(ids, np.zeros(16, np.int32))


def test_sharded_nearest_code_bad_shapes():
    mesh = make_mesh((1, 4, 2))
    z, codebook = codebook_inputs()
    codebook = codebook[:31]
    with pytest.raises(ValueError, match="codebook: 31 rows"):
        sharded_nearest_code(z, codebook, mesh)
    with pytest.raises(ValueError, match="same d"):
        sharded_nearest_code(z[:, :4], codebook, mesh)
