"""The released ``motion_tokenizer.bin`` (official keys, no prefix) -> MotionTokenizer params.

Key rule: dotted indices join their parent (``encoder.down_sample_layers.3.conv`` ->
``encoder/down_sample_layers_3/conv``, ``encode_task_layer.0`` -> ``encode_task_layer_0``), except the
blocks: ``encoder.blocks.N`` -> ``encoder/stage{s}_blocks_{j}`` with ``s, j = divmod(N,
blocks_per_stage)`` (the unscanned layout; the tree is then stacked with ``scan.relayout`` when the
config scans its layers). Linear ``weight`` -> transposed ``kernel``, LayerNorm ``weight`` ->
``scale``, Conv3d ``weight`` [O, I, kt, kh, kw] -> ``kernel`` [kt, kh, kw, I, O];
``quantize.embedding.weight`` -> ``quantize/embedding``; ``pos_embed``, ``temp_pos``, ``q_bias``,
``v_bias`` and biases as they are.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.convert import torch_io
from lavit_jax.models.motion_tokenizer import MOTION_TOKENIZER_STACKS, MotionTokenizer, stage_blocks_name
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze

MOTION_TOKENIZER_FILE = "motion_tokenizer.bin"


def torch_key_to_flax(key: str, ndim: int, blocks_per_stage: int | None = None):
    """Maps an official key to (unscanned flax path, transform).

    ``blocks_per_stage`` (the tokenizer's) regroups ``blocks.N`` into its stage; None keeps ``blocks_N``
    (the motion condition encoder, whose blocks are one stack).
    """
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit() and parts:
            if parts[-1] == "blocks" and blocks_per_stage:
                stage, j = divmod(int(p), blocks_per_stage)
                parts[-1] = f"{stage_blocks_name(stage)}_{j}"
            else:
                parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    if parts[-2:] == ["embedding", "weight"]:
        return tuple(parts[:-1]), torch_io.identity
    if parts[-1] == "weight":
        if ndim == 1:
            return tuple(parts[:-1]) + ("scale",), torch_io.identity
        if ndim == 2:
            return tuple(parts[:-1]) + ("kernel",), torch_io.linear_t
        return tuple(parts[:-1]) + ("kernel",), torch_io.conv_t
    return tuple(parts), torch_io.identity


def param_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {unscanned flax path: shape} of MotionTokenizer(config)'s params (no compute)."""
    model = MotionTokenizer(freeze(config, scan_layers=False))
    x = jax.ShapeDtypeStruct((1, config.input_frames, config.input_height, config.input_width, config.in_channels),
                             jnp.float32)
    return torch_io.param_shapes(jax.eval_shape(lambda m: model.init(jax.random.key(0), m), x)["params"])


def convert_state_dict(state_dict, config, source: str = "<state dict>", dtype=None) -> dict:
    """Official {key: array} -> nested Flax params in ``config``'s layout (stacked when ``scan_layers``).

    All key/shape mismatches are reported in one error naming ``source``.
    """
    np_dtype = np.float32 if dtype is None else np.dtype(jnp.dtype(dtype))

    def rule(key):
        return torch_key_to_flax(key, np.ndim(state_dict[key]), config.blocks_per_stage)

    tree = torch_io.assign_params(state_dict, rule, param_shapes(config), source=source, dtype=np_dtype)
    return scan.relayout(tree, MOTION_TOKENIZER_STACKS, config.scan_layers)


def load_motion_tokenizer(path, config, dtype=None) -> dict:
    """MotionTokenizer params from ``motion_tokenizer.bin`` (the file, or the checkpoint root holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MOTION_TOKENIZER_FILE)
    return convert_state_dict(torch_io.load_torch_file(path), config, source=path, dtype=dtype)
