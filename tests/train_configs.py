"""Small configs of the training tests (fast to compile): configs/tiny.py with fewer layers and pixels."""

from configs import tiny


def small_config(stage: str, workdir, *, mesh=(-1, 1, 1), **train):
    """configs/tiny.py:STAGE reduced for tests: 1-block encoder/merger/decoder on 42-px images (9 patches),
    a 1-layer LLM, 40 steps over 16 synthetic examples; train.* overridden by ``train``; no TensorBoard files."""
    c = tiny.get_config(stage)
    t = c.tokenizer
    t.image_size = 42
    t.eva_depth = t.merger_depth = t.decoder_depth = 1
    c.llm.num_hidden_layers = 1
    c.mesh_shape = mesh
    tr = c.train
    tr.workdir = str(workdir)
    tr.tensorboard = False
    tr.log_every = 1
    tr.save_every = 100
    tr.steps = 40  # tests stop earlier with max_steps: runs differing only in host-side keys share one compilation
    tr.data_dir = "synthetic:16"
    tr.batch_size = 8
    if stage == "lm":
        tr.seq_len = 32
        tr.examples_per_batch = 16
    for k, v in train.items():
        tr[k] = v
    return c
