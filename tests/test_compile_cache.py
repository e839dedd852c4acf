"""The executable cache of ``compile_cache.cached_jit``: a later process runs stored programs without tracing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavit_jax import compile_cache

TRACES = []


@compile_cache.cached_jit(static_argnames=("scale",))
def _affine(params, x, scale: float = 2.0):
    TRACES.append(x.shape)  # runs only while tracing
    return {"y": x @ params["w"] * scale + params["b"]}, jnp.sum(x)


@pytest.fixture
def exec_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(compile_cache._state, "dir", str(tmp_path))
    _affine.compiled.clear()
    TRACES.clear()
    yield tmp_path
    _affine.compiled.clear()


def _inputs(rows=3):
    rs = np.random.RandomState(rows)
    return {"w": jnp.asarray(rs.randn(4, 2), jnp.float32), "b": jnp.asarray(rs.randn(2), jnp.float32)}, \
        jnp.asarray(rs.randn(rows, 4), jnp.float32)


def _want(params, x, scale=2.0):
    return np.asarray(x) @ np.asarray(params["w"]) * scale + np.asarray(params["b"])


def test_a_later_process_runs_the_stored_program_without_tracing(exec_dir):
    params, x = _inputs()
    out, total = _affine(params, x)
    assert len(TRACES) == 1 and len(os.listdir(exec_dir)) == 1
    np.testing.assert_allclose(out["y"], _want(params, x), rtol=1e-6)
    _affine.compiled.clear()  # a new process: nothing in memory, the program on disk
    out, total = _affine(params, x=x)  # keywords or positions: one key
    assert len(TRACES) == 1
    np.testing.assert_allclose(out["y"], _want(params, x), rtol=1e-6)
    np.testing.assert_allclose(total, np.asarray(x).sum(), rtol=1e-6)
    # a new shape or a new static value is a new program
    params5, x5 = _inputs(5)
    np.testing.assert_allclose(_affine(params5, x5)[0]["y"], _want(params5, x5), rtol=1e-6)
    np.testing.assert_allclose(_affine(params, x, scale=3.0)[0]["y"], _want(params, x, 3.0), rtol=1e-6)
    assert len(TRACES) == 3 and len(os.listdir(exec_dir)) == 3
    # inside another jit (e.g. a training step) it is plain jax.jit, traced into the outer program
    outer = jax.jit(lambda p, x: _affine(p, x)[0]["y"] + 1.0)
    np.testing.assert_allclose(outer(params, x), _want(params, x) + 1.0, rtol=1e-6)
    assert len(os.listdir(exec_dir)) == 3


def test_a_corrupt_entry_is_compiled_again_and_no_dir_is_plain_jit(exec_dir, monkeypatch):
    params, x = _inputs(6)
    _affine(params, x)
    (entry,) = os.listdir(exec_dir)
    (exec_dir / entry).write_bytes(b"truncated")
    _affine.compiled.clear()
    np.testing.assert_allclose(_affine(params, x)[0]["y"], _want(params, x), rtol=1e-6)
    assert _affine._load(str(exec_dir), entry[: -len(".pkl")]) is not None  # replaced by a good entry
    monkeypatch.setitem(compile_cache._state, "dir", None)
    np.testing.assert_allclose(_affine(params, x, scale=4.0)[0]["y"], _want(params, x, 4.0), rtol=1e-6)
    assert len(os.listdir(exec_dir)) == 1  # the cache off: nothing written


def test_key_covers_the_code_version_and_refuses_unstable_statics(exec_dir, monkeypatch):
    params, x = _inputs()
    dyn = {"params": params, "x": x}
    key = _affine._key({"scale": 2.0}, dyn)
    assert key == _affine._key({"scale": 2.0}, {"params": params, "x": jnp.zeros_like(x)})  # values are not keyed
    assert key != _affine._key({"scale": 2.0}, {"params": params, "x": x.astype(jnp.bfloat16)})
    assert _affine._key({"scale": object()}, dyn) is None  # repr with a memory address: never cached
    monkeypatch.setitem(compile_cache._state, "version", "another-code-version")
    assert _affine._key({"scale": 2.0}, dyn) != key


def test_enable_sets_the_executable_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(compile_cache._state, "dir", None)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    prev = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert compile_cache.enable() == str(tmp_path / "c")
        assert compile_cache.executable_dir() == str(tmp_path / "c" / compile_cache.EXECUTABLES)
        assert os.path.isdir(compile_cache.executable_dir())
    finally:
        jax.config.update("jax_compilation_cache_dir", prev)
