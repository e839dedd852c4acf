"""Parity of the motion tokenizer with the reference PyTorch module's recorded outputs.

Data-driven: every Video-LaVIT fixture set (../shared/fixtures/video/* with io.npz, and
$LAVIT_VIDEO_FIXTURES); the model is built from the set's config.json and loads its
checkpoint/motion_tokenizer.bin. No set found is a failure.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import video_lavit
from lavit_jax.convert import motion_tokenizer as C
from lavit_jax.convert import torch_io
from lavit_jax.models import motion_tokenizer as M
from lavit_jax.ops.config import freeze
from tests.conftest import video_fixture_dirs

VIDEO_FIXTURES = video_fixture_dirs()


def fixture_config(tok: dict):
    """The released motion-tokenizer config with the sizes a fixture's config.json shrinks."""
    c = video_lavit.motion_tokenizer_config()
    c.width = tok["dim"]
    c.heads = tok["heads"]
    c.blocks_per_stage = tok["blocks_per_stage"]
    c.n_code = tok["n_code"]
    c.code_dim = tok["code_dim"]
    c.mlp_ratio = tok["mlp_ratio"]
    c.layernorm_eps = tok["layernorm_eps"]
    c.in_channels, c.input_frames, c.input_height, c.input_width = tok["input"]
    return freeze(c)


def _close(ours, ref, floor: float, rel: float = 1e-4):
    """max |ours - ref| <= max(rel x max |ref|, the fixture's float-noise floor)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    tol = max(rel * np.abs(ref).max(), floor)
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def _cl(x):
    """Reference [B, C, T, H, W] -> ours [B, T, H, W, C]."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


@pytest.fixture(scope="module", params=VIDEO_FIXTURES or [None],
                ids=lambda p: p.name if p is not None else "no-video-fixture")
def run(request):
    d = request.param
    if d is None:
        pytest.fail("no Video-LaVIT fixture set: ../shared/fixtures/video/*/io.npz or $LAVIT_VIDEO_FIXTURES")
    io = dict(np.load(d / "io.npz"))
    cfg = json.loads((d / "config.json").read_text())
    config = fixture_config(cfg["tokenizer"])
    assert list(M.token_grid(config)) == cfg["tokenizer"]["tokens"]
    params = C.load_motion_tokenizer(d / "checkpoint" / "motion_tokenizer.bin", config)
    model = M.MotionTokenizer(config)
    lh, lw = io["tok_reconstruct_latent"].shape[-2:]

    @jax.jit
    def forward(p, x, codes):
        v = {"params": p}
        out = model.apply(v, x)
        out["latent"] = model.apply(v, x, lh, lw, method=M.MotionTokenizer.reconstruct)
        out["from_token"] = model.apply(v, codes, lh, lw, method=M.MotionTokenizer.reconstruct_from_token)
        return out

    out = forward(params, jnp.asarray(_cl(io["tok_input"])), jnp.asarray(io["tok_code_ids"]))
    return d, io, cfg["float_noise"], jax.tree.map(np.asarray, out)


@pytest.mark.parity
def test_encoder_features(run):
    _, io, noise, out = run
    _close(out["features"], io["tok_encoder_features"], noise["tok_encoder_features"])


@pytest.mark.parity
def test_to_quantizer(run):
    _, io, noise, out = run
    assert out["to_quantizer"].dtype == np.float32
    _close(out["to_quantizer"], io["tok_to_quantizer"], noise["tok_to_quantizer"])


@pytest.mark.parity
def test_code_ids_exact(run):
    _, io, _, out = run
    assert out["codes"].shape == io["tok_code_ids"].shape  # [B, 135], (t, h, w) order
    np.testing.assert_array_equal(out["codes"], io["tok_code_ids"])


@pytest.mark.parity
def test_quantized(run):
    _, io, noise, out = run
    _close(out["quantized"], io["tok_quantized"], noise["tok_quantized"])


@pytest.mark.parity
def test_reconstruction(run):
    _, io, noise, out = run
    _close(out["reconstruction"], _cl(io["tok_reconstruction"]), noise["tok_reconstruction"])


@pytest.mark.parity
def test_reconstruct_latent(run):
    _, io, noise, out = run
    _close(out["latent"], _cl(io["tok_reconstruct_latent"]), noise["tok_reconstruct_latent"])


@pytest.mark.parity
def test_reconstruct_from_token(run):
    _, io, noise, out = run
    _close(out["from_token"], _cl(io["tok_reconstruct_from_token"]), noise["tok_reconstruct_from_token"])


