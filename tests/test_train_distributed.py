"""Two processes on localhost (jax.distributed, CPU collectives over gloo, 4 devices each) train the same
global batches as one process with 8 devices and log the same losses."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def _cmd(workdir):
    return [sys.executable, "train.py", "--config", "configs/tiny.py:lm", "--config.train.steps=4",
            "--config.train.log_every=1", f"--config.train.workdir={workdir}", "--config.train.tensorboard=False",
            "--config.llm.num_hidden_layers=1", "--config.train.seq_len=32", "--config.train.pack_groups=2"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    one = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(_cmd(tmp_path / "one"), cwd=REPO, env=one, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4", LAVIT_DISTRIBUTED="1",
                   LAVIT_COORDINATOR=f"localhost:{port}", LAVIT_NUM_PROCESSES="2", LAVIT_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(_cmd(tmp_path / "two"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "mesh {'data': 8" in results[0][0]  # one mesh over both processes' devices
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, *_ in a] == [s for s, *_ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([x[1:] for x in b], [x[1:] for x in a], rtol=1e-5, atol=0)
