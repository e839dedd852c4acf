"""Video-LaVIT: the released model's numbers (motion tokenizer so far)."""

import ml_collections


def motion_tokenizer_config() -> ml_collections.ConfigDict:
    """The motion VQ tokenizer (``motion_tokenizer.bin``): 2 x 24 x 20 x 36 motion -> 3 x 5 x 9 codes."""
    c = ml_collections.ConfigDict()
    # Input: (dx, dy) per macroblock, 24 frames on a 20 x 36 grid (h, w).
    c.in_channels = 2
    c.input_frames = 24
    c.input_height = 20
    c.input_width = 36
    # Encoder / decoder transformer (the same sizes on both sides).
    c.width = 512
    c.heads = 8
    c.mlp_ratio = 4.0
    c.blocks_per_stage = 3
    c.layernorm_eps = 1e-5
    # Encoder downsamplers: Conv3d k3 after explicit zero padding ((t0, t1), (h0, h1), (w0, w1)).
    c.down_strides = ((1, 2, 2), (2, 1, 1), (2, 1, 1), (2, 2, 2))
    c.down_pads = (((1, 1), (0, 1), (0, 1)), ((0, 1), (1, 1), (1, 1)), ((0, 1), (1, 1), (1, 1)),
                   ((0, 1), (0, 1), (0, 1)))
    # Decoder upsamplers: nearest (t, h, w) factors, then Conv3d k3 pad 1.
    c.up_factors = ((2, 2, 2), (2, 1, 1), (2, 1, 1), (1, 2, 2))
    # Codebook (l2-normalised codes).
    c.n_code = 1024
    c.code_dim = 32
    # ``reconstruct`` divides the decoded motion by this (the detokenizer's motion scale).
    c.motion_scale = 10.0
    # Numerics.
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    return c


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "video_lavit"
    config.motion_tokenizer = motion_tokenizer_config()
    config.checkpoint = ""
    return config
