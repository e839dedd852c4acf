"""Stage 1 on the shared loop: two-phase schedule, k-means codebook init, dead-code restart, loss falls."""

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.models.codebook import l2_normalize
from lavit_jax.train import tokenizer as st
from lavit_jax.train import trainer
from tests.train_configs import small_config


def test_spherical_kmeans_recovers_separated_clusters():
    r = np.random.default_rng(0)
    centers = l2_normalize(jnp.asarray(r.standard_normal((4, 8)), jnp.float32))
    z = l2_normalize(jnp.repeat(centers, 50, 0) + 0.01 * r.standard_normal((200, 8)).astype(np.float32))
    c, counts = st.spherical_kmeans(z, jax.random.key(0), 4, 10)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(c), axis=1), 1.0, rtol=1e-5)
    sim = np.asarray(c) @ np.asarray(centers).T  # each true center has a centroid at cosine > 0.99
    assert (sim.max(0) > 0.99).all()
    assert sorted(np.asarray(counts).tolist()) == [50.0, 50.0, 50.0, 50.0]


def test_dead_codes_restart_at_batch_features(tmp_path):
    c = small_config("tokenizer", tmp_path / "w", dead_code_every=2, dead_code_threshold=0.5, quantize_start_step=0)
    task = trainer.program(c).task
    k, d = c.tokenizer.n_code, c.tokenizer.code_dim
    params = {"tokenizer": {"quantize": {"embedding": l2_normalize(jnp.ones((k, d)))}}}
    ema = {"cluster_size": jnp.full((k,), 2.0).at[:3].set(0.0), "embed_sum": jnp.ones((k, d))}
    cand = l2_normalize(jnp.asarray(np.random.default_rng(1).standard_normal((k, d)), jnp.float32))
    stats = {"counts": jnp.zeros((k,)), "sums": jnp.zeros((k, d)), "candidates": cand}
    for step, restarted in ((0, False), (1, True)):  # restarts after steps 2, 4, ... ((step + 1) % 2 == 0)
        p, e, m = task.update(params, ema, stats, jax.random.key(0), jnp.int32(step))
        emb = np.asarray(p["tokenizer"]["quantize"]["embedding"])
        assert int(m["dead_codes"]) == 3
        np.testing.assert_array_equal(np.allclose(emb[:3], np.asarray(cand[:3]), atol=1e-6), restarted)
        assert not np.allclose(emb[3:], np.asarray(cand[3:]))  # live codes keep their EMA value
        if restarted:
            np.testing.assert_array_equal(np.asarray(e["cluster_size"][:3]), 1.0)


def test_two_phases_kmeans_and_loss_falls(tmp_path, capsys):
    c = small_config("tokenizer", tmp_path / "w", steps=24, batch_size=8, quantize_start_step=4, kmeans_init=True,
                     kmeans_batches=2, dead_code_every=4, lr=2e-3, data_dir="synthetic:16")
    prog = trainer.program(c)
    init_codebook = np.asarray(prog.init_state().params["tokenizer"]["quantize"]["embedding"])
    state, hist = trainer.train(c)
    assert "k-means: codebook of 128 codes initialised from" in capsys.readouterr().out
    phase1, phase2 = hist[:4], hist[4:]
    assert all(h["commitment"] == 0.0 and h["codes_used"] == 0.0 for h in phase1)  # no quantization yet
    assert all(h["codes_used"] > 0 and h["commitment"] > 0 for h in phase2)
    emb = np.asarray(state.params["tokenizer"]["quantize"]["embedding"])
    assert not np.allclose(emb, init_codebook)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    for h in hist:
        assert 0 < h["keep_ratio"] <= 1 and 0 < h["codebook_usage"] <= 1 and 1 <= h["perplexity"] <= 128
        assert -1 <= h["rec_cosine"] <= 1
    first, last = np.mean([h["rec_loss"] for h in hist[:3]]), np.mean([h["rec_loss"] for h in hist[-3:]])
    assert last < 0.8 * first, (first, last)
