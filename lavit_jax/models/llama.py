"""LLaMA causal language model (HF ``LlamaForCausalLM`` layout) in Flax Linen, and HF checkpoint loading.

The model is the LLM at the centre of LaVIT: RMSNorm, rotary position embeddings computed as HF does
(rotate-half convention, ``rope_theta``, ``rope_scaling``), SwiGLU MLP, grouped-query attention through
``lavit_jax.attention.dot_product_attention``, tied or untied embeddings.

Shapes: B batch, T query length, S key length (cache slots), C hidden, H heads, K key/value heads,
D head dim, V vocab.

KV cache: ``{"k": [L, B, S, K, D], "v": [L, B, S, K, D]}`` (L layers, static S slots).
A forward writes its T new keys/values at slots ``[cache_index, cache_index + T)``; a query in slot
``cache_index + t`` sees the key slots ``s <= cache_index + t`` whose ``attention_mask[b, s]`` is set.
Without a cache the keys are the T tokens themselves (S = T, cache_index = 0).

Packed sequences (training): ``segment_ids`` [B, T] (1, 2, ... per packed sequence, 0 for padding, as
``lavit_jax.data.packing`` writes them) make attention causal within each segment (the attention op's
segment ids, on every backend); positions then default to 0, 1, ... restarting at every segment.

The decoder layers run under ``nn.scan`` when ``scan_layers`` (the default; params ``layers/...`` with
a leading [L] axis) or unrolled as ``layers_{i}``; both give the same outputs.

Entry points: ``llama_config(hf_config_dict, **runtime)``, ``LlamaForCausalLM``, ``init_cache``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.config import freeze
from lavit_jax.ops.layers import dense
from lavit_jax.ops.quant import WEIGHT_MODES, Int8Dense
from lavit_jax.ops.remat import check_remat
from lavit_jax.ops.scan import make_layers, run_layers

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
    attention_impl="xla",  # see lavit_jax.ops.attention
    remat="none",  # see lavit_jax.ops.remat
    scan_layers=True,  # decoder layers under nn.scan
    weights="float",  # "int8": projections and LM head on int8 kernels + per-channel scales (ops/quant.py)
)


def llama_config(hf_config: Mapping, source: str = "config", **runtime) -> ml_collections.FrozenConfigDict:
    """Frozen config with HF field names from an HF ``config.json`` dict, plus run-time knobs.

    Fields: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling, tie_word_embeddings,
    max_position_embeddings; run-time knobs (``runtime`` overrides the dict): dtype, param_dtype,
    attention_impl, remat, scan_layers, weights ("float" | "int8"). ``source`` names the dict in errors (e.g. its file).
    """
    if not isinstance(hf_config, Mapping | ml_collections.ConfigDict):
        raise TypeError(f"llama_config takes a dict, got {type(hf_config).__name__}")
    raw = dict(hf_config.items())
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
    unknown = sorted(set(runtime) - set(_RUNTIME_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LLaMA run-time option(s) {unknown}: expected {sorted(_RUNTIME_DEFAULTS)}")
    cfg.update({k: v for k, v in runtime.items() if v is not None})
    check_remat(cfg["remat"], "remat")
    if cfg["weights"] not in WEIGHT_MODES:
        raise ValueError(f"{source}: weights={cfg['weights']!r} is not one of {WEIGHT_MODES}")
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
    return freeze(cfg)


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


def _linear(cfg, features: int, axes, name: str):
    """A bias-free projection: ``nn.Dense``, or ``Int8Dense`` (int8 kernel + per-channel scales) when
    ``cfg.weights == "int8"``."""
    if cfg.weights == "int8":
        return Int8Dense(features, axes, dtype=_dtype(cfg.dtype), name=name)
    return dense(features, axes, use_bias=False, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                 name=name)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional static KV cache.

    x [B, T, C], positions [B, T], attention_mask [B, S] (key validity) -> ([B, T, C], new layer cache).
    """

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, positions, attention_mask, layer_cache=None, cache_index=None, segment_ids=None):
        cfg = self.config
        dt = _dtype(cfg.dtype)
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, t, _ = x.shape
        q = _linear(cfg, h * d, ("embed", "heads"), "q_proj")(x)
        kk = _linear(cfg, k * d, ("embed", "kv_heads"), "k_proj")(x)
        vv = _linear(cfg, k * d, ("embed", "kv_heads"), "v_proj")(x)
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
        if segment_ids is not None:  # packed sequences, no cache: causal within each segment
            mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
            out = dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=mask, is_causal=True,
                                        q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                        implementation=cfg.attention_impl)
        else:
            s = keys.shape[1]
            q_slot = start + jnp.arange(t)[:, None]
            causal = jnp.arange(s)[None, :] <= q_slot  # [T, S]
            mask = jnp.logical_and(causal[None, None], attention_mask[:, None, None, :].astype(bool))  # [B, 1, T, S]
            out = dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=mask,
                                        implementation=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = out.reshape(b, t, h * d)
        out = _linear(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj")(out)
        return out, new_cache


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, C] -> [B, T, C]."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        f = cfg.intermediate_size
        gate = _linear(cfg, f, ("embed", "mlp"), "gate_proj")(x)
        up = _linear(cfg, f, ("embed", "mlp"), "up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        down = _linear(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")
        return down(hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). [B, T, C] -> ([B, T, C], new layer cache)."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, x, positions, attention_mask, layer_cache=None, cache_index=None, segment_ids=None):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        h, new_cache = LlamaAttention(cfg, name="self_attn")(h, positions, attention_mask, layer_cache, cache_index,
                                                            segment_ids)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_cache


