"""Tokenizer behaviour beyond the recorded fixture: keep modes, a single kept token, sharding, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavit_jax.inference.visual_tokenizer import VisualTokenizer
from lavit_jax.models import codebook
from lavit_jax.models import tokenizer as T
from lavit_jax.ops import sharding
from tests import tokenizer_fixture as tfx
from tests.conftest import SHARED

FIX = SHARED / "fixtures" / "image_tokenizer_tiny"


@pytest.fixture(scope="module")
def tiny():
    cfg = tfx.config_from_fixture(FIX / "config.json")
    vt = tfx.released_visual_tokenizer(FIX / "checkpoint", cfg)
    pixels = np.transpose(np.load(FIX / "io.npz")["pixel_values"], (0, 2, 3, 1))
    return cfg, vt, jnp.asarray(pixels)


def test_compact_keeps_order_and_zero_pads():
    x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1) + 1
    keep = jnp.array([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], jnp.float32)
    out, lengths = T.compact(x, keep)
    np.testing.assert_array_equal(lengths, [3, 1])
    np.testing.assert_array_equal(out[..., 0], [[2, 4, 5, 0, 0], [6, 0, 0, 0, 0]])


def test_masked_softmax_matches_formula():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 7)).astype(np.float32)
    m = (rng.random((3, 7)) > 0.5).astype(np.float32)
    m[2] = 0.0  # nothing to attend to: the reference's eps makes it uniform
    e = np.exp(s - s.max(-1, keepdims=True)) * m
    expected = (e + 1e-6 / 7) / (e.sum(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(T.masked_softmax(jnp.asarray(s), jnp.asarray(m)), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(T.masked_softmax(jnp.asarray(s), jnp.asarray(m)))[2], 1 / 7, rtol=1e-5)


def test_keep_modes():
    logp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (4, 64, 2)), -1)
    hard = T.keep_decisions(logp, "argmax")
    np.testing.assert_array_equal(hard, (logp[..., 0] >= logp[..., 1]).astype(np.float32))
    g1 = T.keep_decisions(logp, "gumbel", jax.random.key(1))
    g2 = T.keep_decisions(logp, "gumbel", jax.random.key(1))
    g3 = T.keep_decisions(logp, "gumbel", jax.random.key(2))
    np.testing.assert_array_equal(g1, g2)
    assert set(np.unique(np.asarray(g1))) <= {0.0, 1.0}
    assert not np.array_equal(g1, g3)
    # straight-through: the gradient flows into the log-probs
    grad = jax.grad(lambda lp: T.keep_decisions(lp, "gumbel", jax.random.key(1)).sum())(logp)
    assert np.abs(np.asarray(grad)).sum() > 0
    with pytest.raises(ValueError, match="rng"):
        T.keep_decisions(logp, "gumbel")
    with pytest.raises(ValueError, match="keep mode"):
        T.keep_decisions(logp, "topk")


def test_single_kept_token(tiny):
    cfg, vt, pixels = tiny
    n = (cfg.image_size // cfg.patch_size) ** 2
    decisions = jnp.zeros((2, n)).at[0, 17].set(1.0).at[1, 0].set(1.0)
    out = vt.model.apply({"params": vt.params}, pixels, decisions=decisions)
    np.testing.assert_array_equal(out["lengths"], [1, 1])
    merged = np.asarray(out["merged"])
    assert np.isfinite(merged).all()
    np.testing.assert_allclose(out["kept_features"][0, 0], merged[0, 17], rtol=0, atol=0)
    np.testing.assert_allclose(out["kept_features"][1, 0], merged[1, 0], rtol=0, atol=0)
    assert not np.asarray(out["kept_features"])[:, 1:].any()
    # the code is the nearest normalised codebook row (independent numpy computation)
    z = np.asarray(out["to_quantizer"])[:, 0]
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    cb = np.asarray(vt.params["quantize"]["embedding"])
    np.testing.assert_array_equal(np.asarray(out["codes"])[:, 0], ((z[:, None] - cb[None]) ** 2).sum(-1).argmin(-1))
    # the decoders see one code; padding length does not change their output
    cond = vt.decode_condition(np.asarray(out["codes"])[:, :1] + 32002, np.array([1, 1]))
    cond_long = vt.decode_condition(np.asarray(out["codes"])[:, :40] + 32002, np.array([1, 1]))
    assert np.isfinite(np.asarray(cond)).all()
    np.testing.assert_allclose(cond, cond_long, rtol=1e-5, atol=1e-5)


def test_tokenize_front_end_matches_module(tiny):
    cfg, vt, pixels = tiny
    out = vt.model.apply({"params": vt.params}, pixels)
    img = np.asarray(jax.random.uniform(jax.random.key(0), (2, 40, 50, 3)))
    ids, lengths = vt.tokenize(list(img), add_special=True)
    px = jnp.asarray(vt.preprocess(list(img)))
    ref = vt.model.apply({"params": vt.params}, px)
    for i in range(2):
        n = int(ref["lengths"][i])
        assert int(lengths[i]) == n + 2
        np.testing.assert_array_equal(ids[i, 1:n + 1], np.asarray(ref["codes"][i, :n]) + 32002)
        assert ids[i, 0] == 32000 and ids[i, n + 1] == 32001
    feats, flens = vt.understanding_features(list(img))
    np.testing.assert_array_equal(flens, ref["lengths"])
    np.testing.assert_allclose(feats, ref["kept_llm_features"], rtol=1e-5, atol=1e-5)
    assert out["codes"].dtype == jnp.int32


@pytest.mark.sharding
def test_sharded_tokenizer_equals_single_device(tiny):
    cfg, vt, pixels = tiny
    assert jax.device_count() == 8
    batch = jnp.concatenate([pixels] * 4)  # 8 images
    single = vt.model.apply({"params": vt.params}, batch)
    mesh = sharding.make_mesh((8, 1, 1))
    sharded = VisualTokenizer(cfg, vt.params, vt.decoder_params, mesh=mesh)
    px = sharded.shard_batch(batch)
    assert len(px.sharding.device_set) == 8
    out = jax.jit(lambda p, x: sharded.model.apply({"params": p}, x))(sharded.params, px)
    assert len(out["merged"].sharding.device_set) == 8
    for k in ("eva_features", "merged", "quantized", "kept_llm_features"):
        a, b = np.asarray(out[k]), np.asarray(single[k])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), k  # float32 reassociation only
    np.testing.assert_array_equal(out["codes"], single["codes"])
    np.testing.assert_array_equal(out["lengths"], single["lengths"])
    ids, lengths = sharded.tokenize(list(np.asarray(jax.random.uniform(jax.random.key(3), (8, 32, 32, 3)))))
    ids1, lengths1 = vt.tokenize(list(np.asarray(jax.random.uniform(jax.random.key(3), (8, 32, 32, 3)))))
    np.testing.assert_array_equal(ids, ids1)
    np.testing.assert_array_equal(lengths, lengths1)


def test_bf16_compute_f32_params(tiny):
    cfg, vt, pixels = tiny
    cfg16 = cfg.copy_and_resolve_references()
    cfg16.dtype = "bfloat16"
    model = T.DynamicVisualTokenizer(cfg16)
    out16 = model.apply({"params": vt.params}, pixels)
    out32 = vt.model.apply({"params": vt.params}, pixels)
    assert out16["merged"].dtype == jnp.bfloat16
    assert jax.tree.leaves(vt.params)[0].dtype == jnp.float32
    a, b = np.asarray(out16["eva_features"], np.float32), np.asarray(out32["eva_features"])
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def test_codebook_module_roundtrip():
    cb = codebook.Codebook(16, 4)
    params = cb.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    emb = np.asarray(params["embedding"]["value"] if isinstance(params["embedding"], dict) else
                     jax.tree.leaves(params["embedding"])[0])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    q, ids = cb.apply({"params": params}, jnp.asarray(emb[[3, 7]] * 5.0))
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(q, emb[[3, 7]], rtol=1e-6)


@pytest.mark.parity
def test_sampled_keep_matches_reference_gumbel_distribution(tiny):
    """keep='sample' is the release's F.gumbel_softmax(hard=True) draw: per patch, the keep frequency over many
    seeds equals p_keep (and torch's own hard Gumbel frequency) within binomial error."""
    import torch
    import torch.nn.functional as F

    cfg, vt, pixels = tiny
    logprob = vt.model.apply({"params": vt.params}, pixels[:1])["selector_logprob"]  # [1, N, 2]
    p_keep = np.exp(np.asarray(logprob)[0, :, 0], dtype=np.float64)
    n = 2000
    keys = jax.random.split(jax.random.key(7), n)
    ours = np.asarray(jax.vmap(lambda k: T.keep_decisions(logprob, "gumbel", k))(keys))[:, 0]  # [n, N]
    assert set(np.unique(ours)) <= {0.0, 1.0}
    torch.manual_seed(0)
    ref = F.gumbel_softmax(torch.tensor(np.asarray(logprob)[0]).expand(n, -1, -1), tau=1, hard=True)[..., 0].numpy()
    sigma = np.sqrt(p_keep * (1 - p_keep) / n) + 1e-3
    assert np.all(np.abs(ours.mean(0) - p_keep) <= 5 * sigma)
    assert np.all(np.abs(ref.mean(0) - p_keep) <= 5 * sigma)  # the reference draws the same distribution
    assert 0.05 < p_keep.mean() < 0.95  # a non-degenerate case
    # seeded: the same seed gives the same decisions, another seed others
    images = list(np.asarray(jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))))
    a, _ = vt.tokenize(images, mode="sample", seed=3)
    b, _ = vt.tokenize(images, mode="sample", seed=3)
    c, _ = vt.tokenize(images, mode="sample", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
