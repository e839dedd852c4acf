"""Test helpers for the image-tokenizer parity fixtures: their config and released-layout loaders.

The fixture's ``config.json`` records the small widths the reference modules were built with; the
runtime reads converted checkpoints only, so tests that start from released files build the
runtime objects here, from the ``lavit_jax.convert`` loaders.
"""

from __future__ import annotations

import json
import os

from configs.lavit_7b import tokenizer_config
from lavit_jax.convert import diffusers as convert_diffusers
from lavit_jax.convert import tokenizer as convert_tokenizer
from lavit_jax.inference.detokenizer import Detokenizer
from lavit_jax.inference.visual_tokenizer import VisualTokenizer


def config_from_fixture(path):
    """Tokenizer config from a parity fixture's ``config.json`` (the small widths it records)."""
    with open(path) as f:
        j = json.load(f)
    c = tokenizer_config()
    try:
        c.image_size, c.patch_size = j["image_size"], j["patch_size"]
        c.eva_width = c.width = j["width"]
        c.eva_depth = c.merger_depth = c.decoder_depth = j["depth"]
        c.eva_heads = c.heads = j["heads"]
        c.eva_mlp_ratio = c.mlp_ratio = j["mlp_ratio"]
        c.eva_layernorm_eps = j.get("eva_layernorm_eps", c.eva_layernorm_eps)
        c.tokenizer_layernorm_eps = j.get("tokenizer_layernorm_eps", c.tokenizer_layernorm_eps)
        c.n_code, c.code_dim = j["n_code"], j["code_dim"]
        c.llm_embed_dim, c.decoder_out_dim = j["llm_embed_dim"], j["decoder_out_dim"]
        c.unet_dim_lowres = j["unet_dim_lowres"]
        c.unet_dims_highres = tuple(j["unet_dims_highres"])
        c.pooled_dim = j["pooled_dim"]
    except KeyError as e:
        raise KeyError(f"{path}: missing field {e}") from e
    return c


def released_visual_tokenizer(ckpt_dir, config, decoders=("lowres", "highres"), mesh=None,
                              understanding_weights=None) -> VisualTokenizer:
    """A VisualTokenizer straight from released ``visual_tokenizer/`` files (the decoders present)."""
    vt = convert_tokenizer.visual_tokenizer_dir(ckpt_dir)
    params = convert_tokenizer.load_visual_tokenizer(vt, config, understanding_weights=understanding_weights)
    dec = {}
    for name in decoders:
        path = os.path.join(vt, convert_tokenizer.VISUAL_TOKENIZER_FILES[f"{name}_decoder"])
        if os.path.isfile(path):
            dec[name] = convert_tokenizer.load_token_decoder(path, config, name == "highres")
    return VisualTokenizer(config, params, dec, mesh)


def released_detokenizer(ckpt_dir, config, decoder="highres", **pipeline_kw) -> Detokenizer:
    """A Detokenizer from a released checkpoint root (codebook, token decoder, diffusers folder)."""
    folder = {"lowres": "pixel_decoding", "highres": "highres_pixel_decoding"}[decoder]
    vt = os.path.join(ckpt_dir, "visual_tokenizer")
    files = convert_tokenizer.VISUAL_TOKENIZER_FILES
    codebook = convert_tokenizer.load_codebook(os.path.join(vt, files["tokenizer"]))
    decoder_params = convert_tokenizer.load_token_decoder(os.path.join(vt, files[f"{decoder}_decoder"]), config,
                                                          decoder == "highres")
    pipeline = convert_diffusers.load_pipeline(os.path.join(ckpt_dir, folder), **pipeline_kw)
    uncond = None
    if decoder == "lowres":
        uncond = convert_diffusers.load_uncond_embeddings(os.path.join(ckpt_dir, folder, "uncond_embeddings.bin"))
    return Detokenizer(config, codebook, decoder_params, pipeline, decoder, uncond)
