"""FID features of images: the FID Inception-v3 (``lavit_jax/models/inception.py``) over a device mesh.

    feats = InceptionFeatures("pt_inception-2015-12-05-6726825d.pth")(images)  # [N, 2048] float64

Images (HxWx3 uint8 arrays or PIL images, any sizes) are resized on the host to 299x299 as TensorFlow 1.x's
bilinear resize does (the graph FID is defined with), then run in fixed batches of ``batch_size`` (the last one
padded), split over the mesh's data axis with the weights replicated: one compiled program per batch size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lavit_jax.models.inception import INPUT_SIZE, tf1_resize_bilinear


def _rgb(image, where: str) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got shape {x.shape}")
    return x


class InceptionFeatures:
    """Callable: a sequence of images -> FID pool3 features [N, 2048] (float64, as FID statistics take them)."""

    def __init__(self, weights: str | os.PathLike, *, batch_size: int = 8, mesh: jax.sharding.Mesh | None = None):
        from lavit_jax.convert.inception import load_inception  # reads the weight file (torch only for .pth)
        from lavit_jax.ops import sharding

        self.model, params = load_inception(weights)
        self.mesh = mesh
        if mesh is not None:
            n = mesh.shape[mesh.axis_names[0]]
            self.batch = -(-batch_size // n) * n
            self.input_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
            self.params = jax.device_put(params, sharding.replicated(mesh))
        else:
            self.batch, self.input_sharding, self.params = batch_size, None, params
        self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

    def __call__(self, images: Sequence, names: Sequence[str] | None = None) -> np.ndarray:
        names = names or [f"image {i}" for i in range(len(images))]
        out = []
        for i in range(0, len(images), self.batch):
            chunk = [tf1_resize_bilinear(_rgb(im, names[i + j])) for j, im in enumerate(images[i:i + self.batch])]
            n = len(chunk)
            x = np.stack(chunk + [chunk[-1]] * (self.batch - n))  # one compiled shape
            x = jax.device_put(x, self.input_sharding) if self.input_sharding is not None else x
            out.append(np.asarray(self._apply(self.params, x), np.float64)[:n])
        if not out:
            return np.zeros((0, 2048), np.float64)
        return np.concatenate(out)


__all__ = ["INPUT_SIZE", "InceptionFeatures"]
