"""Fault injection against the converter: SIGKILL at several points of a conversion (fresh, and while
replacing an existing checkpoint), corrupt and truncated source files, a disk that fills up (a file-size
limit: writes fail with EFBIG mid-conversion) and a read-only output directory.

Each fault ends with nothing lost (the source byte-identical; an existing checkpoint intact, or restored by
the next run), a one-line ``error: ...`` where the run survives to report, and nothing left behind once the
next run is done. The killed conversions run in one subprocess that imports the converter once and forks one
child per fault; each child arms its fault (a patched function that SIGKILLs the child, a resource limit, a
dropped privilege), then runs ``tools/convert_torch_weights.py``'s ``main``; the children run concurrently,
each on its own output directory, all reading one shared source.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.cli_helpers import convert, converted_any, digest, error_line
from tests.conftest import REPO
from tests.released_fixture import build_released

TINY = str(REPO / "configs" / "tiny.py")
NOBODY = 65534

DRIVER = r"""
import atexit, json, os, resource, signal, sys, threading
sys.path.insert(0, os.getcwd())
import torch  # noqa: F401  imported once, before the forks
from lavit_jax import checkpoint
from tools import convert_torch_weights as conv

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(fault):
    kind = fault.get("kind")
    if kind in ("kill_before_save", "kill_during_save"):  # the n-th Orbax tree save
        real, calls = checkpoint.save_tree, [0]
        def save_tree(path, tree):
            calls[0] += 1
            if calls[0] == fault["n"]:
                if kind == "kill_before_save":
                    die()
                threading.Timer(0.02, die).start()
            real(path, tree)
        checkpoint.save_tree = save_tree
    elif kind == "kill_at_rename":  # the swap's os.rename whose source is named ``name``/``prefix``
        real = os.rename
        def rename(a, b):
            base = os.path.basename(os.fspath(a))
            if base == fault.get("name") or base.startswith(fault.get("prefix", "\0")):
                die()
            real(a, b)
        os.rename = rename
    elif kind == "kill_at_remove_old":  # after the swap, before the replaced checkpoint is deleted
        from lavit_jax import fsutil
        real = fsutil.remove_tree
        def remove_tree(path):
            if ".old-" in os.path.basename(path):
                die()
            real(path)
        fsutil.remove_tree = remove_tree
    elif kind == "file_size_limit":  # writes beyond the limit fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fault["bytes"], fault["bytes"]))
    elif kind == "nobody":  # root ignores directory permissions: become an ordinary user
        import configs.lavit_7b  # noqa: F401 -- read while we may (the config file imports it)
        os.setgroups([])
        os.setgid(fault["uid"])
        os.setuid(fault["uid"])

pids = []
for run in json.loads(sys.argv[1]):  # all children at once: each is one conversion, mostly waiting on the others
    pid = os.fork()
    if pid == 0:
        atexit._clear()  # the parent's handlers stay the parent's; the child runs only its own at exit
        fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        rc = 3
        try:
            arm(run.get("fault", {}))
            rc = conv.main(run["argv"])
        except BaseException as e:
            print(f"driver: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            # as the interpreter's exit after the real tool's main(): join non-daemon threads, then at-exit
            # handlers (atomic_output_dir removes a partial directory there once Orbax's writers have ended)
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) else 3)
    pids.append(pid)
