"""Output sizes (width / height / the release's aspect-ratio table), SDXL micro-conditioning and the safety
checker on the API and the CLI.

One tiny released checkpoint (tests/released_fixture.py) plus a tiny random safety checker (released layout:
pixel_decoding/safety_checker/, its concept thresholds forced below any cosine so every image is flagged) is
built and converted per module.
"""

import contextlib
import io

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as TorchSafetyChecker
from PIL import Image
from transformers import CLIPConfig

from lavit_jax import __main__ as cli
from lavit_jax.inference import defaults
from lavit_jax.inference import sampling as diffusion
from lavit_jax.inference.lavit import LaVIT
from tests.conftest import REPO
from tests.released_fixture import build_released
from tests.test_cli_errors import Recorder, error_line
from tools import convert_torch_weights as conv

TINY = str(REPO / "configs" / "tiny.py")
RELEASE_TABLE = {  # LaVIT README (text-to-image): ratio_dict, (height, width)
    "1:1": (1024, 1024), "4:3": (896, 1152), "3:2": (832, 1216), "16:9": (768, 1344),
    "2:3": (1216, 832), "3:4": (1152, 896),
}


def tiny_safety_checker(folder):
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    tm = TorchSafetyChecker(cfg).eval()
    with torch.no_grad():  # thresholds below any cosine: every image is flagged
        tm.concept_embeds.normal_()
        tm.concept_embeds_weights.fill_(-2.0)
        tm.special_care_embeds.normal_()
        tm.special_care_embeds_weights.fill_(2.0)
    tm.save_pretrained(folder, safe_serialization=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("sizes")
    rel = build_released(base / "released")
    tiny_safety_checker(rel.root / "pixel_decoding" / "safety_checker")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = conv.main(["--src", str(rel.root), "--out", str(base / "converted"), "--config", TINY, "--dtype", "f32"])
    assert rc == 0, err.getvalue()
    assert "converted safety_checker/" in out.getvalue()
    y, x = np.mgrid[0:64, 0:64] / 64
    img = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y) ** 0.5], -1)
    Image.fromarray((img * 255).astype(np.uint8)).save(base / "img.png")
    return dict(ckpt=base / "converted", img=base / "img.png", base=base, src=rel.root)


@pytest.fixture(scope="module")
def model(env):
    return LaVIT.from_pretrained(env["ckpt"], compilation_cache=False)


def run_cli(capsys, *argv):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------------ the table


def test_ratio_table_is_the_release_one_at_1024_and_scaled_for_lowres():
    for ratio, hw in RELEASE_TABLE.items():
        assert defaults.ratio_size(ratio, 1024, 32) == hw  # the SDXL decoder: 8 (VAE) x 4 (UNet)
    assert defaults.ratio_size("9:16", 1024, 32) == (1344, 768)  # SDXL's table: 16:9 transposed
    lowres = {r: defaults.ratio_size(r, 512, 64) for r in defaults.ASPECT_RATIOS}  # SD-1.5: 8 x 8
    assert lowres == {"1:1": (512, 512), "4:3": (448, 576), "3:4": (576, 448), "3:2": (448, 640),
                      "2:3": (640, 448), "16:9": (384, 704), "9:16": (704, 384)}
    for r, (h, w) in lowres.items():  # landscape ratios stay landscape, sides stay multiples of the factor
        a, b = (int(v) for v in r.split(":"))
        assert h % 64 == 0 and w % 64 == 0 and (w > h) == (a > b) and (w == h) == (a == b)


def test_size_arguments_are_checked_with_their_names():
    geo = dict(native=16, factor=4, decoder="lowres")
    assert defaults.image_size(**geo) == (16, 16)
    assert defaults.image_size(**geo, width=20) == (16, 20)
    assert defaults.image_size(**geo, size=(12, 24)) == (12, 24)
    assert defaults.image_size(**geo, size=12, width=12, height=12) == (12, 12)
    bad = [(dict(width=18), "width 18: must be a multiple of 4 for the lowres decoder"),
           (dict(size=18), "size 18: must be a multiple of 4"), (dict(height=0), "height 0"),
           (dict(ratio="5:4"), "ratio '5:4' is not one of"), (dict(ratio="4:3", size=16), "drop size"),
           (dict(size=16, width=20), "size 16 and width 20 disagree")]
    for kw, needle in bad:
        with pytest.raises(ValueError, match=needle):
            defaults.image_size(**geo, **kw)
    with pytest.raises(ValueError, match="original_size applies only to the highres"):
        defaults.micro_conditioning("lowres", original_size=(8, 8))
    with pytest.raises(ValueError, match="crops_coords_top_left .*>= 0"):
        defaults.micro_conditioning("highres", crops_coords_top_left=(-1, 0))
    with pytest.raises(ValueError, match="target_size .*two integers"):
        defaults.micro_conditioning("highres", target_size=(8,))


def test_sdxl_time_ids_follow_diffusers_order():
    # diffusers' StableDiffusionXLPipeline._get_add_time_ids: list(original_size + crops_coords_top_left + target_size)
    ids = diffusion.sdxl_time_ids(2, 768, 1344, original_size=(512, 640), crops_coords_top_left=(16, 32),
                                  target_size=(1024, 1024))
    np.testing.assert_array_equal(np.asarray(ids), np.array([[512, 640, 16, 32, 1024, 1024]] * 2, np.float32))
    np.testing.assert_array_equal(np.asarray(diffusion.sdxl_time_ids(1, 768, 1344)),
                                  [[768, 1344, 0, 0, 768, 1344]])  # the release's defaults


