"""Segment ids in ``dot_product_attention``: xla against a numpy per-segment reference, splash (Pallas
interpret mode on CPU) against xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavit_jax.ops.attention import dot_product_attention

TOL = 1e-5


def np_attention(q, k, v, causal):
    """Plain float64 attention on one sequence. q [T,H,D], k/v [S,K,D] -> [T,H,D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        t, s = q.shape[0], k.shape[0]
        logits = np.where(np.tril(np.ones((t, s), bool), k=s - t), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def per_segment_reference(q, k, v, q_seg, kv_seg, causal):
    """Each segment of each row attended on its own (gathering its query and key positions)."""
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        for g in np.unique(q_seg[b]):
            qi, ki = np.flatnonzero(q_seg[b] == g), np.flatnonzero(kv_seg[b] == g)
            out[b, qi] = np_attention(q[b, qi], k[b, ki], v[b, ki], causal)
    return out


def qkv(b, t, s, h, kh, d, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((b, t, h, d)).astype(np.float32),
            r.standard_normal((b, s, kh, d)).astype(np.float32),
            r.standard_normal((b, s, kh, d)).astype(np.float32))


def packed_ids(lengths_per_row, length):
    """Contiguous segments 1, 2, ... of the given lengths, then 0 padding. -> [B, length] int32."""
    rows = []
    for lengths in lengths_per_row:
        row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(length - sum(lengths))])
        rows.append(row)
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_xla_segments_equal_separate_attention(causal):
    q, k, v = qkv(2, 12, 12, 4, 2, 8)
    seg = packed_ids([[3, 4, 2], [5, 7]], 12)
    out = dot_product_attention(q, k, v, is_causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                                implementation="xla")
    ref = per_segment_reference(q, k, v, seg, seg, causal)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_xla_segments_interleaved_and_cross_attention():
    # Non-contiguous ids (full attention) and T != S cross-attention with its own kv ids.
    q, k, v = qkv(2, 6, 10, 2, 2, 8, seed=1)
    q_seg = np.array([[1, 2, 1, 2, 3, 3], [2, 2, 2, 1, 1, 1]], np.int32)
    kv_seg = np.array([[2, 1, 1, 3, 2, 2, 1, 3, 1, 2], [1, 1, 2, 2, 2, 2, 1, 1, 1, 2]], np.int32)
    out = dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, implementation="xla")
    ref = per_segment_reference(q, k, v, q_seg, kv_seg, False)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_segments_and_mask_combine():
    # A key-padding mask ANDed with segments: segment 2 of row 0 loses its last key.
    q, k, v = qkv(1, 8, 8, 2, 2, 8, seed=2)
    seg = packed_ids([[4, 4]], 8)
    keep = np.ones((1, 1, 1, 8), bool)
    keep[..., 7] = False
    out = dot_product_attention(q, k, v, mask=keep, q_segment_ids=seg, implementation="xla")
    ref = np.zeros(q.shape)
    ref[0, :4] = np_attention(q[0, :4], k[0, :4], v[0, :4], False)
    ref[0, 4:] = np_attention(q[0, 4:], k[0, 4:7], v[0, 4:7], False)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_jax_backend_takes_segments_as_mask():
    # The "jax" path (jax.nn.dot_product_attention, the same call as cudnn with another backend).
    q, k, v = qkv(2, 12, 12, 4, 2, 8, seed=3)
    seg = packed_ids([[3, 4, 2], [5, 7]], 12)
    out = dot_product_attention(q, k, v, is_causal=True, q_segment_ids=seg, implementation="jax")
    ref = per_segment_reference(q, k, v, seg, seg, True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_bad_segment_ids_named():
    q, k, v = qkv(2, 6, 6, 2, 2, 8)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        dot_product_attention(q, k, v, q_segment_ids=np.ones((2, 6), np.int32),
                              kv_segment_ids=np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match="q_segment_ids"):
        dot_product_attention(q, k, v, q_segment_ids=np.ones((2, 6), np.float32))
    q2, _, _ = qkv(2, 4, 6, 2, 2, 8)
    with pytest.raises(ValueError, match="give both"):
        dot_product_attention(q2, k, v, q_segment_ids=np.ones((2, 4), np.int32))


# ---- splash: the TPU kernel in Pallas interpret mode (block sizes 128, so lengths are multiples of 128).


def test_splash_causal_segments_equal_xla():
    assert jax.default_backend() != "tpu"  # this test is about interpret mode off TPU
    q, k, v = qkv(2, 256, 256, 4, 2, 16, seed=4)  # GQA: 4 query heads on 2 kv heads
    seg = packed_ids([[100, 60, 80], [130, 126]], 256)  # segments cross the 128 blocks; row 0 ends in padding
    kw = dict(is_causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    out = dot_product_attention(q, k, v, implementation="splash", **kw)
    ref = dot_product_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)
    # and xla here is the per-segment truth
    np.testing.assert_allclose(np.asarray(ref), per_segment_reference(q, k, v, seg, seg, True), atol=TOL, rtol=0)


def test_splash_segments_gradients_equal_xla():
    # The backward kernels (dq, dkv) with segment ids, against the xla gradients.
    q, k, v = qkv(1, 256, 256, 2, 2, 16, seed=5)
    seg = packed_ids([[90, 120, 30]], 256)
    w = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape).astype(np.float32))

    def loss(impl, q, k, v):
        o = dot_product_attention(q, k, v, is_causal=True, q_segment_ids=seg, implementation=impl)
        return jnp.sum(o * w)

    g_splash = jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_splash, g_xla, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=f"d{name}")


def test_splash_causal_offset_matches_xla_when_t_lt_s():
    # Causal diagonal aligned to the end (query i sees keys <= i + S - T), as on the xla path.
    q, k, v = qkv(1, 128, 256, 2, 2, 16, seed=7)
    out = dot_product_attention(q, k, v, is_causal=True, implementation="splash")
    ref = np_attention(q[0], k[0], v[0], True)
    np.testing.assert_allclose(np.asarray(out)[0], ref, atol=TOL, rtol=0)
