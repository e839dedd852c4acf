"""LaVIT's dynamic visual tokenizer: EVA-CLIP features -> token selector -> token merger -> codes.

Shapes (N = (image_size/patch_size)^2 = 256 patches, C = width):
- pixels [B, H, W, 3] CLIP-normalised NHWC -> eva features [B, 1+N, C] (CLS first)
- selector log-probs [B, N, 2] (column 0 = keep) -> keep decisions [B, N] in {0, 1}
- merged features [B, N, C] -> kept features compacted to the front [B, N, C] + lengths [B]
- encode_task_layer -> [B, N, code_dim] -> codebook -> quantized [B, N, code_dim], codes [B, N]
- ids in the LLM vocabulary: code + code_offset (32002), padded, optionally [IMG] ... [/IMG].
Everything is static-shaped under ``jit``: variable token counts are padded arrays plus lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.codebook import Codebook
from lavit_jax.models.eva_vit import EvaViT
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.ops.layers import LayerNorm, Mlp, dense, merge_heads, split_heads


def masked_softmax(scores, mask, eps: float = 1e-6):
    """The reference's policy softmax, in float32.

    p = (exp(s - max s) * mask + eps/N) / (sum(exp(s - max s) * mask) + eps), max over all keys.
    scores [..., N], mask broadcastable to scores (1 = attend) -> [..., N].
    """
    s = scores.astype(jnp.float32)
    n = s.shape[-1]
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * mask.astype(jnp.float32)
    return (e + eps / n) / (jnp.sum(e, axis=-1, keepdims=True) + eps)


def _attend(q, k, v, mask, eps):
    """q [B,T,H,D], k/v [B,S,H,D], mask [B,1|H,T,S] -> [B,T,H,D] with the policy softmax."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    probs = masked_softmax(logits, mask, eps).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class TokenSelector(nn.Module):
    """``token_predictor``: features [B,N,C] + policy [B,N] -> keep/drop log-probs [B,N,2] (float32).

    The first half of the channels is per token, the second half is averaged over the tokens the
    policy keeps.
    """

    width: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, policy):
        c = self.width
        kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        x = LayerNorm(self.eps, name="in_conv_0", **kw)(x.astype(jnp.float32))
        x = nn.gelu(dense(c, ("embed", "mlp"), name="in_conv_1", **kw)(x), approximate=False)
        p = policy.astype(jnp.float32)[..., None]
        local_x = x[..., : c // 2]
        global_x = jnp.sum(x[..., c // 2:] * p, axis=1, keepdims=True) / jnp.sum(p, axis=1, keepdims=True)
        x = jnp.concatenate([local_x, jnp.broadcast_to(global_x, local_x.shape[:2] + global_x.shape[2:])], -1)
        x = nn.gelu(dense(c // 2, ("mlp", "embed"), name="out_conv_0", **kw)(x), approximate=False)
        x = nn.gelu(dense(c // 4, ("embed", "mlp"), name="out_conv_2", **kw)(x), approximate=False)
        x = dense(2, ("mlp", None), name="out_conv_4", **kw)(x)
        return jax.nn.log_softmax(x, axis=-1)


class MergerBlock(nn.Module):
    """``CausalFuserBlock``. x [B,N,C], x_origin [B,N,C], keep [B,N] float -> [B,N,C].

    x += causal self-attention over kept tokens and itself; x += cross-attention to the dropped
    tokens of x_origin; x += MLP. Both attentions use the policy softmax.
    """

    heads: int
    mlp_hidden: int
    eps: float = 1e-5
    softmax_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, x_origin, keep):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, c = x.shape
        keep = keep.astype(jnp.float32)
        eye = jnp.eye(n, dtype=jnp.float32)
        causal = jnp.tril(jnp.ones((n, n), jnp.float32))
        self_mask = (keep[:, None, None, :] + (1.0 - keep[:, None, None, :]) * eye) * causal
        cross_mask = (1.0 - keep)[:, None, None, :]

        h = LayerNorm(self.eps, name="norm0", **kw)(x)
        qkv = dense(3 * c, ("embed", "heads"), name="token_causal_attn_qkv", **kw)(h)
        q, k, v = (split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        out = merge_heads(_attend(q, k, v, self_mask, self.softmax_eps))
        x = x + dense(c, ("heads", "embed"), name="token_causal_attn_proj", **kw)(out)

        h = LayerNorm(self.eps, name="norm1", **kw)(x)
        q = split_heads(dense(c, ("embed", "heads"), name="token_cross_attn_query", **kw)(h), self.heads)
        k = split_heads(dense(c, ("embed", "heads"), name="token_cross_attn_key", **kw)(x_origin), self.heads)
        v = split_heads(dense(c, ("embed", "heads"), name="token_cross_attn_value", **kw)(x_origin), self.heads)
        out = merge_heads(_attend(q, k, v, cross_mask, self.softmax_eps))
        x = x + dense(c, ("heads", "embed"), name="token_cross_attn_proj", **kw)(out)

        x = x + Mlp(self.mlp_hidden, name="mlp", **kw)(LayerNorm(self.eps, name="norm2", **kw)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TokenMerger(nn.Module):
    """``causal_encoder``: features [B,N,C] + keep [B,N] -> merged [B,N,C] (after the final norm)."""

    depth: int
    heads: int
    mlp_ratio: float
    eps: float = 1e-5
    softmax_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, keep):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x_origin = LayerNorm(self.eps, name="ln_vision", **kw)(x)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        for i in range(self.depth):
            x = MergerBlock(self.heads, hidden, self.eps, self.softmax_eps, name=f"blocks_{i}", **kw)(
                x, x_origin, keep)
        return LayerNorm(self.eps, name="norm", **kw)(x)


def keep_decisions(logprob, mode: str = "argmax", rng=None):
    """Keep decisions [B,N] float32 in {0,1} from selector log-probs [B,N,2] (column 0 = keep).

    mode 'argmax': keep where log p(keep) >= log p(drop) (deterministic).
    mode 'gumbel': a hard Gumbel-softmax sample (tau 1) as the reference draws, with ``rng``; the
    value is exactly 0/1 and the gradient is the straight-through soft sample's.
    """
    if mode == "argmax":
        return (logprob[..., 0] >= logprob[..., 1]).astype(jnp.float32)
    if mode == "gumbel":
        if rng is None:
            raise ValueError("keep mode 'gumbel' needs an rng key")
        y = logprob + jax.random.gumbel(rng, logprob.shape, jnp.float32)
        soft = jax.nn.softmax(y, axis=-1)[..., 0]
        hard = (jnp.argmax(y, axis=-1) == 0).astype(jnp.float32)
        return hard + (soft - jax.lax.stop_gradient(soft))  # exactly 0/1, straight-through gradient
    raise ValueError(f"keep mode {mode!r}: expected 'argmax' or 'gumbel'")


def compact(x, keep):
    """Moves kept rows to the front in original order and zeroes the rest.

    x [B,N,...], keep [B,N] (0/1) -> (x_compact [B,N,...], lengths [B] int32).
    """
    keep_b = keep > 0.5
    order = jnp.argsort(jnp.logical_not(keep_b).astype(jnp.int32), axis=1, stable=True)
    lengths = jnp.sum(keep_b, axis=1).astype(jnp.int32)
    gathered = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    return jnp.where(valid, gathered, jnp.zeros_like(gathered)), lengths


def to_llm_ids(codes, lengths, *, code_offset=32002, add_special=False, image_start_id=32000,
               image_end_id=32001, pad_id=0):
    """codes [B,N] + lengths [B] -> (ids [B, N (+2)], lengths [B] (+2)): code + offset, padded with pad_id.

    With ``add_special`` each row is [IMG] ids [/IMG] then padding.
    """
    b, n = codes.shape
    pos = jnp.arange(n)[None, :]
    ids = jnp.where(pos < lengths[:, None], codes + code_offset, pad_id).astype(jnp.int32)
    if not add_special:
        return ids, lengths
    ids = jnp.concatenate([jnp.full((b, 1), image_start_id, jnp.int32), ids,
                           jnp.full((b, 1), pad_id, jnp.int32)], axis=1)
    pos = jnp.arange(n + 2)[None, :]
    ids = jnp.where(pos == lengths[:, None] + 1, image_end_id, ids)
    return ids, lengths + 2


class DynamicVisualTokenizer(nn.Module):
    """Image -> kept features, codes and LLM ids. Submodule names follow the released checkpoint.

    ``__call__(pixels, decisions=None, mode='argmax', rng=None)`` returns a dict with every
    intermediate (see the module docstring); ``decisions`` [B,N] overrides the selector's choice.
    """

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.encoder = EvaViT(cfg.image_size, cfg.patch_size, cfg.eva_width, cfg.eva_depth, cfg.eva_heads,
                              cfg.eva_mlp_ratio, cfg.eva_layernorm_eps, attention_impl=cfg.attention_impl,
                              remat=cfg.remat, **kw)
        self.token_predictor = TokenSelector(cfg.width, cfg.tokenizer_layernorm_eps, param_dtype=param_dtype)
        self.causal_encoder = TokenMerger(cfg.merger_depth, cfg.heads, cfg.mlp_ratio, cfg.tokenizer_layernorm_eps,
                                          cfg.masked_softmax_eps, **kw)
        self.quantize = Codebook(cfg.n_code, cfg.code_dim, param_dtype=param_dtype)
        self.encode_task_layer_0 = dense(cfg.width, ("embed", "mlp"), **kw)
        self.encode_task_layer_2 = dense(cfg.code_dim, ("mlp", "code_dim"), dtype=jnp.float32,
                                         param_dtype=param_dtype)
        self.vit_proj = dense(cfg.llm_embed_dim, ("embed", "mlp"), **kw)

    def encode(self, pixels):
        """pixels [B,H,W,3] -> patch features [B,N,C] (CLS dropped)."""
        return self.encoder(pixels)[:, 1:]

    def select(self, features, mode="argmax", rng=None):
        """features [B,N,C] -> (log-probs [B,N,2], keep [B,N]) with all tokens as the policy."""
        logprob = self.token_predictor(features, jnp.ones(features.shape[:2], jnp.float32))
        return logprob, keep_decisions(logprob, mode, rng)

    def to_codes(self, kept):
        """kept features [...,C] -> (to_quantizer [...,d] float32, quantized [...,d], codes [...])."""
        h = jnp.tanh(self.encode_task_layer_0(kept))
        z = self.encode_task_layer_2(h.astype(jnp.float32))
        quantized, codes = self.quantize(z)
        return z, quantized, codes

    def __call__(self, pixels, decisions=None, mode="argmax", rng=None, with_llm_features=True):
        eva = self.encoder(pixels)
        features = eva[:, 1:]
        logprob, keep = self.select(features, mode, rng)
        if decisions is not None:
            keep = decisions.astype(jnp.float32)
        merged = self.causal_encoder(features, keep)
        kept, lengths = compact(merged, keep)
        to_quantizer, quantized, codes = self.to_codes(kept)
        valid = jnp.arange(codes.shape[1])[None, :] < lengths[:, None]
        out = dict(
            eva_features=eva, selector_logprob=logprob, keep=keep, merged=merged, kept_features=kept,
            lengths=lengths, to_quantizer=to_quantizer, quantized=quantized * valid[..., None],
            codes=jnp.where(valid, codes, 0),
        )
        if with_llm_features:
            llm = self.vit_proj(merged)
            out["llm_features"] = llm
            out["kept_llm_features"] = compact(llm, keep)[0]
        return out

    def understanding_features(self, pixels, mode="argmax", rng=None):
        """pixels -> (continuous LLM inputs [B,N,llm_embed_dim] compacted, lengths [B])."""
        features = self.encode(pixels)
        _, keep = self.select(features, mode, rng)
        return compact(self.vit_proj(self.causal_encoder(features, keep)), keep)

    def tokenize(self, pixels, mode="argmax", rng=None, decisions=None):
        """pixels -> (codes [B,N] int32 padded with 0, lengths [B])."""
        out = self(pixels, decisions=decisions, mode=mode, rng=rng, with_llm_features=False)
        return out["codes"], out["lengths"]


# ----------------------------------------------------------------------------------------------
# Loading the released ``visual_tokenizer/`` files.

VISUAL_TOKENIZER_FILES = {
    "encoder": "eva_vitg_psz14.bin",
    "tokenizer": "tokenizer_encoder.bin",
    "lowres_decoder": "tokenizer_decoder.bin",
    "highres_decoder": "highres_tokenizer_decoder.bin",
}

_FLAT_ATTENTION = ("token_causal_attn", "token_cross_attn", "patch_embed")


def torch_key_to_flax(key: str, ndim: int):
    """Maps a reference key to (flax path, transform). ``blocks.3.x`` -> ``blocks_3/x``, Linear
    ``weight`` -> transposed ``kernel``, LayerNorm ``weight`` -> ``scale``, Conv -> HWIO ``kernel``."""
    from lavit_jax.convert import torch_io as weights

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
        return tuple(parts[:-1]), weights.identity
    if leaf == "weight":
        if ndim == 1:
            return tuple(parts[:-1]) + ("scale",), weights.identity
        if ndim == 2:
            return tuple(parts[:-1]) + ("kernel",), weights.linear_t
        return tuple(parts[:-1]) + ("kernel",), weights.conv_t
    return tuple(parts), weights.identity


def released_key_rule(state_dict, prefix=(), ignore=()):
    """An ``assign_params`` rule for reference keys (via ``torch_key_to_flax``); ``ignore`` skips prefixes."""

    def rule(key):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            return None
        path, transform = torch_key_to_flax(key, state_dict[key].ndim)
        return tuple(prefix) + path, transform

    return rule


def _np_dtype(dtype):
    import numpy as np

    if dtype is None:
        return np.float32
    return jnp.dtype(dtype)


def tokenizer_param_shapes(config):
    """Flat {flax path: shape} of the DynamicVisualTokenizer params (no compute)."""
    from lavit_jax.convert import torch_io as weights

    model = DynamicVisualTokenizer(config)
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda p: model.init(jax.random.key(0), p), x)["params"]
    return weights.param_shapes(shapes)


def decoder_param_shapes(config, highres: bool):
    from lavit_jax.convert import torch_io as weights

    n = (config.image_size // config.patch_size) ** 2
    model = TokenDecoder(config, highres)
    codes = jax.ShapeDtypeStruct((1, n, config.code_dim), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda c, l: model.init(jax.random.key(0), c, l), codes, lengths)["params"]
    return weights.param_shapes(shapes)


def load_visual_tokenizer(ckpt_dir, config, dtype=None, understanding_weights=None):
    """Flax params of DynamicVisualTokenizer from a released ``visual_tokenizer/`` directory.

    ``ckpt_dir`` is the checkpoint root or its ``visual_tokenizer`` folder. Reads
    ``eva_vitg_psz14.bin`` (its unused ``norm.*``/``head.*`` skipped) and ``tokenizer_encoder.bin``;
    ``understanding_weights`` (``language_model/visual_weight.bin``) is laid over the latter, as the
    reference's non-strict load does. All key/shape problems of a file are reported together.
    """
    import os

    from lavit_jax.convert import torch_io as weights

    vt_dir = _visual_tokenizer_dir(ckpt_dir)
    shapes = tokenizer_param_shapes(config)
    enc_shapes = {k[1:]: v for k, v in shapes.items() if k[0] == "encoder"}
    rest_shapes = {k: v for k, v in shapes.items() if k[0] != "encoder"}
    np_dtype = _np_dtype(dtype)

    enc_path = os.path.join(vt_dir, VISUAL_TOKENIZER_FILES["encoder"])
    enc_sd = weights.load_torch_file(enc_path)
    enc = weights.assign_params(enc_sd, released_key_rule(enc_sd, ignore=("norm", "head")), enc_shapes,
                                source=enc_path, dtype=np_dtype)
    del enc_sd
    tok_path = os.path.join(vt_dir, VISUAL_TOKENIZER_FILES["tokenizer"])
    tok_sd = weights.load_torch_file(tok_path)
    if understanding_weights is not None:
        over = weights.load_torch_file(understanding_weights)
        bad = sorted(k for k in over if k not in tok_sd)
        if bad:
            raise weights.WeightMismatchError(
                f"checkpoint {understanding_weights}: keys not in {VISUAL_TOKENIZER_FILES['tokenizer']}: "
                + ", ".join(bad))
        tok_sd.update(over)
    rest = weights.assign_params(tok_sd, released_key_rule(tok_sd), rest_shapes, source=tok_path, dtype=np_dtype)
    rest["encoder"] = enc
    return rest


def load_token_decoder(path, config, highres: bool, dtype=None):
    """Flax params of TokenDecoder from ``tokenizer_decoder.bin`` / ``highres_tokenizer_decoder.bin``."""
    from lavit_jax.convert import torch_io as weights

    sd = weights.load_torch_file(path)
    return weights.assign_params(sd, released_key_rule(sd), decoder_param_shapes(config, highres), source=str(path),
                                 dtype=_np_dtype(dtype))


def _visual_tokenizer_dir(ckpt_dir):
    import os

    ckpt_dir = os.fspath(ckpt_dir)
    sub = os.path.join(ckpt_dir, "visual_tokenizer")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(ckpt_dir, VISUAL_TOKENIZER_FILES["tokenizer"])):
        return ckpt_dir
    raise FileNotFoundError(f"{ckpt_dir}: no visual_tokenizer/ directory with the released tokenizer files")


# ----------------------------------------------------------------------------------------------
# A small stateful front end: params + compiled functions.


class VisualTokenizer:
    """Images -> LLM ids / understanding features, and ids -> diffusion condition, compiled once.

    ``params`` are DynamicVisualTokenizer params; ``decoder_params`` maps 'lowres'/'highres' to
    TokenDecoder params. With a ``mesh``, the batch is sharded over the data axes and the params
    are replicated (the tokenizer is small next to the LLM).
    """

    def __init__(self, config, params, decoder_params=None, mesh=None):
        from lavit_jax.ops import sharding

        self.config = config
        self.model = DynamicVisualTokenizer(config)
        self.mesh = mesh
        if mesh is not None:
            params = jax.device_put(params, sharding.replicated(mesh))
        self.params = params
        self.decoder_params = dict(decoder_params or {})
        self._tokenize = jax.jit(self._tokenize_impl, static_argnames=("mode", "add_special"))
        self._features = jax.jit(self._features_impl, static_argnames=("mode",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("highres",))

    @classmethod
    def from_released(cls, ckpt_dir, config, dtype=None, decoders=("lowres", "highres"), mesh=None,
                      understanding_weights=None):
        """Loads the released ``visual_tokenizer/`` files (decoders that are present)."""
        import os

        vt = _visual_tokenizer_dir(ckpt_dir)
        params = load_visual_tokenizer(vt, config, dtype, understanding_weights)
        dec = {}
        for name in decoders:
            path = os.path.join(vt, VISUAL_TOKENIZER_FILES[f"{name}_decoder"])
            if os.path.isfile(path):
                dec[name] = load_token_decoder(path, config, name == "highres", dtype)
        return cls(config, params, dec, mesh)

    def _shard_batch(self, x):
        from lavit_jax.ops import sharding

        if self.mesh is None:
            return x
        return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

    def _tokenize_impl(self, params, pixels, rng, mode, add_special):
        codes, lengths = self.model.apply({"params": params}, pixels, mode=mode, rng=rng, method="tokenize")
        c = self.config
        return to_llm_ids(codes, lengths, code_offset=c.code_offset, add_special=add_special,
                          image_start_id=c.image_start_id, image_end_id=c.image_end_id)

    def _features_impl(self, params, pixels, rng, mode):
        return self.model.apply({"params": params}, pixels, mode=mode, rng=rng, method="understanding_features")

    def _decode_impl(self, params, codes, lengths, highres):
        return TokenDecoder(self.config, highres).apply({"params": params}, codes, lengths)

    def preprocess(self, images):
        from lavit_jax.data.image_io import preprocess

        return preprocess(images, self.config.image_size)

    def tokenize(self, images, *, add_special=False, mode=None, seed=0):
        """Images (path / PIL / array, or a list) -> (ids [B, N(+2)] int32 padded with 0, lengths [B])."""
        mode = mode or self.config.keep_mode
        pixels = self._shard_batch(jnp.asarray(self.preprocess(images)))
        return self._tokenize(self.params, pixels, jax.random.key(seed), mode, add_special)

    def understanding_features(self, images, *, mode=None, seed=0):
        """Images -> (LLM-space features [B, N, llm_embed_dim] compacted, lengths [B])."""
        mode = mode or self.config.keep_mode
        pixels = self._shard_batch(jnp.asarray(self.preprocess(images)))
        return self._features(self.params, pixels, jax.random.key(seed), mode)

    def ids_to_codes(self, ids, lengths):
        """LLM ids [B, N] (code + offset; no [IMG]/[/IMG]) -> codebook vectors [B, N, code_dim]."""
        from lavit_jax.models.codebook import lookup

        codes = jnp.clip(jnp.asarray(ids) - self.config.code_offset, 0, self.config.n_code - 1)
        valid = jnp.arange(codes.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        return lookup(self.params["quantize"]["embedding"], codes) * valid[..., None]

    def decode_condition(self, ids, lengths, highres=False):
        """LLM ids [B, N] + lengths -> low-res condition, or (prompt_embeds, pooled) for high-res."""
        name = "highres" if highres else "lowres"
        if name not in self.decoder_params:
            raise ValueError(f"no {name} token decoder loaded ({VISUAL_TOKENIZER_FILES[name + '_decoder']})")
        codes = self.ids_to_codes(ids, lengths)
        return self._decode(self.decoder_params[name], codes, jnp.asarray(lengths, jnp.int32), highres)


def config_from_fixture(path):
    """Tokenizer config from a parity fixture's ``config.json`` (the small widths it records)."""
    import json

    from configs.lavit_7b import tokenizer_config

    with open(path) as f:
        j = json.load(f)
    c = tokenizer_config()
    try:
        c.image_size, c.patch_size = j["image_size"], j["patch_size"]
        c.eva_width = c.width = j["width"]
        c.eva_depth = c.merger_depth = c.decoder_depth = j["depth"]
        c.eva_heads = c.heads = j["heads"]
        c.eva_mlp_ratio = c.mlp_ratio = j["mlp_ratio"]
        c.eva_layernorm_eps = j.get("eva_layernorm_eps", c.eva_layernorm_eps)
        c.tokenizer_layernorm_eps = j.get("tokenizer_layernorm_eps", c.tokenizer_layernorm_eps)
        c.n_code, c.code_dim = j["n_code"], j["code_dim"]
        c.llm_embed_dim, c.decoder_out_dim = j["llm_embed_dim"], j["decoder_out_dim"]
        c.unet_dim_lowres = j["unet_dim_lowres"]
        c.unet_dims_highres = tuple(j["unet_dims_highres"])
        c.pooled_dim = j["pooled_dim"]
    except KeyError as e:
        raise KeyError(f"{path}: missing field {e}") from e
    return c


def load_converted(ckpt_dir, mesh=None) -> VisualTokenizer:
    """A VisualTokenizer from a directory written by ``tools/convert_torch_weights.py``."""
    import os

    from lavit_jax import checkpoint

    manifest = checkpoint.read_manifest(ckpt_dir)
    part = manifest["parts"].get("visual_tokenizer")
    if part is None:
        raise FileNotFoundError(f"{ckpt_dir}: the converted checkpoint has no visual_tokenizer part")
    config = ml_collections.ConfigDict(part["config"])
    config.unet_dims_highres = tuple(config.unet_dims_highres)
    root = os.path.join(ckpt_dir, "visual_tokenizer")
    params = checkpoint.load_tree(os.path.join(root, "tokenizer"))
    dec = {name: checkpoint.load_tree(os.path.join(root, f"{name}_decoder"))
           for name in ("lowres", "highres") if f"{name}_decoder" in part["files"]}
    return VisualTokenizer(config, params, dec, mesh)
