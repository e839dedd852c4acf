"""Visual tokens -> pixels: codebook lookup -> token decoder -> guided UNet sampling -> VAE decode -> PIL.

    detok = Detokenizer.from_released(ckpt_dir, config.tokenizer, decoder="highres")
    images = detok(ids, lengths, steps=25, guidance=7.0, seed=0)          # list of PIL images

``ids`` are visual ids in LLM space (code + ``code_offset``, 32002) padded to [B, N], ``lengths`` [B]
the number of valid ids per row (no [IMG]/[/IMG]). ``decoder="lowres"`` uses the SD-1.5 UNet (512 px,
``uncond_embeddings.bin`` negatives with an encoder mask), ``"highres"`` the SDXL UNet (1024 px, zero
negatives, time ids). The sampler is DDIM (as LaVIT), the VAE decodes in float32.

Compiled functions: the token decoder is one jit; sampling + VAE decode is one jit with a
``lax.fori_loop`` over the steps (see ``diffusion.py``). ``progress=True`` compiles a variant of that same
loop with a ``jax.debug.callback`` per step that advances a tqdm bar; the default has no callback.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.convert.torch_io import WeightFileError, load_weight_file
from lavit_jax.inference import sampling as diffusion
from lavit_jax.models.codebook import lookup
from lavit_jax.models.token_decoder import TokenDecoder

DECODERS = ("lowres", "highres")
# (pixel-decoding folder, token decoder file, default image size) per decoder.
_RELEASED = {
    "lowres": ("pixel_decoding", "tokenizer_decoder.bin", 512),
    "highres": ("highres_pixel_decoding", "highres_tokenizer_decoder.bin", 1024),
}
# LaVIT's defaults: reconstruction (image_detokenize.py) and text-to-image (lavit_for_generation.py).
RECONSTRUCT_DEFAULTS = dict(steps=50, guidance=5.0)
TEXT2IMAGE_DEFAULTS = dict(steps=25, guidance=7.0)


def token_condition(decoder: TokenDecoder, decoder_params, codebook, ids, lengths, code_offset: int = 32002):
    """LLM-space ids [B, N] + lengths [B] -> token decoder output (low-res condition [B, 256, D], or
    (prompt_embeds, pooled) for high-res). Padding positions are zeroed and masked by ``lengths``."""
    codes = jnp.clip(ids - code_offset, 0, codebook.shape[0] - 1)
    valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    vectors = lookup(codebook, codes) * valid[..., None].astype(codebook.dtype)
    return decoder.apply({"params": decoder_params}, vectors, lengths)


class Detokenizer:
    """Token ids -> images with one token decoder and its diffusion pipeline.

    tokenizer_config: the ``tokenizer`` ConfigDict (widths of the token decoder); codebook [K, code_dim];
    decoder_params: TokenDecoder params; pipeline: ``diffusion.DiffusionPipeline``; uncond_embeddings
    [L, D] (low-res only).
    """

    def __init__(self, tokenizer_config, codebook, decoder_params, pipeline: diffusion.DiffusionPipeline,
                 decoder: str = "highres", uncond_embeddings=None, code_offset: int | None = None,
                 default_size: int | None = None):
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        self.decoder = decoder
        self.highres = decoder == "highres"
        if not self.highres and uncond_embeddings is None:
            raise ValueError("the low-res decoder needs uncond_embeddings (pixel_decoding/uncond_embeddings.bin)")
        self.config = tokenizer_config
        self.token_decoder = TokenDecoder(tokenizer_config, self.highres)
        self.codebook = jnp.asarray(codebook)
        self.decoder_params = decoder_params
        self.pipeline = pipeline
        self.uncond_embeddings = None if uncond_embeddings is None else jnp.asarray(uncond_embeddings)
        self.code_offset = int(code_offset if code_offset is not None else tokenizer_config.get("code_offset", 32002))
        self._condition = jax.jit(partial(token_condition, self.token_decoder), static_argnums=(4,))
        f = pipeline.vae_scale_factor
        self.default_size = default_size or (pipeline.unet.config.sample_size or 64) * f

    @classmethod
    def from_released(cls, ckpt_dir: str | os.PathLike, tokenizer_config, decoder: str = "highres", *,
                      dtype=jnp.bfloat16, scheduler_kind: str = "ddim", attention_impl: str | None = "auto"):
        """Loads a released LaVIT checkpoint folder: ``visual_tokenizer/`` (codebook from
        ``tokenizer_encoder.bin``, the token decoder) and ``pixel_decoding/`` or ``highres_pixel_decoding/``.
        """
        from lavit_jax.models.tokenizer import load_token_decoder

        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        ckpt_dir = os.fspath(ckpt_dir)
        folder, decoder_file, size = _RELEASED[decoder]
        vt = os.path.join(ckpt_dir, "visual_tokenizer")
        codebook = load_codebook(os.path.join(vt, "tokenizer_encoder.bin"))
        decoder_params = load_token_decoder(os.path.join(vt, decoder_file), tokenizer_config, decoder == "highres")
        pipeline = diffusion.load_pipeline(os.path.join(ckpt_dir, folder), dtype=dtype,
                                           scheduler_kind=scheduler_kind, attention_impl=attention_impl)
        uncond = None
        if decoder == "lowres":
            uncond = diffusion.load_uncond_embeddings(os.path.join(ckpt_dir, folder, "uncond_embeddings.bin"))
        return cls(tokenizer_config, codebook, decoder_params, pipeline, decoder, uncond, default_size=size)

    def condition(self, ids, lengths, *, height: int, width: int,
                  original_size: tuple[int, int] | None = None) -> diffusion.GuidedCondition:
        """ids [B, N] (LLM space), lengths [B] -> the [uncond; cond] UNet condition."""
        ids = jnp.asarray(ids, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"ids must be [B, N] with lengths [B]; got ids {ids.shape}, lengths {lengths.shape}")
        out = self._condition(self.decoder_params, self.codebook, ids, lengths, self.code_offset)
        if self.highres:
            prompt, pooled = out
            return diffusion.highres_condition(prompt, pooled, height, width, original_size)
        return diffusion.lowres_condition(out, self.uncond_embeddings)

    def generate(self, ids, lengths, *, steps: int = 25, guidance: float = 7.0, seed: int = 0,
                 size: int | tuple[int, int] | None = None, original_size: tuple[int, int] | None = None,
                 noise=None, progress: bool = False):
        """-> (images [B, H, W, 3] float32 in [0, 1], final latents). ``size``: int or (height, width);
        ``noise``: optional standard-normal initial latents [B, H/8, W/8, 4] instead of ``seed``."""
        if size is None:
            size = self.default_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        cond = self.condition(ids, lengths, height=height, width=width, original_size=original_size)
        return self.pipeline.generate(cond, num_steps=steps, guidance_scale=guidance, seed=seed, height=height,
                                      width=width, noise=noise, progress=progress)

    def __call__(self, ids, lengths, **kwargs) -> list:
        """ids [B, N], lengths [B] -> list of B PIL images (keyword arguments as ``generate``)."""
        images, _ = self.generate(ids, lengths, **kwargs)
        return diffusion.to_pil(images)


def load_codebook(path: str | os.PathLike, key: str = "quantize.embedding.weight") -> np.ndarray:
    """The visual codebook [K, code_dim] from ``tokenizer_encoder.bin`` (read with weights_only=True)."""
    sd = load_weight_file(path)
    if key not in sd:
        raise WeightFileError(f"{os.fspath(path)} has no {key!r} (the visual codebook)")
    return np.asarray(sd[key], np.float32)
