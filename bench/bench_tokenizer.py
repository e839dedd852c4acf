"""Image -> ids throughput of the visual tokenizer at the full-size widths. Prints JSON.

    python bench/bench_tokenizer.py [--batch 1 32] [--eva-depth N] [--merger-depth N] [--iters N]

On CPU the encoder/merger depths default to 2/1 (full widths 1408, 16 heads, 256 patches, 16384
codes); on an accelerator the full depths (40/12). The reduced depths are stated in the output.
The reference PyTorch tokenizer is not a pip package (it needs the LaVIT repository and timm), so
no PyTorch number is taken here; the LLM and UNet benchmarks compare against transformers/diffusers.
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

from configs.lavit_7b import tokenizer_config  # noqa: E402
from lavit_jax.models import tokenizer as T  # noqa: E402
from lavit_jax.ops.config import freeze  # noqa: E402


def main():
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--eva-depth", type=int, default=2 if on_cpu else 40)
    p.add_argument("--merger-depth", type=int, default=1 if on_cpu else 12)
    p.add_argument("--iters", type=int, default=2 if on_cpu else 20)
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    args = p.parse_args()

    cfg = tokenizer_config()
    cfg.eva_depth, cfg.merger_depth, cfg.dtype = args.eva_depth, args.merger_depth, args.dtype
    cfg.attention_impl = "auto"
    model = T.DynamicVisualTokenizer(freeze(cfg))
    x0 = jnp.zeros((1, 224, 224, 3), jnp.float32)
    params = jax.jit(lambda k: model.init(k, x0))(jax.random.key(0))["params"]
    from flax.core import meta

    params = meta.unbox(params)
    fn = jax.jit(lambda p, x: T.to_llm_ids(*model.apply({"params": p}, x, method="tokenize"), add_special=True))
    results = []
    for b in args.batch:
        x = jax.random.normal(jax.random.key(b), (b, 224, 224, 3), jnp.float32)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            out = fn(params, x)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / args.iters
        results.append({"batch": b, "images_per_s": b / dt, "seconds_per_batch": dt, "first_call_s": compile_s})
    print(json.dumps({
        "benchmark": "tokenizer image->ids",
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "widths": {"eva_width": cfg.eva_width, "heads": cfg.eva_heads, "patches": 256, "n_code": cfg.n_code},
        "eva_depth": cfg.eva_depth, "merger_depth": cfg.merger_depth,
        "reduced_depth": cfg.eva_depth != 40 or cfg.merger_depth != 12,
        "dtype": cfg.dtype, "iters": args.iters, "results": results,
        "pytorch_reference": "not measured (reference tokenizer is not an installable package)",
    }, indent=1))


if __name__ == "__main__":
    main()
