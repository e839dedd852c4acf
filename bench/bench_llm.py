"""LLM prefill / decode throughput, JAX vs transformers (PyTorch) in the same run. Prints JSON.

CPU: a reduced model (sizes in the output). GPU (jax.default_backend() == 'gpu'): also the LLaMA-2-7B
shape in bf16 with the fraction of the HBM-bandwidth bound reached by decoding (bound = bandwidth /
bytes of weights + KV cache read per step).

    PYTHONPATH=. python bench/bench_llm.py [--hidden 256 --layers 4 --prompt 128 --new 32] [--int8]

``--int8`` adds each shape with int8 weight-only projections (``lavit_jax.ops.quant``, per-channel scales;
its HBM bound counts the int8 bytes). Its accuracy against float: ``bench/bench_int8.py``.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from lavit_jax.inference import generation
from lavit_jax.models import llama
from lavit_jax.ops import quant

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}


def _time(fn, reps):
    fn()  # compile / warm up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_jax(cfg, batch, prompt, new, reps, dtype):
    model = llama.LlamaForCausalLM(cfg)
    int8 = cfg.weights == "int8"
    init_cfg = llama.llama_config(dict(cfg.items()), weights="float") if int8 else cfg
    params = jax.jit(lambda: llama.init_params(init_cfg, jax.random.PRNGKey(0)))()
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if int8:
        params = quant.quantize_params(params)
    ids = jax.random.randint(jax.random.PRNGKey(1), (batch, prompt), 3, 32000)
    mask = jnp.ones((batch, prompt), jnp.int32)
    prefill = jax.jit(lambda p, i, m: model.apply({"params": p}, input_ids=i, attention_mask=m)[0][:, -1])
    t_prefill = _time(lambda: prefill(params, ids, mask).block_until_ready(), reps)
    gcfg = generation.GenerationConfig(max_new_tokens=new, min_new_tokens=new, eos_token_id=None)
    t_gen = _time(lambda: generation.generate_from_ids(model, params, ids, mask, gcfg).tokens.block_until_ready(), reps)
    t_decode = max(t_gen - t_prefill, 1e-9)
    return {
        "prefill_tokens_per_s": batch * prompt / t_prefill,
        "decode_tokens_per_s": batch * (new - 1) / t_decode,
        "decode_step_ms": 1e3 * t_decode / (new - 1),
    }, params


def bench_torch(hf_cfg, batch, prompt, new, reps, torch_dtype):
    import torch
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch_dtype).eval()
    ids = torch.randint(3, 32000, (batch, prompt), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids)
        sync()

    def gen():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=2)
        sync()

    t_prefill = _time(prefill, reps)
    t_gen = _time(gen, reps)
    t_decode = max(t_gen - t_prefill, 1e-9)
    return {
        "device": device,
        "prefill_tokens_per_s": batch * prompt / t_prefill,
        "decode_tokens_per_s": batch * (new - 1) / t_decode,
        "decode_step_ms": 1e3 * t_decode / (new - 1),
    }


def hf_config(cfg):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
    )


def run_shape(name, cfg, args, dtype, torch_dtype, bandwidth=None, with_torch=True):
    out = {"name": name, "dtype": str(jnp.dtype(dtype)), "prompt_len": args.prompt, "new_tokens": args.new,
           "config": {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads")}, "batches": {}}
    for batch in (1, 8):
        res, params = bench_jax(cfg, batch, args.prompt, args.new, args.reps, dtype)
        entry = {"jax": res}
        if bandwidth:
            param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
            kv_bytes = (2 * cfg.num_hidden_layers * batch * (args.prompt + args.new) * cfg.num_key_value_heads
                        * cfg.head_dim * jnp.dtype(dtype).itemsize)
            bound_step_s = (param_bytes + kv_bytes) / bandwidth
            entry["hbm_bound_decode_step_ms"] = 1e3 * bound_step_s
            entry["fraction_of_hbm_bound"] = bound_step_s / (res["decode_step_ms"] / 1e3)
        del params
        if with_torch:
            try:
                entry["torch"] = bench_torch(hf_config(cfg), batch, args.prompt, args.new, args.reps, torch_dtype)
            except Exception as e:  # e.g. no CUDA torch on the GPU machine, or out of memory
                entry["torch"] = {"error": f"{type(e).__name__}: {e}"}
        out["batches"][str(batch)] = entry
    return out


def main():
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--int8", action="store_true", help="also run each shape with int8 weight-only projections")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backend = jax.default_backend()
    small = llama.llama_config(dict(
        vocab_size=48386, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=2048))
    report = {"backend": backend, "device": str(jax.devices()[0].device_kind), "results": []}
    if backend != "gpu":
        report["note"] = "CPU: reduced model size (not the 7B shape); float32"
    report["results"].append(run_shape("reduced", small, args, jnp.float32, torch.float32))
    if args.int8:
        report["results"].append(run_shape("reduced-int8", llama.llama_config(dict(small.items()), weights="int8"),
                                           args, jnp.float32, torch.float32, with_torch=False))
    if backend == "gpu" and not args.skip_7b:
        kind = jax.devices()[0].device_kind
        bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)
        big = llama.llama_config(dict(vocab_size=48386, hidden_size=4096, intermediate_size=11008,
                                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))
        big.dtype = big.param_dtype = "bfloat16"
        big.attention_impl = "auto"
        report["hbm_bytes_per_s"] = bw
        report["results"].append(run_shape("llama2-7b", big, args, jnp.bfloat16, torch.bfloat16, bandwidth=bw,
                                           with_torch=torch.cuda.is_available()))
        if args.int8:
            report["results"].append(run_shape("llama2-7b-int8", llama.llama_config(dict(big.items()), weights="int8"),
                                               args, jnp.bfloat16, torch.bfloat16, bandwidth=bw, with_torch=False))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
