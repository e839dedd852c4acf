"""Bad input to the two command lines (``python -m lavit_jax`` and ``tools/convert_torch_weights.py``):
every argument checked before any model work, one ``error: ...`` line naming the culprit, nothing
of the user's overwritten or deleted, and clean output (progress bars, logs, warnings).

One tiny released checkpoint (tests/released_fixture.py) is built and converted per module. Tests
that only need the argument checks replace ``LaVIT.from_pretrained`` with a recorder (so a check
that comes too late shows up as a model load); the others run the real tasks on the tiny checkpoint.
"""

import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys

import diffusers
import jax
import numpy as np
import pytest
import transformers
from PIL import Image
from tqdm import std as tqdm_std

import eval as lavit_eval  # the repository's eval.py
from lavit_jax import __main__ as cli
from lavit_jax.inference.lavit import LaVIT
from tests.cli_helpers import convert, converted_any, digest, error_line
from tests.conftest import REPO
from tests.released_fixture import build_released
from tools import convert_torch_weights as conv

TINY = str(REPO / "configs" / "tiny.py")


def can_create_file(folder) -> bool:
    try:
        with open(os.path.join(folder, ".probe"), "w"):
            pass
        os.unlink(os.path.join(folder, ".probe"))
        return True
    except OSError:
        return False


def unwritable_dir(tmp_path):
    """A directory nobody may create files in: a 0555 folder, or /sys when running as root."""
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    if not can_create_file(d):
        return d
    d.chmod(0o755)
    if os.path.isdir("/sys") and not can_create_file("/sys"):
        return "/sys"
    pytest.skip("no unwritable directory here (root, and /sys takes files)")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_errors")
    rel = build_released(base / "released")
    rc, out, err = convert("--src", rel.root, "--out", base / "converted", "--config", TINY, "--dtype", "f32")
    assert rc == 0, err
    y, x = np.mgrid[0:64, 0:64] / 64
    img = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y) ** 0.5], -1)
    Image.fromarray((img * 255).astype(np.uint8)).save(base / "img.png")
    return dict(rel=rel.root, ckpt=base / "converted", img=base / "img.png", base=base, log=out)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


class Recorder:
    """Stands in for a loaded LaVIT: records each task call and returns a small result."""

    def __init__(self):
        self.calls = []

    def _image(self, task, kw):
        self.calls.append((task, kw))
        draw = lambda i: (Image.new("RGB", (16, 16), (200, 30 * i, 30)),  # noqa: E731
                          (np.full((1, 3 + i), 32005, np.int32), np.array([3 + i])))
        if kw.get("num_images", 1) == 1:
            return draw(0)
        draws = [draw(i) for i in range(kw["num_images"])]
        return [d[0] for d in draws], [d[1] for d in draws]

    def caption(self, image, **kw):
        self.calls.append(("caption", kw))
        return ["a caption"] * kw["num_captions"] if "num_captions" in kw else "a caption"

    def vqa(self, image, question, **kw):
        self.calls.append(("vqa", kw))
        return "an answer"

    def text2image(self, prompt, **kw):
        return self._image("text2image", kw)

    def edit(self, image, prompt, **kw):
        return self._image("edit", kw)

    def generate_image(self, parts, **kw):
        return self._image("compose", {**kw, "parts": parts})

    def reconstruct(self, image, **kw):
        return self._image("reconstruct", kw)


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    loads = []

    def from_pretrained(cls, ckpt_dir, **kw):
        loads.append(kw)
        return rec

    monkeypatch.setattr(LaVIT, "from_pretrained", classmethod(from_pretrained))
    rec.loads = loads
    return rec


# ------------------------------------------------------------------------------------------ lavit CLI


