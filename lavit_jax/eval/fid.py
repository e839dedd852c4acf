"""FID and CLIP score from precomputed features (the Inception / CLIP networks are not here).

FID follows pytorch-fid's ``calculate_frechet_distance``: ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))
with scipy's ``sqrtm`` of the (non-symmetric) product, retried with eps on the diagonals when the root is not
finite, and the imaginary part dropped when the diagonal's is within 1e-3 of zero (an error otherwise).
Statistics are ``mean`` over samples and ``np.cov(rowvar=False)`` (unbiased), in float64.

CLIP score follows torchmetrics' ``CLIPScore``: 100 * cosine similarity of each image/text feature pair,
averaged over the pairs, then clamped at 0 (the clamp is applied to the mean, as torchmetrics computes it).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], covariance [D, D]) in float64; N >= 2."""
    x = _features(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"features: a covariance needs at least 2 samples, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape}: expected two mean vectors of one length")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"sigma1 {sigma1.shape} and sigma2 {sigma2.shape}: expected two [{mu1.shape[0]}, "
                         f"{mu1.shape[0]}] covariances")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # nearly singular product
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets [N1, D] and [N2, D] (e.g. Inception pool3 features)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def clip_similarities(image_features, text_features) -> np.ndarray:
    """100 * cos(image_i, text_i) for each pair: [N, D], [N, D] -> [N] (float64)."""
    a, b = _features(image_features, "image_features"), _features(text_features, "text_features")
    if a.shape != b.shape:
        raise ValueError(f"image_features {a.shape} and text_features {b.shape}: expected one shape")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * np.sum(a * b, axis=-1)


def clip_score(image_features, text_features) -> float:
    """torchmetrics CLIPScore of paired features: max(mean(100 * cos), 0)."""
    return max(float(np.mean(clip_similarities(image_features, text_features))), 0.0)
