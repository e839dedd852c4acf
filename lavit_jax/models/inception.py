"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as pytorch-fid and torch-fidelity port it) in Flax, NHWC.

The network FID is defined with, not torchvision's Inception-v3: the average pools of the A, C and first E
blocks leave the zero padding out of their means, the last E block max-pools its pool branch, the classifier
has 1008 classes, and BatchNorm uses eps 1e-3. Inference only: the BatchNorm statistics are parameters
(``bn/{scale, bias, mean, var}``), never updated.

Input: images [B, 299, 299, 3] in [0, 255] (``tf1_resize_bilinear`` brings any size there as the TF graph
does); they are scaled to [-1, 1] inside. Output: the pool3 features [B, 2048] that FID uses, or also the
logits [B, 1008]. Module names follow the PyTorch keys (``Mixed_5b/branch1x1/conv``), so the weight file of
pytorch-fid / torch-fidelity maps one to one (``lavit_jax/convert/inception.py``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lavit_jax.ops.layers import dense

INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008
BN_EPS = 1e-3


def tf1_resize_bilinear(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """[H, W, C] (any real dtype, 0..255) -> float32 [size, size, C]: TensorFlow 1.x ``resize_bilinear`` with
    ``align_corners=False`` (source = dest * in / out, no half-pixel shift), in float32 with torch-fidelity's
    order of operations. Runs on the host, so images of any size share one compiled network."""
    x = np.asarray(image, np.float32)
    if x.ndim != 3:
        raise ValueError(f"image: expected [H, W, C], got shape {x.shape}")

    def axis(n_in):
        grid = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = grid.astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), grid - lo.astype(np.float32)

    (ylo, yhi, dy), (xlo, xhi, dx) = axis(x.shape[0]), axis(x.shape[1])
    dx = dx[None, :, None]
    top = x[ylo][:, xlo] + (x[ylo][:, xhi] - x[ylo][:, xlo]) * dx
    bottom = x[yhi][:, xlo] + (x[yhi][:, xhi] - x[yhi][:, xlo]) * dx
    return top + (bottom - top) * dy[:, None, None]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with its running statistics as parameters: (x - mean) / sqrt(var + eps) * scale + bias, [..., C]."""

    features: int

    @nn.compact
    def __call__(self, x):
        p = {n: self.param(n, nn.with_logical_partitioning(init, ("conv_out",)), (self.features,))
             for n, init in (("scale", nn.initializers.ones), ("bias", nn.initializers.zeros),
                             ("mean", nn.initializers.zeros), ("var", nn.initializers.ones))}
        inv = p["scale"] / jnp.sqrt(p["var"] + BN_EPS)
        return (x - p["mean"].astype(x.dtype)) * inv.astype(x.dtype) + p["bias"].astype(x.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (running statistics) -> ReLU. [B, H, W, I] -> [B, H', W', O]."""

    features: int
    kernel: int | tuple[int, int] = 1
    stride: int = 1
    padding: int | tuple[int, int] = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        (ph, pw) = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=(self.stride,) * 2, padding=((ph, ph), (pw, pw)),
                    use_bias=False, dtype=self.dtype, name="conv",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ("conv_h", "conv_w", "conv_in", "conv_out")))(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_same(x):
    """3x3 stride-1 average over the window's in-image pixels (TF's pool; torch ``count_include_pad=False``)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(64, name="branch1x1")(x)
        b5 = c(64, 5, 2, name="branch5x5_2")(c(48, name="branch5x5_1")(x))
        b3 = c(96, 3, 1, name="branch3x3dbl_3")(c(96, 3, 1, name="branch3x3dbl_2")(c(64, name="branch3x3dbl_1")(x)))
        bp = c(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, dtype=self.dtype, name="branch3x3")(x)
        d = BasicConv2d(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
        d = BasicConv2d(96, 3, padding=1, dtype=self.dtype, name="branch3x3dbl_2")(d)
        d = BasicConv2d(96, 3, stride=2, dtype=self.dtype, name="branch3x3dbl_3")(d)
        return jnp.concatenate([b3, d, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        c = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, *row, name="branch7x7_2")(b7)
        b7 = c(192, *col, name="branch7x7_3")(b7)
        d = c(c7, name="branch7x7dbl_1")(x)
        for i, (f, kp) in enumerate(((c7, col), (c7, row), (c7, col), (192, row)), start=2):
            d = c(f, *kp, name=f"branch7x7dbl_{i}")(d)
        bp = c(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, d, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=1, p=0, s=1, name=None: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = c(320, 3, s=2, name="branch3x3_2")(c(192, name="branch3x3_1")(x))
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), (0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), (3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, 3, s=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """``max_pool``: the last block of the TF graph max-pools its pool branch (the first averages)."""

    max_pool: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda f, k=1, p=0, name=None: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)], axis=-1)
        d = c(384, 3, 1, name="branch3x3dbl_2")(c(448, name="branch3x3dbl_1")(x))
        d = jnp.concatenate([c(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(d),
                             c(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(d)], axis=-1)
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool_same(x)
        bp = c(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, d, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """images [B, 299, 299, 3] in [0, 255] -> pool3 features [B, 2048] (``with_logits``: and logits [B, 1008])."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, with_logits: bool = False):
        if images.shape[-3:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"images: expected [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] (tf1_resize_bilinear first), "
                             f"got {images.shape}")
        d = self.dtype
        x = ((images.astype(jnp.float32) - 128.0) / 128.0).astype(d)
        x = BasicConv2d(32, 3, stride=2, dtype=d, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, dtype=d, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, dtype=d, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv2d(80, 1, dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, dtype=d, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)  # [B, 35, 35, 192]
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pf, dtype=d, name=name)(x)
        x = InceptionB(dtype=d, name="Mixed_6a")(x)  # [B, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, dtype=d, name=name)(x)
        x = InceptionD(dtype=d, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE(dtype=d, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, dtype=d, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not with_logits:
            return features
        return features, dense(CLASSES, ("embed", "vocab"), name="fc")(features)
