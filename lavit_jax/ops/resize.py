"""PyTorch-exact resizes of the trailing spatial axes: bicubic and legacy nearest.

``resize_bicubic(x, (h, w))`` is ``F.interpolate(x, (h, w), mode="bicubic", align_corners=False)``
without antialias: Keys' cubic with a = -0.75, source index ``scale * (dst + 0.5) - 0.5`` and
out-of-range taps clamped to the border. ``resize_nearest(x, size)`` is torch's legacy 'nearest'
(src = floor(dst * in / out), with the exact copy / halving shortcuts torch takes for 1x and 2x).

Indices and weights are static (numpy, float32, computed once per size pair exactly as torch's CPU
kernel computes them, fused multiply-adds included). Applying them:
- numpy input -> numpy, with the products and sums rounded as torch's CPU kernel rounds them
  (each tap sum is one fused multiply-add, emulated exactly), so results are bit-identical;
- jax input -> jax (jit-able): the same expression, in whatever dtype comes in (computed in float32
  for half types); XLA's own multiply-add fusion decides the last ulp. Under ``jax.jit`` on CPU it
  fuses as torch does; elsewhere expect differences of an ulp or so.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75

_f32 = np.float32


def _fma32(a, b, c):
    """Correctly rounded float32 ``a * b + c`` (numpy, elementwise).

    The product is exact in float64; the float64 sum is made round-to-odd (the TwoSum error picks
    the odd neighbour when inexact), so the final rounding to float32 is a single correct rounding.
    """
    a64 = np.asarray(a, np.float64)
    p = a64 * np.asarray(b, np.float64)
    c64 = np.asarray(c, np.float64)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    s = np.asarray(s)
    with np.errstate(invalid="ignore"):
        fix = np.isfinite(s) & (err != 0) & ((s.view(np.int64) & 1) == 0)
    if np.any(fix):
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _scale(in_size: int, out_size: int, scale: float | None) -> np.float32:
    """torch's area_pixel_compute_scale (align_corners=False) in float32."""
    if scale is not None and scale > 0:
        return _f32(1.0 / scale)
    return _f32(in_size) / _f32(out_size)


def _cubic1(x):
    """(A+2)|x|^3 - (A+3)|x|^2 + 1 for |x| <= 1, evaluated as torch's CPU build does."""
    a = _f32(CUBIC_A)
    p = _fma32(a + _f32(2), x, -(a + _f32(3)))
    return (p * x) * x + _f32(1)


def _cubic2(x):
    """A|x|^3 - 5A|x|^2 + 8A|x| - 4A for 1 < |x| < 2, evaluated as torch's CPU build does."""
    a = _f32(CUBIC_A)
    p = _fma32(a, x, -(_f32(5) * a))
    p = _fma32(p, x, _f32(8) * a)
    return p * x - _f32(4) * a


