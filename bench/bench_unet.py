"""UNet denoising steps per second, JAX vs diffusers PyTorch, SD-1.5 and SDXL shapes. Prints JSON.

    python bench/bench_unet.py [--variant sd15 sdxl] [--size full|reduced] [--batch 1] [--iters N]

One "step" is one classifier-free-guided UNet call: batch 2 * --batch (uncond + cond), a 256-token
condition (LaVIT's token decoder output), at the variant's latent size. Weights are random (speed
does not depend on them); both frameworks build the model from the same diffusers config.

On a GPU (``jax.default_backend() == 'gpu'``) the default is the full released shapes in bfloat16
(SD-1.5: 64x64 latents, SDXL: 128x128). On CPU the default is a reduced size, stated in the output
(channels / 5, fewer transformer layers, 32x32 latents), float32. PyTorch runs on its own default
device (CPU unless a CUDA build is installed) in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lavit_jax.models import unet as U  # noqa: E402

SD15_FULL = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_FULL = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
REDUCED = {
    "sd15": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=1, sample_size=32),
    "sdxl": dict(block_out_channels=(64, 128, 256), layers_per_block=1, attention_head_dim=(1, 2, 4),
                 transformer_layers_per_block=(1, 2, 2), sample_size=32),
}
CONTEXT_LEN = 256


def make_config(variant: str, size: str) -> dict:
    cfg = dict(SD15_FULL if variant == "sd15" else SDXL_FULL)
    if size == "reduced":
        cfg.update(REDUCED[variant])
    return cfg


def make_inputs(cfg: dict, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hw = cfg["sample_size"]
    x = rng.standard_normal((2 * batch, hw, hw, 4)).astype(np.float32)
    ctx = rng.standard_normal((2 * batch, CONTEXT_LEN, cfg["cross_attention_dim"])).astype(np.float32)
    mask = np.ones((2 * batch, CONTEXT_LEN), bool)
    mask[:batch, 77:] = False  # LaVIT's low-res negative attends to its stored 77 positions
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        extra["text_embeds"] = rng.standard_normal((2 * batch, pooled)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (2 * batch, 1))
        mask = None
    return x, ctx, mask, extra


def time_calls(fn, iters: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return first, (time.perf_counter() - t0) / iters


def bench_jax(cfg: dict, batch: int, iters: int, dtype) -> dict:
    config = U.unet_config(cfg)
    model = U.UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype, attention_impl="auto")
    x, ctx, mask, extra = make_inputs(cfg, batch)
    init_args = U.dummy_unet_inputs(config, 1, (x.shape[1], x.shape[2]), 1)
    from flax.core import meta

    params = meta.unbox(jax.jit(lambda k: model.init(k, *init_args))(jax.random.key(0))["params"])
    nparams = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    fn = jax.jit(lambda p, x, t, c, m, te, ti: model.apply({"params": p}, x, t, c, m, te, ti))
    args = (params, jnp.asarray(x, dtype), jnp.float32(500.0), jnp.asarray(ctx, dtype),
            None if mask is None else jnp.asarray(mask), extra.get("text_embeds"), extra.get("time_ids"))
    first, dt = time_calls(lambda: jax.block_until_ready(fn(*args)), iters)
    return {"steps_per_s": 1.0 / dt, "seconds_per_step": dt, "first_call_s": first, "params": nparams,
            "device": str(jax.devices()[0].device_kind), "dtype": jnp.dtype(dtype).name}


def bench_torch(cfg: dict, batch: int, iters: int, dtype_name: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg).to(device=device, dtype=tdtype).eval()
    x, ctx, mask, extra = make_inputs(cfg, batch)
    x_t = torch.tensor(x.transpose(0, 3, 1, 2), device=device, dtype=tdtype)
    ctx_t = torch.tensor(ctx, device=device, dtype=tdtype)
    kw = {}
    if mask is not None:
        kw["encoder_attention_mask"] = torch.tensor(mask, device=device)
    if extra:
        kw["added_cond_kwargs"] = {k: torch.tensor(v, device=device, dtype=tdtype) for k, v in extra.items()}

    def call():
        with torch.no_grad():
            model(x_t, 500, encoder_hidden_states=ctx_t, **kw)
        if device == "cuda":
            torch.cuda.synchronize()

    first, dt = time_calls(call, iters)
    return {"steps_per_s": 1.0 / dt, "seconds_per_step": dt, "first_call_s": first, "device": device,
            "threads": torch.get_num_threads(), "dtype": dtype_name}


def main():
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser()
    p.add_argument("--variant", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    p.add_argument("--size", default="full" if on_gpu else "reduced", choices=["full", "reduced"])
    p.add_argument("--batch", type=int, default=1, help="images per step (the UNet sees twice this for CFG)")
    p.add_argument("--iters", type=int, default=20 if on_gpu else 3)
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = p.parse_args()

    results = []
    for variant in args.variant:
        cfg = make_config(variant, args.size)
        rec = {
            "variant": variant,
            "size": args.size,
            "config": {k: cfg[k] for k in ("block_out_channels", "layers_per_block", "attention_head_dim",
                                           "cross_attention_dim", "sample_size") if k in cfg}
            | {"transformer_layers_per_block": cfg.get("transformer_layers_per_block", 1)},
            "unet_batch": 2 * args.batch,
            "latent_hw": cfg["sample_size"],
            "context_len": CONTEXT_LEN,
            "jax": bench_jax(cfg, args.batch, args.iters, jnp.dtype(args.dtype)),
        }
        if not args.no_torch:
            rec["torch"] = bench_torch(cfg, args.batch, args.iters, args.dtype)
            rec["jax_over_torch"] = rec["jax"]["steps_per_s"] / rec["torch"]["steps_per_s"]
        results.append(rec)
    note = None if args.size == "full" else (
        "reduced size (not the released shapes): " + json.dumps({k: REDUCED[k] for k in args.variant}))
    print(json.dumps({
        "benchmark": "unet_guided_step",
        "backend": jax.default_backend(),
        "host": platform.machine(),
        "cpu_count": os.cpu_count(),
        "note": note,
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
