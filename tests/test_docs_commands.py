"""Every command shown in README.md and in module docstrings runs as written.

Commands are collected from README.md's ``bash`` blocks and from the docstring of every module in the
repository (lines starting with ``python``, ``PYTHONPATH=``, ``make``; ``\\`` continuations and indented
``[--option]`` lines joined; optional ``[...]`` parts dropped: the minimal form runs, and the options they
name must exist). README's ``python`` blocks run too. Each command falls in one category:

- run: runs on CPU here, as written, in a sandbox directory laid out so that the documented relative paths
  exist: ``configs/ tools/ lavit_jax/ bench/ train.py eval.py`` link to the repository, ``ckpt/lavit7b`` and
  ``out/tiny_converted`` are a tiny converted checkpoint (tests/released_fixture.py), ``ckpt/video_lavit`` a
  tiny converted Video-LaVIT (tests/video_release_fixture.py) with ``clip.mp4`` its fixture video, ``cat.jpg`` and
  ``dog.png`` tiny images. Placeholders are replaced by real tiny things: IMAGE -> cat.jpg, QUESTION and
  PROMPT -> a short text, FILE.png -> a new file name, DIR and CONVERTED_DIR -> ckpt/lavit7b, IMAGES -> a
  folder of two images. ``python -m lavit_jax`` commands run in-process (compiled code shared), the others
  in a subprocess. The training commands are the ``slow`` test (each trains for its configured steps).
- needs 7B: the released weights (``RELEASED_DIR``, ``/path/to/LaVIT-7B-v2``), the 7B config with real
  data (``configs/lavit_7b.py``, ``/data/...``): parsed only. The converter's arguments reach ``convert``
  (recorded, not run); ``python -m lavit_jax`` goes through the CLI's parser; train.py / eval.py parse
  their flags (config overrides included) in a subprocess.
- benchmark (``bench/``): minutes on CPU, so ``--help`` runs and the options shown must be in it.
- make: ``make -n TARGET`` succeeds; for ``make demo`` the command it would run (``python -m lavit_jax.demo``)
  then runs with ``DEMO_FLAGS`` shortening every stage (``DEMO_SMOKE_FLAGS``) into a temporary directory, and
  its report.json, PNGs and converted model are checked.
- install (``pip``, ``venv``): needs the network; the files named exist and the pinned versions agree.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lavit_jax import __main__ as cli
from lavit_jax import demo
from tests.conftest import REPO
from tests.released_fixture import build_released
from tests.video_release_fixture import VIDEO_SET, build_video_release
from tools import convert_torch_weights as conv

TINY = str(REPO / "configs" / "tiny.py")
VIDEO_TINY = str(REPO / "configs" / "video_tiny.py")
PREFIXES = ("python ", "python3", "PYTHONPATH=", "make ", ".venv/bin/")
PLACEHOLDERS = {"IMAGE": "cat.jpg", "QUESTION": "what is in the image?", "PROMPT": "a duck made of wool",
                "DIR": "ckpt/lavit7b", "CONVERTED_DIR": "ckpt/lavit7b", "IMAGES": "images"}
SEVEN_B = ("RELEASED_DIR", "/path/to/", "configs/lavit_7b.py", "/data/", "/ckpt/", "rain1011/")
LINKS = ("configs", "tools", "lavit_jax", "bench", "train.py", "eval.py")
# `make demo` runs here with these flags (DEMO_FLAGS): the very commands, a few steps of each stage.
DEMO_SMOKE_FLAGS = "--steps_scale=0.03 --eval_scenes=4 --t2i_prompts=2"


# ------------------------------------------------------------------------------------------ collection


def _join_continuations(lines):
    """Joins ``\\``-continued lines and indented lines that carry on a command (``[--opt ...]``, ``--opt``)."""
    out = []
    for raw in lines:
        s = raw.strip()
        if out and (out[-1].endswith("\\") or (s.startswith(("[", "--")) and raw[:1].isspace())):
            out[-1] = out[-1].rstrip("\\").rstrip() + " " + s
        else:
            out.append(s)
    return out


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def readme_commands() -> list[tuple[str, str]]:
    cmds = []
    for block in readme_blocks("bash"):
        for line in _join_continuations(block.splitlines()):
            if line and not line.startswith("#"):
                cmds.append(("README.md", re.sub(r"\s+#\s.*$", "", line)))
    return cmds


def docstring_commands() -> list[tuple[str, str]]:
    cmds = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests", "out") or any(p.startswith(".") for p in rel.parts):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=True) or ""
        lines = [re.sub(r"^(\s*)Run:\s+", r"\1", ln) for ln in doc.splitlines()]
        for line in _join_continuations(lines):
            line = re.split(r"\s{2,}\(", line)[0].strip()  # "cmd    (what it does)"
            if line.startswith(PREFIXES):
                cmds.append((str(rel), line))
    return cmds


def all_commands():
    seen, out = set(), []
    for where, cmd in readme_commands() + docstring_commands():
        if cmd not in seen:
            seen.add(cmd)
            out.append((where, cmd))
    return out


def minimal(cmd: str) -> tuple[list[str], list[str]]:
    """(tokens without the optional ``[...]`` parts, the option names those parts show)."""
    optional = re.findall(r"\[([^\]]*)\]", cmd)
    names = [t for part in optional for t in part.split() if t.startswith("--")]
    return shlex.split(re.sub(r"\s*\[[^\]]*\]", "", cmd)), names


def category(cmd: str) -> str:
    if "pip install" in cmd or "-m venv" in cmd:
        return "install"
    if cmd.startswith("make "):
        return "make"
    if "bench/" in cmd:
        return "benchmark"
    if any(s in cmd for s in SEVEN_B):
        return "needs 7B"
    return "run"


COMMANDS = all_commands()
# The commands this test only parses, because they need the released 7B weights or real data (a documented
# command added or changed in that category must be added here).
NEEDS_7B = {
    "python -m lavit_jax caption cat.jpg --checkpoint rain1011/LaVIT-7B-v2",
    "python -m lavit_jax text2image \"a duck made of wool\" --out duck.png --checkpoint rain1011/LaVIT-7B-v2 "
    "--revision main",
    "python -m lavit_jax caption cat.jpg --checkpoint rain1011/LaVIT-7B-v2 [--revision REV]",
    "python tools/convert_torch_weights.py --src /path/to/LaVIT-7B-v2 --out ckpt/lavit7b --dtype bf16",
    "python tools/convert_torch_weights.py --src /path/to/LaVIT-7B-v2 --out ckpt/lavit7b --dtype bf16 --verify",
    "python tools/convert_torch_weights.py --src /path/to/Video-LaVIT-v1 --out ckpt/video_lavit "
    "--config configs/video_lavit.py --dtype bf16",
    "python eval.py --config configs/lavit_7b.py --checkpoint out/tokenizer_stage1 --data_dir /data/val",
    "python train.py --config configs/lavit_7b.py:tokenizer --config.train.data_dir=/data/images "
    "--config.train.init_from=CONVERTED_DIR",
    "python train.py --config configs/lavit_7b.py:lm --config.train.data_dir=/data/pairs.jsonl "
    "--config.train.init_from=CONVERTED_DIR --config.train.tokenizer_from=CONVERTED_DIR",
    "python tools/convert_torch_weights.py --src RELEASED_DIR --out OUT_DIR [--dtype bf16|f32] "
    "[--config configs/lavit_7b.py] [--overwrite] [--verify]",
    "python train.py --config configs/lavit_7b.py:tokenizer --config.train.data_dir=/data/images "
    "--config.train.init_from=/ckpt/LaVIT-7B-v2-converted --config.mesh_shape='(-1,1,1)'",
    "python train.py --config configs/lavit_7b.py:detokenizer --config.train.data_dir=/data/images "
    "--config.train.init_from=CONVERTED_DIR",
    *(f"python eval.py --config configs/lavit_7b.py --task {task} --checkpoint /ckpt/lavit7b --data /data/{data} "
      f"{extra}--out {out}.json"
      for task, data, extra, out in (
          ("coco_caption", "coco_karpathy_test", "", "coco_caption"), ("vqav2", "vqav2_val", "", "vqav2"),
          ("okvqa", "okvqa_val", "", "okvqa"), ("gqa", "gqa_testdev", "", "gqa"),
          ("vizwiz", "vizwiz_val", "", "vizwiz"),
          ("t2i_clip_score", "coco_val_prompts", "--clip /ckpt/clip-vit-large-patch14 ", "clip_score"),
          ("t2i_fid", "coco_val_30k", "--inception /ckpt/pt_inception-2015-12-05-6726825d.pth ", "fid"))),
}


def test_commands_are_found_and_classified():
    cats = {}
    for _where, cmd in COMMANDS:
        cats.setdefault(category(cmd), []).append(cmd)
    assert {"run", "needs 7B", "benchmark", "make", "install"} <= set(cats), cats
    assert set(cats["needs 7B"]) == NEEDS_7B, sorted(set(cats["needs 7B"]) ^ NEEDS_7B)


# ------------------------------------------------------------------------------------------ sandbox


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    rel = build_released(base / "released")
    sb = base / "sb"
    sb.mkdir()
    for name in LINKS:
        os.symlink(REPO / name, sb / name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = conv.main(["--src", str(rel.root), "--out", str(sb / "ckpt" / "lavit7b"), "--config", TINY,
                        "--dtype", "f32"])
    assert rc == 0, out.getvalue()
    vrel = build_video_release(base / "video_released")  # README's Video-LaVIT commands
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = conv.main(["--src", str(vrel.root), "--out", str(sb / "ckpt" / "video_lavit"), "--config", VIDEO_TINY,
                        "--dtype", "f32"])
    assert rc == 0, out.getvalue()
    shutil.copyfile(VIDEO_SET / "video.mp4", sb / "clip.mp4")
    (sb / "out").mkdir()
    os.symlink(sb / "ckpt" / "lavit7b", sb / "out" / "tiny_converted")
    y, x = np.mgrid[0:64, 0:64] / 64
    img = (np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y) ** 0.5], -1) * 255).astype(np.uint8)
    Image.fromarray(img).save(sb / "cat.jpg")
    Image.fromarray(img[::-1]).save(sb / "dog.png")
    (sb / "images").mkdir()
    shutil.copy(sb / "cat.jpg", sb / "images")
    shutil.copy(sb / "dog.png", sb / "images")
    return sb


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def substitute(tokens: list[str], counter=[0]) -> list[str]:  # noqa: B006  (a running count of outputs)
    out = []
    for t in tokens:
        if t == "FILE.png":
            counter[0] += 1
            t = f"file{counter[0]}.png"
        out.append(PLACEHOLDERS.get(t, t))
    return out


def python_argv(tokens: list[str]) -> tuple[list[str], dict]:
    """A documented command's tokens -> (argv with this interpreter, extra environment)."""
    tokens, extra = list(tokens), {}
    while "=" in tokens[0] and not tokens[0].startswith("-"):
        k, v = tokens.pop(0).split("=", 1)
        extra[k] = str(REPO) if v == "." else v
    assert tokens[0] in ("python", "python3", "python3.11", ".venv/bin/python"), tokens
    return [sys.executable, *tokens[1:]], extra


