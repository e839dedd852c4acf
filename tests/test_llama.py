"""LLaMA model: logits parity with transformers, HF checkpoint loading, sharded forward/backward."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn

from lavit_jax import checkpoint
from lavit_jax.convert import llama as CL
from lavit_jax.convert import torch_io as weights
from lavit_jax.models import llama
from lavit_jax.ops import sharding
from tests import llm_fixtures as fx


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    hf = fx.make_hf_model(seed=0)
    d = fx.save_hf(hf, tmp_path_factory.mktemp("gqa"), safetensors=True)
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))  # really sharded
    return hf, d


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    hf = fx.make_hf_model(seed=1, num_key_value_heads=4)
    d = fx.save_hf(hf, tmp_path_factory.mktemp("mha"), safetensors=False)
    assert os.path.isfile(os.path.join(d, "pytorch_model.bin.index.json"))
    return hf, d


def _compare_logits(hf, model, params, seed=0):
    rs = np.random.RandomState(seed)
    ids, mask = fx.left_padded_ids(rs, [9, 5, 1], 9, high=fx.VOCAB)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=fx.hf_positions(mask))
    ref = ref.logits.numpy()
    out, _ = model.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    out = np.asarray(out)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_logits_match_transformers(which, request):
    hf, d = request.getfixturevalue(which)
    model, params = fx.load_flax(d)
    _compare_logits(hf, model, params)


@pytest.mark.parity
@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8},
    ],
)
def test_rope_scaling_and_tied_embeddings(rope_scaling, tmp_path):
    hf = fx.make_hf_model(seed=2, rope_theta=500.0, rope_scaling=rope_scaling, tie_word_embeddings=True,
                          eos_boost=False)
    d = fx.save_hf(hf, tmp_path, safetensors=True, shard="10GB")
    model, params = fx.load_flax(d)
    assert model.config.tie_word_embeddings and "lm_head" not in params
    _compare_logits(hf, model, params, seed=3)


def test_config_from_hf_fields(gqa):
    cfg = checkpoint.read_llama_config(os.path.join(gqa[1], "config.json"))
    hf_cfg = gqa[0].config
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings"):
        assert cfg[k] == getattr(hf_cfg, k), k
    with pytest.raises(ValueError, match="num_key_value_heads"):
        llama.llama_config({"num_attention_heads": 4, "num_key_value_heads": 3, "hidden_size": 32})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        llama.llama_config({"rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_loader_reports_all_mismatches_and_bad_shards(gqa, tmp_path):
    from safetensors.torch import save_file

    hf = gqa[0]
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(7, 32)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(weights.WeightMismatchError) as e:
        CL.load_hf_llama(tmp_path)
    msg = str(e.value)
    assert "layers_1/mlp/up_proj/kernel" in msg and "model.extra.weight" in msg and "q_proj.weight" in msg

    # a truncated shard is named in the error
    bad = tmp_path / "bad"
    bad.mkdir()
    import shutil

    for f in os.listdir(gqa[1]):
        shutil.copy(os.path.join(gqa[1], f), bad / f)
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[1]
    data = (bad / shard).read_bytes()
    (bad / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightFileError, match=shard):
        CL.load_hf_llama(bad)


def test_loader_casts_to_bf16(gqa):
    model, params = fx.load_flax(gqa[1], dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ref = dict(gqa[0].state_dict())["model.layers.0.mlp.gate_proj.weight"].numpy().T
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["mlp"]["gate_proj"]["kernel"][0]), jnp.asarray(ref, jnp.bfloat16)
    )


@pytest.mark.sharding
def test_sharded_forward_backward_matches_single_device(gqa):
    base_cfg = checkpoint.read_llama_config(gqa[1])
    _, params = fx.load_flax(gqa[1])
    rs = np.random.RandomState(5)
    ids, mask = fx.left_padded_ids(rs, [8, 6, 3, 8], 8, high=fx.VOCAB)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss_fn(model, params, ids, mask):
        logits, _ = model.apply({"params": params}, input_ids=ids, attention_mask=mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        w = mask[:, 1:].astype(jnp.float32)
        return (ce * w).sum() / w.sum()

    single_model = llama.LlamaForCausalLM(base_cfg)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(single_model, p, ids, mask)))(params)

    cfg = checkpoint.read_llama_config(gqa[1], remat="dots")
    model = llama.LlamaForCausalLM(cfg)
    mesh = sharding.make_mesh((1, 4, 2))
    rules = sharding.DEFAULT_RULES
    p_shard = sharding.logical_sharding(llama.param_specs(cfg), mesh, rules)
    b_shard = sharding.batch_sharding(mesh, 2, rules)
    params_s = jax.device_put(params, p_shard)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        grad_fn = jax.value_and_grad(lambda p, i, m: loss_fn(model, p, i, m))
        out_shardings = (sharding.replicated(mesh), p_shard)
        fn = jax.jit(grad_fn, in_shardings=(p_shard, b_shard, b_shard), out_shardings=out_shardings)
        loss, grads = fn(params_s, jax.device_put(ids, b_shard), jax.device_put(mask, b_shard))
    spec = grads["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec  # [layers, embed, mlp]
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4),
                 grads, ref_grads)
