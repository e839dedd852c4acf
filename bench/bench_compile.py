"""Compile time of repeated stacks, scanned (``nn.scan``) vs unrolled, at growing depth. Prints JSON.

    python bench/bench_compile.py [--depths 4 16 32] [--models llama eva]

Reduced widths (LLaMA hidden 256 / 4 heads / vocab 1024, sequence 64; EVA width 128 / 4 heads, 224 px);
reported: trace + lower time (``jax.jit(...).lower``), XLA compile time (``.compile()``) of the forward
pass, and the optimised HLO size. With scan the compiled program holds one layer body, so its compile
time stays flat in depth; unrolled it grows with the layer count.
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

from lavit_jax.models import llama  # noqa: E402
from lavit_jax.models.eva_vit import EvaViT  # noqa: E402


def _compile(fn, *args):
    """(trace + lower seconds, XLA compile seconds, optimised HLO characters) of ``jax.jit(fn)(*args)``."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return t1 - t0, time.perf_counter() - t1, len(compiled.as_text() or "")


def llama_case(depth: int, scan: bool):
    cfg = llama.llama_config(dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=depth,
                                  num_attention_heads=4, max_position_embeddings=128), scan_layers=scan)
    model = llama.LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, 64), jnp.int32)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    return _compile(lambda p, x: model.apply({"params": p}, input_ids=x)[0], params, ids)


def eva_case(depth: int, scan: bool):
    model = EvaViT(width=128, depth=depth, heads=4, scan_layers=scan)
    x = jnp.zeros((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    return _compile(lambda p, x: model.apply({"params": p}, x), params, x)


CASES = {"llama": llama_case, "eva": eva_case}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    results = []
    for name in args.models:
        for scan in (True, False):
            for depth in args.depths:
                lower_s, compile_s, hlo_chars = CASES[name](depth, scan)
                results.append({"model": name, "scan_layers": scan, "depth": depth, "lower_s": round(lower_s, 3),
                                "compile_s": round(compile_s, 3), "hlo_chars": hlo_chars})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "compile time, scanned vs unrolled",
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