print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]))
"""

# name -> (fault, start with an existing checkpoint at --out and pass --overwrite)
FAULTS = {
    "kill_before_first_save": ({"kind": "kill_before_save", "n": 1}, False),
    "kill_during_third_save": ({"kind": "kill_during_save", "n": 3}, False),
    "kill_before_moving_old_aside": ({"kind": "kill_at_rename", "name": "out"}, True),
    "kill_between_the_two_renames": ({"kind": "kill_at_rename", "prefix": ".out.partial-"}, True),
    "kill_before_removing_old": ({"kind": "kill_at_remove_old"}, True),
    "disk_full": ({"kind": "file_size_limit", "bytes": 200_000}, True),
    "read_only_output_dir": ({"kind": "read_only"}, True),
}


def link_tree(src, dst):
    """A copy of ``src`` made of hard links (cheap; replace a file with ``rewrite`` before changing it)."""
    shutil.copytree(src, dst, copy_function=os.link)


def rewrite(path, data: bytes):
    os.unlink(path)  # break the hard link: the shared original stays intact
    pathlib.Path(path).write_bytes(data)


def manifest(ckpt) -> dict:
    return json.loads((pathlib.Path(ckpt) / "lavit.json").read_text())


@pytest.fixture(scope="module")
def world():
    # Not under pytest's 0700 base directory: the read-only fault runs as an ordinary user when we are root.
    base = pathlib.Path(tempfile.mkdtemp(prefix="lavit-faults-"))
    base.chmod(0o755)
    rel = build_released(base / "released")
    src = base / "src"  # the killed conversions' source: the visual tokenizer (three Orbax trees)
    link_tree(rel.root / "visual_tokenizer", src / "visual_tokenizer")
    good = base / "good"
    rc, _, err = convert("--src", src, "--out", good, "--config", TINY, "--dtype", "f32")
    assert rc == 0, err
    yield dict(base=base, released=rel.root, src=src, src_digest=digest(src), good=good, good_digest=digest(good))
    for dirpath, dirnames, _ in os.walk(base):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def faulted(world):
    """Runs every fault of FAULTS in a forked child; -> {name: (exit code, log, parent dir)}."""
    runs, parents = [], {}
    for name, (fault, existing) in FAULTS.items():
        parent = world["base"] / name
        parent.mkdir()
        if existing:
            shutil.copytree(world["good"], parent / "out")
        argv = ["--src", str(world["src"]), "--out", str(parent / "out"), "--config", TINY, "--dtype", "bf16"]
        if existing:
            argv.append("--overwrite")
        if fault["kind"] == "read_only":
            parent.chmod(0o555)
            fault = {"kind": "nobody", "uid": NOBODY} if os.geteuid() == 0 else {}
            if fault:  # the ordinary user may not traverse the checkout's parents: its config from the world
                configs = world["base"] / "configs"
                if not configs.exists():
                    shutil.copytree(REPO / "configs", configs)
                argv[argv.index(TINY)] = str(configs / "tiny.py")
        runs.append({"argv": argv, "fault": fault, "log": str(world["base"] / f"{name}.log")})
        parents[name] = parent
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    parents["read_only_output_dir"].chmod(0o755)
    return {name: (code, pathlib.Path(run["log"]).read_text(), parents[name])
            for name, code, run in zip(FAULTS, codes, runs, strict=True)}


def hidden(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.mark.parametrize("name", ["kill_before_first_save", "kill_during_third_save"])
def test_killed_fresh_conversion_leaves_nothing_that_looks_complete(world, faulted, name):
    code, log, parent = faulted[name]
    assert code == -9, log  # SIGKILL
    assert not (parent / "out").exists()
    partial = [p for p in hidden(parent) if p.startswith(".out.partial-")]
    assert len(partial) == 1 and not (parent / partial[0] / "lavit.json").exists()
    assert digest(world["src"]) == world["src_digest"]
    # the next run removes what the killed one left and converts
    rc, out, err = convert("--src", world["src"], "--out", parent / "out", "--config", TINY)
    assert rc == 0, err
    assert f"removed {partial[0]} (left by an interrupted run)" in out
    assert os.listdir(parent) == ["out"] and manifest(parent / "out")["dtype"] == "bfloat16"


def test_killed_before_the_swap_keeps_the_old_checkpoint(world, faulted):
    code, log, parent = faulted["kill_before_moving_old_aside"]
    assert code == -9, log
    assert digest(parent / "out") == world["good_digest"]
    rc, out, err = convert("--src", world["src"], "--out", parent / "out", "--config", TINY, "--overwrite")
    assert rc == 0, err
    assert os.listdir(parent) == ["out"] and manifest(parent / "out")["dtype"] == "bfloat16"


def test_killed_between_the_renames_the_next_run_restores_the_old_checkpoint(world, faulted):
    code, log, parent = faulted["kill_between_the_two_renames"]
    assert code == -9, log
    assert not (parent / "out").exists()
    old = [p for p in hidden(parent) if p.startswith(".out.old-")]
    assert len(old) == 1 and digest(parent / old[0]) == world["good_digest"]  # nothing lost, only moved aside
    rc, out, err = convert("--src", world["src"], "--out", parent / "out", "--config", TINY)  # no --overwrite
    assert rc == 2 and "--overwrite" in error_line(err)
    assert "restored" in out
    assert os.listdir(parent) == ["out"] and digest(parent / "out") == world["good_digest"]


def test_killed_after_the_swap_the_new_checkpoint_is_complete(world, faulted):
    code, log, parent = faulted["kill_before_removing_old"]
    assert code == -9, log
    assert manifest(parent / "out")["dtype"] == "bfloat16"  # the new one, whole
    assert [p for p in hidden(parent) if p.startswith(".out.old-")]
    rc, out, err = convert("--src", world["src"], "--out", parent / "out", "--config", TINY, "--overwrite")
    assert rc == 0, err
    assert os.listdir(parent) == ["out"]


def test_disk_full_mid_conversion_is_one_line_and_keeps_the_old_checkpoint(world, faulted):
    code, log, parent = faulted["disk_full"]
    assert code == 2, log
    line = error_line(log)
    assert "cannot write" in line and "File too large" in line
    assert os.listdir(parent) == ["out"] and digest(parent / "out") == world["good_digest"]


def test_read_only_output_directory_is_one_line_and_keeps_the_old_checkpoint(world, faulted):
    code, log, parent = faulted["read_only_output_dir"]
    assert code == 2, log
    line = error_line(log)
    assert "cannot write" in line and str(parent) in line
    assert os.listdir(parent) == ["out"] and digest(parent / "out") == world["good_digest"]


def _truncate(path):
    rewrite(path, pathlib.Path(path).read_bytes()[: os.path.getsize(path) // 2])


def _garbage(path):
    rewrite(path, os.urandom(4096))


def _garbage_pickle(path):  # passes a header check: a legacy pickle starts with this opcode
    rewrite(path, b"\x80\x02" + os.urandom(4094))


def _empty(path):
    rewrite(path, b"")


def _bad_json(path):
    rewrite(path, b'{"in_channels": 4, ')


def _delete(path):
    os.unlink(path)


CORRUPTIONS = [
    ("visual_tokenizer/eva_vitg_psz14.bin", _truncate),
    ("visual_tokenizer/tokenizer_encoder.bin", _garbage),
    ("visual_tokenizer/tokenizer_decoder.bin", _empty),
    ("language_model/pytorch_model-00002-of-00003.bin", _truncate),
    ("language_model/pytorch_model.bin.index.json", _bad_json),
    ("language_model/config.json", _bad_json),
    ("language_model/tokenizer.model", _garbage),
    ("language_model/visual_weight.bin", _truncate),
    ("pixel_decoding/unet/diffusion_pytorch_model.bin", _truncate),
    ("pixel_decoding/uncond_embeddings.bin", _garbage),
    ("pixel_decoding/uncond_embeddings.bin", _garbage_pickle),
    ("highres_pixel_decoding/unet/diffusion_pytorch_model.safetensors", _truncate),
    ("highres_pixel_decoding/vae/config.json", _bad_json),
    ("highres_pixel_decoding/scheduler/scheduler_config.json", _delete),
]


@pytest.mark.parametrize("relpath,corrupt", CORRUPTIONS, ids=[f"{c.__name__[1:]}-{p}" for p, c in CORRUPTIONS])
def test_corrupt_source_file_is_named_before_anything_is_converted(world, tmp_path, relpath, corrupt):
    src = tmp_path / "src"
    link_tree(world["released"], src)
    corrupt(src / relpath)
    before = digest(src)
    rc, out, err = convert("--src", src, "--out", tmp_path / "out", "--config", TINY)
    assert rc == 2
    assert os.path.basename(relpath) in error_line(err)
    assert not converted_any(out)  # found by the checks that precede any conversion
    assert os.listdir(tmp_path) == ["src"] and digest(src) == before


def test_the_shared_source_was_never_modified(world, faulted):
    assert digest(world["src"]) == world["src_digest"]
    assert digest(world["good"]) == world["good_digest"]