class Job:
    """A command started in the background (the suite's two cores: compiling in-process leaves one free)."""

    def __init__(self, label, argv, cwd, extra=None):
        self.label, self.log = label, cwd / f".job-{abs(hash(label))}.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(argv, cwd=cwd, env={**env(), **(extra or {})}, stdout=f,
                                         stderr=subprocess.STDOUT, text=True)

    def result(self, timeout=1200) -> str:
        self.proc.wait(timeout=timeout)
        out = self.log.read_text()
        assert self.proc.returncode == 0, f"{self.label}\n{out[-4000:]}"
        return out


def is_cli(argv) -> bool:
    return argv[1:3] == ["-m", "lavit_jax"]


def is_training(cmd) -> bool:
    return "train.py" in cmd


RUN = list({shlex.join(minimal(c)[0]): c for _, c in COMMANDS if category(c) == "run"}.values())

_PARSE_FLAGS = r"""
import importlib, sys
sys.path.insert(0, {repo!r})
sys.argv = sys.argv[1:]  # ml_collections registers the --config.* overrides it finds in sys.argv
from absl import flags
importlib.import_module(sys.argv[0][:-3]).define_flags()
flags.FLAGS(sys.argv)
print("parsed", flags.FLAGS.config.name if "config" in flags.FLAGS else "")
"""


