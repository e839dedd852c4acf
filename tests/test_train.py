"""Stage-1 tokenizer training: sharded steps, frozen encoder, EMA codebook, exact resume."""

import jax
import numpy as np
import pytest

import train
from configs import tiny
from lavit_jax.convert import tokenizer as CT
from lavit_jax.convert.converter import convert
from tests import tokenizer_fixture as tfx
from tests.conftest import SHARED

FIX = SHARED / "fixtures" / "image_tokenizer_tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny fixture converted once (train.py initialises from converted checkpoints)."""
    out = tmp_path_factory.mktemp("converted") / "tiny"
    convert(str(FIX / "checkpoint"), str(out), tfx.config_from_fixture(FIX / "config.json"), "float32", log=print)
    return out


def _config(workdir, steps, init_from, mesh=(8, 1, 1)):
    c = tiny.get_config()
    c.tokenizer.decoder_out_dim = c.tokenizer.eva_width  # stage 1 reconstructs encoder features
    c.mesh_shape = mesh
    t = c.train
    t.data_dir, t.batch_size, t.steps = "synthetic:24", 8, steps
    t.save_every, t.log_every, t.workdir = 2, 1, str(workdir)
    t.init_from = str(init_from)
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, converted):
    base = tmp_path_factory.mktemp("train")
    resumed_dir = base / "resumed"
    first, hist_a = train.train(_config(resumed_dir, 3, converted), max_steps=2)  # stops at 2, checkpoint at 2
    resumed, hist_b = train.train(_config(resumed_dir, 3, converted))  # resumes 2 -> 3
    straight, hist_c = train.train(_config(base / "straight", 3, converted))
    return first, resumed, straight, hist_a, hist_b, hist_c, base


def test_resume_is_exact(runs):
    _, resumed, straight, hist_a, hist_b, hist_c, _ = runs
    assert [h["step"] for h in hist_a] == [1, 2] and [h["step"] for h in hist_b] == [3]
    assert int(resumed.step) == int(straight.step) == 3
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hist_b[0]["loss"] == hist_c[2]["loss"]


def test_frozen_encoder_and_ema_codebook(runs):

    first, _, straight, *_ = runs
    cfg = tfx.config_from_fixture(FIX / "config.json")
    released = CT.load_visual_tokenizer(FIX / "checkpoint", cfg)
    p = straight.params["tokenizer"]
    for a, b in zip(jax.tree.leaves(p["encoder"]), jax.tree.leaves(released["encoder"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    sel_a = np.asarray(p["token_predictor"]["out_conv_4"]["kernel"])
    assert not np.array_equal(sel_a, released["token_predictor"]["out_conv_4"]["kernel"])
    emb = np.asarray(p["quantize"]["embedding"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(emb, released["quantize"]["embedding"])
    assert float(np.asarray(straight.ema["cluster_size"]).sum()) > 0


def test_losses_finite_and_params_sharded(runs, tmp_path, converted):
    hist_c = runs[5]
    for h in hist_c:
        assert np.isfinite([h["loss"], h["rec_loss"], h["ratio_loss"], h["grad_norm"]]).all()
        assert 0.0 < h["keep_ratio"] <= 1.0
    state, hist = train.train(_config(tmp_path / "fsdp", 1, converted, mesh=(4, 2, 1)))
    kernel = state.params["tokenizer"]["causal_encoder"]["blocks"]["mlp"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    np.testing.assert_allclose(hist[0]["loss"], hist_c[0]["loss"], rtol=1e-4)


def test_bad_data_dir_is_named(tmp_path):
    c = _config(tmp_path / "w", 1, tmp_path / "unused")
    c.train.data_dir = str(tmp_path / "no_images")
    with pytest.raises(FileNotFoundError, match="train.data_dir.*no_images"):
        train.train(c)


def test_eval_on_trained_and_converted(runs, converted):
    import eval as lavit_eval

    base = runs[-1]
    cfg = _config(base / "straight", 3, converted)
    trained = lavit_eval.evaluate(cfg, str(base / "straight"), "synthetic:16", limit=8, batch_size=8)
    assert trained["images"] == 8 and -1.0 <= trained["feature_cosine"] <= 1.0
    assert 1 <= trained["distinct_codes"] <= cfg.tokenizer.n_code
    released = lavit_eval.evaluate(cfg, str(converted), "synthetic:16", limit=8, batch_size=8)
    assert released["feature_cosine"] is None and released["images"] == 8