def _bad_argument_cases(env, tmp_path):
    img, ck = env["img"], ["--checkpoint", env["ckpt"]]
    out = tmp_path / "out.png"
    rec = ["reconstruct", img, "--out", out, *ck]
    t2i = ["text2image", "a duck", "--out", out, *ck]
    existing = tmp_path / "existing.png"
    Image.new("RGB", (4, 4)).save(existing)
    (tmp_path / "adir.png").mkdir()
    os.symlink(img, tmp_path / "alias.png")
    (tmp_path / "notimage.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "n-2.png")
    return [
        (rec + ["--steps", "0"], "--steps"),
        (rec + ["--steps", "-3"], "--steps"),
        (rec + ["--size", "0"], "--size"),
        (rec + ["--size", "-8"], "--size"),
        (rec + ["--size", "101"], "multiple of"),
        (rec + ["--size", "18"], "multiple of"),  # a multiple of the VAE factor, not of VAE x UNet
        (rec + ["--dtype", "foo"], "--dtype"),
        (["caption", img, "--dtype", "foo", *ck], "--dtype"),
        (rec + ["--seed", "-1"], "--seed"),
        (rec + ["--guidance", "nan"], "--guidance"),
        (t2i + ["--top-p", "0"], "--top-p"),
        (t2i + ["--top-k", "-1"], "--top-k"),
        (t2i + ["--max-new-tokens", "0"], "--max-new-tokens"),
        (t2i + ["--min-new-tokens", "9", "--max-new-tokens", "3"], "--min-new-tokens"),
        (["reconstruct", img, "--out", img, *ck], "input"),
        (["reconstruct", img, "--out", img, "--overwrite", *ck], "input"),
        (["edit", img, "in the snow", "--out", tmp_path / "alias.png", "--overwrite", *ck], "input"),
        (["reconstruct", img, "--out", existing, *ck], "--overwrite"),
        (["reconstruct", img, "--out", tmp_path / "adir.png", "--overwrite", *ck], "directory"),
        (rec + ["--ids-out", existing.with_suffix(".npy")], "--ids-out"),  # exists, no --overwrite
        (rec + ["--ids-out", tmp_path / "ids.txt"], ".npy"),
        (["caption", img, "--keep", "maybe", *ck], "--keep"),
        (["caption", img, "--sample", "--temperature", "0", *ck], "--temperature"),
        (["caption", img, "--temperature", "0.7", *ck], "--temperature"),  # needs --sample
        (["vqa", img, "what?", "--top-p", "0.5", *ck], "--top-p"),  # needs --sample
        (["caption", img, "--sample", "--top-p", "1.5", *ck], "--top-p"),
        (["vqa", img, "what?", "--sample", "--top-k", "-1", *ck], "--top-k"),
        (["caption", img, "--repetition-penalty", "0", *ck], "--repetition-penalty"),
        (["caption", img, "--repetition-penalty", "inf", *ck], "--repetition-penalty"),
        (["caption", img, "--num-captions", "0", *ck], "--num-captions"),
        (t2i + ["--num-images", "0"], "--num-images"),
        (t2i + ["--tile"], "--tile"),
        (["edit", img, "in the snow", "--out", out, "--num-images", "2", "--tile", "--top-p", "2", *ck], "--top-p"),
        (["text2image", "a duck", "--out", existing, "--num-images", "2", "--tile", *ck], "--overwrite"),
        (["text2image", "a duck", "--out", tmp_path / "n.png", "--num-images", "3", *ck], "--overwrite"),  # n-2.png
        (["compose", img, "ids:1,,2", "--out", out, *ck], "ids:1,2,3"),
        (t2i + ["--negative-prompt", "a horse", "--llm-guidance", "1"], "--llm-guidance 1"),
        (t2i + ["--vae-dtype", "int8"], "--vae-dtype"),
        (["compose", img, "in the style of", tmp_path / "notimage.png", "--out", out, *ck], "not a readable image"),
        (["compose", img, "x", "--out", img, "--overwrite", *ck], "input"),
    ]


def test_bad_arguments_fail_before_any_model_work(env, tmp_path, capsys, recorder):
    np.save(tmp_path / "existing.npy", np.zeros(1))
    before = (tmp_path / "existing.npy").read_bytes()
    for argv, needle in _bad_argument_cases(env, tmp_path):
        try:
            rc, out, err = run_cli(capsys, *argv)
        except SystemExit as e:  # argparse: one line too, exit status 2
            rc, err = e.code, capsys.readouterr().err
        assert rc == 2, (argv, err)
        line = error_line(err)
        assert needle in line, (argv, line)
        assert not recorder.loads, f"the model was loaded before rejecting {argv}"
    assert not (tmp_path / "out.png").exists()
    assert (tmp_path / "existing.npy").read_bytes() == before
    assert Image.open(tmp_path / "existing.png").size == (4, 4)


def test_unwritable_out_is_reported_before_generation(env, tmp_path, capsys, recorder):
    folder = unwritable_dir(tmp_path)
    rc, out, err = run_cli(capsys, "reconstruct", env["img"], "--out", os.path.join(folder, "x.png"),
                           "--checkpoint", env["ckpt"])
    assert rc == 2 and "cannot write" in error_line(err) and str(folder) in err
    assert not recorder.loads


def test_overwrite_replaces_an_existing_output_whole(env, tmp_path, capsys, recorder):
    target = tmp_path / "old.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(target)
    rc, out, err = run_cli(capsys, "reconstruct", env["img"], "--out", target, "--checkpoint", env["ckpt"])
    assert rc == 2 and "--overwrite" in error_line(err)
    assert Image.open(target).size == (4, 4)
    rc, out, err = run_cli(capsys, "reconstruct", env["img"], "--out", target, "--overwrite", "--ids-out",
                           tmp_path / "ids.npy", "--checkpoint", env["ckpt"])
    assert rc == 0, err
    assert Image.open(target).size == (16, 16) and np.load(tmp_path / "ids.npy").tolist() == [[32005] * 3]
    assert sorted(os.listdir(tmp_path)) == ["ids.npy", "old.png"]  # no temporary files left


def test_negative_guidance_warns_and_runs(env, tmp_path, capsys, recorder):
    rc, out, err = run_cli(capsys, "text2image", "a duck", "--out", tmp_path / "d.png", "--guidance", "-2",
                           "--llm-guidance", "-1", "--checkpoint", env["ckpt"])
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "--guidance -2" in warnings[0] and "--llm-guidance -1" in warnings[1]
    assert recorder.calls[0][1]["guidance"] == -2.0 and recorder.calls[0][1]["llm_guidance"] == -1.0


def test_unset_sizes_and_token_counts_are_left_to_the_checkpoint(env, tmp_path, capsys, recorder):
    """With no --size / --max-new-tokens / --min-new-tokens / --steps the CLI passes none: the API derives them."""
    for argv in (["text2image", "a duck"], ["edit", env["img"], "in the snow"], ["reconstruct", env["img"]]):
        rc, out, err = run_cli(capsys, *argv, "--out", tmp_path / f"{argv[0]}.png", "--checkpoint", env["ckpt"])
        assert rc == 0, err
    for task, kw in recorder.calls:
        for name in ("size", "max_new_tokens", "min_new_tokens", "steps", "guidance", "seed", "decoder", "keep"):
            assert kw.get(name) is None, (task, name, kw)
    rc, out, err = run_cli(capsys, "text2image", "a duck", "--out", tmp_path / "b.png", "--size", "32",
                           "--max-new-tokens", "7", "--checkpoint", env["ckpt"])
    assert rc == 0 and recorder.calls[-1][1]["size"] == 32 and recorder.calls[-1][1]["max_new_tokens"] == 7


def test_keep_and_seed_are_passed_to_the_api(env, tmp_path, capsys, recorder):
    img, ck = env["img"], ["--checkpoint", env["ckpt"]]
    runs = [("caption", [img]), ("vqa", [img, "what is it?"]),
            ("edit", [img, "in the snow", "--out", tmp_path / "e.png"]),
            ("reconstruct", [img, "--out", tmp_path / "r.png"])]
    for task, argv in runs:
        rc, out, err = run_cli(capsys, task, *argv, "--keep", "sample", "--seed", "3", *ck)
        assert rc == 0, err
        assert recorder.calls[-1] == (task, {**recorder.calls[-1][1], "keep": "sample", "seed": 3})
    rc, out, err = run_cli(capsys, "caption", img, "--dtype", "bf16", *ck)
    assert rc == 0 and recorder.loads[-1]["dtype"] == "bfloat16"
    assert recorder.loads[-1]["llm_weights"] == "float" and not recorder.loads[-1]["verbose"]
    rc, out, err = run_cli(capsys, "vqa", img, "what is it?", "--int8", "--verbose", *ck)
    assert rc == 0 and recorder.loads[-1]["llm_weights"] == "int8" and recorder.loads[-1]["verbose"]


def test_caption_and_vqa_sampling_options_reach_the_api(env, capsys, recorder):
    img, ck = env["img"], ["--checkpoint", env["ckpt"]]
    rc, out, err = run_cli(capsys, "caption", img, "--sample", "--temperature", "0.7", "--top-p", "0.8", "--top-k",
                           "5", "--repetition-penalty", "1.2", "--num-captions", "3", *ck)
    assert rc == 0, err
    assert out.splitlines() == ["a caption"] * 3  # one caption a line
    assert recorder.calls[-1] == ("caption", dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=5,
                                                  repetition_penalty=1.2, num_captions=3, progress=True))
    rc, out, err = run_cli(capsys, "vqa", img, "what is it?", "--repetition-penalty", "1.5", *ck)
    assert rc == 0 and recorder.calls[-1] == ("vqa", dict(repetition_penalty=1.5, progress=True))


