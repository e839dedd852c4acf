"""Training throughput of each stage through the shared loop (train.py's trainer). Prints JSON.

Per stage: median step time, examples/s (images) or tokens/s, and MFU (model FLOPs from the 6N +
attention formula, ``Task.flops_per_step``, over the devices' dense bf16 peak; none for the
detokenizer, whose convolutions 6N does not count). On CPU the models are
reduced (sizes in the output) and MFU is null (no peak known; pass --peak-tflops to set one). On a GPU
or TPU: the 7B layer shapes (LLaMA-2-7B / EVA-g widths) with fewer layers to fit, bf16 compute, remat
'full', next to MaxText's published ~50% MFU for LLaMA-2-7B on H100 (a full model on a pod slice,
not the same setting: a reference point, not a like-for-like comparison).

    PYTHONPATH=. python bench/bench_train.py [--stages tokenizer,lm,detokenizer] [--steps 8] [--layers 4]
"""

import argparse
import contextlib
import io
import json
import os
import tempfile

import jax
import numpy as np

from configs import lavit_7b, tiny
from lavit_jax.train import metrics as metrics_lib
from lavit_jax.train import trainer

MAXTEXT_LLAMA2_7B_MFU = 0.50  # MaxText README, LLaMA-2-7B on H100 / TPU v5p


def reduced(stage: str, accelerator: bool, layers: int):
    c = tiny.get_config(stage)
    tr = c.train
    tr.tensorboard = False
    tr.save_every = 10**6
    tr.log_every = 1
    tr.data_dir = "synthetic:256"
    if not accelerator:
        tr.batch_size = 8
        if stage == "lm":
            tr.seq_len = 128
            tr.examples_per_batch = 32
        return c
    # 7B layer shapes, fewer layers.
    t, l = c.tokenizer, c.llm
    t.eva_width = t.width = 1408
    t.eva_heads = t.heads = 16
    t.eva_depth = t.merger_depth = t.decoder_depth = layers
    t.n_code, t.code_dim, t.decoder_out_dim = 16384, 32, 1408
    t.image_size = 224
    t.remat = "full"
    l.vocab_size, l.hidden_size, l.intermediate_size = 48386, 4096, 11008
    l.num_attention_heads = l.num_key_value_heads = 32
    l.num_hidden_layers = layers
    l.max_position_embeddings = 2048
    l.remat = "full"
    tr.compute_dtype = "bfloat16"
    t.attention_impl = l.attention_impl = "auto"
    if stage == "tokenizer":
        tr.batch_size = 64
        tr.kmeans_init = False
    elif stage == "detokenizer":
        c.detokenizer = lavit_7b.detokenizer_config()  # the SD-1.5 UNet and VAE at 512 px
        tr.batch_size = 16
    else:
        tr.batch_size = 8
        tr.seq_len = 2048
        tr.examples_per_batch = 64
        tr.mix = (0.0, 0.0, 1.0)  # text-only keeps the host side (image tokenizing) out of the step time
    return c


def bench(stage: str, steps: int, accelerator: bool, layers: int, peak_tflops: float):
    c = reduced(stage, accelerator, layers)
    c.train.steps = steps + 2
    c.train.peak_tflops_per_device = peak_tflops
    with tempfile.TemporaryDirectory() as wd:
        c.train.workdir = os.path.join(wd, stage)
        with contextlib.redirect_stdout(io.StringIO()):  # the console lines; this prints JSON only
            _, hist = trainer.train(c, log=lambda _: None)
    secs = np.diff([h["seconds"] for h in hist])[1:]  # drop the first (compile) interval
    step_s = float(np.median(secs))
    prog = trainer.program(c)
    flops = prog.task.flops_per_step(c.train.batch_size, prog.counts)
    units = prog.task.units_per_step(c.train.batch_size)
    peak = metrics_lib.peak_flops_per_device(peak_tflops)
    out = {
        "stage": stage, "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "batch_size": c.train.batch_size, "params_trained": prog.counts["train"],
        "params_frozen": prog.counts["frozen"], "compute_dtype": c.train.compute_dtype,
        "step_ms": round(1e3 * step_s, 1), f"{prog.task.unit}_per_s": round(units / step_s, 1),
        "model_tflops_per_step": flops / 1e12,
        "mfu": metrics_lib.mfu(flops, 1.0 / step_s, jax.device_count(), peak),
        "final_loss": hist[-1]["loss"],
    }
    if stage == "lm":
        out.update(seq_len=c.train.seq_len, layers=c.llm.num_hidden_layers, hidden=c.llm.hidden_size)
        if accelerator:
            out["maxtext_llama2_7b_mfu"] = MAXTEXT_LLAMA2_7B_MFU
    elif stage == "tokenizer":
        out.update(image_size=c.tokenizer.image_size, width=c.tokenizer.width,
                   layers=(c.tokenizer.eva_depth, c.tokenizer.merger_depth, c.tokenizer.decoder_depth))
    else:
        out.update(resolution=c.detokenizer.resolution, unet_channels=list(c.detokenizer.unet.block_out_channels))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="tokenizer,lm,detokenizer")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--layers", type=int, default=4, help="layers per stack at the 7B shapes (accelerators)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s per device (0: by device kind)")
    args = p.parse_args()
    accelerator = jax.default_backend() in ("gpu", "tpu")
    results = [bench(s, args.steps, accelerator, args.layers, args.peak_tflops) for s in args.stages.split(",")]
    print(json.dumps({"backend": jax.default_backend(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
