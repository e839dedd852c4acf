"""Image input: PIL image, path or array -> CLIP-normalised pixels [B, 224, 224, 3] float32 (NHWC).

Resize is PIL bicubic to (size, size) without crop (what the reference's torchvision ``Resize`` does
on a PIL image), then /255 and CLIP mean/std. Grayscale, palette and RGBA inputs become RGB.

Pre-normalised input, as the reference's methods accept tensors: a float array [3, size, size]
(channel first, already resized and CLIP-normalised), or a batch [B, 3, size, size], is used as it
is (transposed to NHWC). A batch whose layout cannot be told apart ([B, 3, W, 3]) is refused.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


class ImageInputError(ValueError):
    """An input is missing, unreadable, empty or not an image."""


def _describe(x) -> str:
    if isinstance(x, str | os.PathLike):
        return os.fspath(x)
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__


def load_image(x) -> Image.Image:
    """Opens ``x`` (path, PIL image, or HxW / HxWx{1,3,4} uint8 or [0,1]-float array) as RGB."""
    if isinstance(x, str | os.PathLike):
        path = os.fspath(x)
        if not os.path.exists(path):
            raise ImageInputError(f"image file not found: {path}")
        if os.path.isdir(path):
            raise ImageInputError(f"image path is a directory: {path}")
        if os.path.getsize(path) == 0:
            raise ImageInputError(f"image file is empty (0 bytes): {path}")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageInputError(f"not a readable image: {path} ({type(e).__name__}: {e})") from e
    elif isinstance(x, Image.Image):
        img = x
    elif isinstance(x, np.ndarray):
        arr = x
        if arr.size == 0:
            raise ImageInputError(f"empty image: {_describe(x)}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ImageInputError(f"not an image array (expected HxW or HxWx3/4, or a pre-normalised float "
                                  f"[3, S, S] at the model's image size S): {_describe(x)}")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                raise ImageInputError(f"image array has NaN or inf values: {_describe(x)}")
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ImageInputError(f"image array must be uint8 or float in [0, 1]: {_describe(x)}")
        img = Image.fromarray(arr)
    else:
        raise ImageInputError(f"not an image: {_describe(x)} (expected a path, PIL image or array)")
    if img.width == 0 or img.height == 0:
        raise ImageInputError(f"image has zero size {img.size}: {_describe(x)}")
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        img = img.convert("RGB")
    return img


def is_prenormalised(x, size: int) -> bool:
    """Whether ``x`` is one pre-normalised image: a float array [3, size, size] (see the module docstring)."""
    return (isinstance(x, np.ndarray) and x.ndim == 3 and x.shape == (3, size, size)
            and np.issubdtype(x.dtype, np.floating))


def check_batch_layout(x) -> None:
    """Refuses a 4-D array whose layout is ambiguous ([B, 3, W, 3]: NCHW or NHWC)."""
    if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1] == 3 and x.shape[3] == 3:
        raise ImageInputError(f"ambiguous image batch: {_describe(x)} could be [B, 3, H, W] (pre-normalised) or "
                              "[B, H, W, 3] (images); pass a list of images or a [B, 3, size, size] array")


def preprocess(images, size: int = 224) -> np.ndarray:
    """One image or a sequence of images -> [B, size, size, 3] float32, CLIP-normalised.

    Pre-normalised [3, size, size] / [B, 3, size, size] float arrays pass through (transposed)."""
    if not isinstance(images, np.ndarray) and hasattr(images, "__array__") and getattr(images, "ndim", 0) >= 3:
        images = np.asarray(images)  # a jax array
    if isinstance(images, np.ndarray) and images.ndim == 4:
        check_batch_layout(images)
        if images.shape[1] == 3 and images.shape[-1] != 3 and images.shape[2:] != (size, size):
            raise ImageInputError(f"pre-normalised image batch {_describe(images)}: expected [B, 3, {size}, {size}] "
                                  f"(the model's image size {size})")
        images = list(images)
    elif not isinstance(images, list | tuple):
        images = [images]
    if len(images) == 0:
        raise ImageInputError("no images given")
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, x in enumerate(images):
        if not isinstance(x, np.ndarray) and hasattr(x, "__array__") and getattr(x, "ndim", 0) == 3:
            x = np.asarray(x)  # a jax array
        if is_prenormalised(x, size):
            if not np.all(np.isfinite(x)):
                raise ImageInputError(f"pre-normalised image has NaN or inf values: {_describe(x)}")
            out[i] = np.transpose(x, (1, 2, 0))
            continue
        img = load_image(x).resize((size, size), Image.BICUBIC)
        out[i] = (np.asarray(img, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return out


def to_pil(images) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL images."""
    arr = np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