def test_num_images_numbered_files_tile_and_compose(env, tmp_path, capsys, recorder):
    img, ck = env["img"], ["--checkpoint", env["ckpt"]]
    rc, out, err = run_cli(capsys, "text2image", "a duck", "--out", tmp_path / "d.png", "--num-images", "3",
                           "--ids-out", tmp_path / "ids.npy", *ck)
    assert rc == 0, err
    assert recorder.calls[-1][1]["num_images"] == 3
    assert sorted(os.listdir(tmp_path)) == ["d-1.png", "d-2.png", "d-3.png", "ids.npy"]
    assert [Image.open(tmp_path / f"d-{i}.png").getpixel((0, 0))[1] for i in (1, 2, 3)] == [0, 30, 60]
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (3, 5) and (ids > 0).sum(1).tolist() == [3, 4, 5]
    assert "d-1.png, " in out and "3, 4, 5 visual tokens" in out
    rc, out, err = run_cli(capsys, "edit", img, "in the snow", "--out", tmp_path / "t.png", "--num-images", "3",
                           "--tile", *ck)
    assert rc == 0, err
    assert Image.open(tmp_path / "t.png").size == (32, 32)  # 2 columns, 2 rows
    assert not (tmp_path / "t-1.png").exists()
    rc, out, err = run_cli(capsys, "compose", img, "in the style of", img, "with snow", "--out", tmp_path / "c.png",
                           "--keep", "argmax", *ck)
    assert rc == 0, err
    task, kw = recorder.calls[-1]
    assert task == "compose" and kw["parts"] == [str(img), "in the style of", str(img), "with snow"]
    assert kw["keep"] == "argmax" and "num_images" not in kw
    with pytest.raises(SystemExit):
        run_cli(capsys, "compose", "--help")
    assert "names an existing file is an image" in " ".join(capsys.readouterr().out.split())


