"""One attention op with backends.

``dot_product_attention(q, k, v, ...)`` takes q [B, T, H, D] and k, v [B, S, K, D] with H a
multiple of K (grouped-query attention), and returns [B, T, H, D].

Backends (``implementation``):
- ``"xla"``: plain einsum + softmax in float32; the reference path, used on CPU and in tests.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on
  NVIDIA GPUs; bf16/fp16 only).
- ``"splash"``: Pallas splash attention on TPU (causal or full, no arbitrary bias).
- ``"auto"`` / ``None``: cudnn on GPU for half precision, splash on TPU where the shapes allow,
  xla otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite: fully masked rows give a uniform distribution, not NaN.

def _xla_attention(q, k, v, bias, mask, is_causal, scale):
    b, t, h, d = q.shape
    kh = k.shape[2]
    if h != kh:
        if h % kh:
            raise ValueError(f"query heads {h} are not a multiple of key/value heads {kh}")
        k = jnp.repeat(k, h // kh, axis=2)
        v = jnp.repeat(v, h // kh, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    s = k.shape[1]
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)

def _splash_attention(q, k, v, is_causal, scale):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    s = k.shape[1]
    mask_cls = sm.CausalMask if is_causal else sm.FullMask
    mask = sm.MultiHeadMask([mask_cls((t, s)) for _ in range(h)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    kh = k.shape[2]
    if kh != h:
        k = jnp.repeat(k, h // kh, axis=2)
        v = jnp.repeat(v, h // kh, axis=2)
    qt = jnp.swapaxes(q * scale, 1, 2)
    kt = jnp.swapaxes(k, 1, 2)
    vt = jnp.swapaxes(v, 1, 2)
    out = jax.vmap(kernel)(qt, kt, vt)
    return jnp.swapaxes(out, 1, 2)

def pick_implementation(implementation, q, k, bias, mask) -> str:
    if implementation not in (None, "auto"):
        return implementation
    platform = jax.default_backend()
    t, s = q.shape[1], k.shape[1]
    if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "tpu" and bias is None and mask is None and t % 128 == 0 and s % 128 == 0:
        return "splash"
    return "xla"

def dot_product_attention(
    q,
    k,
    v,
    *,
    bias=None,
    mask=None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
):
    """Scaled dot-product attention. q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D].

    bias: additive, broadcastable to [B, H, T, S]. mask: boolean (True = attend), broadcastable to
    [B, H, T, S]. ``is_causal`` aligns the causal diagonal to the end (query i sees keys <= i + S - T).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    impl = pick_implementation(implementation, q, k, bias, mask)
    if impl == "xla":
        return _xla_attention(q, k, v, bias, mask, is_causal, scale)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
        )
    if impl == "splash":
        if bias is not None or mask is not None:
            raise ValueError("splash attention takes no bias or mask; use implementation='xla'")
        return _splash_attention(q, k, v, is_causal, scale)
    if impl == "jax":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r} (xla, cudnn, splash, jax, auto)")

