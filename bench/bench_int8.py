"""Int8 weight-only LLM decode: accuracy next to float on random prompts. Prints JSON.

    python bench/bench_int8.py [--prompts 8] [--prompt-len 16] [--new-tokens 16]

A random LLaMA at configs/llm_tiny.py's shapes (on a GPU, ``--config-7b`` uses the release's 7B shape)
is run with float weights (float32 and bfloat16) and with the same weights quantised to int8
(``lavit_jax.ops.quant``: per-channel symmetric scales). Reported per compute dtype: the largest and the
RMS logit difference (absolute and over the float logits' std) on teacher-forced random prompts, the
next-token (argmax) agreement at every prompt position, and greedy decoding's token agreement
(identical tokens position by position, and whole sequences identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.llm_tiny import get_config  # noqa: E402
from lavit_jax.inference import generation  # noqa: E402
from lavit_jax.models import llama  # noqa: E402
from lavit_jax.ops import quant  # noqa: E402

RELEASE_7B = dict(vocab_size=32002 + 16384, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, max_position_embeddings=2048)


def compare(base, dtype, ids, new_tokens):
    cfg_f = llama.llama_config(base, dtype=dtype, param_dtype=dtype)
    cfg_q = llama.llama_config(base, dtype=dtype, param_dtype=dtype, weights="int8")
    params = llama.init_params(llama.llama_config(base), jax.random.key(0))  # float32 master weights
    qparams = quant.quantize_params(params)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    model_f, model_q = llama.LlamaForCausalLM(cfg_f), llama.LlamaForCausalLM(cfg_q)
    lf = jax.jit(lambda p, i: model_f.apply({"params": p}, input_ids=i)[0])(params, ids)
    lq = jax.jit(lambda p, i: model_q.apply({"params": p}, input_ids=i)[0])(qparams, ids)
    diff = jnp.abs(lq - lf)
    std = float(jnp.std(lf))
    gen_cfg = generation.GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None)
    mask = jnp.ones(ids.shape, jnp.int32)
    tf = np.asarray(generation.generate_from_ids(model_f, params, ids, mask, gen_cfg).tokens)
    tq = np.asarray(generation.generate_from_ids(model_q, qparams, ids, mask, gen_cfg).tokens)
    return {"compute_dtype": dtype, "max_abs_logit_diff": round(float(jnp.max(diff)), 5),
            "max_logit_diff_over_std": round(float(jnp.max(diff)) / std, 5),
            "rms_logit_diff_over_std": round(float(jnp.sqrt(jnp.mean(diff ** 2))) / std, 5),
            "teacher_forced_argmax_agreement": round(float(jnp.mean(jnp.argmax(lq, -1) == jnp.argmax(lf, -1))), 4),
            "greedy_token_agreement": round(float(np.mean(tq == tf)), 4),
            "greedy_sequences_identical": round(float(np.mean(np.all(tq == tf, axis=1))), 4)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--config-7b", action="store_true", help="the release's 7B LLaMA shape (needs an accelerator)")
    args = p.parse_args()
    base = RELEASE_7B if args.config_7b else get_config().to_dict()
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 32000, (args.prompts, args.prompt_len)), jnp.int32)
    results = [compare(base, dtype, ids, args.new_tokens) for dtype in ("float32", "bfloat16")]
    print(json.dumps({"benchmark": "int8 weight-only LLM vs float weights (random model, random prompts)",
                      "backend": jax.default_backend(), "shape": "7b" if args.config_7b else "llm_tiny",
                      "hidden_size": base["hidden_size"], "layers": base["num_hidden_layers"],
                      "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