def test_out_of_memory_is_one_line_naming_the_size(env, tmp_path, capsys, monkeypatch, recorder):
    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 550.00GiB")

    monkeypatch.setattr(recorder, "text2image", oom)
    rc, out, err = run_cli(capsys, "text2image", "a duck", "--out", tmp_path / "d.png", "--size", "4096",
                           "--checkpoint", env["ckpt"])
    assert rc == 2 and "out of memory" in error_line(err) and "--size 4096" in err


def test_failing_task_closes_its_progress_bars_and_logs_stay_quiet(env, tmp_path, capfd):
    """A task that fails mid-run (a part deleted from the converted checkpoint): bars closed, then one error
    line; Orbax's INFO logs only with --verbose."""
    broken = tmp_path / "broken"
    shutil.copytree(env["ckpt"], broken)
    shutil.rmtree(broken / "highres_pixel_decoding" / "unet")
    argv = ["reconstruct", str(env["img"]), "--out", str(tmp_path / "r.png"), "--steps", "1", "--checkpoint",
            str(broken)]
    assert cli.main(argv) == 2
    err = capfd.readouterr().err
    assert "tokenize" in err  # the stage bar was running when the task failed
    assert "unet" in error_line(err) and "%|" not in error_line(err)
    assert not list(tqdm_std.tqdm._instances), "a progress bar was left open"
    assert "Restoring checkpoint" not in err and "orbax" not in err.lower()
    assert cli.main(argv + ["--verbose"]) == 2
    err = capfd.readouterr().err
    assert "Restoring checkpoint" in err  # Orbax INFO, asked for
    assert not (tmp_path / "r.png").exists()


