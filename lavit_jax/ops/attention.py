"""One attention op with backends.

``dot_product_attention(q, k, v, ...)`` takes q [B, T, H, D] and k, v [B, S, K, D] with H a
multiple of K (grouped-query attention), and returns [B, T, H, D].

Backends (``implementation``):
- ``"xla"``: plain einsum + softmax in float32; the reference path, used on CPU and in tests.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused flash attention on
  NVIDIA GPUs; bf16/fp16 only).
- ``"splash"``: Pallas splash attention on TPU (causal or full, no arbitrary bias). Off TPU the same
  kernel runs in Pallas interpret mode (slow; it lets CPU tests check the kernel's call shapes).
- ``"auto"`` / ``None``: cudnn on GPU for half precision, splash on TPU where the shapes allow,
  xla otherwise.

Segment ids (packed sequences): ``q_segment_ids`` [B, T] and ``kv_segment_ids`` [B, S] (integers; a
query attends only to keys with the same id; id 0 is padding by convention and pads attend to pads).
splash takes them natively (``SegmentIds``); xla, cudnn and jax AND them into the boolean mask
(``jax.nn.dot_product_attention`` has no segment ids, and its sequence lengths express only a single
leading segment per row, with other semantics for the padded query rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite: fully masked rows give a uniform distribution, not NaN.


def segment_mask(q_segment_ids, kv_segment_ids):
    """q_segment_ids [B, T], kv_segment_ids [B, S] -> boolean mask [B, 1, T, S] (True = same segment)."""
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def _check_segment_ids(q, k, q_segment_ids, kv_segment_ids):
    """Fills in the missing one of the pair for self-attention and checks shapes."""
    if q_segment_ids is None and kv_segment_ids is None:
        return None, None
    if q_segment_ids is None or kv_segment_ids is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                "q_segment_ids / kv_segment_ids: give both when query length "
                f"{q.shape[1]} != key length {k.shape[1]}"
            )
        q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
        kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q_segment_ids = jnp.asarray(q_segment_ids)
    kv_segment_ids = jnp.asarray(kv_segment_ids)
    for name, ids, ref in (("q_segment_ids", q_segment_ids, q), ("kv_segment_ids", kv_segment_ids, k)):
        if ids.shape != ref.shape[:2]:
            raise ValueError(f"{name} has shape {ids.shape}, expected [batch, length] = {ref.shape[:2]}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got {ids.dtype}")
    return q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def _and_masks(mask, extra):
    return extra if mask is None else jnp.logical_and(mask, extra)


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

def _splash_attention(q, k, v, is_causal, scale, q_segment_ids=None, kv_segment_ids=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    s = k.shape[1]
    # offset s - t: the causal diagonal is aligned to the end, as in the xla path.
    head_mask = sm.CausalMask((t, s), offset=s - t) if is_causal else sm.FullMask((t, s))
    mask = sm.MultiHeadMask([head_mask for _ in range(h)])
    interpret = jax.default_backend() != "tpu"
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    kh = k.shape[2]
    if kh != h:
        k = jnp.repeat(k, h // kh, axis=2)
        v = jnp.repeat(v, h // kh, axis=2)
    qt = jnp.swapaxes(q * scale, 1, 2)
    kt = jnp.swapaxes(k, 1, 2)
    vt = jnp.swapaxes(v, 1, 2)
    if q_segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        out = jax.vmap(lambda q_, k_, v_, qs, ks: kernel(q_, k_, v_, sk.SegmentIds(q=qs, kv=ks)))(
            qt, kt, vt, q_segment_ids, kv_segment_ids
        )
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
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """Scaled dot-product attention. q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D].

    bias: additive, broadcastable to [B, H, T, S]. mask: boolean (True = attend), broadcastable to
    [B, H, T, S]. ``is_causal`` aligns the causal diagonal to the end (query i sees keys <= i + S - T).
    q_segment_ids [B, T] / kv_segment_ids [B, S]: integer segment ids, a query attends only to keys of
    its own segment (give one of them alone for self-attention, T == S). A query row with no key left
    to attend gets a uniform distribution on xla; splash requires every row to keep a key.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q_segment_ids, kv_segment_ids = _check_segment_ids(q, k, q_segment_ids, kv_segment_ids)
    impl = pick_implementation(implementation, q, k, bias, mask)
    if impl == "splash":
        if bias is not None or mask is not None:
            raise ValueError("splash attention takes no bias or mask; use implementation='xla'")
        return _splash_attention(q, k, v, is_causal, scale, q_segment_ids, kv_segment_ids)
    if q_segment_ids is not None:
        mask = _and_masks(mask, segment_mask(q_segment_ids, kv_segment_ids))
    if impl == "xla":
        return _xla_attention(q, k, v, bias, mask, is_causal, scale)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
        )
    if impl == "jax":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r} (xla, cudnn, splash, jax, auto)")

