"""JAX's persistent compilation cache, on by default for the CLI and the ``LaVIT`` API.

Compiled programs are written to a cache directory and reused by later processes, so the second
``python -m lavit_jax caption ...`` skips XLA compilation. The directory is
``$LAVIT_COMPILATION_CACHE`` if set (``0``/``off`` disables the cache), else
``$XDG_CACHE_HOME/lavit-jax/xla`` (``~/.cache/lavit-jax/xla``). It is safe to delete at any time.
"""

from __future__ import annotations

import os

import jax

ENV = "LAVIT_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "")


def default_dir() -> str | None:
    """The cache directory from the environment, or None when disabled."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lavit-jax", "xla")


def enable(cache_dir: str | None = None) -> str | None:
    """Turns the persistent cache on (``cache_dir`` or ``default_dir()``); returns the directory used.

    Leaves an already configured cache directory (``jax_compilation_cache_dir`` set by the user) alone.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    cache_dir = cache_dir or default_dir()
    if cache_dir is None:
        return None
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        return None  # an unwritable cache is not an error: compile as usual
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
