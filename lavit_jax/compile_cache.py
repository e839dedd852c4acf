"""JAX's persistent compilation cache, on by default for the CLI and the ``LaVIT`` API.

Compiled programs are written to a cache directory and reused by later processes, so the second
``python -m lavit_jax caption ...`` skips XLA compilation. The directory is
``$LAVIT_COMPILATION_CACHE`` if set (``0``/``off`` disables the cache), else
``xla/`` under the cache home (``$LAVIT_CACHE``, else ``~/.cache/lavit-jax``: ``fsutil.cache_home``).
It is safe to delete at any time.

The task functions on the inference path are ``cached_jit``s: their compiled programs are also stored
serialised in ``executables/`` there, so a later process skips tracing and lowering too (see ``_CachedJit``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import pickle
import tempfile

import jax
import numpy as np
from jax.experimental import serialize_executable

from lavit_jax import fsutil

ENV = "LAVIT_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "")


def default_dir() -> str | None:
    """The cache directory from the environment, or None when disabled."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))
    return os.path.join(fsutil.cache_home(), "xla")


def enable(cache_dir: str | None = None) -> str | None:
    """Turns the persistent cache on (``cache_dir`` or ``default_dir()``); returns the directory used.

    Leaves an already configured cache directory (``jax_compilation_cache_dir`` set by the user) alone.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        _set_executable_dir(current)
        return current
    cache_dir = cache_dir or default_dir()
    if cache_dir is None:
        return None
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        return None  # an unwritable cache is not an error: compile as usual
    _set_executable_dir(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


# ------------------------------------------------------------------------------------------ executables

EXECUTABLES = "executables"  # sub-folder of the cache directory: serialised compiled programs of ``cached_jit``
_state = {"dir": None, "version": None}


def executable_dir() -> str | None:
    """Where ``cached_jit`` keeps serialised executables (set by ``enable``), or None (plain ``jax.jit``)."""
    return _state["dir"]


def _set_executable_dir(cache_dir: str | None) -> None:
    if cache_dir is None:
        _state["dir"] = None
        return
    path = os.path.join(cache_dir, EXECUTABLES)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        path = None
    _state["dir"] = path


def _code_version() -> str:
    """A digest of what a compiled program depends on besides its inputs: this package's sources, the
    library versions, the backend and its devices, XLA flags and the numerics-relevant JAX settings."""
    if _state["version"] is None:
        import flax
        import jaxlib

        h = hashlib.sha256()
        root = os.path.dirname(os.path.abspath(__file__))
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                h.update(os.path.relpath(os.path.join(dirpath, name), root).encode())
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(f.read())
        h.update(repr((jax.__version__, jaxlib.__version__, flax.__version__, jax.default_backend(),
                       [(d.id, d.device_kind) for d in jax.devices()], os.environ.get("XLA_FLAGS", ""),
                       jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)).encode())
        _state["version"] = h.hexdigest()
    return _state["version"]


def _leaf_key(x):
    if isinstance(x, jax.core.Tracer):
        return None  # called inside another trace (a training step): plain jax.jit, inlined there
    if isinstance(x, jax.Array):
        return ("a", x.shape, str(x.dtype), getattr(x, "weak_type", False), str(x.sharding))
    if isinstance(x, np.ndarray | np.generic):
        return ("n", x.shape, str(x.dtype))
    if isinstance(x, bool | int | float | complex):
        return ("s", type(x).__name__)
    return None  # unknown leaf kind: not cached


class _CachedJit:
    """``jax.jit(fun, static_argnames)`` whose compiled programs are also kept serialised on disk.

    JAX's persistent compilation cache skips XLA compilation in a later process, but every process still
    traces and lowers each program (a second or more for the LLM and the tokenizer). Here a call whose
    inputs' shapes, dtypes and shardings and whose static arguments (by ``repr``; one with a memory
    address in it is never cached) were seen before, in this process or an earlier one with the same
    code version (``_code_version``), runs the stored executable directly: no trace, no lowering.
    Without an executable directory (the cache off), it is plain ``jax.jit``.
    """

    def __init__(self, fun, static_argnames):
        self.jitted = jax.jit(fun, static_argnames=static_argnames)
        self.static = frozenset(static_argnames)
        self.signature = inspect.signature(fun)
        self.name = f"{fun.__module__}.{fun.__qualname__}"
        self.compiled: dict = {}  # in-process: key -> jax.stages.Compiled
        functools.update_wrapper(self, fun)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def _key(self, static, dynamic):
        leaves, tree = jax.tree.flatten(dynamic)
        spec = [_leaf_key(x) for x in leaves]
        text = repr(sorted(static.items()))
        if any(s is None for s in spec) or " at 0x" in text:
            return None
        return hashlib.sha256(repr((self.name, _code_version(), text, str(tree), spec)).encode()).hexdigest()

    def __call__(self, *args, **kwargs):
        cache_dir = executable_dir()
        if cache_dir is None:
            return self.jitted(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        static = {k: v for k, v in bound.arguments.items() if k in self.static}
        dynamic = {k: v for k, v in bound.arguments.items() if k not in self.static}
        key = self._key(static, dynamic)
        if key is None:
            return self.jitted(*args, **kwargs)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._load(cache_dir, key)
        if compiled is None:
            compiled = self.jitted.lower(**bound.arguments).compile()
            self._store(cache_dir, key, compiled)
        self.compiled[key] = compiled
        return compiled(**dynamic)

    def _load(self, cache_dir, key):
        path = os.path.join(cache_dir, key + ".pkl")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree, device_ids = pickle.load(f)
            by_id = {d.id: d for d in jax.devices()}
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                             execution_devices=[by_id[i] for i in device_ids])
        except Exception:  # a truncated or stale entry: compile again (and replace it)
            return None

    def _store(self, cache_dir, key, compiled):
        try:
            devices = next(s._device_assignment for s in jax.tree.leaves(compiled.input_shardings)
                           if hasattr(s, "_device_assignment"))
            blob = pickle.dumps((*serialize_executable.serialize(compiled), [d.id for d in devices]))
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, os.path.join(cache_dir, key + ".pkl"))  # atomic: readers see all or nothing
        except Exception:  # an unserialisable program or an unwritable cache: it stays in memory only
            with contextlib.suppress(Exception):
                os.remove(tmp)


def cached_jit(fun=None, *, static_argnames=()):
    """``jax.jit`` with the executable cache of ``_CachedJit`` (a decorator, with or without arguments)."""
    if fun is None:
        return functools.partial(cached_jit, static_argnames=static_argnames)
    return _CachedJit(fun, tuple(static_argnames))
