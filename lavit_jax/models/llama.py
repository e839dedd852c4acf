"""LLaMA causal language model (HF ``LlamaForCausalLM`` layout) in Flax Linen, and HF checkpoint loading.

The model is the LLM at the centre of LaVIT: RMSNorm, rotary position embeddings computed as HF does
(rotate-half convention, ``rope_theta``, ``rope_scaling``), SwiGLU MLP, grouped-query attention through
``lavit_jax.attention.dot_product_attention``, tied or untied embeddings.

Shapes: B batch, T query length, S key length (cache slots), C hidden, H heads, K key/value heads,
D head dim, V vocab.

KV cache: a tuple (one entry per layer) of ``{"k": [B, S, K, D], "v": [B, S, K, D]}`` with static S.
A forward writes its T new keys/values at slots ``[cache_index, cache_index + T)``; a query in slot
``cache_index + t`` sees the key slots ``s <= cache_index + t`` whose ``attention_mask[b, s]`` is set.
Without a cache the keys are the T tokens themselves (S = T, cache_index = 0).

Entry points: ``llama_config_from_hf(path_or_dict)``, ``LlamaForCausalLM``, ``init_cache``,
``load_hf_llama(model_dir, config, dtype)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from lavit_jax.convert import torch_io as weights_lib
from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import dense

# --------------------------------------------------------------------------------------------- config

_CONFIG_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    head_dim=None,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)

# Our run-time knobs (not HF fields), kept beside the HF fields in the ConfigDict.
_RUNTIME_DEFAULTS = dict(
    dtype="float32",  # activation dtype
    param_dtype="float32",
    attention_impl="xla",  # see lavit_jax.attention
    remat_policy="none",  # see REMAT_POLICIES
)


def llama_config_from_hf(path_or_dict) -> ml_collections.ConfigDict:
    """ConfigDict with HF field names from a ``config.json`` path, a model directory, or a dict.

    Fields: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling, tie_word_embeddings,
    max_position_embeddings (+ run-time knobs dtype, param_dtype, attention_impl, remat_policy).
    """
    source = "dict"
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        source = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LLaMA config not found: {path}")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"LLaMA config {path} is not valid JSON: {e}") from e
    elif isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
    else:
        raise TypeError(f"llama_config_from_hf takes a path or a dict, got {type(path_or_dict).__name__}")
    cfg = dict(_CONFIG_DEFAULTS)
    for k in _CONFIG_DEFAULTS:
        if k in raw and raw[k] is not None:
            cfg[k] = raw[k]
    # transformers >= 5 writes rope_parameters = {rope_type, rope_theta, ...}
    rope_params = raw.get("rope_parameters")
    if isinstance(rope_params, Mapping):
        rope_params = dict(rope_params)
        if "rope_theta" in rope_params:
            cfg["rope_theta"] = rope_params.pop("rope_theta")
        if rope_params.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope_params
    for k in _RUNTIME_DEFAULTS:
        cfg[k] = raw.get(k, _RUNTIME_DEFAULTS[k])
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["head_dim"] is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if raw.get("model_type", "llama") not in ("llama",):
        raise ValueError(f"{source}: model_type {raw.get('model_type')!r} is not 'llama'")
    for k in ("hidden_act",):
        if cfg[k] != "silu":
            raise ValueError(f"{source}: {k}={cfg[k]!r} is not supported (only 'silu')")
    for k in ("attention_bias", "mlp_bias"):
        if cfg[k]:
            raise ValueError(f"{source}: {k}=true is not supported")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError(
            f"{source}: num_attention_heads={cfg['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={cfg['num_key_value_heads']}"
        )
    _rope_scaling_kind(cfg["rope_scaling"], source)  # validates
    out = ml_collections.ConfigDict(cfg)
    return out


def _rope_scaling_kind(rope_scaling, source="config") -> str:
    if rope_scaling is None:
        return "default"
    if not isinstance(rope_scaling, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f"{source}: rope_scaling must be a dict or null, got {rope_scaling!r}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return kind


def rope_inv_freq(config) -> np.ndarray:
    """Inverse frequencies [D/2] (float32) exactly as HF computes them for the configured RoPE type."""
    dim = int(config.head_dim)
    base = np.float32(config.rope_theta)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base**exponent)).astype(np.float32)
    scaling = config.rope_scaling
    kind = _rope_scaling_kind(scaling)
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, rotate-half convention. x [B, T, H, D], positions [B, T] -> [B, T, H, D]."""
    freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


# --------------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight. [..., C] -> [..., C]."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        weight = self.param("weight", init, (c,), self.param_dtype)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return (weight.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


