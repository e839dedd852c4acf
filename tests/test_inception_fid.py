"""The FID Inception-v3 against torch-fidelity's (the TensorFlow-exact PyTorch port torchmetrics' FID uses), with
random weights; FID through the network against torchmetrics' ``FrechetInceptionDistance``.

torch-fidelity is installed by the Makefile without its dependencies into ``.venv/reference`` (its package
``__init__`` imports torchvision, which is not installed): ``reference_inception`` loads its Inception module
alone from there and removes the package from ``sys.modules`` again, so torchmetrics never sees it.
"""

from __future__ import annotations

import numpy as np
import pytest

from lavit_jax.convert.torch_io import WeightMismatchError
from tests.fid_reference import random_reference_inception, reference_features, reference_module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return random_reference_inception(tmp_path_factory.mktemp("inception"))


def _images(seed, n, shapes=((64, 48), (320, 300), (299, 299))):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        base = rng.integers(0, 256, (1, 1, 3))  # a colour per image plus noise: images differ in their means
        out.append(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.mark.parity
def test_tf1_resize_equals_torch_fidelity():
    import torch

    from lavit_jax.models.inception import tf1_resize_bilinear

    ref = reference_module("interpolate_compat_tensorflow")
    for im in _images(1, 3, ((17, 40), (500, 333), (299, 299))):
        x = torch.from_numpy(im).permute(2, 0, 1)[None].float()
        want = ref.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        np.testing.assert_allclose(tf1_resize_bilinear(im), want[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-4)


@pytest.mark.parity
def test_inception_features_equal_torch_fidelity(reference):
    import torch

    from lavit_jax.convert.inception import load_inception
    from lavit_jax.eval.inception_features import InceptionFeatures
    from lavit_jax.models.inception import tf1_resize_bilinear

    model, path = reference
    images = _images(0, 3)
    want = reference_features(model, images)
    assert want.std() > 0.05 and np.abs(want).max() < 1e3  # activations neither vanished nor exploded
    got = InceptionFeatures(path, batch_size=2)(images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the logits head too
    net, params = load_inception(path)
    _, logits = net.apply({"params": params}, tf1_resize_bilinear(images[2])[None], with_logits=True)
    with torch.no_grad():
        want_logits = model(torch.from_numpy(images[2]).permute(2, 0, 1)[None])[1].numpy()
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4 * np.abs(want_logits).max())


def test_inception_weight_file_errors_name_the_file(reference, tmp_path):
    import torch
    from safetensors.torch import save_file

    from lavit_jax.convert.inception import load_inception

    model, path = reference
    sd = model.state_dict()
    st = tmp_path / "inception.safetensors"  # the same weights as safetensors: read without torch, same params
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(st))
    a, b = load_inception(path)[1], load_inception(st)[1]
    import jax

    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    broken = {k: v for k, v in sd.items() if k != "Mixed_6b.branch1x1.bn.running_var"}
    broken["Mixed_5b.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save(broken, bad)
    with pytest.raises(WeightMismatchError, match=r"bad\.pth(.|\n)*missing \(1\): Mixed_6b/branch1x1/bn/var"
                                                  r"(.|\n)*unexpected \(1\): Mixed_5b\.extra\.weight"):
        load_inception(bad)