@pytest.fixture(scope="module")
def jobs(sandbox, tmp_path_factory):
    """Every subprocess command, started at once: scripts that run, --help of the benchmarks, flag parsing of
    the 7B train/eval commands, and what `make demo` runs."""
    started = {}
    for cmd in RUN:
        if not is_training(cmd):
            argv, extra = python_argv(substitute(minimal(cmd)[0]))
            if not is_cli(argv):
                started[cmd] = Job(cmd, argv, sandbox, extra)
    for cmd in (c for _, c in COMMANDS if category(c) == "benchmark"):
        argv, extra = python_argv(minimal(cmd)[0])
        started[cmd] = Job(cmd, [*argv, "--help"], REPO, extra)
    for _, c in COMMANDS:  # train.py / eval.py commands needing 7B: their flags parse (one process each)
        if category(c) == "needs 7B" and re.match(r"python (train|eval)\.py", c):
            argv = python_argv(minimal(c)[0])[0]
            started[shlex.join(argv[1:])] = Job(f"flag parsing of {c}", [sys.executable, "-c",
                                                _PARSE_FLAGS.format(repo=str(REPO)), *argv[1:]], REPO)
    if shutil.which("make"):
        run_dir = tmp_path_factory.mktemp("make_demo") / "run"
        dry = subprocess.run(["make", "-n", "demo", f"DEMO_FLAGS=--workdir={run_dir} {DEMO_SMOKE_FLAGS}"], cwd=REPO,
                             capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        lines = _join_continuations(dry.stdout.replace("\t", " ").splitlines())
        recipe = [ln for ln in lines if ln.startswith(".venv/bin/python") and "pip" not in ln]
        assert len(recipe) == 1 and "lavit_jax.demo" in recipe[0], recipe
        chain = " && ".join(shlex.quote(sys.executable) + ln[len(".venv/bin/python"):] for ln in recipe)
        started["make demo"] = Job("make demo (its commands)", ["bash", "-c", chain], REPO)
        started["make demo"].run_dir = run_dir
    yield started
    for job in set(started.values()):
        if job.proc.poll() is None:
            job.proc.kill()


# ------------------------------------------------------------------------------------------ run


def cli_help(task: str) -> str:
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[task].format_help()


@pytest.mark.slow  # compiles every task on the tiny checkpoint: about a minute on 2 idle cores
def test_cli_commands_run_as_written(sandbox, jobs, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    ran, timings = 0, []
    for cmd in RUN:
        tokens, options = minimal(cmd)
        argv, extra = python_argv(substitute(tokens))
        if not is_cli(argv):
            continue
        for opt in options:
            assert opt in cli_help(argv[3]), (cmd, opt)
        t0 = time.time()
        rc = cli.main(argv[3:])
        cap = capsys.readouterr()
        timings.append((round(time.time() - t0, 1), cmd))
        assert rc == 0, f"{cmd}\n{cap.err[-3000:]}"
        if "--out" in argv:
            assert (sandbox / argv[argv.index("--out") + 1]).is_file(), cmd
        ran += 1
    print(*timings, sep="\n")  # seconds per command (-s shows them)
    assert ran >= 10


@pytest.mark.slow
def test_readme_python_blocks_run(sandbox, jobs, monkeypatch):
    monkeypatch.chdir(sandbox)
    blocks = readme_blocks("python")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102  the README's own code


@pytest.mark.parametrize("cmd", [c for c in RUN if not is_training(c) and not is_cli(python_argv(minimal(c)[0])[0])])
def test_script_commands_run_as_written(cmd, jobs):
    jobs[cmd].result()


@pytest.mark.slow
def test_training_commands_run_as_written(sandbox, tmp_path):
    """Each in a fresh sandbox of its own (their default workdirs may coincide), all at once."""
    procs = []
    for i, cmd in enumerate(c for c in RUN if is_training(c)):
        cwd = tmp_path / f"run{i}"
        cwd.mkdir()
        for name in LINKS:
            os.symlink(REPO / name, cwd / name)
        argv, extra = python_argv(substitute(minimal(cmd)[0]))
        procs.append(Job(cmd, argv, cwd, extra))
    assert procs
    for job in procs:
        job.result()


# ------------------------------------------------------------------------------------------ parse only


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS if category(c) == "needs 7B"])
def test_commands_needing_7b_weights_parse(cmd, jobs, monkeypatch, capsys):
    tokens, options = minimal(cmd)
    argv, extra = python_argv(tokens)
    monkeypatch.chdir(REPO)
    help_text = ""
    if argv[1] == "tools/convert_torch_weights.py":
        seen = {}

        def record(src, out, tokenizer_config, dtype, overwrite, **kw):
            seen.update(src=src, out=out, dtype=dtype, width=tokenizer_config.eva_width)
            return {"parts": {}}

        monkeypatch.setattr(conv, "convert", record)
        assert conv.main(argv[2:]) == 0
        assert seen["src"] == argv[argv.index("--src") + 1] and seen["width"] == 1408
        with pytest.raises(SystemExit):
            conv.main(["--help"])
        help_text = capsys.readouterr().out
    elif is_cli(argv):
        cli._parser().parse_args(argv[3:])
        help_text = cli_help(argv[3])
    else:
        assert argv[1] in ("train.py", "eval.py"), cmd
        assert "parsed" in jobs[shlex.join(argv[1:])].result()
    for opt in options:
        assert opt in help_text, (cmd, opt)


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS if category(c) == "benchmark"])
def test_benchmark_commands_parse(cmd, jobs):
    out = jobs[cmd].result()
    for opt in minimal(cmd)[1]:
        assert opt in out, (cmd, opt)


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS if category(c) == "make"])
def test_make_commands(cmd, jobs):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    target = shlex.split(cmd)[1]
    dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    if target == "demo":
        job = jobs["make demo"]
        out = job.result()
        report = json.loads((job.run_dir / "report.json").read_text())
        for field in demo.REPORT_FIELDS:  # every field, a measured value in range (not a value asserted)
            assert 0.0 <= report[field] <= 1.0, (field, report[field])
            assert field in out  # the summary table
        assert report["eval_scenes"] == 4 and report["t2i_prompts"] == 2
        for png in ("samples.png", "loss_curves.png"):
            with Image.open(job.run_dir / png) as im:
                assert im.format == "PNG" and min(im.size) > 32
        assert (job.run_dir / "model" / "lavit.json").is_file()


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS if category(c) == "install"])
def test_install_commands_name_real_files_and_pins(cmd):
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    for name in re.findall(r"-r\s+(\S+)", cmd):
        assert (REPO / name).is_file(), (cmd, name)
    for pkg, version in re.findall(r"\"?(\w+)\[[\w,]+\]==([\w.]+)", cmd):
        assert pins.get(pkg) == version, (cmd, pkg, pins.get(pkg))
