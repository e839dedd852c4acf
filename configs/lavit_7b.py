"""LaVIT-7B: the released model's numbers.

Run:  python -m lavit_jax caption IMAGE --checkpoint CONVERTED_DIR --config configs/lavit_7b.py
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


def train_config() -> ml_collections.ConfigDict:
    """Stage-1 tokenizer training (train.py): data, optimiser, losses, checkpoints."""
    c = ml_collections.ConfigDict()
    c.stage = "tokenizer"
    c.data_dir = ""  # a folder of images (searched recursively) or "synthetic:N"
    c.batch_size = 256
    c.steps = 100_000
    c.lr = 1e-4
    c.warmup_steps = 2000
    c.weight_decay = 0.05
    c.b1, c.b2 = 0.9, 0.99
    c.grad_clip = 1.0
    c.target_keep_ratio = 1 / 3
    c.keep_ratio_weight = 1.0
    c.commitment_weight = 0.0
    c.ema_decay = 0.99
    c.init_from = ""  # released or converted checkpoint: the frozen EVA encoder (and a warm start)
    c.workdir = "out/tokenizer_stage1"
    c.save_every = 1000
    c.keep_checkpoints = 3
    c.log_every = 50
    c.seed = 0
    return c


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "lavit_7b"
    config.tokenizer = tokenizer_config()
    config.llm = llm_config()
    config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor)
    config.logical_axis_rules = None  # None: lavit_jax.ops.sharding.DEFAULT_RULES
    config.checkpoint = ""
    config.train = train_config()
    return config