@functools.lru_cache(maxsize=256)
def bicubic_indices_weights(in_size: int, out_size: int, scale: float | None = None):
    """Source taps and weights of one axis: (indices [out, 4] int32, weights [out, 4] float32).

    ``scale`` is torch's ``scale_factor`` for the axis (None: derived from the sizes, as when
    ``F.interpolate`` gets ``size``). Indices are already clamped to [0, in_size - 1].
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize: sizes must be positive, got {in_size} -> {out_size}")
    s = _scale(in_size, out_size, scale)
    dst = np.arange(out_size, dtype=np.float32)
    real = _fma32(s, dst + _f32(0.5), _f32(-0.5))
    idx = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam = np.clip(real - idx.astype(np.float32), _f32(0), _f32(1)).astype(np.float32)
    inv = (_f32(1) - lam).astype(np.float32)
    w = np.stack([_cubic2(lam + _f32(1)), _cubic1(lam), _cubic1(inv), _cubic2(inv + _f32(1))], axis=1)
    taps = np.clip(idx[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1).astype(np.int32)
    taps.setflags(write=False)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return taps, w


def _interp_axis_np(x: np.ndarray, axis: int, taps, w) -> np.ndarray:
    """out = fma(x3, w3, fma(x2, w2, fma(x0, w0, x1 * w1))) along ``axis`` (torch's CPU rounding)."""
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    g = [np.take(x, taps[:, k], axis=axis) for k in range(4)]
    wk = [w[:, k].reshape(shape) for k in range(4)]
    out = _fma32(g[0], wk[0], g[1] * wk[1])
    out = _fma32(g[2], wk[2], out)
    return _fma32(g[3], wk[3], out)


def _interp_axis_jnp(x, axis: int, taps, w):
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    g = [jnp.take(x, jnp.asarray(taps[:, k]), axis=axis) for k in range(4)]
    wk = [jnp.asarray(w[:, k].reshape(shape), x.dtype) for k in range(4)]
    return ((g[0] * wk[0] + g[1] * wk[1]) + g[2] * wk[2]) + g[3] * wk[3]


def _check_size(x, size: Sequence[int], what: str):
    if len(size) != 2 or x.ndim < 2:
        raise ValueError(f"{what}: expected x [..., H, W] and size (h, w), got x {tuple(x.shape)} and size {size}")


def resize_bicubic(x, size: Sequence[int], scales: Sequence[float | None] | None = None):
    """torch bicubic (a = -0.75, align_corners=False, no antialias) of x [..., H, W] -> [..., h, w].

    numpy in -> numpy float32 out (bit-identical to torch on CPU); jax in -> jax out (jit-able), same
    dtype as the input (half types computed in float32).
    """
    _check_size(x, size, "resize_bicubic")
    h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
    h_out, w_out = int(size[0]), int(size[1])
    sh, sw = (None, None) if scales is None else scales
    th, wh = bicubic_indices_weights(h_in, h_out, sh)
    tw, ww = bicubic_indices_weights(w_in, w_out, sw)
    if isinstance(x, jax.Array):
        dtype = x.dtype
        xf = x.astype(jnp.float32) if dtype in (jnp.bfloat16, jnp.float16) else x
        out = _interp_axis_jnp(_interp_axis_jnp(xf, x.ndim - 1, tw, ww), x.ndim - 2, th, wh)
        return out.astype(dtype)
    xf = np.asarray(x, np.float32)
    return _interp_axis_np(_interp_axis_np(xf, xf.ndim - 1, tw, ww), xf.ndim - 2, th, wh)


@functools.lru_cache(maxsize=256)
def nearest_indices(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """torch legacy 'nearest' source indices of one axis: [out] int32.

    Equal sizes copy, doubling halves the index (torch's shortcuts), otherwise
    min(floor(dst * s), in - 1) with s = in / out (or 1 / scale_factor) in float32.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"nearest resize: sizes must be positive, got {in_size} -> {out_size}")
    dst = np.arange(out_size)
    if out_size == in_size:
        idx = dst
    elif out_size == 2 * in_size:
        idx = dst >> 1
    else:
        s = _scale(in_size, out_size, scale)
        idx = np.minimum(np.floor(dst.astype(np.float32) * s).astype(np.int64), in_size - 1)
    idx = idx.astype(np.int32)
    idx.setflags(write=False)
    return idx


def resize_nearest(x, size: Sequence[int], scales: Sequence[float | None] | None = None,
                   axes: Sequence[int] | None = None):
    """torch legacy nearest resize of the axes ``axes`` (default: the last ``len(size)``) to ``size``.

    ``scales`` are torch's ``scale_factor`` per axis (None: from the sizes). numpy or jax in, same out.
    """
    size = tuple(int(s) for s in size)
    if axes is None:
        axes = tuple(range(x.ndim - len(size), x.ndim))
    axes = tuple(a % x.ndim for a in axes)
    if len(axes) != len(size) or len(size) == 0:
        raise ValueError(f"resize_nearest: size {size} does not match axes {axes} of x {tuple(x.shape)}")
    scales = (None,) * len(size) if scales is None else tuple(scales)
    take = jnp.take if isinstance(x, jax.Array) else np.take
    for axis, out, s in zip(axes, size, scales):
        if x.shape[axis] != out:
            x = take(x, nearest_indices(int(x.shape[axis]), out, s), axis=axis)
    return x


def upsample_nearest(x, factors: Sequence[int], axes: Sequence[int]):
    """``F.interpolate(x, scale_factor=factors, mode='nearest')`` on ``axes``: integer factors repeat."""
    size = [int(x.shape[a]) * int(f) for a, f in zip(axes, factors)]
    return resize_nearest(x, size, scales=[float(f) for f in factors], axes=axes)
