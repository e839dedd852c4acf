"""tools/convert_torch_weights.py on the visual tokenizer: output equals the direct load, the
source is untouched, failures leave nothing that looks complete."""

import hashlib
import shutil

import jax
import numpy as np
import pytest

from lavit_jax import checkpoint
from lavit_jax.convert import tokenizer as CT
from tests import tokenizer_fixture as tfx
from tests.conftest import REPO, SHARED
from tools import convert_torch_weights as conv

FIX = SHARED / "fixtures" / "image_tokenizer_tiny"
TINY = str(REPO / "configs" / "tiny.py")


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def src(tmp_path):
    d = tmp_path / "released"
    shutil.copytree(FIX / "checkpoint", d)
    return d


def test_convert_roundtrip_and_source_untouched(src, tmp_path):
    before = _digest(src)
    out = tmp_path / "converted"
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY, "--dtype", "f32"]) == 0
    assert _digest(src) == before
    vt = checkpoint.load_visual_tokenizer(str(out))
    cfg = tfx.config_from_fixture(FIX / "config.json")
    direct = CT.load_visual_tokenizer(src, cfg)
    for a, b in zip(jax.tree.leaves(vt.params), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert set(vt.decoder_params) == {"lowres", "highres"}
    io = np.load(FIX / "io.npz")
    out_ = vt.model.apply({"params": vt.params}, np.transpose(io["pixel_values"], (0, 2, 3, 1)),
                          decisions=io["keep_decisions"])
    codes = np.concatenate([np.asarray(out_["codes"])[i, :n] for i, n in enumerate(io["token_nums"])])
    np.testing.assert_array_equal(codes, io["code_ids"])
    # an existing output is not overwritten without --overwrite
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY]) == 2
    # bf16 storage
    out16 = tmp_path / "bf16"
    assert conv.main(["--src", str(src), "--out", str(out16), "--config", TINY, "--dtype", "bf16"]) == 0
    vt16 = checkpoint.load_visual_tokenizer(str(out16))
    # as the release's convert_weights_to_bf16: only Linear/Conv weights and biases become bf16; LayerNorms,
    # q_bias/v_bias, cls_token, pos_embed, learned queries/positions and the codebook stay float32
    kept_f32 = {"q_bias", "v_bias", "cls_token", "pos_embed", "query_embed", "positional_embedding", "embedding",
                "scale"}
    for tree in (vt16.params, *vt16.decoder_params.values()):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [p.key for p in path]
            parent = tree
            for n in names[:-1]:
                parent = parent[n]
            layer_norm_bias = names[-1] == "bias" and "scale" in parent
            want = "float32" if names[-1] in kept_f32 or layer_norm_bias else "bfloat16"
            assert str(leaf.dtype) == want, ("/".join(names), str(leaf.dtype))
    assert str(vt16.params["encoder"]["blocks"]["attn"]["qkv"]["kernel"].dtype) == "bfloat16"


def test_partial_source_converts_what_is_there(src, tmp_path, capsys):
    (src / "visual_tokenizer" / "highres_tokenizer_decoder.bin").unlink()
    out = tmp_path / "out"
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY]) == 0
    text = capsys.readouterr().out
    assert "highres_tokenizer_decoder.bin absent" in text
    assert "language_model" in text or "visual_tokenizer" in text
    assert set(checkpoint.load_visual_tokenizer(str(out)).decoder_params) == {"lowres"}


def test_failed_conversion_leaves_no_output(src, tmp_path, capsys):
    bad = src / "visual_tokenizer" / "tokenizer_decoder.bin"
    bad.write_bytes(bad.read_bytes()[:1000])
    out = tmp_path / "out"
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY]) == 2
    assert "tokenizer_decoder.bin" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(FileNotFoundError, match="not a converted"):
        checkpoint.read_manifest(str(tmp_path))


def test_missing_source_and_out_inside_source(tmp_path, src, capsys):
    assert conv.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--config", TINY]) == 2
    assert "nope" in capsys.readouterr().err
    assert conv.main(["--src", str(src), "--out", str(src / "o"), "--config", TINY]) == 2
    assert "never modified" in capsys.readouterr().err
