"""The shared training loop: config errors before any model work, the NaN guard, corrupt-checkpoint fallback,
SIGTERM, strict-JSON metrics and TensorBoard files."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import lavit_7b
from lavit_jax.data import input_pipeline
from lavit_jax.train import trainer
from lavit_jax.train.task import Task
from tests.conftest import REPO
from tests.train_configs import small_config


def _strict(line):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in {line}"))


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [_strict(line) for line in f]


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir) if d.isdigit())


@pytest.mark.parametrize("edit,match", [
    (dict(stage="lmm"), r"config train\.stage='lmm': expected one of tokenizer, lm, detokenizer"),
    (dict(stpes=3), r"config train\.stpes: unknown key \(did you mean train\.steps\?\)"),
    (dict(mesh=(3, 1, 1)), r"config mesh_shape=\(3, 1, 1\) needs 3 devices, but there are 8"),
    (dict(mesh=(-1, 3, 1)), r"config mesh_shape=\(-1, 3, 1\): 3 devices per slice does not divide the 8 devices"),
    (dict(mesh=(4, 2, 1), batch_size=6), r"config train\.batch_size=6 is not divisible by the data-parallel "
                                         r"size 8 \(mesh_shape data x fsdp = 4 x 2\)"),
    (dict(batch_size=8, grad_accum_steps=3), r"config train\.grad_accum_steps=3: must be >= 1 and divide"),
    (dict(examples_per_batch=12), r"config train\.examples_per_batch=12 is not divisible by the data-parallel"),
    (dict(init_from="/no/such/ckpt"), r"config train\.init_from='/no/such/ckpt' is not a converted checkpoint"),
])
def test_config_errors_name_the_field_before_model_work(tmp_path, edit, match):
    edit = dict(edit)
    mesh = edit.pop("mesh", (-1, 1, 1))
    stage = "tokenizer" if edit.get("stage") == "lmm" else "lm"
    c = small_config(stage, tmp_path / "w", mesh=mesh)
    for k, v in edit.items():
        c.train[k] = v
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        trainer.train(c)
    assert not (tmp_path / "w").exists()  # nothing written


def test_unknown_top_level_key(tmp_path):
    c = small_config("lm", tmp_path / "w")
    c.trian = 1
    with pytest.raises(ValueError, match=r"config trian: unknown key \(did you mean train\?\)"):
        trainer.train(c)


@pytest.mark.parametrize("args,line", [
    (["--config", "configs/tiny.py:lm", "--config.train.batch_size=6"],
     "error: config train.batch_size=6 is not divisible by the data-parallel size 8 (mesh_shape data x fsdp = "
     "8 x 1)"),
    (["--config", "configs/tiny.py:lm", "--config.train.stpes=3"],
     "error: --config.train.stpes: unknown config key (did you mean --config.train.steps?)"),
    (["--config", "configs/tiny.py:lmm"],
     "error: config stage 'lmm': expected one of tokenizer, lm, detokenizer (configs/FILE.py:STAGE)"),
    (["--config", "configs/nope.py"], "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"),
])
def test_cli_errors_are_one_line(tmp_path, args, line):
    out = subprocess.run([sys.executable, "train.py", *args, f"--config.train.workdir={tmp_path / 'w'}"][
        :None if "nope" not in args[1] else -1], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "w").exists()


def test_nan_guard_stops_and_keeps_last_finite_checkpoint(tmp_path):
    wd = tmp_path / "w"
    # lr 1e30: step 1 (lr 0, warmup) and step 2 are finite, step 2's update blows the params up, step 3's loss is not.
    c = small_config("lm", wd, steps=8, lr=1e30, warmup_steps=2, save_every=1, keep_checkpoints=1)
    with pytest.raises(trainer.NonFiniteError, match=r"non-finite .* at step 3: training stopped; the last "
                                                     r"finite checkpoint \(step 2\) .* is kept"):
        trainer.train(c)
    assert _steps(wd) == [2]  # keep-last-K kept step 2; nothing written for step 3
    recs = _records(wd)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert None in (recs[-1]["loss"], recs[-1]["grad_norm"]) and None not in (recs[1]["loss"], recs[1]["grad_norm"])
    # The same command again resumes from step 2, stops at 3 again and still keeps step 2.
    with pytest.raises(trainer.NonFiniteError, match="at step 3"):
        trainer.train(c)
    assert _steps(wd) == [2]


def test_corrupt_latest_checkpoint_falls_back_with_one_warning(tmp_path, capfd):
    wd = tmp_path / "w"
    c = small_config("lm", wd, save_every=2)  # the program of the other lm tests (compiled once)
    trainer.train(c, max_steps=4)
    assert _steps(wd) == [2, 4]
    for root, _, files in os.walk(wd / "4" / "state"):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
    capfd.readouterr()
    _, hist = trainer.train(c, max_steps=2)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: checkpoint step 4 in {wd} is corrupt")
    assert "falling back to step 2" in warnings[0]
    assert (wd / "corrupt" / "4").is_dir()  # moved aside, not deleted
    assert [h["step"] for h in hist] == [3, 4] and _steps(wd) == [2, 4]


def test_sigterm_saves_and_returns(tmp_path, monkeypatch):
    wd = tmp_path / "w"
    c = small_config("lm", wd, tensorboard=True)
    prog = trainer.program(c)
    real = prog.task.before_step

    def before_step(state, step, shardings):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(state, step, shardings)

    monkeypatch.setattr(prog.task, "before_step", before_step)
    state, hist = trainer.train(c)
    assert int(state.step) == 4 and hist[-1]["step"] == 4
    assert _steps(wd) == [4]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    assert os.listdir(wd / "tensorboard")[0].startswith("events.out.tfevents")
    recs = _records(wd)
    assert {"step", "loss", "grad_norm", "lr", "steps_per_s", "tokens_per_s", "mfu"} <= set(recs[0])
    assert np.isfinite([r["loss"] for r in recs]).all()


class _LinearTask(Task):
    """A least-squares toy stage: exact gradient-accumulation arithmetic (equal-size microbatch means)."""

    stage = "toy"
    X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    Y = X @ np.arange(1, 5, dtype=np.float32)

    def dataset(self, process_index, process_count, local_batch):
        return input_pipeline.sharded_batches(list(range(64)), lambda i: {"x": self.X[i], "y": self.Y[i]},
                                              local_batch, process_index=process_index,
                                              process_count=process_count)

    def init_params(self, rng):
        return {"w": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def loss(self, params, ema, batch, rng, step):
        loss = jnp.mean(jnp.square(batch["x"] @ params["w"] + params["b"] - batch["y"]))
        return loss, {"loss": loss}, {}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1)])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, monkeypatch, mesh):
    monkeypatch.setitem(trainer.STAGES, "toy", _LinearTask)
    states = []
    for accum in (1, 4):
        c = ml_collections.ConfigDict({"mesh_shape": mesh, "logical_axis_rules": None,
                                       "train": lavit_7b.common_train_config("toy")})
        t = c.train
        t.batch_size, t.grad_accum_steps, t.steps, t.lr, t.warmup_steps = 32, accum, 5, 0.1, 0
        t.workdir, t.tensorboard, t.log_every = str(tmp_path / f"a{accum}"), False, 1
        states.append(trainer.train(c))
    (s1, h1), (s4, h4) = states
    np.testing.assert_allclose([h["loss"] for h in h4], [h["loss"] for h in h1], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert h1[-1]["loss"] < h1[0]["loss"]
