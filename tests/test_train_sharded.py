"""Sharded training steps equal the single-device step (8 simulated CPU devices, float32), stages 1 and 2."""

import jax
import numpy as np
import pytest

from lavit_jax.train import trainer
from tests.train_configs import small_config

MESHES = [(1, 4, 2), (8, 1, 1)]  # fsdp=4 x tensor=2, data=8
TOL = 1e-5
STEPS = 3


def _run(stage, workdir, mesh, devices=None):
    extra = dict(kmeans_init=False) if stage == "tokenizer" else {}  # (k-means runs on the host, before a step)
    c = small_config(stage, workdir, mesh=mesh, **extra)
    state, hist = trainer.train(c, max_steps=STEPS, devices=devices)
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    return c, state, hist


@pytest.fixture(scope="module", params=["tokenizer", "lm"])
def single(request, tmp_path_factory):
    stage = request.param
    one = jax.devices()[:1]
    c, state, hist = _run(stage, tmp_path_factory.mktemp(f"{stage}_single"), (1, 1, 1), devices=one)
    init = jax.device_get(trainer.program(c, devices=one).init_state().params)
    return stage, init, jax.device_get(state.params), hist


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_equals_single_device(single, mesh, tmp_path):
    stage, init, ref, ref_hist = single
    _, state, hist = _run(stage, tmp_path / "w", mesh)
    if mesh == (1, 4, 2):  # the params really are split over the 8 devices
        split = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
        assert split and all(len(x.sharding.device_set) == 8 for x in split)
    got = jax.device_get(state.params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref)[0]]
    diffs = {p: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for p, a, b in zip(paths, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{stage} mesh {mesh}: {worst} differs by {diffs[worst]}"
    moved = [p for p, a, b in zip(paths, jax.tree.leaves(init), jax.tree.leaves(ref), strict=True)
             if not np.array_equal(a, b)]
    assert len(moved) > len(paths) // 2  # three steps changed most params
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=0, atol=TOL)
