"""torch-fidelity's FID Inception-v3 (the TensorFlow-exact PyTorch port torchmetrics' FID uses) as a test reference.

torch-fidelity is installed by the Makefile without its dependencies into ``.venv/reference`` (its package
``__init__`` imports torchvision, which is not installed): ``reference_module`` loads one of its modules alone
from there and removes the package from ``sys.modules`` again, so torchmetrics never sees it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np

REFERENCE = os.path.join(sys.prefix, "reference")


def reference_module(name: str):
    """``torch_fidelity.NAME`` loaded from ``.venv/reference`` without the package's ``__init__``; the package is
    removed from ``sys.modules`` again (the returned module keeps working)."""
    pkg_dir = os.path.join(REFERENCE, "torch_fidelity")
    if not os.path.isfile(os.path.join(pkg_dir, f"{name}.py")):
        raise FileNotFoundError(f"{pkg_dir}: torch-fidelity is not installed there (make env installs it)")
    if "torch_fidelity" in sys.modules:
        raise RuntimeError("torch_fidelity is already imported: the reference must be loaded alone")
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [pkg_dir]
    sys.modules["torch_fidelity"] = stub
    try:
        return importlib.import_module(f"torch_fidelity.{name}")
    finally:
        for n in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
            del sys.modules[n]


def random_reference_inception(folder, seed=0):
    """A torch-fidelity Inception with random weights (He-scaled convs, random BatchNorm statistics, so the
    activations neither vanish nor explode over 94 layers), and the .pth file holding them."""
    import torch

    cls = reference_module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3

    class Random(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the fresh init (no download)
            return None

    empty = os.path.join(folder, "empty.pth")
    torch.save({}, empty)
    model = Random("inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("bn.weight") or name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("bn.bias") or name.endswith("running_mean"):
                t.copy_(0.2 * (torch.rand(t.shape, generator=g) - 0.5))
            elif name.startswith("fc."):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    path = os.path.join(folder, "inception.pth")
    torch.save(model.state_dict(), path)
    return model.eval(), path


def reference_features(model, images):
    """torch-fidelity's pool3 features of HxWx3 uint8 images (one call per image: any sizes)."""
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None])[0].numpy()
                               for im in images]).astype(np.float64)


def torchmetrics_fid(model, real, fake) -> float:
    """torchmetrics' ``FrechetInceptionDistance`` with ``model``'s pool3 features (its custom-network route) over
    HxWx3 uint8 images (one update per image: any sizes)."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Pool3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x)[0]

    metric = FrechetInceptionDistance(feature=Pool3())
    for images, is_real in ((real, True), (fake, False)):
        for im in images:
            metric.update(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None], real=is_real)
    return float(metric.compute().double())
