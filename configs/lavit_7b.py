"""LaVIT-7B: the released model's numbers, and a train section per stage.

Run:  python -m lavit_jax caption IMAGE --checkpoint CONVERTED_DIR
      python train.py --config configs/lavit_7b.py:tokenizer --config.train.data_dir=/data/images \\
          --config.train.init_from=CONVERTED_DIR
      python train.py --config configs/lavit_7b.py:lm --config.train.data_dir=/data/pairs.jsonl \\
          --config.train.init_from=CONVERTED_DIR --config.train.tokenizer_from=CONVERTED_DIR
"""

import ml_collections


def tokenizer_config() -> ml_collections.ConfigDict:
    """The dynamic visual tokenizer: EVA-CLIP ViT-g/14 + selector + merger + codebook + decoders."""
    c = ml_collections.ConfigDict()
    c.image_size = 224
    c.patch_size = 14
    # EVA-CLIP ViT-g/14 encoder (frozen).
    c.eva_width = 1408
    c.eva_depth = 40
    c.eva_heads = 16
    c.eva_mlp_ratio = 4.3637
    c.eva_layernorm_eps = 1e-6
    # Token selector / merger / decoders share the encoder width.
    c.width = 1408
    c.heads = 16
    c.mlp_ratio = 4.3637
    c.merger_depth = 12
    c.decoder_depth = 12
    c.tokenizer_layernorm_eps = 1e-5
    c.masked_softmax_eps = 1e-6
    # Codebook.
    c.n_code = 16384
    c.code_dim = 32
    # Output widths hard-coded in the reference.
    c.llm_embed_dim = 4096
    c.decoder_out_dim = 1408
    c.unet_dim_lowres = 768
    c.unet_dims_highres = (768, 1280)
    c.pooled_dim = 1280
    # Keep decisions: 'argmax' (deterministic) or 'gumbel' (hard sample, as the reference).
    c.keep_mode = "argmax"
    c.target_keep_ratio = 1 / 3
    # Numerics: compute dtype for activations; params stay in param_dtype.
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention_impl = "xla"
    c.remat = "none"  # lavit_jax.ops.remat policy name
    c.scan_layers = True  # repeated blocks under nn.scan
    return c


def llm_config() -> ml_collections.ConfigDict:
    """LLaMA-2-7B shape in HF field names, vocab 32000 text + 2 specials + 16384 codes."""
    c = ml_collections.ConfigDict()
    c.vocab_size = 48386
    c.hidden_size = 4096
    c.intermediate_size = 11008
    c.num_hidden_layers = 32
    c.num_attention_heads = 32
    c.num_key_value_heads = 32
    c.rms_norm_eps = 1e-5
    c.rope_theta = 10000.0
    c.rope_scaling = None
    c.tie_word_embeddings = False
    c.max_position_embeddings = 2048
    c.scan_layers = True
    c.remat = "none"
    return c


STAGES = ("tokenizer", "lm", "detokenizer")