@pytest.mark.parity
def test_converter_reports_every_mismatch(run):
    d = run[0]
    path = d / "checkpoint" / "motion_tokenizer.bin"
    cfg = json.loads((d / "config.json").read_text())
    sd = torch_io.load_torch_file(path)
    del sd["encoder.temp_pos"]
    sd["encoder.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["decoder.in_proj.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(torch_io.WeightMismatchError) as e:
        C.convert_state_dict(sd, fixture_config(cfg["tokenizer"]), source=str(path))
    msg = str(e.value)
    for part in (str(path), "encoder/temp_pos", "encoder.extra.weight", "decoder.in_proj.weight"):
        assert part in msg, (part, msg)


@pytest.mark.parity
def test_scanned_equals_unrolled(run):
    """The same weights in the stacked (scan_layers) and unrolled layouts give the same outputs."""
    d, io, _, out = run
    cfg = json.loads((d / "config.json").read_text())
    config = freeze(fixture_config(cfg["tokenizer"]), scan_layers=False)
    params = C.load_motion_tokenizer(d / "checkpoint" / "motion_tokenizer.bin", config)
    bps = config.blocks_per_stage
    assert "stage0_blocks" not in params["encoder"] and f"stage3_blocks_{bps - 1}" in params["decoder"]
    stacked = C.load_motion_tokenizer(d / "checkpoint" / "motion_tokenizer.bin", fixture_config(cfg["tokenizer"]))
    assert stacked["encoder"]["stage2_blocks"]["norm0"]["scale"].shape[0] == bps
    unrolled = jax.jit(lambda p, x: M.MotionTokenizer(config).apply({"params": p}, x))(
        params, jnp.asarray(_cl(io["tok_input"])))
    np.testing.assert_array_equal(np.asarray(unrolled["codes"]), out["codes"])
    for k in ("features", "to_quantizer", "reconstruction"):
        ref = out[k]
        err = np.abs(np.asarray(unrolled[k], np.float64) - ref).max()
        assert err <= 1e-6 * np.abs(ref).max(), (k, err)


def test_released_config_shapes():
    """The released numbers give the released parameter listing (no weights needed)."""
    config = video_lavit.get_config().motion_tokenizer
    assert M.token_grid(config) == (3, 5, 9) and M.num_tokens(config) == 135
    shapes = C.param_shapes(config)  # unscanned layout: encoder.blocks.11 is stage 3, block 2
    assert shapes[("encoder", "pos_embed")] == (1, 720, 512)
    assert shapes[("encoder", "temp_pos")] == (1, 24, 512)
    assert C.torch_key_to_flax("encoder.blocks.11.spatial_attention.qkv.weight", 2, 3)[0] == (
        "encoder", "stage3_blocks_2", "spatial_attention", "qkv", "kernel")
    assert shapes[("encoder", "stage3_blocks_2", "spatial_attention", "qkv", "kernel")] == (512, 1536)
    assert shapes[("encoder", "down_sample_layers_3", "conv", "kernel")] == (3, 3, 3, 512, 512)
    assert shapes[("decoder", "up_sample_layers_0", "conv", "kernel")] == (3, 3, 3, 512, 512)
    assert shapes[("decoder", "in_proj", "kernel")] == (32, 512)
    assert shapes[("decode_task_layer_2", "kernel")] == (512, 2)
    assert shapes[("quantize", "embedding")] == (1024, 32)
    assert ("encoder", "stage3_blocks_3", "norm0", "scale") not in shapes
    assert ("decoder", "stage3_blocks_2", "mlp", "fc1", "kernel") in shapes
    stacked = jax.eval_shape(lambda m: M.MotionTokenizer(freeze(config)).init(jax.random.key(0), m),
                             jax.ShapeDtypeStruct((1, 24, 20, 36, 2), jnp.float32))["params"]
    kernel = stacked["encoder"]["stage1_blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.value.shape == (3, 512, 2048) and kernel.names == ("layers", "embed", "mlp")


def test_bad_config_and_input_raise():
    config = video_lavit.motion_tokenizer_config()
    config.up_factors = ((2, 2, 2), (2, 1, 1), (2, 1, 1), (1, 1, 2))
    with pytest.raises(ValueError, match="up_factors"):
        M.check_config(config)
    small = freeze(video_lavit.motion_tokenizer_config(), width=16, heads=2, blocks_per_stage=1, n_code=8, code_dim=4)
    x = jax.ShapeDtypeStruct((1, 24, 20, 32, 2), jnp.float32)
    with pytest.raises(ValueError, match="motion tokenizer input"):
        jax.eval_shape(lambda m: M.MotionTokenizer(small).init(jax.random.key(0), m), x)
