"""A tiny LaVIT with the shapes of the parity fixture ``shared/fixtures/image_tokenizer_tiny``, per training stage
(``make demo`` trains ``configs/demo.py`` instead).

Run:  python train.py --config configs/tiny.py                (stage 1 on synthetic images, ~20 steps)
      python train.py --config configs/tiny.py:lm             (stage 2 on synthetic packed sequences)
      python train.py --config configs/tiny.py:detokenizer    (diffusion decoder on synthetic images)
"""

from configs import lavit_7b


def get_config(stage: str | None = None):
    """``configs/tiny.py`` (stage 'tokenizer') or ``configs/tiny.py:STAGE`` (tokenizer, lm, detokenizer)."""
    config = lavit_7b.get_config(stage)
    config.name = "tiny"
    t = config.tokenizer
    t.eva_width = t.width = 64
    t.eva_depth = t.merger_depth = t.decoder_depth = 2
    t.eva_heads = t.heads = 4
    t.n_code = 128
    t.code_dim = 8
    t.llm_embed_dim = 128
    t.decoder_out_dim = 96
    t.unet_dim_lowres = 48
    t.unet_dims_highres = (48, 80)
    t.pooled_dim = 80
    l = config.llm
    l.vocab_size = 32002 + 128
    l.hidden_size = 128
    l.intermediate_size = 256
    l.num_hidden_layers = 2
    l.num_attention_heads = 4
    l.num_key_value_heads = 2
    l.max_position_embeddings = 512
    l.remat = "none"
    config.checkpoint = "../shared/fixtures/image_tokenizer_tiny/checkpoint"
    config.mesh_shape = (-1, 1, 1)
    tr = config.train
    tr.data_dir = "synthetic:64"
    tr.batch_size = 8
    tr.steps = 20
    tr.lr = 1e-3
    tr.warmup_steps = 2
    tr.save_every = 10
    tr.log_every = 5
    tr.compute_dtype = "float32"
    if tr.stage == "tokenizer":
        tr.workdir = "out/tiny_stage1"
        tr.quantize_start_step = 0  # quantized from the start (k-means init at step 0)
        tr.kmeans_batches = 2
        tr.dead_code_every = 5
    elif tr.stage == "lm":
        # A random frozen 56-px tokenizer (16 patches) keeps the smoke run fast; train.tokenizer_from takes a
        # converted checkpoint's tokenizer (with its own config) instead.
        t.image_size = 56
        tr.workdir = "out/tiny_lm"
        tr.steps = 60
        tr.lr = 3e-3
        tr.warmup_steps = 5
        tr.seq_len = 64
        tr.examples_per_batch = 16
    elif tr.stage == "detokenizer":
        # The tiny diffusion decoder of the tests (width 48 = tokenizer.unet_dim_lowres): 16-px images, 8x8 latents.
        t.image_size = 56
        tr.workdir = "out/tiny_detokenizer"
        tr.ema_decay = 0.9
        d = config.detokenizer
        d.resolution = 16
        d.unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                      attention_head_dim=4, norm_num_groups=8)
        d.vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                     norm_num_groups=8, sample_size=16)
    return config
