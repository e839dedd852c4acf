"""Stage 2 (LLM on packed multimodal sequences): packing with segment ids, vocab-parallel loss, loss falls,
and a SIGKILLed run resumed with the same command reaches the uninterrupted run's loss bitwise."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import llm_tiny
from lavit_jax import vocab
from lavit_jax.data import input_pipeline
from lavit_jax.data.packing import pack_sequences
from lavit_jax.models import llama
from lavit_jax.ops.collectives import vocab_parallel_cross_entropy
from lavit_jax.ops.sharding import make_mesh
from lavit_jax.train import lm, trainer
from tests.conftest import REPO
from tests.train_configs import small_config


def test_packed_rows_equal_separate_sequences():
    cfg = llm_tiny.get_config()
    model = llama.LlamaForCausalLM(cfg)
    params = jax.jit(lambda: llama.init_params(cfg, jax.random.key(0)))()
    seqs = [np.arange(3, 14), np.arange(40, 47), np.arange(100, 104)]
    packed = pack_sequences(seqs, 24, num_rows=1)
    apply = jax.jit(lambda ids, seg=None: model.apply({"params": params}, input_ids=ids, segment_ids=seg)[0])
    logits = apply(jnp.asarray(packed["tokens"]), jnp.asarray(packed["segment_ids"]))
    np.testing.assert_array_equal(np.asarray(llama.segment_positions(jnp.asarray(packed["segment_ids"]))),
                                  packed["positions"])
    at = 0
    for s in seqs:
        ref = apply(jnp.asarray(s[None, :-1]))
        n = len(s) - 1
        np.testing.assert_allclose(np.asarray(logits[0, at:at + n]), np.asarray(ref[0]), atol=1e-4 * float(
            np.abs(ref).max()), rtol=0)
        at += n


@pytest.mark.parametrize("vocab_size,shape", [(96, (1, 4, 2)), (95, (1, 2, 4)), (93, (2, 1, 4))])
def test_padded_vocab_parallel_loss_equals_plain(vocab_size, shape):
    r = np.random.default_rng(0)
    h = jnp.asarray(r.standard_normal((8, 5, 16)), jnp.float32)
    w = jnp.asarray(r.standard_normal((16, vocab_size)) * 0.5, jnp.float32)
    y = jnp.asarray(r.integers(0, vocab_size, (8, 5)), jnp.int32)
    mesh = make_mesh(shape)

    def ours(h, w):
        hp, wp = lm.pad_vocab(h, w, mesh.shape["tensor"])
        return vocab_parallel_cross_entropy(hp, wp, y, jnp.ones((8, 5)), mesh)[0]

    def plain(h, w):
        return optax.softmax_cross_entropy_with_integer_labels(jnp.einsum("btc,cv->btv", h, w), y).mean()

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(ours, (0, 1)))(h, w), jax.value_and_grad(plain, (0, 1))(h, w)
    np.testing.assert_allclose(float(a), float(b), rtol=0, atol=1e-5)
    for x, z in zip(ga, gb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=0, atol=1e-5)


def test_sequence_layouts():
    text, vis = np.array([5, 6, 7]), np.array([32002, 32010])
    i2t = lm.build_sequence(input_pipeline.KIND_IMAGE_TO_TEXT, text, vis)
    t2i = lm.build_sequence(input_pipeline.KIND_TEXT_TO_IMAGE, text, vis)
    txt = lm.build_sequence(input_pipeline.KIND_TEXT, text, vis)
    assert i2t.tolist() == [vocab.IMG_START, 32002, 32010, vocab.IMG_END, 5, 6, 7, vocab.EOS_ID]
    assert t2i.tolist() == [5, 6, 7, vocab.IMG_START, 32002, 32010, vocab.IMG_END]
    assert txt.tolist() == [vocab.BOS_ID, 5, 6, 7, vocab.EOS_ID]
    rows, dropped = lm.pack_rows([i2t, t2i, txt] * 3, [np.ones(len(s)) for s in [i2t, t2i, txt] * 3], 2, 16)
    assert rows["tokens"].shape == (2, 16) and dropped > 0
    assert rows["segment_ids"].max() >= 2  # packed several sequences per row


def test_loss_falls_on_synthetic_set(tmp_path):
    c = small_config("lm", tmp_path / "w", log_every=5)
    _, hist = trainer.train(c)
    losses = [h["loss"] for h in hist]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses
    assert hist[-1]["text_loss"] < hist[0]["text_loss"] and hist[-1]["visual_loss"] < hist[0]["visual_loss"]
    assert all(0 < h["packing"] <= 1 for h in hist)


def _cmd(workdir):
    return [sys.executable, "train.py", "--config", "configs/tiny.py:lm", "--config.train.steps=12",
            "--config.train.log_every=1", "--config.train.save_every=4", f"--config.train.workdir={workdir}",
            "--config.train.tensorboard=False", "--config.llm.num_hidden_layers=1", "--config.train.seq_len=32"]


def _records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_sigkill_then_same_command_resumes_exactly(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        # past the checkpoint at step 4, and Orbax has finalised it (renamed its temporary directory to "4")
        if any(r["step"] >= 6 for r in _records(killed)) and (killed / "4").is_dir():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in _records(killed))
    assert killed_at < 12
    out = subprocess.run(_cmd(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step" in out.stdout
    a = {r["step"]: r for r in _records(straight)}
    b = {r["step"]: r for r in _records(killed)}  # the resumed run's records come last
    assert a[12]["loss"] == b[12]["loss"]
    for step in range(9, 13):  # every step after the last checkpoint before the kill
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"]
