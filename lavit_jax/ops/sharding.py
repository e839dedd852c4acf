"""Meshes and logical-axis rules.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``); activations
are constrained with ``nn.with_logical_constraint``. One table of rules (data, in the config) maps
the logical names to the mesh axes ``('data', 'fsdp', 'tensor')``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data+fsdp, weights' embed dim over fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),  # the stacked axis of scanned layers
    ("length", None),
    ("kv_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("codes", None),
    ("code_dim", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("pos", None),
    ("out", None),
)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
    """Turns a config's rule list (lists or tuples, mesh axes as str/None/list) into Flax rules."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def make_mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = MESH_AXES) -> Mesh:
    """A mesh over all devices; ``shape`` (e.g. ``(2, 2, 2)``; -1 allowed once) defaults to all-data."""
    n = jax.device_count()
    if shape is None:
        shape = (n,) + (1,) * (len(axes) - 1)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = n // rest
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {tuple(shape)} does not cover the {n} devices")
    # Auto axes: GSPMD propagates shardings from the jit in/out shardings and logical constraints.
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def logical_sharding(tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a pytree of ``nn.Partitioned`` boxes or of logical PartitionSpecs."""
    specs = nn.get_partition_spec(tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, rank: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding for an array whose leading axis is the batch."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (rank - 1), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
