"""Reading released PyTorch weights without running code, and mapping them onto Flax params.

Torch pickles are read with ``torch.load(..., weights_only=True)`` (torch is imported lazily: the
JAX path never needs it), safetensors with ``safetensors.numpy``. Tensors come back as numpy
arrays; bf16 becomes ``ml_dtypes.bfloat16``.

``assign_params`` takes a flat {torch key: array} dict, a rule mapping each torch key to a Flax
path and a transform, and the Flax parameter shapes; it reports every missing, unexpected or
mis-shaped key together in one ``WeightMismatchError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from flax.core import meta
from safetensors import safe_open
from safetensors.numpy import load_file


class WeightFileError(ValueError):
    """A weight file is missing, truncated, corrupt or not a state dict."""


class WeightMismatchError(ValueError):
    """Keys or shapes of a checkpoint do not match the model."""


def tensor_to_numpy(t) -> np.ndarray:
    """A torch tensor -> numpy (bf16 viewed as ``ml_dtypes.bfloat16``, no float32 round trip)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_torch_object(path: str | os.PathLike, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)``: never runs code from the file; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"weight file not found: {path}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        raise WeightFileError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a torch pickle state dict with ``weights_only=True`` into numpy arrays."""
    path = os.fspath(path)
    sd = load_torch_object(path)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightFileError(f"weight file {path} holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "detach"):
            raise WeightFileError(f"weight file {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = tensor_to_numpy(v)
    return out


def load_safetensors_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"weight file not found: {path}")
    try:
        return dict(load_file(path))
    except Exception as e:
        raise WeightFileError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e


def load_weight_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads ``.safetensors`` or a torch pickle (``.bin``/``.pt``/``.pth``), never running code."""
    if os.fspath(path).endswith(".safetensors"):
        return load_safetensors_file(path)
    return load_torch_file(path)


def index_shard_files(index_path) -> list[str]:
    """Paths of the shards a ``*.index.json`` names (its ``weight_map`` values, first-seen order)."""
    index_path = os.fspath(index_path)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"bad shard index {index_path}: {type(e).__name__}: {e}") from e
    folder = os.path.dirname(index_path)
    return [os.path.join(folder, f) for f in dict.fromkeys(weight_map.values())]


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, numpy array) of one weight file, one tensor at a time, without running code.

    ``.safetensors`` are opened lazily as numpy (torch is not imported); torch pickles are memory-mapped
    (older non-zip pickles fall back to a plain ``weights_only`` load). A missing/truncated/corrupt file
    raises ``WeightFileError`` naming it.
    """
    if not os.path.isfile(path):
        raise WeightFileError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):  # read as numpy (bf16 as ml_dtypes.bfloat16): no torch import
        try:
            f = safe_open(path, framework="numpy")
            keys = list(f.keys())
        except Exception as e:
            raise WeightFileError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:
                raise WeightFileError(f"cannot read tensor {k!r} of {path}: {type(e).__name__}: {e}") from e
            yield k, t
        return
    try:
        sd = load_torch_object(path, mmap=True)
    except WeightFileError:
        sd = None
    if sd is None:  # not a zip pickle (mmap needs one), or corrupt: the plain loader names the problem
        yield from load_torch_file(path).items()
        return
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightFileError(f"weight file {path} holds a {type(sd).__name__}, not a state dict")
    for k in list(sd):
        v = sd.pop(k)
        if not hasattr(v, "detach"):
            raise WeightFileError(f"weight file {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        yield str(k), tensor_to_numpy(v)


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keeps the keys under ``prefix`` (e.g. ``"encoder."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# A rule maps a torch key to (flax path tuple, transform) or None to ignore the key.
Rule = Callable[[str], "tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]] | None"]


def linear_t(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv_t(w: np.ndarray) -> np.ndarray:
    """torch Conv weight [O, I, *k] -> Flax Conv kernel [*k, I, O]."""
    nd = w.ndim - 2
    return np.ascontiguousarray(np.transpose(w, tuple(range(2, 2 + nd)) + (1, 0)))


def identity(w: np.ndarray) -> np.ndarray:
    return w


def param_shapes(params) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of a (possibly boxed / ShapeDtypeStruct) param tree."""
    # Take the boxed values directly: meta.unbox would apply sharding constraints under a mesh.
    params = jax.tree.map(lambda x: x.value if isinstance(x, meta.AxisMetadata) else x, params,
                          is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    flat = traverse_util.flatten_dict(params)
    return {k: tuple(v.shape) for k, v in flat.items()}


def assign_params(
    state_dict: Mapping[str, np.ndarray],
    rule: Rule,
    shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    *,
    source: str,
    dtype=np.float32,
    ignore_missing: Iterable[tuple[str, ...]] = (),
) -> dict:
    """Builds a nested Flax param dict; raises one WeightMismatchError listing all problems."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, mismatched_paths = [], [], set()
    for key, value in state_dict.items():
        r = rule(key)
        if r is None:
            continue
        path, transform = r
        if path not in shapes:
            unexpected.append(key)
            continue
        arr = transform(np.asarray(value))
        if tuple(arr.shape) != tuple(shapes[path]):
            mismatched_paths.add(path)
            mismatched.append(
                f"{key}: shape {list(value.shape)} -> {'/'.join(path)} {list(arr.shape)}, expected {list(shapes[path])}"
            )
            continue
        flat[path] = arr.astype(dtype) if dtype is not None else arr
    ignore = set(ignore_missing) | mismatched_paths
    missing = ["/".join(p) for p in shapes if p not in flat and p not in ignore]
    if unexpected or mismatched or missing:
        parts = [f"checkpoint {source} does not match the model:"]
        if missing:
            parts.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)))
        if unexpected:
            parts.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
        if mismatched:
            parts.append(f"  mis-shaped ({len(mismatched)}): " + "; ".join(mismatched))
        raise WeightMismatchError("\n".join(parts))
    return traverse_util.unflatten_dict(flat)


def to_device_tree(params, dtype=None):
    """numpy tree -> jax arrays (optionally cast)."""
    return jax.tree.map(lambda x: jax.numpy.asarray(x, dtype=dtype), params)