def test_real_runs_plain_progress_lines_and_keep_modes(env, tmp_path, capsys):
    """reconstruct on the tiny checkpoint: progress as plain lines on a non-terminal stderr (the stage bar and the
    nested diffusion bar), and --keep / --seed reaching the tokenizer (seeded samples repeat, argmax differs)."""
    ids = {}
    for name, extra in (("s1", ["--keep", "sample", "--seed", "1"]), ("s1b", ["--keep", "sample", "--seed", "1"]),
                        ("argmax", ["--keep", "argmax"])):
        rc, out, err = run_cli(capsys, "reconstruct", env["img"], "--out", tmp_path / f"{name}.png", "--steps", "2",
                               "--ids-out", tmp_path / f"{name}.npy", *extra, "--checkpoint", env["ckpt"])
        assert rc == 0, err
        assert "wrote" in out
        assert "\r" not in err and "\x1b" not in err
        lines = err.strip().split("\n")
        assert any(ln.startswith("tokenize") for ln in lines) and any(ln.startswith("diffusion") for ln in lines)
        assert all(len(ln) < 200 for ln in lines)
        ids[name] = np.load(tmp_path / f"{name}.npy")
    assert np.array_equal(ids["s1"], ids["s1b"]) and not np.array_equal(ids["s1"], ids["argmax"])


# ------------------------------------------------------------------------------------------ converter CLI


def test_converter_help_states_defaults(capsys):
    with pytest.raises(SystemExit):
        conv.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: bf16" in out and "default: configs/lavit_7b.py" in out


def test_converter_names_its_config_and_warns_about_a_small_text_tokenizer(env):
    assert "tokenizer config: configs/tiny.py" in env["log"]
    assert "tokenizer.model has 400 pieces, fewer than the 32000 text ids" in env["log"]


def test_converter_width_mismatch_is_short_and_points_at_config(env, tmp_path):
    rc, out, err = convert("--src", env["rel"], "--out", tmp_path / "o")  # default config: the 7B widths
    assert rc == 2
    line = error_line(err)
    assert len(err) < 2000, len(err)
    assert "--config sets the tokenizer widths" in line and "eva_width 64 (config: 1408)" in line
    assert "tokenizer config: configs/lavit_7b.py" in out
    assert not (tmp_path / "o").exists() and not os.listdir(tmp_path)


def test_converter_src_that_is_a_file(env, tmp_path):
    rc, out, err = convert("--src", env["rel"] / "language_model" / "config.json", "--out", tmp_path / "o",
                           "--config", TINY)
    assert rc == 2 and "not a directory" in error_line(err)


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dotdot", "symlink", "same"])
def test_converter_never_deletes_a_source_inside_out(env, tmp_path, monkeypatch, spelling):
    parent = tmp_path / "parent"
    shutil.copytree(env["rel"] / "visual_tokenizer", parent / "src" / "visual_tokenizer")
    (parent / "lavit.json").write_text(json.dumps({"format": "lavit-jax/1"}))  # even if PARENT looks like ours
    before = digest(parent)
    os.symlink(parent, tmp_path / "link")
    src, out = {
        "absolute": (parent / "src", parent),
        "relative": ("src", "."),
        "dotdot": (parent / "src", parent / "src" / ".."),
        "symlink": (tmp_path / "link" / "src", parent),
        "same": (parent / "src", tmp_path / "link" / "src"),
    }[spelling]
    monkeypatch.chdir(parent)
    rc, _, err = convert("--src", src, "--out", out, "--overwrite", "--config", TINY)
    assert rc == 2 and "--src" in error_line(err)
    assert digest(parent) == before


