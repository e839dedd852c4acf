"""``make demo``: a small LaVIT trained end to end on the procedural shapes dataset (``lavit_jax/data/shapes.py``).

Stages (each an ordinary ``train.py`` stage): ``configs/demo.py:tokenizer`` (stage 1),
``configs/demo.py:lm`` (stage 2) and ``configs/demo.py:detokenizer``; ``configs/demo.py:demo`` holds
what ``python -m lavit_jax.demo`` does around them (the VAE fit, the held-out evaluation, generation
settings). The demo fills the paths between stages (``train.workdir``, ``train.tokenizer_from``,
``train.text_tokenizer``, ``train.init_from``) under its ``--workdir``.
"""

import ml_collections

from configs import lavit_7b

STAGES = ("tokenizer", "lm", "detokenizer")


def demo_config() -> ml_collections.ConfigDict:
    """Settings of the demo driver (``lavit_jax/demo.py``), not of a training stage."""
    c = ml_collections.ConfigDict()
    c.text_vocab = 200  # sentencepiece pieces of the text tokenizer built on the dataset's closed vocabulary
    c.encoder_steps = 1000  # the EVA encoder is pretrained first (no released EVA-CLIP to load)
    c.encoder_batch = 32
    c.encoder_lr = 3e-3
    c.vae_steps = 300  # the frozen VAE of the detokenizer stage is fitted first (no released VAE to load)
    c.vae_batch = 16
    c.vae_lr = 3e-3
    c.vae_kl_weight = 1e-6
    c.eval_scenes = 32  # held-out scenes: captions, VQA (4 questions each), reconstruction
    c.t2i_prompts = 16  # held-out captions as text-to-image prompts
    c.diffusion_steps = 16
    c.guidance = 3.0
    c.llm_guidance = 1.0
    c.top_k = 1  # visual-token sampling for text-to-image (1: greedy)
    c.grid_samples = 8
    return c


def get_config(stage: str | None = None):
    """``configs/demo.py:STAGE``: tokenizer (default), lm, detokenizer, or demo (the driver's settings)."""
    if stage == "demo":
        return demo_config()
    config = lavit_7b.get_config(stage)
    config.name = "demo"
    t = config.tokenizer
    t.image_size = 56  # 16 patches of 14 px
    t.eva_width = t.width = 64
    t.eva_depth = t.merger_depth = t.decoder_depth = 2
    t.eva_heads = t.heads = 4
    t.n_code = 64
    t.code_dim = 8
    t.llm_embed_dim = 128
    t.decoder_out_dim = 96
    t.unet_dim_lowres = 48
    t.unet_dims_highres = (48, 80)
    t.pooled_dim = 80
    t.target_keep_ratio = 0.5
    l = config.llm
    l.vocab_size = 32002 + 64
    l.hidden_size = 128
    l.intermediate_size = 256
    l.num_hidden_layers = 2
    l.num_attention_heads = 4
    l.num_key_value_heads = 2
    l.max_position_embeddings = 128
    l.remat = "none"
    config.checkpoint = ""
    config.mesh_shape = (-1, 1, 1)
    tr = config.train
    tr.data_dir = "shapes:4000"  # 800 scenes x (a caption + 4 VQA pairs)
    tr.batch_size = 16
    tr.lr = 3e-3
    tr.warmup_steps = 10
    tr.save_every = 1000
    tr.log_every = 10
    tr.compute_dtype = "float32"
    tr.tensorboard = False
    if tr.stage == "tokenizer":
        tr.workdir = "runs/demo/tokenizer"
        tr.steps = 1200  # the selector separates its keep probabilities (argmax keeps tokens) after ~1000 steps
        tr.target_keep_ratio = 0.5
        tr.quantize_start_step = 100
        tr.kmeans_batches = 2
        tr.ema_decay = 0.9  # codebook EMA: short memory, so that unused codes restart within the run ...
        tr.dead_code_every = 10
        tr.dead_code_threshold = 0.3  # ... at batch features (EMA count: assignments per batch)
    elif tr.stage == "lm":
        tr.workdir = "runs/demo/lm"
        tr.steps = 400
        tr.warmup_steps = 15
        tr.batch_size = 8
        tr.seq_len = 64
        tr.examples_per_batch = 24
        tr.mix = (0.6, 0.4, 0.0)  # image->text (captions and VQA), text->image, no text-only
        tr.weight_decay = 0.0
        tr.b2 = 0.99
    elif tr.stage == "detokenizer":
        tr.workdir = "runs/demo/detokenizer"
        tr.steps = 1000
        tr.lr = 2e-3
        tr.ema_decay = 0.98
        tr.b2 = 0.99
        tr.weight_decay = 0.0
        d = config.detokenizer
        d.resolution = 32
        d.unet = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                      attention_head_dim=4, norm_num_groups=8)
        d.vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                     norm_num_groups=8, sample_size=32,
                     scaling_factor=1.0)  # the demo sets 1 / latent std after fitting the VAE
        d.scheduler.prediction_type = "v_prediction"  # clean shapes after 1000 steps (epsilon: noise at 300)
    return config
