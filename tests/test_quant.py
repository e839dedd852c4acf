"""Int8 weight-only LLM: per-channel quantisation as torch's, and a model that runs on it close to float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.llm_tiny import get_config
from lavit_jax.models import llama
from lavit_jax.ops import quant


@pytest.mark.parity
def test_quantize_kernel_matches_torch_per_channel():
    torch = pytest.importorskip("torch")
    w = np.random.RandomState(0).randn(2, 16, 6).astype(np.float32)  # [layers, in, out]
    w[1, :, 3] = 0.0  # an all-zero channel
    got = jax.tree.map(np.asarray, quant.quantize_kernel(jnp.asarray(w)))
    for layer in range(2):
        ref_scale = np.abs(w[layer]).max(0) / 127
        ref_scale[ref_scale == 0] = 1.0
        ref = torch.quantize_per_channel(torch.tensor(w[layer]), torch.tensor(ref_scale, dtype=torch.float64),
                                         torch.zeros(6, dtype=torch.int64), 1, torch.qint8)
        np.testing.assert_array_equal(got["kernel"][layer], ref.int_repr().numpy())
        np.testing.assert_allclose(got["scale"][layer], ref_scale, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(quant.dequantize_kernel(jax.tree.map(jnp.asarray, got)))[layer],
                                   ref.dequantize().numpy(), rtol=1e-6, atol=1e-7)
    assert got["kernel"].dtype == np.int8 and np.abs(got["kernel"]).max() == 127


def test_int8_llama_is_the_float_model_on_dequantised_kernels_and_close_to_float():
    cfg = get_config()
    params = llama.init_params(cfg, jax.random.key(0))
    qparams = quant.quantize_params(params)
    assert qparams["lm_head"]["kernel"].dtype == jnp.int8 and qparams["layers"]["mlp"]["up_proj"]["kernel"].ndim == 3
    assert "kernel" not in qparams["embed_tokens"]  # the embedding table is gathered, not quantised
    model_q = llama.LlamaForCausalLM(llama.llama_config(cfg.to_dict(), weights="int8"))
    model_f = llama.LlamaForCausalLM(cfg)
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 32000, (4, 12)), jnp.int32)
    run_q = jax.jit(lambda p: model_q.apply({"params": p}, input_ids=ids)[0])
    run_f = jax.jit(lambda p: model_f.apply({"params": p}, input_ids=ids)[0])  # one program: float and dequantised
    logits_q = run_q(qparams)
    # exactly the float model whose kernels are the dequantised int8 ones (float32 rounding apart)
    deq = jax.tree.map(lambda x: x, params)
    for path in (("lm_head",),) + tuple(("layers", blk, name) for blk, names in
                                        (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                         ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names):
        node, qnode = deq, qparams
        for k in path:
            node, qnode = node[k], qnode[k]
        node["kernel"] = quant.dequantize_kernel(qnode)
    logits_deq = run_f(deq)
    # (the scale is applied after the matmul here, before it there: float32 reassociation over two layers)
    np.testing.assert_allclose(logits_q, logits_deq, rtol=1e-4, atol=1e-3 * float(jnp.std(logits_deq)))
    # and close to the float model. Each int8 weight is off by at most half a step (a channel's max / 254):
    # for Gaussian rows of 64-176 weights that is ~0.6% of the weights' std, ~1% of the logits' after the
    # model's three matmul stages; 2% (RMS) leaves a 2x margin.
    logits_f = run_f(params)
    rms = float(jnp.sqrt(jnp.mean((logits_q - logits_f) ** 2)) / jnp.std(logits_f))
    agree = float(jnp.mean(jnp.argmax(logits_q, -1) == jnp.argmax(logits_f, -1)))
    assert rms < 0.02 and agree >= 0.9, (rms, agree)
