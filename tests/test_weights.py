"""Weight loading: no code execution, and every key/shape problem reported in one error naming the file."""

import pickle
import shutil

import numpy as np
import pytest
import torch

from lavit_jax import checkpoint
from lavit_jax.convert import tokenizer as CT
from lavit_jax.convert import torch_io as weights
from tests import tokenizer_fixture as tfx
from tests.conftest import SHARED

FIX = SHARED / "fixtures" / "image_tokenizer_tiny"


@pytest.fixture()
def ckpt(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(FIX / "checkpoint", dst)
    return dst


@pytest.fixture(scope="module")
def cfg():
    return tfx.config_from_fixture(FIX / "config.json")


def test_all_problems_in_one_error(ckpt, cfg):
    path = ckpt / "visual_tokenizer" / "tokenizer_encoder.bin"
    sd = torch.load(path, weights_only=True)
    del sd["vit_proj.bias"]
    del sd["causal_encoder.norm.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["encode_task_layer.0.weight"] = torch.zeros(5, 5)
    torch.save(sd, path)
    with pytest.raises(weights.WeightMismatchError) as e:
        CT.load_visual_tokenizer(ckpt, cfg)
    msg = str(e.value)
    assert str(path) in msg
    for part in ("vit_proj/bias", "causal_encoder/norm/scale", "extra.weight", "encode_task_layer.0.weight",
                 "missing (2)", "unexpected (1)", "mis-shaped (1)"):
        assert part in msg, part


def test_bf16_checkpoint_loads(ckpt, cfg):
    path = ckpt / "visual_tokenizer" / "tokenizer_decoder.bin"
    sd = {k: v.to(torch.bfloat16) for k, v in torch.load(path, weights_only=True).items()}
    torch.save(sd, path)
    p = CT.load_token_decoder(path, cfg, highres=False)
    ref = sd["in_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(p["in_proj"]["kernel"], ref)
    assert p["in_proj"]["kernel"].dtype == np.float32


def test_truncated_and_missing_files_named(ckpt, cfg):
    path = ckpt / "visual_tokenizer" / "eva_vitg_psz14.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightFileError, match="eva_vitg_psz14.bin"):
        CT.load_visual_tokenizer(ckpt, cfg)
    path.unlink()
    with pytest.raises(weights.WeightFileError, match="not found.*eva_vitg_psz14.bin"):
        CT.load_visual_tokenizer(ckpt, cfg)
    with pytest.raises(FileNotFoundError, match="visual_tokenizer"):
        CT.load_visual_tokenizer(ckpt / "nowhere", cfg)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(weights.WeightFileError, match="evil.bin"):
        weights.load_torch_file(path)
    assert "code ran" not in capsys.readouterr().out


def test_understanding_weights_overlay(ckpt, cfg, tmp_path):
    base = torch.load(ckpt / "visual_tokenizer" / "tokenizer_encoder.bin", weights_only=True)
    over = {"vit_proj.weight": base["vit_proj.weight"] * 2,
            "causal_encoder.norm.bias": base["causal_encoder.norm.bias"] + 1}
    torch.save(over, tmp_path / "visual_weight.bin")
    p = CT.load_visual_tokenizer(ckpt, cfg, understanding_weights=tmp_path / "visual_weight.bin")
    np.testing.assert_allclose(p["vit_proj"]["kernel"], over["vit_proj.weight"].numpy().T)
    np.testing.assert_allclose(p["causal_encoder"]["norm"]["bias"], over["causal_encoder.norm.bias"].numpy())
    torch.save({"not_a_key": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(weights.WeightMismatchError, match="not_a_key"):
        CT.load_visual_tokenizer(ckpt, cfg, understanding_weights=tmp_path / "bad.bin")


def test_bad_index_and_config_json_are_named(tmp_path):
    idx = tmp_path / "pytorch_model.bin.index.json"
    idx.write_text('{"metadata": {}}')
    with pytest.raises(weights.WeightFileError, match="pytorch_model.bin.index.json"):
        weights.index_shard_files(idx)
    idx.write_text('{"weight_map": {"a": "s2.bin", "b": "s1.bin", "c": "s2.bin"}}')
    assert weights.index_shard_files(idx) == [str(tmp_path / "s2.bin"), str(tmp_path / "s1.bin")]
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        checkpoint.load_json_config(tmp_path, "config.json", dict, "UNet config")
    with pytest.raises(FileNotFoundError, match="UNet config not found"):
        checkpoint.load_json_config(tmp_path / "nope", "config.json", dict, "UNet config")