# Per-layer arguments of LlamaDecoderLayer: positions, mask, cache index and segment ids are shared, the cache is
# per layer.
_LAYER_IN_AXES = (nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast)


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder + LM head. Params: ``embed_tokens``, ``layers`` (scanned; ``layers_{i}`` unrolled), ``norm``,
    ``lm_head`` (HF names, no "model.").

    ``__call__(input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
    cache_index=None, segment_ids=None)`` -> (logits [B, T, V] float32, new cache or None).
    ``embed(ids [B, T])`` -> [B, T, C] token embeddings.
    """

    config: ml_collections.FrozenConfigDict

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
        self.layers = make_layers(LlamaDecoderLayer, cfg.num_hidden_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat,
                                  in_axes=_LAYER_IN_AXES)
        self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")

    def embed(self, ids):
        """Token embeddings: ids [B, T] int -> [B, T, C]."""
        return self.embed_tokens(ids)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                      cache_index=None, segment_ids=None):
        """The decoder's final-norm output [B, T, C] and the new cache (see ``__call__``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(_dtype(self.config.dtype))
        b, t, _ = x.shape
        if cache is not None and cache_index is None:
            raise ValueError("a cache needs cache_index")
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) are for training forwards, without a cache")
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids has shape {segment_ids.shape}, expected {(b, t)} (batch, length)")
        s = t if cache is None else cache["k"].shape[2]
        if attention_mask is None and segment_ids is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask is not None and attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, s)} (batch, key slots)")
        if positions is None:
            if segment_ids is not None:
                positions = segment_positions(segment_ids)
            elif cache is None:
                positions = default_positions(attention_mask)
            else:
                positions = jnp.broadcast_to(cache_index + jnp.arange(t)[None], (b, t))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, new_cache = run_layers(self.layers, x, positions, attention_mask, cache, cache_index, segment_ids,
                                  in_axes=_LAYER_IN_AXES)
        return self.norm(x), new_cache

    def logits(self, hidden):
        """LM head: hidden [B, T, C] -> logits [B, T, V] float32."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)

    def __call__(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        positions=None,
        cache=None,
        cache_index=None,
        segment_ids=None,
    ):
        x, new_cache = self.hidden_states(input_ids, inputs_embeds, attention_mask, positions, cache, cache_index,
                                          segment_ids)
        return self.logits(x), new_cache


def default_positions(attention_mask):
    """HF position ids for a left-padded mask [B, T]: cumsum(mask) - 1, 0 at padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def segment_positions(segment_ids):
    """Positions restarting at every segment of packed rows: segment_ids [B, T] -> [B, T] int32 (0 in padding)."""
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(seg > 0, idx - start_idx, 0)


def init_cache(config, batch: int, slots: int, dtype=None):
    """Zero KV cache {"k", "v": [layers, batch, slots, K, D]}."""
    dtype = _dtype(dtype or config.dtype)
    shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


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


# (parent path, name) of the repeated layers: stacked on a leading axis when ``scan_layers``.
LLAMA_STACKS = (((), "layers"),)
