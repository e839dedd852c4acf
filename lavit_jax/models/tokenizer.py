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

from lavit_jax import vocab
from lavit_jax.models.codebook import Codebook
from lavit_jax.models.eva_vit import EvaViT
from lavit_jax.ops.layers import LayerNorm, Mlp, dense, merge_heads, split_heads
from lavit_jax.ops.scan import apply_layers


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
    """``CausalFuserBlock``. x [B,N,C], x_origin [B,N,C], keep [B,N] float -> ([B,N,C], None).

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
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class TokenMerger(nn.Module):
    """``causal_encoder``: features [B,N,C] + keep [B,N] -> merged [B,N,C] (after the final norm)."""

    depth: int
    heads: int
    mlp_ratio: float
    eps: float = 1e-5
    softmax_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, x, keep):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x_origin = LayerNorm(self.eps, name="ln_vision", **kw)(x)
        hidden = int(x.shape[-1] * self.mlp_ratio)
        x, _ = apply_layers(MergerBlock, self.depth, "blocks", x, x_origin, keep.astype(jnp.float32),
                            scan=self.scan_layers, remat=self.remat,
                            block_args=(self.heads, hidden, self.eps, self.softmax_eps), block_kwargs=kw)
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


def to_llm_ids(codes, lengths, *, code_offset=vocab.VISUAL_OFFSET, add_special=False,
               image_start_id=vocab.IMG_START, image_end_id=vocab.IMG_END, pad_id=0):
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
                              remat=cfg.remat, scan_layers=cfg.scan_layers, **kw)
        self.token_predictor = TokenSelector(cfg.width, cfg.tokenizer_layernorm_eps, param_dtype=param_dtype)
        self.causal_encoder = TokenMerger(cfg.merger_depth, cfg.heads, cfg.mlp_ratio, cfg.tokenizer_layernorm_eps,
                                          cfg.masked_softmax_eps, remat=cfg.remat, scan_layers=cfg.scan_layers, **kw)
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


# (parent path, name) of the repeated layers: stacked on a leading axis when ``scan_layers``.
TOKENIZER_STACKS = ((("encoder",), "blocks"), (("causal_encoder",), "blocks"))
