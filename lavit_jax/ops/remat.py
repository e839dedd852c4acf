"""Rematerialisation policies by name (MaxText's names), one table for every model.

``remat_policy(name)`` -> a ``jax.checkpoint_policies`` entry, or None for ``"none"`` (no remat).
Configs name the policy in ``remat``; the models apply it inside their layer scan.
"""

from __future__ import annotations

import jax

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "minimal": jax.checkpoint_policies.checkpoint_dots,  # MaxText 'minimal': keep matmul outputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_nothing": jax.checkpoint_policies.nothing_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def check_remat(name: str, field: str = "remat") -> str:
    """Returns ``name`` if it is a known policy, else raises naming the config ``field``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"config {field}={name!r}: expected one of {sorted(REMAT_POLICIES)}")
    return name


def remat_policy(name: str, field: str = "remat"):
    """The ``jax.checkpoint_policies`` entry for ``name`` (None for 'none')."""
    return REMAT_POLICIES[check_remat(name, field)]
