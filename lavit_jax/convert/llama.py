"""HF ``LlamaForCausalLM`` checkpoints (``config.json`` + sharded ``.bin``/``.safetensors``) -> Flax params.

The one shard loop (``llama_params``) streams the shards listed in the index one tensor at a time
(torch pickles memory-mapped with ``weights_only=True``, safetensors lazily), transposes and casts
each tensor as it is read, checks every key and shape together, and stacks the layers when the
config scans them. The converter saves its result; ``load_hf_llama`` (tests, tools) puts it on device.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import torch_io
from lavit_jax.models import llama
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze


def hf_key_rule(key: str):
    """Maps an HF ``LlamaForCausalLM`` state-dict key to (unscanned flax path, transform); None to ignore."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a buffer in older checkpoints
    parts = key.split(".")
    if parts[0] == "lm_head":
        return ("lm_head", "kernel"), torch_io.linear_t
    if parts[0] != "model":
        return ("<unknown>", key), torch_io.identity
    rest = parts[1:]
    if rest == ["embed_tokens", "weight"]:
        return ("model", "embed_tokens", "embedding"), torch_io.identity
    if rest == ["norm", "weight"]:
        return ("model", "norm", "weight"), torch_io.identity
    if len(rest) >= 4 and rest[0] == "layers":
        layer = f"layers_{rest[1]}"
        sub = rest[2:]
        if sub[-1] == "weight" and sub[0] in ("input_layernorm", "post_attention_layernorm") and len(sub) == 2:
            return ("model", layer, sub[0], "weight"), torch_io.identity
        if len(sub) == 3 and sub[0] in ("self_attn", "mlp") and sub[2] == "weight":
            return ("model", layer, sub[0], sub[1], "kernel"), torch_io.linear_t
    return ("<unknown>", key), torch_io.identity


def flax_param_shapes(config):
    """Flat {HF-style unscanned path: shape} of the params (decoder under "model", as the HF keys are)."""
    shapes = torch_io.param_shapes(llama.param_specs(freeze(config, scan_layers=False)))
    return {(("model",) + k) if k[0] != "lm_head" else k: v for k, v in shapes.items()}


def hf_shard_files(model_dir: str) -> list[str]:
    """Weight files of an HF checkpoint directory, in index order."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            return torch_io.index_shard_files(index_path)
        if os.path.isfile(os.path.join(model_dir, single)):
            return [os.path.join(model_dir, single)]
    raise torch_io.WeightFileError(
        f"no LLaMA weights in {model_dir}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
    )


def llama_params(model_dir, config, dtype, progress=None, ignore_prefixes=()) -> dict:
    """numpy params of ``LlamaForCausalLM(config)`` in ``dtype`` from an HF checkpoint directory.

    ``progress(iterable, desc)`` optionally wraps the shard list (e.g. a tqdm bar); keys starting with one of
    ``ignore_prefixes`` are other modules' (Video-LaVIT's SFT shards also hold its tokenizers). Raises
    ``WeightFileError`` naming a missing/corrupt shard and one ``WeightMismatchError`` listing all
    missing/unexpected/mis-shaped keys. Peak memory ~ params in ``dtype`` + one tensor in flight.
    """
    model_dir = os.fspath(model_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    files = hf_shard_files(model_dir)
    converted: dict[str, np.ndarray] = {}
    for path in (progress(files, os.path.basename(os.path.normpath(model_dir))) if progress else files):
        for key, value in torch_io.iter_tensors(path):
            if key.startswith(tuple(ignore_prefixes)):
                continue
            r = hf_key_rule(key)
            if r is None:
                continue
            converted[key] = r[1](value).astype(np_dtype, copy=False)
            del value

    def rule(key):
        r = hf_key_rule(key)
        return None if r is None else (r[0], torch_io.identity)

    tree = torch_io.assign_params(converted, rule, flax_param_shapes(config), source=model_dir, dtype=None)
    converted.clear()
    params = dict(tree.pop("model"))  # HF's "model" level is our top level
    params.update(tree)
    return scan.relayout(params, llama.LLAMA_STACKS, config.scan_layers)


def load_hf_llama(model_dir, config=None, dtype=jnp.bfloat16, **runtime):
    """(params as jax arrays in ``dtype``, config) of an HF LLaMA directory; ``runtime`` as ``llama_config``."""
    model_dir = os.fspath(model_dir)
    if config is None:
        config = checkpoint.read_llama_config(model_dir, **runtime)
    params = llama_params(model_dir, config, dtype)
    return checkpoint.to_device(params, dtype), config
