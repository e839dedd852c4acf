"""A tiny LaVIT with the shapes of the parity fixture ``shared/fixtures/image_tokenizer_tiny``.

Run:  make demo   (tokenizes an image with the fixture checkpoint)
"""

from configs import lavit_7b


def get_config():
    config = lavit_7b.get_config()
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
    config.checkpoint = "../shared/fixtures/image_tokenizer_tiny/checkpoint"
    tr = config.train
    tr.data_dir = "synthetic:64"
    tr.batch_size = 8
    tr.steps = 20
    tr.lr = 1e-3
    tr.warmup_steps = 2
    tr.save_every = 10
    tr.log_every = 5
    tr.workdir = "out/tiny_stage1"
    return config