@pytest.mark.parametrize("kind", ["plain_dir", "other_format", "file", "empty_manifest"])
def test_converter_overwrite_replaces_only_a_lavit_checkpoint(env, tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("my notes")
    else:
        target.mkdir()
        (target / "precious.txt").write_text("keep me")
        if kind == "other_format":
            (target / "lavit.json").write_text(json.dumps({"format": "someone-else/3"}))
        if kind == "empty_manifest":
            (target / "lavit.json").write_text("")
    before = digest(tmp_path)
    src = tmp_path / "src"
    shutil.copytree(env["rel"] / "visual_tokenizer", src / "visual_tokenizer")
    rc, out, err = convert("--src", src, "--out", target, "--overwrite", "--config", TINY)
    assert rc == 2 and "not replaced" in error_line(err)
    assert not converted_any(out)
    assert {k: v for k, v in digest(tmp_path).items() if not k.startswith("src")} == before
    assert sorted(os.listdir(tmp_path)) == ["src", "target"]


def test_converter_replaces_its_own_checkpoint_and_writes_a_normal_directory(env, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(env["rel"] / "visual_tokenizer", src / "visual_tokenizer")
    out = tmp_path / "out"
    assert convert("--src", src, "--out", out, "--config", TINY, "--dtype", "f32")[0] == 0
    rc, log, err = convert("--src", src, "--out", out, "--config", TINY, "--overwrite")
    assert rc == 0, err
    assert json.loads((out / "lavit.json").read_text())["dtype"] == "bfloat16"
    os.mkdir(tmp_path / "plain")  # what a plain mkdir gives here (umask applied)
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["out", "plain", "src"]


def test_converter_checks_every_part_before_converting_anything(env, tmp_path):
    src = tmp_path / "src"
    for part in ("visual_tokenizer", "language_model"):
        shutil.copytree(env["rel"] / part, src / part)
    os.unlink(src / "language_model" / "tokenizer.model")
    rc, out, err = convert("--src", src, "--out", tmp_path / "out", "--config", TINY)
    assert rc == 2 and "tokenizer.model" in error_line(err)
    assert not converted_any(out)  # visual_tokenizer/ comes first in the order, and was not converted
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_verify_loads_references_without_alarming_third_party_warnings(env, capsys):
    """What --verify does to read the PyTorch references (diffusers .bin folders, HF .bin shards), inside the
    tool's quiet_reference_loaders: none of the loaders' warnings or bars. The same loads without it show them
    (the control), so the check can fail."""
    roots = diffusers.utils.logging.get_logger(), transformers.utils.logging.get_logger()
    handlers = [h for r in roots for h in r.handlers if type(h) is logging.StreamHandler]  # the libraries' own
    logs = io.StringIO()
    streams = [h.setStream(logs) for h in handlers]

    def load_references():
        diffusers.UNet2DConditionModel.from_pretrained(env["rel"] / "pixel_decoding" / "unet")
        diffusers.AutoencoderKL.from_pretrained(env["rel"] / "pixel_decoding" / "vae")
        transformers.LlamaForCausalLM.from_pretrained(env["rel"] / "language_model")
        cap = capsys.readouterr()
        text = logs.getvalue() + cap.out + cap.err
        logs.seek(0)
        logs.truncate()
        return text

    try:
        control = load_references()
        with conv.quiet_reference_loaders():
            quiet = load_references()
    finally:
        for h, stream in zip(handlers, streams, strict=True):
            h.setStream(stream)
    assert "unsafe serialization" in control and "Loading weights" in control
    for noise in ("unsafe serialization", "accelerate", "An error occurred", "Loading weights"):
        assert noise not in quiet, noise


# ------------------------------------------------------------------------------------------ eval.py


def test_eval_errors_name_its_flags_and_create_nothing(env, tmp_path):
    typo = tmp_path / "chekpoint"
    proc = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(typo), "--data_dir", "synthetic:4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "--checkpoint" in error_line(proc.stderr)
    assert not typo.exists()
    config = conv.load_config_file(TINY)
    bad = [
        ((typo, "synthetic:4"), FileNotFoundError, "--checkpoint"),
        ((tmp_path, "synthetic:4"), FileNotFoundError, "--checkpoint"),  # neither kind of checkpoint
        ((env["ckpt"], str(tmp_path / "no_images")), FileNotFoundError, "--data_dir"),
        ((env["ckpt"], str(tmp_path)), FileNotFoundError, "--data_dir"),  # a folder without images
        ((env["ckpt"], "synthetic:zero"), ValueError, "--data_dir"),
    ]
    for (ckpt, data), kind, needle in bad:
        with pytest.raises(kind, match=needle) as e:
            lavit_eval.evaluate(config, str(ckpt), data, limit=4, batch_size=2)
        assert "train.data_dir" not in str(e.value)
    assert not typo.exists()


def test_eval_counts_distinct_images_states_keep_mode_and_is_quiet(env, tmp_path):
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        Image.open(env["img"]).rotate(90 * i).save(folder / f"{i}.png")
    proc = subprocess.run([sys.executable, "eval.py", "--config", TINY, "--checkpoint", str(env["ckpt"]),
                           "--data_dir", str(folder), "--limit", "8", "--batch_size", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["images"] == 3 and result["keep_mode"] == "argmax"
    assert "orbax" not in proc.stderr.lower() and not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ API on the tiny checkpoint


@pytest.fixture(scope="module")
def tiny_model(env):
    return LaVIT.from_pretrained(env["ckpt"], compilation_cache=False)


def test_interleaved_prompt_is_built_as_the_release_does(env, tmp_path, monkeypatch, tiny_model):
    """generate_image builds [image a ids][text ids][image b ids][IMG] (no BOS, no [IMG]/[/IMG] around images, as
    the release's multimodal_synthesis), capped to the prompt's token count."""
    from lavit_jax.inference import llm_tasks

    model = tiny_model
    other = tmp_path / "other.png"
    Image.open(env["img"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    seen = []

    def spy(m, p, ids, mask, rng, **kw):  # records the prompt; generates nothing
        seen.append((np.asarray(ids), np.asarray(mask), kw["config"]))
        return llm_tasks.GenerationOutput(np.full((1, 4), 32005, np.int32), np.array([4]), np.zeros(1))

    monkeypatch.setattr(llm_tasks, "token_prompt_to_image_ids", spy)
    ids, lengths = model.generate_image_ids([str(env["img"]), "in the style of", other], seed=0)
    assert lengths.tolist() == [4] and ids[0, :4].tolist() == [32005] * 4
    vis, n = (np.asarray(a) for a in model.visual_tokenizer.tokenize([str(env["img"]), other], mode="sample", seed=0))
    tok = model.language_model[2]
    expected = vis[0, : n[0]].tolist() + tok.encode("in the style of") + vis[1, : n[1]].tolist() + [32000]
    ids, mask, cfg = seen[-1]
    assert ids[0][mask[0] == 1].tolist() == expected and mask[0, -len(expected):].all()
    cap = (model.visual_tokenizer.config.image_size // model.visual_tokenizer.config.patch_size) ** 2
    assert cfg.max_new_tokens == min(len(expected) - 1, cap)  # the release's cap: the prompt's token count
    assert len(expected) - 1 > cap  # (two images: the cap is an image's token count)
    model.generate_image_ids([other, "a duck"], seed=0)
    assert seen[-1][2].max_new_tokens == seen[-1][1].sum() - 1 < cap


def test_edit_is_generate_image_and_draws_are_seeded(env, monkeypatch, tiny_model):
    """edit(img, text) is generate_image([img, text]); num_images=N gives image i as seed + i does."""
    from lavit_jax.inference import llm_tasks

    model = tiny_model
    seen = []
    real = llm_tasks.token_prompt_to_image_ids

    def spy(m, p, ids, mask, rng, **kw):
        seen.append(np.asarray(ids))
        return real(m, p, ids, mask, rng, **kw)

    monkeypatch.setattr(llm_tasks, "token_prompt_to_image_ids", spy)
    kw = dict(steps=1, seed=0, return_ids=True, cap_to_prompt=False, min_new_tokens=2, max_new_tokens=8)
    e_img, e_ids = model.edit(str(env["img"]), "in the snow", **kw)
    g_img, g_ids = model.generate_image([str(env["img"]), "in the snow"], **kw)
    np.testing.assert_array_equal(seen[-2], seen[-1])
    np.testing.assert_array_equal(e_ids[0], g_ids[0])
    np.testing.assert_array_equal(np.asarray(e_img), np.asarray(g_img))

    imgs, runs = model.edit(str(env["img"]), "in the snow", num_images=2, **kw)
    one, one_ids = model.edit(str(env["img"]), "in the snow", **{**kw, "seed": 1})
    assert len(imgs) == 2 and len(runs) == 2
    np.testing.assert_array_equal(np.asarray(imgs[0]), np.asarray(e_img))
    np.testing.assert_array_equal(np.asarray(imgs[1]), np.asarray(one))
    np.testing.assert_array_equal(runs[1][0], one_ids[0])


def test_text2image_draws_are_seeded(tiny_model):
    model = tiny_model
    t_kw = dict(steps=1, min_new_tokens=2, max_new_tokens=8)
    t_imgs = model.text2image("a duck", num_images=2, seed=3, **t_kw)
    np.testing.assert_array_equal(np.asarray(t_imgs[1]), np.asarray(model.text2image("a duck", seed=4, **t_kw)))
    with pytest.raises(ValueError, match="num_images"):
        model.text2image("a duck", num_images=0)
    with pytest.raises(ValueError, match="non-empty list"):
        model.generate_image("a duck")
