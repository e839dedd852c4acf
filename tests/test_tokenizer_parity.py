"""Parity of the visual tokenizer with the reference PyTorch modules' recorded outputs.

Data-driven: every fixture directory (``$LAVIT_FIXTURES`` or ../shared/fixtures/*) holding io.npz.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavit_jax.convert import tokenizer as CT
from lavit_jax.models import tokenizer as T
from lavit_jax.models.token_decoder import TokenDecoder
from tests import tokenizer_fixture as tfx
from tests.conftest import SHARED, fixture_dirs

FIXTURES = fixture_dirs()
pytestmark = pytest.mark.parity


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    scale = max(np.abs(ref).max(), 1e-6)
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x reference scale {scale:.3g}"


def _flat(x, lengths):
    x = np.asarray(x)
    return np.concatenate([x[i, : int(n)] for i, n in enumerate(lengths)], axis=0)


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.name for p in FIXTURES])
def run(request):
    d = request.param
    io = dict(np.load(d / "io.npz"))
    cfg = tfx.config_from_fixture(d / "config.json")
    vt = d / "checkpoint" / "visual_tokenizer"
    params = CT.load_visual_tokenizer(vt, cfg)
    pixels = jnp.asarray(np.transpose(io["pixel_values"], (0, 2, 3, 1)))
    model = T.DynamicVisualTokenizer(cfg)
    out = jax.jit(lambda p, x, k: model.apply({"params": p}, x, decisions=k))(
        params, pixels, jnp.asarray(io["keep_decisions"]))
    out = jax.tree.map(np.asarray, out)
    dec = {}
    for highres in (False, True):
        name = "highres_tokenizer_decoder.bin" if highres else "tokenizer_decoder.bin"
        dp = CT.load_token_decoder(vt / name, cfg, highres)
        dec[highres] = TokenDecoder(cfg, highres).apply(
            {"params": dp}, jnp.asarray(out["quantized"]), jnp.asarray(out["lengths"]))
    return io, out, dec


def test_encoder_features(run):
    io, out, _ = run
    _close(out["eva_features"], io["eva_features"])


def test_selector_logprob(run):
    io, out, _ = run
    _close(out["selector_logprob"], io["token_predictor_logprob"])


def test_merged_and_projected(run):
    io, out, _ = run
    _close(out["merged"], io["merged_features"])
    _close(out["llm_features"], io["llm_features"])


def test_kept_tokens_compacted(run):
    io, out, _ = run
    np.testing.assert_array_equal(out["lengths"], io["token_nums"])
    _close(_flat(out["kept_features"], out["lengths"]), io["kept_features"])
    keep = io["keep_decisions"] > 0.5
    llm_kept = np.concatenate([io["llm_features"][i][keep[i]] for i in range(len(keep))])
    _close(_flat(out["kept_llm_features"], out["lengths"]), llm_kept)


def test_encode_task_layer_and_quantizer(run):
    io, out, _ = run
    _close(_flat(out["to_quantizer"], out["lengths"]), io["to_quantizer"])
    _close(_flat(out["quantized"], out["lengths"]), io["quantized"])
    np.testing.assert_array_equal(_flat(out["codes"], out["lengths"]), io["code_ids"])


def test_token_decoders(run):
    io, _, dec = run
    _close(dec[False], io["lowres_condition"])
    _close(dec[True][0], io["highres_prompt_embeds"])
    _close(dec[True][1], io["highres_pooled"])


def test_llm_ids(run):
    io, out, _ = run
    ids, lengths = T.to_llm_ids(jnp.asarray(out["codes"]), jnp.asarray(out["lengths"]), add_special=True)
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    start = 0
    for i, n in enumerate(io["token_nums"]):
        expected = np.concatenate([[32000], io["code_ids"][start:start + n] + 32002, [32001]])
        start += n
        np.testing.assert_array_equal(ids[i, : n + 2], expected)
        assert lengths[i] == n + 2
        assert (ids[i, n + 2:] == 0).all()


def test_fixture_discovery_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAVIT_FIXTURES", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert [p.name for p in fixture_dirs()] == ["a", "b"]
    monkeypatch.delenv("LAVIT_FIXTURES")
    assert all((p / "io.npz").is_file() for p in fixture_dirs())
    if SHARED.is_dir():  # the parity tests above must not silently run on zero fixtures
        assert len(fixture_dirs()) >= 1
