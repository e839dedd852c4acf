"""Parity of lavit_jax.ops.resize with torch.nn.functional.interpolate on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavit_jax.ops import resize

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.parity

# (in H, W) -> (out h, w): the pipeline's sizes (pooled 90x120 motion -> tokenizer grid, tokenizer grid ->
# latent sizes and the 16x16 condition grid, keyframes to 224) plus odd up/down/mixed ratios.
SIZES = [
    ((6, 8), (20, 36)),
    ((20, 36), (8, 24)),
    ((20, 36), (16, 16)),
    ((8, 24), (16, 16)),
    ((90, 120), (224, 224)),
    ((7, 5), (3, 11)),
    ((33, 17), (10, 40)),
    ((1, 4), (3, 2)),
    ((5, 5), (5, 5)),
]


def _torch_bicubic(x, size):
    return F.interpolate(torch.from_numpy(x), size, mode="bicubic", align_corners=False).numpy()


@pytest.mark.parametrize("src,dst", SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
def test_bicubic_numpy_bit_exact(src, dst):
    x = (np.random.default_rng(0).standard_normal((2, 3) + src) * 7).astype(np.float32)
    ours = resize.resize_bicubic(x, dst)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _torch_bicubic(x, dst))


@pytest.mark.parametrize("src,dst", SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
def test_bicubic_jax_matches_torch(src, dst):
    x = (np.random.default_rng(1).standard_normal((2, 3) + src) * 7).astype(np.float32)
    ref = _torch_bicubic(x, dst)
    ours = np.asarray(jax.jit(lambda v: resize.resize_bicubic(v, dst))(jnp.asarray(x)))
    # a last-ulp difference is allowed where XLA fuses multiply-adds differently from torch's build
    np.testing.assert_allclose(ours, ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(ref).max())


def test_bicubic_leading_dims_and_bf16():
    x = np.random.default_rng(2).standard_normal((2, 4, 3, 6, 8)).astype(np.float32)
    ref = _torch_bicubic(x.reshape(8, 3, 6, 8), (20, 36)).reshape(2, 4, 3, 20, 36)
    np.testing.assert_array_equal(resize.resize_bicubic(x, (20, 36)), ref)
    out = resize.resize_bicubic(jnp.asarray(x, jnp.bfloat16), (20, 36))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 3, 20, 36)


@pytest.mark.parametrize("src,dst", [((6, 8), (20, 36)), ((20, 36), (8, 24)), ((5, 7), (10, 14)),
                                     ((16, 16), (5, 9)), ((3, 5), (3, 5)), ((4, 6), (13, 7))])
def test_nearest_legacy_matches_torch(src, dst):
    x = np.random.default_rng(3).standard_normal((2, 3) + src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), dst, mode="nearest").numpy()
    np.testing.assert_array_equal(resize.resize_nearest(x, dst), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: resize.resize_nearest(v, dst))(jnp.asarray(x))), ref)


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 1, 1), (1, 2, 2), (3, 1, 2)])
def test_nearest_scale_factor_3d_matches_torch(factors):
    x = np.random.default_rng(4).standard_normal((2, 3, 3, 5, 9)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), scale_factor=tuple(float(f) for f in factors), mode="nearest").numpy()
    np.testing.assert_array_equal(resize.upsample_nearest(x, factors, axes=(2, 3, 4)), ref)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="size"):
        resize.resize_bicubic(np.zeros((4, 4), np.float32), (0, 3))
    with pytest.raises(ValueError, match="expected x"):
        resize.resize_bicubic(np.zeros((4,), np.float32), (2, 2))