# ------------------------------------------------------------------------------------------ API


def _record_conditions(monkeypatch):
    seen = []
    real = diffusion.DiffusionPipeline.generate

    def spy(self, condition, **kw):
        seen.append((condition, kw))
        return real(self, condition, **kw)

    monkeypatch.setattr(diffusion.DiffusionPipeline, "generate", spy)
    return seen


def test_api_sizes_and_micro_conditioning_reach_the_unet(env, model, monkeypatch):
    seen = _record_conditions(monkeypatch)
    img = model.reconstruct(str(env["img"]), decoder="highres", steps=1, width=20, height=12,
                            original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(32, 24),
                            safety_checker=False)
    assert img.size == (20, 12)
    cond, kw = seen[-1]
    assert (kw["height"], kw["width"]) == (12, 20)
    expected = np.array([[64, 48, 4, 8, 32, 24]] * 2, np.float32)  # [uncond; cond] share the ids
    np.testing.assert_array_equal(np.asarray(cond.time_ids), expected)
    img = model.reconstruct(str(env["img"]), decoder="highres", steps=1, ratio="16:9", safety_checker=False)
    assert img.size == (20, 12)  # the tiny decoder's 16 px: 16:9 -> 12 x 20
    np.testing.assert_array_equal(np.asarray(seen[-1][0].time_ids), [[12, 20, 0, 0, 12, 20]] * 2)
    with pytest.raises(ValueError, match="original_size applies only to the highres"):
        model.reconstruct(str(env["img"]), decoder="lowres", steps=1, original_size=(16, 16))
    with pytest.raises(ValueError, match="width 18: must be a multiple of 4"):
        model.text2image("a duck", width=18)
    n = len(seen)
    with pytest.raises(ValueError, match="ratio 4:3 sets both sides"):
        model.text2image("a duck", ratio="4:3", size=16)
    assert len(seen) == n  # rejected before any sampling


def test_api_safety_checker_blacks_out_flagged_images(env, model):
    flagged = model.reconstruct(str(env["img"]), steps=1)  # on by default: the checkpoint has one
    assert flagged.info["nsfw"] is True and model.last_nsfw == [True]
    assert not np.asarray(flagged).any()
    plain = model.reconstruct(str(env["img"]), steps=1, safety_checker=False)
    assert plain.info["nsfw"] is False and np.asarray(plain).any()


def test_converted_safety_checker_verifies_against_diffusers(env):
    from lavit_jax.convert import verify

    logs = []
    assert verify.verify_safety_checker(str(env["src"]), str(env["ckpt"]), None, logs.append,
                                        np.random.default_rng(0)), logs
    assert any("safety_checker (image embeds)" in line and line.endswith("ok") for line in logs), logs


# ------------------------------------------------------------------------------------------ CLI


def test_cli_bad_size_flags_fail_before_model_work(env, tmp_path, capsys, monkeypatch):
    rec = Recorder()
    loads = []
    monkeypatch.setattr(LaVIT, "from_pretrained", classmethod(lambda cls, d, **kw: loads.append(kw) or rec))
    base = ["reconstruct", env["img"], "--out", tmp_path / "o.png", "--checkpoint", env["ckpt"]]
    for extra, needle in [(["--width", "18"], "--width 18: must be a multiple of 4"),
                          (["--height", "0"], "--height"), (["--ratio", "5:4"], "--ratio"),
                          (["--ratio", "4:3", "--width", "16"], "--ratio 4:3 sets both sides; drop --width"),
                          (["--size", "16", "--height", "20"], "--size 16 and --height 20 disagree"),
                          (["--decoder", "lowres", "--original-size", "16", "16"], "--original-size applies only"),
                          (["--target-size", "16"], "--target-size")]:
        rc, _, err = run_cli(capsys, *base, *extra)
        assert rc == 2, (extra, err)
        assert needle in error_line(err), (extra, err)
    assert not loads
    rc, _, err = run_cli(capsys, *base, "--ratio", "3:2", "--original-size", "64", "48", "--crops-coords-top-left",
                         "1", "2", "--target-size", "32", "24", "--no-safety-checker")
    assert rc == 0, err
    kw = rec.calls[-1][1]
    assert kw["ratio"] == "3:2" and kw["original_size"] == (64, 48) and kw["crops_coords_top_left"] == (1, 2)
    assert kw["target_size"] == (32, 24) and kw["safety_checker"] is False


def test_cli_safety_checker_warns_and_no_safety_checker_keeps_images(env, tmp_path, capsys):
    out = tmp_path / "r.png"
    argv = ["reconstruct", env["img"], "--out", out, "--steps", "1", "--no-progress", "--checkpoint", env["ckpt"]]
    rc, stdout, err = run_cli(capsys, *argv, "--width", "20", "--height", "12")
    assert rc == 0, err
    assert "warning: the safety checker flagged 1 of 1 image as NSFW" in err
    assert "(20x12," in stdout
    assert not np.asarray(Image.open(out)).any()
    rc, _, err = run_cli(capsys, *argv, "--no-safety-checker", "--overwrite")
    assert rc == 0, err
    assert "safety checker" not in err
    assert np.asarray(Image.open(out)).any()
