"""FID Inception-v3 weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``: one key layout) -> Flax params of
``lavit_jax.models.inception.FIDInceptionV3``.

Keys map by name: ``Mixed_5b.branch1x1.conv.weight`` -> ``Mixed_5b/branch1x1/conv/kernel`` (OIHW -> HWIO),
``*.bn.{weight, bias, running_mean, running_var}`` -> ``*/bn/{scale, bias, mean, var}``, ``fc.weight`` ->
``fc/kernel`` (transposed); ``num_batches_tracked`` is ignored. A ``.safetensors`` file with the same keys is
read without torch; a torch pickle with ``weights_only=True``. Every missing, unexpected or mis-shaped key is
reported in one ``WeightMismatchError`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.convert.torch_io import assign_params, conv_t, identity, linear_t, load_weight_file, param_shapes
from lavit_jax.models.inception import INPUT_SIZE, FIDInceptionV3

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def inception_key_to_flax(key: str):
    """PyTorch FID Inception key -> (Flax path, transform), or None for ``num_batches_tracked``."""
    *parents, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return None
    if parents and parents[-1] == "bn" and leaf in _BN:
        return (*parents, _BN[leaf]), identity
    if parents and parents[-1] == "conv" and leaf == "weight":
        return (*parents, "kernel"), conv_t
    if parents == ["fc"]:
        return (("fc", "kernel"), linear_t) if leaf == "weight" else (("fc", leaf), identity)
    return tuple(parents) + (leaf,), identity  # not a key of the network: reported as unexpected


def inception_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    model = FIDInceptionV3()
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    return param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), x, with_logits=True)["params"]))


def inception_params_from_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str, dtype=np.float32):
    """Flax params (numpy tree) of ``FIDInceptionV3`` from the PyTorch state dict; ``source`` names the file."""
    return assign_params(state_dict, inception_key_to_flax, inception_param_shapes(), source=source, dtype=dtype)


def load_inception(path: str | os.PathLike, *, dtype=jnp.float32):
    """(FIDInceptionV3, params) from a FID Inception weight file (``.pth`` / ``.pt`` / ``.safetensors``)."""
    path = os.fspath(path)
    params = inception_params_from_state_dict(load_weight_file(path), source=path)
    return FIDInceptionV3(dtype=dtype), jax.tree.map(jnp.asarray, params)
