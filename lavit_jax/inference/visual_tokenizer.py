"""The visual tokenizer's compiled front end: images -> LLM ids / understanding features, ids -> condition.

    vt = checkpoint.load_visual_tokenizer(converted_dir)       # a VisualTokenizer
    ids, lengths = vt.tokenize(["cat.jpg", "dog.png"], add_special=True)   # [B, N+2] int32, [B]
    feats, n = vt.understanding_features("cat.jpg")                         # [1, N, llm_embed_dim], [1]
    cond = vt.decode_condition(ids[:, 1:-1], lengths - 2)                    # low-res condition [B, N, D]

The compiled functions are module-level ``jax.jit``s with the (hashable, frozen-config) Flax module
as a static argument, so every VisualTokenizer of the same config shares one compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lavit_jax.compile_cache import cached_jit
from lavit_jax.data.image_io import preprocess
from lavit_jax.inference.detokenizer import token_condition
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer, to_llm_ids
from lavit_jax.ops import sharding
from lavit_jax.ops.config import freeze

# "sample" draws the reference's hard Gumbel sample (seeded); "argmax" is deterministic. "gumbel" is an
# alias of "sample" (the model's name for it).
KEEP_MODES = ("sample", "argmax", "gumbel")


def model_keep_mode(mode: str) -> str:
    """The DynamicVisualTokenizer mode name ('gumbel' | 'argmax') of a user-facing keep mode."""
    if mode not in KEEP_MODES:
        raise ValueError(f"keep mode {mode!r}: expected one of {KEEP_MODES[:2]}")
    return "gumbel" if mode in ("sample", "gumbel") else "argmax"


@cached_jit(static_argnames=("model", "mode", "add_special"))
def tokenize_pixels(model: DynamicVisualTokenizer, params, pixels, rng, mode: str, add_special: bool):
    """pixels [B, H, W, 3] -> (LLM ids [B, N(+2)] padded with 0, lengths [B])."""
    codes, lengths = model.apply({"params": params}, pixels, mode=mode, rng=rng, method="tokenize")
    return to_llm_ids(codes, lengths, add_special=add_special)


@cached_jit(static_argnames=("model", "mode"))
def understanding_features(model: DynamicVisualTokenizer, params, pixels, rng, mode: str):
    """pixels -> (continuous LLM inputs [B, N, llm_embed_dim] compacted, lengths [B])."""
    return model.apply({"params": params}, pixels, mode=mode, rng=rng, method="understanding_features")


class VisualTokenizer:
    """DynamicVisualTokenizer params (+ token decoders) behind compiled task functions.

    ``params``: DynamicVisualTokenizer params; ``decoder_params``: {'lowres'|'highres': TokenDecoder
    params}. With a ``mesh``, the batch is sharded over the data axes and the params are replicated
    (the tokenizer is small next to the LLM).
    """

    def __init__(self, config, params, decoder_params=None, mesh=None):
        self.config = freeze(config)
        self.model = DynamicVisualTokenizer(self.config)
        self.mesh = mesh
        if mesh is not None:
            params = jax.device_put(params, sharding.replicated(mesh))
        self.params = params
        self.decoder_params = dict(decoder_params or {})

    def preprocess(self, images):
        """Images (path / PIL / array, or a list) -> CLIP-normalised pixels [B, H, W, 3] float32 (numpy)."""
        return preprocess(images, self.config.image_size)

    def shard_batch(self, x):
        """Puts an array with a leading batch axis on the mesh (batch over the data axes), if any."""
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

    def _pixels(self, images):
        return self.shard_batch(self.preprocess(images))

    def _mode(self, mode):
        return model_keep_mode(mode or self.config.keep_mode)

    def tokenize(self, images, *, add_special=False, mode=None, seed=0):
        """Images (path / PIL / array, or a list) -> (ids [B, N(+2)] int32 padded with 0, lengths [B])."""
        return tokenize_pixels(self.model, self.params, self._pixels(images), jax.random.key(seed), self._mode(mode),
                               add_special)

    def understanding_features(self, images, *, mode=None, seed=0):
        """Images -> (LLM-space features [B, N, llm_embed_dim] compacted, lengths [B])."""
        return understanding_features(self.model, self.params, self._pixels(images), jax.random.key(seed),
                                      self._mode(mode))

    def decode_condition(self, ids, lengths, highres=False):
        """LLM ids [B, N] (no [IMG]/[/IMG]) + lengths -> low-res condition, or (prompt_embeds, pooled)."""
        name = "highres" if highres else "lowres"
        if name not in self.decoder_params:
            raise ValueError(f"no {name} token decoder loaded")
        return token_condition(TokenDecoder(self.config, highres), self.decoder_params[name],
                               self.params["quantize"]["embedding"], jnp.asarray(ids, jnp.int32),
                               jnp.asarray(lengths, jnp.int32))


