"""Grain input pipelines: image folders (or synthetic images) -> CLIP-normalised batches.

``image_batches(spec, image_size, batch_size, seed)`` returns a Grain dataset whose iterators have
``get_state()/set_state()`` (saved with the training checkpoint). Each process reads its own shard
(``jax.process_index()`` of ``jax.process_count()``).
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np

from lavit_jax.data.image_io import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config train.data_dir: image folder not found: {data_dir}")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(data_dir) for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(f"config train.data_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in {data_dir}")
    return files


def synthetic_image(index: int, size: int = 64) -> np.ndarray:
    """A deterministic random-blob image [size, size, 3] uint8 for smoke runs."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(4):
        cx, cy, r = rng.random(3) * [1, 1, 0.4] + [0, 0, 0.1]
        img += rng.random(3) * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def image_batches(spec: str, image_size: int, batch_size: int, seed: int = 0):
    """A repeating, shuffled Grain dataset of [batch_size, S, S, 3] float32 batches."""
    if spec.startswith("synthetic:"):
        source = list(range(int(spec.split(":", 1)[1])))
        load = synthetic_image
    else:
        source = list_images(spec)
        load = str
    source = source[jax.process_index()::jax.process_count()]
    if len(source) < batch_size:
        raise ValueError(f"config train.data_dir: {len(source)} images for this process, fewer than "
                         f"train.batch_size={batch_size}")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.map(lambda item: preprocess(load(item), image_size)[0])
    return ds.batch(batch_size, drop_remainder=True)
