"""Video-LaVIT: the released model's numbers (motion tokenizer, motion condition encoder, detokenizer)."""

import ml_collections

from configs import lavit_7b


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
    # Numerics and layer stacking (each stage's blocks under nn.scan; remat policy inside the scan).
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.scan_layers = True
    c.remat = "none"
    return c


def motion_encoder_config() -> ml_collections.ConfigDict:
    """The detokenizer's motion condition encoder (``motion_encoder.*`` in ``video_3d_unet.bin``).

    Motion latents resized (PyTorch bicubic) to the 16 x 16 grid -> [B, T, 256, out_dim] UNet context.
    """
    c = ml_collections.ConfigDict()
    c.in_channels = 2
    c.grid = (16, 16)  # (h, w): 256 tokens per frame, row-major; the UNet's temporal context grid too
    c.num_frames = 24  # the length of ``temp_pos`` (only with add_temp_pos)
    c.width = 512
    c.heads = 8
    c.depth = 12
    c.mlp_ratio = 4.0
    c.layernorm_eps = 1e-5
    c.out_dim = 1024  # = the UNet's cross_attention_dim
    c.add_temp_pos = False
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.scan_layers = True
    c.remat = "none"
    return c


def video_sampling_config() -> ml_collections.ConfigDict:
    """``VideoDetokenizer.reconstruct_from_token`` as the release runs it (Euler, 25 steps, 24 frames)."""
    c = ml_collections.ConfigDict()
    c.num_frames = 24
    c.steps = 25
    c.min_guidance = 1.0  # per-frame classifier-free guidance, linear from frame 0 to the last
    c.max_guidance = 4.0
    c.fps = 6  # added time ids (fps itself, not fps - 1 as diffusers' SVD pipeline)
    c.motion_bucket_id = 127
    c.noise_aug = 0.02  # keyframe noise before the VAE encode; also the third added time id
    c.decode_chunk = 8  # VAE temporal decoder frames per call
    c.vae_scale_factor = 8
    c.sizes = ((576, 320), (896, 512), (512, 512), (768, 768))  # (width, height), multiples of 64
    return c


def detokenizer_config() -> ml_collections.ConfigDict:
    """The video detokenizer: motion condition encoder + SVD-style 3D UNet (sizes from
    ``video_detokenizer/unet/config.json``) + temporal VAE + SVD Euler scheduler."""
    c = ml_collections.ConfigDict()
    c.motion_encoder = motion_encoder_config()
    c.sampling = video_sampling_config()
    # The UNet, VAE and scheduler sizes are read from the release's diffusers folders:
    c.unet_folder = "video_detokenizer/unet"  # config only: its weights are in video_3d_unet.bin
    c.vae_folder = "video_detokenizer/vae"
    c.scheduler_folder = "video_detokenizer/scheduler"
    c.weights = "video_3d_unet.bin"  # keys unet.* and motion_encoder.*
    c.unet_dtype = "float32"
    c.attention_impl = "auto"
    return c


def get_config() -> ml_collections.ConfigDict:
    """The release (``rain1011/Video-LaVIT-v1``): its keyframe tokenizer is LaVIT's (``configs/lavit_7b.py``).

    ``python tools/convert_torch_weights.py --src RELEASED_DIR --out OUT_DIR --config configs/video_lavit.py``
    """
    config = ml_collections.ConfigDict()
    config.name = "video_lavit"
    config.tokenizer = lavit_7b.get_config().tokenizer
    config.motion_tokenizer = motion_tokenizer_config()
    config.detokenizer = detokenizer_config()
    config.checkpoint = ""
    return config