def _dtype(name):
    return jnp.dtype(name) if isinstance(name, str) else name


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional static KV cache.

    x [B, T, C], positions [B, T], attention_mask [B, S] (key validity) -> ([B, T, C], new layer cache).
    """

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, positions, attention_mask, layer_cache=None, cache_index=None):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, t, _ = x.shape
        q = dense(h * d, ("embed", "heads"), use_bias=False, dtype=dt, param_dtype=pdt, name="q_proj")(x)
        kk = dense(k * d, ("embed", "kv_heads"), use_bias=False, dtype=dt, param_dtype=pdt, name="k_proj")(x)
        vv = dense(k * d, ("embed", "kv_heads"), use_bias=False, dtype=dt, param_dtype=pdt, name="v_proj")(x)
        q = q.reshape(b, t, h, d)
        kk = kk.reshape(b, t, k, d)
        vv = vv.reshape(b, t, k, d)
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q, positions, inv_freq)
        kk = apply_rope(kk, positions, inv_freq)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        if layer_cache is None:
            keys, values, start = kk, vv, 0
            new_cache = None
        else:
            start = cache_index
            zero = jnp.zeros((), jnp.int32)
            idx = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            keys = jax.lax.dynamic_update_slice(layer_cache["k"], kk.astype(layer_cache["k"].dtype), idx)
            values = jax.lax.dynamic_update_slice(layer_cache["v"], vv.astype(layer_cache["v"].dtype), idx)
            new_cache = {"k": keys, "v": values}
        s = keys.shape[1]
        q_slot = start + jnp.arange(t)[:, None]
        causal = jnp.arange(s)[None, :] <= q_slot  # [T, S]
        mask = jnp.logical_and(causal[None, None], attention_mask[:, None, None, :].astype(bool))  # [B, 1, T, S]
        out = dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=mask, implementation=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = out.reshape(b, t, h * d)
        out = dense(cfg.hidden_size, ("heads", "embed"), use_bias=False, dtype=dt, param_dtype=pdt, name="o_proj")(out)
        return out, new_cache


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, C] -> [B, T, C]."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        f = cfg.intermediate_size
        gate = dense(f, ("embed", "mlp"), use_bias=False, dtype=dt, param_dtype=pdt, name="gate_proj")(x)
        up = dense(f, ("embed", "mlp"), use_bias=False, dtype=dt, param_dtype=pdt, name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        down = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=False, dtype=dt, param_dtype=pdt, name="down_proj")
        return down(hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). [B, T, C] -> ([B, T, C], new layer cache)."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, positions, attention_mask, layer_cache=None, cache_index=None):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        h, new_cache = LlamaAttention(cfg, name="self_attn")(h, positions, attention_mask, layer_cache, cache_index)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder + LM head. Params: ``embed_tokens``, ``layers_{i}``, ``norm``, ``lm_head`` (HF names, no "model.").

    ``__call__(input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
    cache_index=None)`` -> (logits [B, T, V] float32, new cache or None).
    ``embed(ids [B, T])`` -> [B, T, C] token embeddings.
    """

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed_tokens",
        )
        policy = cfg.get("remat_policy", "none")
        if policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {policy!r} unknown; choose from {sorted(REMAT_POLICIES)}")
        layer_cls = LlamaDecoderLayer
        if policy != "none":
            layer_cls = nn.remat(LlamaDecoderLayer, policy=REMAT_POLICIES[policy], prevent_cse=True)
        self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(
                cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dt, param_dtype=pdt, name="lm_head"
            )

    def embed(self, ids):
        """Token embeddings: ids [B, T] int -> [B, T, C]."""
        return self.embed_tokens(ids)

    def __call__(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        positions=None,
        cache=None,
        cache_index=None,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(_dtype(self.config.dtype))
        b, t, _ = x.shape
        if cache is not None and cache_index is None:
            raise ValueError("a cache needs cache_index")
        s = t if cache is None else cache[0]["k"].shape[1]
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, s)} (batch, key slots)")
        if positions is None:
            if cache is None:
                positions = default_positions(attention_mask)
            else:
                positions = jnp.broadcast_to(cache_index + jnp.arange(t)[None], (b, t))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            x, c = layer(x, positions, attention_mask, layer_cache, cache_index)
            if cache is not None:
                new_cache.append(c)
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32), (tuple(new_cache) if new_cache is not None else None)


