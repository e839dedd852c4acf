"""Visual tokens -> pixels: codebook lookup -> token decoder -> guided UNet sampling -> VAE decode -> PIL.

    detok = checkpoint.load_detokenizer(converted_dir, "highres")
    images = detok(ids, lengths, steps=25, guidance=7.0, seed=0)          # list of PIL images

``ids`` are visual ids in LLM space (code + 32002) padded to [B, N], ``lengths`` [B] the number of
valid ids per row (no [IMG]/[/IMG]). ``decoder="lowres"`` uses the SD-1.5 UNet (512 px,
``uncond_embeddings`` negatives with an encoder mask), ``"highres"`` the SDXL UNet (1024 px, zero
negatives, time ids). The sampler is DDIM (as LaVIT), the VAE decodes in float32.

Compiled functions: the token decoder is one jit (``token_condition``); sampling + VAE decode is one
jit with a ``lax.fori_loop`` over the steps (``sampling.py``).
"""

from __future__ import annotations

import jax.numpy as jnp

from lavit_jax import vocab
from lavit_jax.compile_cache import cached_jit
from lavit_jax.inference import sampling as diffusion
from lavit_jax.models.codebook import lookup
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.ops.config import freeze

DECODERS = ("lowres", "highres")


@cached_jit(static_argnames=("decoder",))
def token_condition(decoder: TokenDecoder, decoder_params, codebook, ids, lengths):
    """LLM-space ids [B, N] + lengths [B] -> token decoder output (low-res condition [B, 256, D], or
    (prompt_embeds, pooled) for high-res). Padding positions are zeroed and masked by ``lengths``.
    The one ids -> condition path (the tokenizer front end and the detokenizer both use it)."""
    codes = jnp.clip(ids - vocab.VISUAL_OFFSET, 0, codebook.shape[0] - 1)
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
                 decoder: str = "highres", uncond_embeddings=None):
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        self.decoder = decoder
        self.highres = decoder == "highres"
        if not self.highres and uncond_embeddings is None:
            raise ValueError("the low-res decoder needs uncond_embeddings (pixel_decoding/uncond_embeddings.bin)")
        self.config = freeze(tokenizer_config)
        self.token_decoder = TokenDecoder(self.config, self.highres)
        self.codebook = jnp.asarray(codebook)
        self.decoder_params = decoder_params
        self.pipeline = pipeline
        self.uncond_embeddings = None if uncond_embeddings is None else jnp.asarray(uncond_embeddings)
        # The UNet's native resolution (SD-1.5: 64 x 8 = 512 px, SDXL: 128 x 8 = 1024 px).
        self.default_size = pipeline.default_size

    def condition(self, ids, lengths, *, height: int, width: int,
                  original_size: tuple[int, int] | None = None,
                  crops_coords_top_left: tuple[int, int] | None = None,
                  target_size: tuple[int, int] | None = None) -> diffusion.GuidedCondition:
        """ids [B, N] (LLM space), lengths [B] -> the [uncond; cond] UNet condition. The SDXL micro-conditioning
        (``original_size``, ``crops_coords_top_left``, ``target_size``) is the highres decoder's only."""
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size)
        if not self.highres and any(v is not None for v in micro.values()):
            given = ", ".join(k for k, v in micro.items() if v is not None)
            raise ValueError(f"{given}: SDXL micro-conditioning applies only to the highres decoder")
        ids = jnp.asarray(ids, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"ids must be [B, N] with lengths [B]; got ids {ids.shape}, lengths {lengths.shape}")
        out = token_condition(self.token_decoder, self.decoder_params, self.codebook, ids, lengths)
        if self.highres:
            prompt, pooled = out
            return diffusion.highres_condition(prompt, pooled, height, width, **micro)
        return diffusion.lowres_condition(out, self.uncond_embeddings)

    def generate(self, ids, lengths, *, steps: int = 25, guidance: float = 7.0, seed: int = 0,
                 size: int | tuple[int, int] | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
                 noise=None, progress: bool = False, vae_dtype: str | None = "float32", latents=None,
                 start_step: int = 0):
        """-> (images [B, H, W, 3] float32 in [0, 1], final latents). ``size``: int or (height, width);
        ``noise``: optional standard-normal initial latents [B, H/8, W/8, 4] instead of ``seed``;
        ``vae_dtype``: the VAE decode's dtype (None: the VAE's own); ``latents`` + ``start_step``: start from
        latents noised to that step (``sampling.noised_latents``; Video-LaVIT's long-video keyframes)."""
        if size is None:
            size = self.default_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        cond = self.condition(ids, lengths, height=height, width=width, original_size=original_size,
                              crops_coords_top_left=crops_coords_top_left, target_size=target_size)
        return self.pipeline.generate(cond, num_steps=steps, guidance_scale=guidance, seed=seed, height=height,
                                      width=width, noise=noise, progress=progress, vae_dtype=vae_dtype,
                                      latents=latents, start_step=start_step)

    def __call__(self, ids, lengths, **kwargs) -> list:
        """ids [B, N], lengths [B] -> list of B PIL images (keyword arguments as ``generate``)."""
        images, _ = self.generate(ids, lengths, **kwargs)
        return diffusion.to_pil(images)

