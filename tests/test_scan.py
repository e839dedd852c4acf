"""Scanned (``nn.scan``) and unrolled layer stacks give the same outputs, and the layouts convert both ways.

Tolerance: the project's parity bound, max |a - b| <= 1e-4 x max |reference| (float32 reassociation:
XLA fuses a loop body differently from unrolled layers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llm_tiny
from lavit_jax.convert import tokenizer as CT
from lavit_jax.models import llama
from lavit_jax.models.token_decoder import DECODER_STACKS, TokenDecoder
from lavit_jax.models.tokenizer import TOKENIZER_STACKS, DynamicVisualTokenizer
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze
from tests import tokenizer_fixture as tfx
from tests.conftest import SHARED

FIX = SHARED / "fixtures" / "image_tokenizer_tiny"


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_stack_unstack_roundtrip():
    rs = np.random.RandomState(0)
    tree = {"x": {"blocks_0": {"w": rs.randn(2, 3)}, "blocks_1": {"w": rs.randn(2, 3)}, "other": rs.randn(4)}}
    stacked = scan.relayout(tree, ((("x",), "blocks"),), True)
    assert stacked["x"]["blocks"]["w"].shape == (2, 2, 3) and "blocks_0" not in stacked["x"]
    back = scan.relayout(stacked, ((("x",), "blocks"),), False)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    with pytest.raises(KeyError, match="blocks_<i>"):
        scan.stack_layers({"blocks_0": 1, "blocks_2": 2}, "blocks")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_tokenizer_scanned_equals_unrolled(remat):
    cfg = tfx.config_from_fixture(FIX / "config.json")
    params = CT.load_visual_tokenizer(FIX / "checkpoint", freeze(cfg, scan_layers=False))
    pixels = jax.random.normal(jax.random.key(0), (2, cfg.image_size, cfg.image_size, 3))
    unrolled = DynamicVisualTokenizer(freeze(cfg, scan_layers=False)).apply({"params": params}, pixels)
    scanned_params = scan.relayout(params, TOKENIZER_STACKS, True)
    assert scanned_params["encoder"]["blocks"]["norm1"]["scale"].shape[0] == cfg.eva_depth
    scanned = DynamicVisualTokenizer(freeze(cfg, scan_layers=True, remat=remat)).apply(
        {"params": scanned_params}, pixels)
    for k in ("eva_features", "merged", "to_quantizer", "llm_features"):
        assert _max_rel(scanned[k], unrolled[k]) <= 1e-4, k
    np.testing.assert_array_equal(scanned["codes"], unrolled["codes"])
    # gradients through the scanned stack equal the unrolled ones
    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, pixels)["merged"] ** 2)
    g_u = jax.grad(lambda p: loss(DynamicVisualTokenizer(freeze(cfg, scan_layers=False)), p))(params)
    g_s = jax.grad(lambda p: loss(DynamicVisualTokenizer(freeze(cfg, scan_layers=True, remat=remat)), p))(
        scanned_params)
    g_s = scan.relayout(g_s, TOKENIZER_STACKS, False)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_u))  # float32 noise relative to the gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale), g_s, g_u)


def test_token_decoder_scanned_equals_unrolled():
    cfg = tfx.config_from_fixture(FIX / "config.json")
    vt = FIX / "checkpoint" / "visual_tokenizer"
    params = CT.load_token_decoder(vt / "highres_tokenizer_decoder.bin", freeze(cfg, scan_layers=False), True)
    codes = jax.random.normal(jax.random.key(1), (2, 40, cfg.code_dim))
    lengths = jnp.array([40, 7])
    a = TokenDecoder(freeze(cfg, scan_layers=False), True).apply({"params": params}, codes, lengths)
    b = TokenDecoder(freeze(cfg, scan_layers=True), True).apply(
        {"params": scan.relayout(params, DECODER_STACKS, True)}, codes, lengths)
    for x, y in zip(a, b, strict=True):
        assert _max_rel(y, x) <= 1e-4


def test_llama_scanned_equals_unrolled_with_cache():
    cfg_s = freeze(llm_tiny.get_config(), scan_layers=True)
    cfg_u = freeze(cfg_s, scan_layers=False)
    params_s = llama.init_params(cfg_s, jax.random.key(0))
    params_u = scan.relayout(params_s, llama.LLAMA_STACKS, False)
    assert "layers_1" in params_u and params_s["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, cfg_s.vocab_size)
    out_s, _ = llama.LlamaForCausalLM(cfg_s).apply({"params": params_s}, input_ids=ids)
    out_u, _ = llama.LlamaForCausalLM(cfg_u).apply({"params": params_u}, input_ids=ids)
    assert _max_rel(out_s, out_u) <= 1e-4
    # prefill into a KV cache, then one decode step: same logits and caches
    for cfg, p in ((cfg_s, params_s), (cfg_u, params_u)):
        cache = llama.init_cache(cfg, 2, 8)
        mask = jnp.concatenate([jnp.ones((2, 6), jnp.int32), jnp.zeros((2, 2), jnp.int32)], 1)
        _, cache = llama.LlamaForCausalLM(cfg).apply({"params": p}, input_ids=ids, attention_mask=mask, cache=cache,
                                                     cache_index=0)
        mask = mask.at[:, 6].set(1)
        step, cache = llama.LlamaForCausalLM(cfg).apply({"params": p}, input_ids=ids[:, :1], attention_mask=mask,
                                                        cache=cache, cache_index=6)
        if cfg.scan_layers:
            ref_step, ref_cache = step, cache
    assert _max_rel(step, ref_step) <= 1e-4
    assert _max_rel(cache["k"], ref_cache["k"]) <= 1e-4
