"""The released ``visual_tokenizer/`` files -> DynamicVisualTokenizer / TokenDecoder params.

Reference keys map onto Flax paths by one rule (``torch_key_to_flax``): ``blocks.3.x`` ->
``blocks_3/x``, Linear ``weight`` -> transposed ``kernel``, LayerNorm ``weight`` -> ``scale``, Conv
-> HWIO ``kernel``. Trees are assigned in the unscanned layout, then stacked when the config scans
its layers (``scan_layers``), so the result always matches ``DynamicVisualTokenizer(config)``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.convert import torch_io
from lavit_jax.models.token_decoder import DECODER_STACKS, TokenDecoder
from lavit_jax.models.tokenizer import TOKENIZER_STACKS, DynamicVisualTokenizer
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze

VISUAL_TOKENIZER_FILES = {
    "encoder": "eva_vitg_psz14.bin",
    "tokenizer": "tokenizer_encoder.bin",
    "lowres_decoder": "tokenizer_decoder.bin",
    "highres_decoder": "highres_tokenizer_decoder.bin",
}
CODEBOOK_KEY = "quantize.embedding.weight"

_FLAT_ATTENTION = ("token_causal_attn", "token_cross_attn", "patch_embed")


def torch_key_to_flax(key: str, ndim: int):
    """Maps a reference key to (unscanned flax path, transform)."""
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        elif parts and parts[-1] in _FLAT_ATTENTION:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    leaf = parts[-1]
    if parts[-2:] == ["embedding", "weight"]:
        return tuple(parts[:-1]), torch_io.identity
    if leaf == "weight":
        if ndim == 1:
            return tuple(parts[:-1]) + ("scale",), torch_io.identity
        if ndim == 2:
            return tuple(parts[:-1]) + ("kernel",), torch_io.linear_t
        return tuple(parts[:-1]) + ("kernel",), torch_io.conv_t
    return tuple(parts), torch_io.identity


def released_key_rule(state_dict, prefix=(), ignore=()):
    """An ``assign_params`` rule for reference keys (via ``torch_key_to_flax``); ``ignore`` skips prefixes."""

    def rule(key):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            return None
        path, transform = torch_key_to_flax(key, state_dict[key].ndim)
        return tuple(prefix) + path, transform

    return rule


def _np_dtype(dtype):
    return np.float32 if dtype is None else np.dtype(jnp.dtype(dtype))


def linear_weights_to(tree: dict, dtype) -> dict:
    """Casts the Linear/Conv weights and biases (a module's ``kernel`` and its ``bias``) to ``dtype`` and keeps
    everything else in float32, as the release's ``convert_weights_to_bf16`` does for the visual tokenizer
    (LayerNorms, ``q_bias``/``v_bias``, ``cls_token``, ``pos_embed``, query embeddings, the codebook stay f32).
    """
    dtype = _np_dtype(dtype)

    def walk(node):
        linear = "kernel" in node
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out[k] = walk(v)
            else:
                out[k] = np.asarray(v).astype(dtype if linear and k in ("kernel", "bias") else np.float32)
        return out

    return walk(tree)


def tokenizer_param_shapes(config):
    """Flat {unscanned flax path: shape} of the DynamicVisualTokenizer params (no compute)."""
    model = DynamicVisualTokenizer(freeze(config, scan_layers=False))
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return torch_io.param_shapes(jax.eval_shape(lambda p: model.init(jax.random.key(0), p), x)["params"])


def decoder_param_shapes(config, highres: bool):
    """Flat {unscanned flax path: shape} of the TokenDecoder params."""
    n = (config.image_size // config.patch_size) ** 2
    model = TokenDecoder(freeze(config, scan_layers=False), highres)
    codes = jax.ShapeDtypeStruct((1, n, config.code_dim), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    return torch_io.param_shapes(
        jax.eval_shape(lambda c, l: model.init(jax.random.key(0), c, l), codes, lengths)["params"])


def visual_tokenizer_dir(ckpt_dir):
    """The released ``visual_tokenizer/`` folder of a checkpoint root (or the folder itself)."""
    ckpt_dir = os.fspath(ckpt_dir)
    sub = os.path.join(ckpt_dir, "visual_tokenizer")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(ckpt_dir, VISUAL_TOKENIZER_FILES["tokenizer"])):
        return ckpt_dir
    raise FileNotFoundError(f"{ckpt_dir}: no visual_tokenizer/ directory with the released tokenizer files")


def load_visual_tokenizer(ckpt_dir, config, dtype=None, understanding_weights=None):
    """DynamicVisualTokenizer params from a released ``visual_tokenizer/`` directory.

    ``ckpt_dir`` is the checkpoint root or its ``visual_tokenizer`` folder. Reads
    ``eva_vitg_psz14.bin`` (its unused ``norm.*``/``head.*`` skipped) and ``tokenizer_encoder.bin``;
    ``understanding_weights`` (``language_model/visual_weight.bin``) is laid over the latter, as the
    reference's non-strict load does. All key/shape problems of a file are reported together.
    """
    vt_dir = visual_tokenizer_dir(ckpt_dir)
    shapes = tokenizer_param_shapes(config)
    enc_shapes = {k[1:]: v for k, v in shapes.items() if k[0] == "encoder"}
    rest_shapes = {k: v for k, v in shapes.items() if k[0] != "encoder"}
    np_dtype = _np_dtype(dtype)

    enc_path = os.path.join(vt_dir, VISUAL_TOKENIZER_FILES["encoder"])
    enc_sd = torch_io.load_torch_file(enc_path)
    enc = torch_io.assign_params(enc_sd, released_key_rule(enc_sd, ignore=("norm", "head")), enc_shapes,
                                 source=enc_path, dtype=np.float32)
    del enc_sd
    tok_path = os.path.join(vt_dir, VISUAL_TOKENIZER_FILES["tokenizer"])
    tok_sd = torch_io.load_torch_file(tok_path)
    if understanding_weights is not None:
        over = torch_io.load_torch_file(understanding_weights)
        bad = sorted(k for k in over if k not in tok_sd)
        if bad:
            raise torch_io.WeightMismatchError(
                f"checkpoint {understanding_weights}: keys not in {VISUAL_TOKENIZER_FILES['tokenizer']}: "
                + ", ".join(bad))
        tok_sd.update(over)
    rest = torch_io.assign_params(tok_sd, released_key_rule(tok_sd), rest_shapes, source=tok_path, dtype=np.float32)
    rest["encoder"] = enc
    return scan.relayout(linear_weights_to(rest, np_dtype), TOKENIZER_STACKS, config.scan_layers)


def load_visual_weight(path, config, dtype=None) -> dict:
    """``visual_weight.bin`` (stage-2 merger + projector) -> the partial tokenizer param tree it overrides."""
    return visual_weight_from_state_dict(torch_io.load_torch_file(path), config, dtype, source=os.fspath(path))


def visual_weight_from_state_dict(sd, config, dtype=None, *, source: str) -> dict:
    """Tokenizer keys (a part of them, e.g. ``visual_weight.bin``'s merger + projector, or all of Video-LaVIT's
    SFT ``model.visual_tokenizer.*`` with the prefix removed) -> the partial param tree they override."""
    shapes = tokenizer_param_shapes(config)
    eva = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    eva_rule = released_key_rule(eva, prefix=("encoder",), ignore=("norm", "head"))  # as eva_vitg_psz14.bin
    rest_rule = released_key_rule(sd)

    def rule(key):
        return eva_rule(key[len("encoder."):]) if key.startswith("encoder.") else rest_rule(key)

    mapped = {r[0] for r in map(rule, sd) if r is not None}
    tree = torch_io.assign_params(sd, rule, shapes, source=source, dtype=np.float32,
                                  ignore_missing=[p for p in shapes if p not in mapped])
    return scan.relayout(linear_weights_to(tree, dtype), TOKENIZER_STACKS, config.scan_layers)


def load_token_decoder(path, config, highres: bool, dtype=None):
    """TokenDecoder params from ``tokenizer_decoder.bin`` / ``highres_tokenizer_decoder.bin``."""
    sd = torch_io.load_torch_file(path)
    tree = torch_io.assign_params(sd, released_key_rule(sd), decoder_param_shapes(config, highres),
                                  source=os.fspath(path), dtype=np.float32)
    return scan.relayout(linear_weights_to(tree, dtype), DECODER_STACKS, config.scan_layers)


def load_codebook(path) -> np.ndarray:
    """The visual codebook [K, code_dim] float32 from ``tokenizer_encoder.bin``."""
    sd = torch_io.load_torch_file(path)
    if CODEBOOK_KEY not in sd:
        raise torch_io.WeightFileError(f"{os.fspath(path)} has no {CODEBOOK_KEY!r} (the visual codebook)")
    return np.asarray(sd[CODEBOOK_KEY], np.float32)
