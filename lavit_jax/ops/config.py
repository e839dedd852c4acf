"""Frozen configs: the library builds modules from ``FrozenConfigDict``s, fixed once built.

``freeze(cfg, **overrides)`` -> a FrozenConfigDict (hashable, so a config and the modules built from
it can be static arguments of ``jax.jit``) with the run-time knobs (dtype, attention implementation,
remat policy, scan) set at construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections


def freeze(cfg, **overrides) -> ml_collections.FrozenConfigDict:
    """``cfg`` (ConfigDict, FrozenConfigDict or dict) with ``overrides`` applied, frozen."""
    if isinstance(cfg, ml_collections.FrozenConfigDict) and not overrides:
        return cfg
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for k, v in overrides.items():
        if v is not None:
            d[k] = v
    return ml_collections.FrozenConfigDict(d)


def as_dict(cfg) -> dict:
    """A plain (JSON-able) dict of a config; tuples stay tuples only where JSON allows (as lists)."""
    if isinstance(cfg, Mapping):
        return {k: as_dict(v) for k, v in cfg.items()}
    if hasattr(cfg, "to_dict"):
        return as_dict(cfg.to_dict())
    if isinstance(cfg, tuple | list):
        return [as_dict(v) for v in cfg]
    return cfg
