"""Repeated layers under ``nn.scan`` (compile time flat in depth), and the stacked-parameter layout.

``apply_layers(block_cls, depth, name, x, ...)`` applies ``depth`` copies of a block (one per
LLM layer, EVA block, ...). Scanned, their parameters are one subtree whose leaves have a leading
``[depth]`` axis (logical name ``layers``); unscanned, they are ``NAME_0 .. NAME_{depth-1}``.
``stack_layers`` / ``unstack_layers`` convert a param tree between the two layouts (the converter
writes stacked trees; a model built with ``scan_layers=False`` reads them unstacked).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.ops.remat import remat_policy


def remat_block(block_cls, remat: str):
    """``block_cls`` wrapped in ``nn.remat`` with the named policy ('none' -> unchanged)."""
    if remat == "none":
        return block_cls
    return nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=False)


def scanned(block_cls, depth: int, *, remat: str = "none", in_axes=()):
    """``nn.scan`` of ``block_cls`` over ``depth`` layers (params stacked on a leading ``layers`` axis).

    ``block_cls.__call__(x, *args)`` returns ``(x, y)`` (y may be None); ``in_axes`` gives, per extra
    argument, ``nn.broadcast`` (the same for every layer) or 0 (sliced per layer, e.g. a KV cache
    stacked [depth, ...]). The remat policy is applied to each block, inside the scan.
    """
    return nn.scan(
        remat_block(block_cls, remat),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=tuple(in_axes),
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def make_layers(block_cls, depth: int, *args, scan: bool, remat: str = "none", in_axes=(), **kwargs):
    """For ``setup``: one scanned module, or a list of ``depth`` (rematted) blocks. Assign it to
    ``self.NAME`` (params ``NAME/...`` stacked, or ``NAME_0 .. NAME_{depth-1}``) and run it with
    ``run_layers``. ``args``/``kwargs`` construct the block."""
    if scan:
        return scanned(block_cls, depth, remat=remat, in_axes=in_axes)(*args, **kwargs)
    return [remat_block(block_cls, remat)(*args, **kwargs) for _ in range(depth)]


def run_layers(layers, x, *args, in_axes=()):
    """Applies ``make_layers``'s result. Per-layer args (``in_axes`` 0) are stacked on a leading
    [depth] axis. Returns (x, ys) with ys stacked on [depth] (or None when the blocks return None)."""
    if not isinstance(layers, list | tuple):  # setup turns lists of modules into tuples
        return layers(x, *args)
    in_axes = tuple(in_axes) + (nn.broadcast,) * (len(args) - len(in_axes))
    ys = []
    for i, layer in enumerate(layers):
        layer_args = [a if ax is nn.broadcast else jax.tree.map(lambda t, i=i: t[i], a) for a, ax in zip(args, in_axes)]
        x, y = layer(x, *layer_args)
        ys.append(y)
    if all(y is None for y in ys):
        return x, None
    return x, jax.tree.map(lambda *t: jnp.stack(t), *ys)


def apply_layers(block_cls, depth: int, name: str, x, *args, scan: bool, remat: str = "none", in_axes=(),
                 block_args=(), block_kwargs=None):
    """``make_layers`` + ``run_layers`` from inside an ``nn.compact`` method: scanned as one submodule
    ``name`` or unrolled as ``name_0 .. name_{depth-1}``. Returns (x, ys)."""
    block_kwargs = dict(block_kwargs or {})
    in_axes = tuple(in_axes) + (nn.broadcast,) * (len(args) - len(in_axes))
    if scan:
        stack = scanned(block_cls, depth, remat=remat, in_axes=in_axes)(*block_args, name=name, **block_kwargs)
        return stack(x, *args)
    cls = remat_block(block_cls, remat)
    layers = [cls(*block_args, name=f"{name}_{i}", **block_kwargs) for i in range(depth)]
    return run_layers(layers, x, *args, in_axes=in_axes)


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def stack_layers(tree: dict, name: str, depth: int | None = None) -> dict:
    """{NAME_0: t0, ..., NAME_{n-1}: t_{n-1}, ...} -> {NAME: stack(t0..t_{n-1}), ...} (one level of ``tree``)."""
    indexed = {}
    for k in tree:
        m = _INDEXED.match(k)
        if m and m.group(1) == name:
            indexed[int(m.group(2))] = k
    if not indexed:
        raise KeyError(f"no {name}_<i> entries to stack (keys: {sorted(tree)})")
    n = max(indexed) + 1
    if sorted(indexed) != list(range(n)) or (depth is not None and n != depth):
        raise KeyError(f"{name}_<i> entries {sorted(indexed)} are not 0..{(depth or n) - 1}")
    layers = [tree[indexed[i]] for i in range(n)]
    out = {k: v for k, v in tree.items() if k not in indexed.values()}
    out[name] = jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs), *layers)
    return out


def unstack_layers(tree: dict, name: str) -> dict:
    """Inverse of ``stack_layers``: {NAME: leaves [n, ...]} -> {NAME_0 .. NAME_{n-1}}."""
    stacked = tree[name]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in tree.items() if k != name}
    for i in range(n):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def at_path(tree: dict, path: Sequence[str], fn) -> dict:
    """A copy of nested ``tree`` with the dict at ``path`` replaced by ``fn(dict)``."""
    if not path:
        return fn(tree)
    out = dict(tree)
    out[path[0]] = at_path(tree[path[0]], path[1:], fn)
    return out


def relayout(tree: dict, stacks: Sequence[tuple[tuple[str, ...], str]], scanned: bool) -> dict:
    """Converts ``tree`` between the unscanned and the stacked layout at each (parent path, name) in ``stacks``.

    Trees already in the requested layout are returned unchanged.
    """
    for parent, name in stacks:
        try:
            node = tree
            for p in parent:
                node = node[p]
        except KeyError:
            continue
        if scanned and name not in node:
            tree = at_path(tree, parent, lambda d, name=name: stack_layers(d, name))
        elif not scanned and name in node:
            tree = at_path(tree, parent, lambda d, name=name: unstack_layers(d, name))
    return tree
