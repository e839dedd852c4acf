"""diffusers' ``StableDiffusionSafetyChecker`` in JAX.

images [B, H, W, 3] in [0, 1] -> ``clip_preprocess`` (uint8 as ``numpy_to_pil``, PIL bicubic resize of the
shortest side, center crop, CLIP mean/std: transformers' ``CLIPImageProcessor``) -> CLIP vision tower ->
``visual_projection`` -> cosine similarity with 17 ``concept_embeds`` and 3 ``special_care_embeds`` ->
scores ``round(cos - weight + adjustment, 3)`` where ``adjustment`` is 0.01 once any special-care score is
positive -> an image with any positive concept score is NSFW and replaced by a black image.

Usage::

    checker = SafetyChecker.from_pretrained(local_sd_folder / "safety_checker")
    images, has_nsfw = checker(images)        # numpy [B, H, W, 3], [B] bool
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from PIL import Image

from lavit_jax.convert import clip as convert_clip
from lavit_jax.data.image_io import CLIP_MEAN, CLIP_STD
from lavit_jax.models.clip import CLIPVisionTransformer
from lavit_jax.ops.layers import dense

NUM_CONCEPTS = 17  # fixed sizes of diffusers' concept_embeds / special_care_embeds
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
SCORE_DECIMALS = 3  # diffusers rounds each score to 3 decimals before comparing it with 0


def clip_preprocess(images, size: int = 224, crop_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
    """images [B, H, W, 3] floats in [0, 1] -> [B, crop, crop, 3] float32 CLIP input (crop defaults to size).

    As diffusers + transformers: ``(x * 255).round()`` to uint8 (x clipped to [0, 1] first), PIL bicubic
    resize of the shortest side to ``size`` (long side ``int(size * long / short)``), center crop
    (top/left ``(dim - crop) // 2``), ``/ 255``, ``(x - mean) / std``.
    """
    crop = size if crop_size is None else crop_size
    arr = np.asarray(jax.device_get(images), np.float32)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images of shape {arr.shape}: expected [B, H, W, 3]")
    arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = np.empty((arr.shape[0], crop, crop, 3), np.float32)
    for i, a in enumerate(arr):
        h, w = a.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
        img = np.asarray(Image.fromarray(a).resize((new_w, new_h), Image.BICUBIC))
        if new_h < crop or new_w < crop:
            raise ValueError(f"image {i}: resized to {new_h}x{new_w}, smaller than the {crop}x{crop} crop")
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        img = img[top:top + crop, left:left + crop]
        x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = (x - mean) / std
    return out


def cosine_distance(a, b):
    """a [B, P], b [N, P] -> [B, N] cosine similarity in float32 (``F.normalize``: norms clamped at 1e-12)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


class StableDiffusionSafetyChecker(nn.Module):
    """clip_input [B, S, S, 3] -> dict(has_nsfw [B] bool, special_scores [B, 3], concept_scores [B, 17]).

    Params: vision_model, visual_projection, concept_embeds [17, P], special_care_embeds [3, P] and their
    per-concept thresholds concept_embeds_weights [17], special_care_embeds_weights [3].
    """

    config: ml_collections.FrozenConfigDict  # ``clip_config_from_hf`` of the safety checker's config.json
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = "auto"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, clip_input):
        cfg = self.config
        p = cfg.projection_dim
        _, pooled = CLIPVisionTransformer(cfg.vision, self.dtype, self.param_dtype, self.attention_impl,
                                          self.scan_layers, name="vision_model")(clip_input)
        image_embeds = dense(p, ("embed", "out"), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="visual_projection")(pooled)
        ones = nn.initializers.ones
        concept = self.param("concept_embeds", nn.with_logical_partitioning(ones, (None, "out")),
                             (NUM_CONCEPTS, p), self.param_dtype)
        special = self.param("special_care_embeds", nn.with_logical_partitioning(ones, (None, "out")),
                             (NUM_SPECIAL_CARE, p), self.param_dtype)
        concept_w = self.param("concept_embeds_weights", nn.with_logical_partitioning(ones, (None,)),
                               (NUM_CONCEPTS,), self.param_dtype)
        special_w = self.param("special_care_embeds_weights", nn.with_logical_partitioning(ones, (None,)),
                               (NUM_SPECIAL_CARE,), self.param_dtype)
        # diffusers scores concept by concept: special-care scores before the first positive one are taken with
        # adjustment 0, those after it (and all concept scores) with 0.01, so the adjustment is 0.01 iff any
        # special-care score at adjustment 0 is positive.
        raw_special = cosine_distance(image_embeds, special) - special_w.astype(jnp.float32)
        positive = jnp.round(raw_special, SCORE_DECIMALS) > 0
        earlier = (jnp.cumsum(positive, axis=-1) - positive) > 0
        special_scores = jnp.round(raw_special + jnp.where(earlier, SPECIAL_CARE_ADJUSTMENT, 0.0), SCORE_DECIMALS)
        adjustment = jnp.where(jnp.any(positive, axis=-1), SPECIAL_CARE_ADJUSTMENT, 0.0)[:, None]
        concept_scores = jnp.round(cosine_distance(image_embeds, concept) - concept_w.astype(jnp.float32)
                                   + adjustment, SCORE_DECIMALS)
        has_nsfw = jnp.any(concept_scores > 0, axis=-1)
        return dict(has_nsfw=has_nsfw, special_scores=special_scores, concept_scores=concept_scores)


def black_out(images, has_nsfw):
    """images [B, H, W, C] with those flagged in has_nsfw [B] replaced by zeros."""
    return jnp.where(jnp.asarray(has_nsfw)[:, None, None, None], jnp.zeros((), images.dtype), images)


def init_args(config, batch: int = 1):
    """Zero clip_input for ``StableDiffusionSafetyChecker.init``."""
    v = config.vision
    return (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),)


class SafetyChecker:
    """Host-side runner: images [B, H, W, 3] in [0, 1] -> (numpy images with NSFW ones black, has_nsfw [B]).

    ``size`` / ``crop_size``: the CLIP preprocessing (shortest side, crop); both default to the model's
    ``image_size`` (224 for the released checker, as its ``feature_extractor`` does).
    """

    def __init__(self, model: StableDiffusionSafetyChecker, params, size: int | None = None,
                 crop_size: int | None = None):
        self.model = model
        self.params = params
        self.size = size or model.config.vision.image_size
        self.crop_size = crop_size or model.config.vision.image_size
        self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, variant: str | None = None,
                        attention_impl: str | None = "auto", scan_layers: bool = True, **kw) -> SafetyChecker:
        """Reads a diffusers ``safety_checker/`` folder (config.json + model.safetensors / pytorch_model.bin)."""
        config = convert_clip.load_clip_config(path)
        model = StableDiffusionSafetyChecker(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl,
                                             scan_layers=scan_layers)
        shapes = convert_clip.unrolled_param_shapes(model, *init_args(config))
        params = convert_clip.load_safety_checker_params(path, shapes, scan_layers=scan_layers, variant=variant)
        return cls(model, jax.tree.map(lambda a: jnp.asarray(a, dtype), params), **kw)

    def scores(self, images) -> dict:
        """The module's outputs (has_nsfw, special_scores, concept_scores) as numpy, for images [B, H, W, 3]."""
        clip_input = clip_preprocess(images, self.size, self.crop_size)
        return jax.tree.map(np.asarray, self._apply(self.params, jnp.asarray(clip_input)))

    def __call__(self, images):
        has_nsfw = self.scores(images)["has_nsfw"]
        return np.asarray(black_out(jnp.asarray(images), has_nsfw)), has_nsfw