def common_train_config(stage: str) -> ml_collections.ConfigDict:
    """train.* keys every stage reads (train.py; lavit_jax/train/trainer.py)."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    # The data source, one spec string for every stage (lavit_jax/data/input_pipeline.py):
    #   synthetic:N                     deterministic random images (and id patterns in stage 2), smoke runs
    #   /data/images                    an image folder, searched recursively (image stages)
    #   /data/pairs.jsonl               {"image": PATH, "text": STR} per line (image optional)
    #   tar:/data/shards-{000..099}.tar webdataset tar shards (also a glob or a folder): KEY.jpg|png|... and an
    #                                   optional KEY.txt or KEY.json ({"text"|"caption": STR}) caption
    #   arrayrecord:/data/train-*.array_record  msgpack records {"image": JPEG/PNG bytes, "text": STR}
    #                                   (input_pipeline.write_array_record writes them)
    #   tfds:NAME[/CONFIG][:SPLIT][@DATA_DIR]   a TFDS dataset built in ArrayRecord format (needs
    #                                   pip install tensorflow-datasets)
    # Corrupt images / records are logged with their source, counted (metric skipped_images) and skipped.
    c.data_dir = ""
    c.batch_size = 256  # global, over all processes; divisible by the data-parallel size (data x fsdp)
    c.grad_accum_steps = 1  # microbatches per step (batch_size / grad_accum_steps per forward)
    c.steps = 100_000
    c.lr = 1e-4
    c.schedule = "cosine"  # cosine | linear | constant | rsqrt, after a linear warmup
    c.warmup_steps = 2000
    c.min_lr_ratio = 0.0  # final lr = lr * min_lr_ratio
    c.weight_decay = 0.05
    c.b1, c.b2 = 0.9, 0.99
    c.grad_clip = 1.0  # global-norm clipping (0: off)
    c.compute_dtype = "bfloat16"  # activations; master weights stay float32
    c.init_from = ""  # a converted checkpoint (tools/convert_torch_weights.py); stage lm: or a HF LLaMA directory
    c.workdir = f"out/{stage}"
    c.save_every = 1000
    c.keep_checkpoints = 3
    c.log_every = 50
    c.seed = 0
    c.data_workers = 0  # Grain worker processes decoding data with prefetch (0: threads in the main process)
    c.tensorboard = True  # event files in WORKDIR/tensorboard
    c.peak_tflops_per_device = 0.0  # for MFU; 0: by device kind (unknown on CPU)
    return c


def train_config(stage: str = "tokenizer") -> ml_collections.ConfigDict:
    """The train section of ``stage``: 'tokenizer' (stage 1), 'lm' (stage 2) or 'detokenizer'."""
    if stage not in STAGES:
        raise ValueError(f"config stage {stage!r}: expected one of {', '.join(STAGES)} (configs/FILE.py:STAGE)")
    c = common_train_config(stage)
    if stage == "tokenizer":
        # Paper: 50K steps on ~100M LAION images, batch 2048, target keep ratio rho = 1/3.
        c.workdir = "out/tokenizer_stage1"
        c.data_dir = ""  # images: a folder, tar:..., arrayrecord:..., tfds:..., JSONL or "synthetic:N"
        c.batch_size = 2048
        c.steps = 50_000
        c.target_keep_ratio = 1 / 3
        c.keep_ratio_weight = 1.0
        c.commitment_weight = 0.0
        c.ema_decay = 0.99
        c.quantize_start_step = 5000  # phase 1 (selector + merger, no quantization) before this step
        c.kmeans_init = True  # k-means codebook init at quantize_start_step ...
        c.kmeans_batches = 4  # ... from the kept features of this many batches
        c.kmeans_iters = 10
        c.dead_code_every = 1000  # restart codes with an EMA count below dead_code_threshold (0: never)
        c.dead_code_threshold = 1e-3
    elif stage == "lm":
        # Our defaults (not from the paper): LLaMA-2-7B fine-tuned on the unified token sequences.
        c.workdir = "out/lm_stage2"
        c.data_dir = ""  # image+text: a JSONL file, tar:... with captions, arrayrecord:..., tfds:... or "synthetic:N"
        c.batch_size = 256  # packed rows of seq_len tokens
        c.seq_len = 2048
        c.examples_per_batch = 1024  # examples drawn per step, packed into batch_size rows
        c.mix = (0.4, 0.4, 0.2)  # image->text, text->image, text only
        c.pack_groups = 0  # packing groups per global batch (0: one per process; fix it to rerun on other hosts)
        c.text_loss_weight = 1.0
        c.visual_loss_weight = 1.0
        c.lr = 2e-5
        c.warmup_steps = 500
        c.steps = 30_000
        c.weight_decay = 0.1
        c.b2 = 0.95
        c.tokenizer_from = ""  # converted checkpoint with the (frozen) visual tokenizer; "" = random (tests)
        c.text_tokenizer = ""  # folder with tokenizer.model (default: INIT_FROM/language_model, or INIT_FROM if HF)
        c.max_text_tokens = 512
        # Image->text inputs: "continuous" = the merger -> vit_proj features between [IMG] and [/IMG], the merger
        # and vit_proj training with the LLM, loss on the text only (as the reference); "discrete" = visual ids.
        c.understanding = "continuous"
        c.images_per_row = 4  # continuous: image->text images per packed row (their pixels travel with the row)
        # tools/precompute_visual_tokens.py output for train.data_dir: text->image (and discrete image->text) ids
        # from the file instead of tokenizing on the fly; "" = on the fly.
        c.visual_ids_from = ""
    elif stage == "detokenizer":
        # Our defaults (not from the paper): SD-1.5 UNet fine-tuning on the token decoder's condition.
        c.workdir = "out/detokenizer"
        c.data_dir = ""  # images: a folder, tar:..., arrayrecord:..., tfds:..., JSONL or "synthetic:N"
        c.batch_size = 256
        c.lr = 1e-5
        c.warmup_steps = 1000
        c.weight_decay = 0.01
        c.b2 = 0.999
        c.steps = 50_000
        c.cond_dropout = 0.1  # condition -> the sampler's negative, for classifier-free guidance
        c.ema_decay = 0.9999  # EMA weights of the UNet (+ token decoder) for sampling
        c.prediction_type = ""  # "" = the scheduler config's; epsilon | v_prediction | sample
        c.train_token_decoder = True
    return c


def detokenizer_config(decoder: str = "lowres") -> ml_collections.ConfigDict:
    """The diffusion decoder trained by the detokenizer stage (used when train.init_from has none): SD-1.5
    shapes (diffusers field names); a converted checkpoint's own unet/vae/scheduler configs win."""
    c = ml_collections.ConfigDict()
    c.decoder = decoder  # lowres (SD-1.5, 512 px) | highres (SDXL, 1024 px)
    c.resolution = 512
    c.unet = ml_collections.ConfigDict(dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32))
    c.vae = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=512, scaling_factor=0.18215))
    c.scheduler = ml_collections.ConfigDict(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon"))
    return c


def get_config(stage: str | None = None) -> ml_collections.ConfigDict:
    """``configs/lavit_7b.py`` (stage 'tokenizer') or ``configs/lavit_7b.py:STAGE``."""
    config = ml_collections.ConfigDict()
    config.name = "lavit_7b"
    config.tokenizer = tokenizer_config()
    config.llm = llm_config()
    config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor)
    config.logical_axis_rules = None  # None: lavit_jax.ops.sharding.DEFAULT_RULES
    config.checkpoint = ""
    config.train = train_config(stage or "tokenizer")
    if config.train.stage == "detokenizer":
        config.detokenizer = detokenizer_config()
    if config.train.stage == "lm":
        config.mesh_shape = (1, -1, 1)  # FSDP over all devices for the 7B LLM
        config.llm.remat = "full"
    return config
