"""Image input handling: formats, conversions and clear errors naming the input."""

import numpy as np
import pytest
from PIL import Image

from lavit_jax.data.image_io import CLIP_MEAN, CLIP_STD, ImageInputError, load_image, preprocess


def test_preprocess_matches_pil_bicubic_and_clip_norm(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    out = preprocess([path, arr, Image.fromarray(arr)])
    assert out.shape == (3, 224, 224, 3) and out.dtype == np.float32
    ref = np.asarray(Image.fromarray(arr).resize((224, 224), Image.BICUBIC), np.float32) / 255.0
    np.testing.assert_allclose(out[0], (ref - CLIP_MEAN) / CLIP_STD, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_grayscale_rgba_and_float_inputs():
    gray = Image.fromarray(np.full((10, 10), 128, np.uint8), "L")
    assert load_image(gray).mode == "RGB"
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    img = load_image(rgba)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 0, 0)
    f = load_image(np.full((4, 4, 3), 0.5, np.float32))
    assert f.getpixel((0, 0)) == (128, 128, 128)
    batch = preprocess(np.zeros((2, 8, 8, 3), np.uint8))
    assert batch.shape == (2, 224, 224, 3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: _write(d / "empty.png", b""), "empty"),
        (lambda d: _write(d / "text.png", b"hello"), "not a readable image"),
        (lambda d: _write(d / "trunc.png", _png_bytes()[:40]), "not a readable image"),
        (lambda d: d, "directory"),
        (lambda d: np.zeros((0, 5, 3), np.uint8), "empty"),
        (lambda d: np.zeros((5, 5, 7), np.uint8), "not an image array"),
        (lambda d: np.zeros((5, 5, 3), np.int64), "uint8"),
        (lambda d: 42, "not an image"),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, make, match):
    x = make(tmp_path)
    with pytest.raises(ImageInputError, match=match) as e:
        preprocess(x)
    if not isinstance(x, np.ndarray | int):
        assert str(x) in str(e.value)


def _write(path, data):
    path.write_bytes(data)
    return path


def _png_bytes():
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_prenormalised_arrays_pass_through_and_ambiguous_batches_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    ref = preprocess(img, 16)  # [1, 16, 16, 3]
    nchw = np.transpose(ref, (0, 3, 1, 2)).copy()  # what the reference's processor hands its methods
    np.testing.assert_array_equal(preprocess(nchw, 16), ref)
    np.testing.assert_array_equal(preprocess([nchw[0], img], 16), np.concatenate([ref, ref]))
    with pytest.raises(ImageInputError, match=r"expected \[B, 3, 16, 16\]"):
        preprocess(np.zeros((2, 3, 8, 8), np.float32), 16)
    with pytest.raises(ImageInputError, match="ambiguous"):
        preprocess(np.zeros((2, 3, 16, 3), np.float32), 16)
    with pytest.raises(ImageInputError, match="pre-normalised"):
        preprocess(np.zeros((3, 8, 8), np.float32), 16)  # channel first at another size
    bad = nchw[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ImageInputError, match="NaN"):
        preprocess(bad, 16)


def test_api_takes_a_prenormalised_batch_as_a_batch():
    from lavit_jax.inference.lavit import _as_list

    batch = np.zeros((2, 3, 224, 224), np.float32)
    items, single = _as_list(batch)
    assert not single and len(items) == 2 and items[0].shape == (3, 224, 224)
    assert _as_list("cat.jpg") == (["cat.jpg"], True)
    with pytest.raises(ImageInputError, match="ambiguous"):
        _as_list(np.zeros((2, 3, 224, 3), np.float32))