def default_positions(attention_mask):
    """HF position ids for a left-padded mask [B, T]: cumsum(mask) - 1, 0 at padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def init_cache(config, batch: int, slots: int, dtype=None):
    """Zero KV cache: tuple over layers of {"k", "v": [batch, slots, K, D]}."""
    dtype = _dtype(dtype or config.dtype)
    shape = (batch, slots, config.num_key_value_heads, config.head_dim)
    return tuple(
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)
    )


def init_params(config, rng, *, boxed: bool = False):
    """Random parameters (boxed ``nn.Partitioned`` if ``boxed``) for ``LlamaForCausalLM(config)``."""
    model = LlamaForCausalLM(config)
    variables = model.init(rng, input_ids=jnp.zeros((1, 2), jnp.int32))
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def param_specs(config):
    """Boxed abstract parameter tree (shapes + logical axis names), computed without allocating."""
    model = LlamaForCausalLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 2), jnp.int32)))["params"]


# --------------------------------------------------------------------------------------------- loading


def hf_key_rule(key: str):
    """Maps an HF ``LlamaForCausalLM`` state-dict key to (flax path, transform); None to ignore."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a buffer in older checkpoints
    parts = key.split(".")
    if parts[0] == "lm_head":
        return ("lm_head", "kernel"), weights_lib.linear_t
    if parts[0] != "model":
        return ("<unknown>", key), weights_lib.identity
    rest = parts[1:]
    if rest == ["embed_tokens", "weight"]:
        return ("model", "embed_tokens", "embedding"), weights_lib.identity
    if rest == ["norm", "weight"]:
        return ("model", "norm", "weight"), weights_lib.identity
    if len(rest) >= 4 and rest[0] == "layers":
        layer = f"layers_{rest[1]}"
        sub = rest[2:]
        if sub[-1] == "weight" and sub[0] in ("input_layernorm", "post_attention_layernorm") and len(sub) == 2:
            return ("model", layer, sub[0], "weight"), weights_lib.identity
        if len(sub) == 3 and sub[0] in ("self_attn", "mlp") and sub[2] == "weight":
            return ("model", layer, sub[0], sub[1], "kernel"), weights_lib.linear_t
    return ("<unknown>", key), weights_lib.identity


def flax_param_shapes(config):
    """Flat {HF-style path: shape} of the params (decoder under "model", as the HF keys are)."""
    shapes = weights_lib.param_shapes(param_specs(config))
    # Our module tree has the decoder at top level; the HF tree has it under "model". Map both ways.
    return {(("model",) + k) if k[0] != "lm_head" else k: v for k, v in shapes.items()}


def hf_shard_files(model_dir: str) -> list[str]:
    """Weight files of an HF checkpoint directory, in index order."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(model_dir, index_name)
        if os.path.isfile(index_path):
            return weights_lib.index_shard_files(index_path)
        if os.path.isfile(os.path.join(model_dir, single)):
            return [os.path.join(model_dir, single)]
    raise weights_lib.WeightFileError(
        f"no LLaMA weights in {model_dir}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
    )


def load_hf_llama(model_dir, config=None, dtype=jnp.bfloat16):
    """Loads an HF LLaMA checkpoint directory into Flax params of ``LlamaForCausalLM(config)``.

    Reads ``config.json`` (unless ``config`` is given) and the sharded ``pytorch_model-*.bin`` (torch
    ``weights_only=True``) or ``*.safetensors`` files listed in the index, one shard at a time: each
    shard's tensors are converted to ``dtype`` and transposed, then the shard is dropped before the
    next is read (peak memory ~ params in ``dtype`` + one shard). Raises ``WeightFileError`` naming a
    missing/corrupt shard and one ``WeightMismatchError`` listing all missing/unexpected/mis-shaped keys.

    Returns (params, config): params is a nested dict of jax arrays in ``dtype``.
    """
    model_dir = os.fspath(model_dir)
    if config is None:
        config = llama_config_from_hf(model_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = flax_param_shapes(config)
    converted: dict[str, np.ndarray] = {}
    for path in hf_shard_files(model_dir):
        shard = weights_lib.load_weight_file(path)
        for key in list(shard.keys()):
            value = shard.pop(key)
            r = hf_key_rule(key)
            if r is None:
                continue
            _, transform = r
            converted[key] = transform(np.asarray(value)).astype(np_dtype, copy=False)
            del value
        del shard

    def rule(key):
        r = hf_key_rule(key)
        return None if r is None else (r[0], weights_lib.identity)

    tree = weights_lib.assign_params(converted, rule, shapes, source=model_dir, dtype=None)
    converted.clear()
    # Flatten our module tree: HF's "model" level is our top level.
    params = dict(tree.pop("model"))
    params.update(tree)

    def to_jax(node: dict) -> dict:
        out = {}
        for k in list(node):
            v = node.pop(k)  # drop the numpy copy as soon as the device copy exists
            out[k] = to_jax(v) if isinstance(v, dict) else jnp.asarray(v, dtype=dtype)
            del v
        return out

    return to_jax(params), config
