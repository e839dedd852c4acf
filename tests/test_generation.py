"""Generation: greedy / beam / CFG token-identical to transformers generate; processors equal HF's; one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hfp
from transformers.modeling_outputs import CausalLMOutputWithPast

from lavit_jax.inference import generation
from lavit_jax.inference.generation import GenerationConfig
from tests import llm_fixtures as fx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = fx.make_hf_model(seed=0)
    d = fx.save_hf(hf, tmp_path_factory.mktemp("gen"))
    model, params = fx.load_flax(d)
    return hf, model, params


def _hf_new_tokens(out, prompt_len):
    return out[:, prompt_len:].numpy()


def _assert_same_tokens(ours, hf_new, pad=fx.EOS):
    ours = np.asarray(ours.tokens)
    assert ours.shape[0] == hf_new.shape[0]
    n = hf_new.shape[1]
    np.testing.assert_array_equal(ours[:, :n], hf_new)
    assert np.all(ours[:, n:] == pad)


@pytest.mark.parity
def test_greedy_matches_hf(tiny):
    hf, model, params = tiny
    ids, mask = fx.left_padded_ids(np.random.RandomState(0), [6, 3, 1, 5], 6, high=32000)
    cfg = GenerationConfig(max_new_tokens=12, min_new_tokens=2, suppress_ranges=((32002, fx.VOCAB),))
    ours = generation.generate_from_ids(model, params, ids, mask, cfg)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=12, min_new_tokens=2, suppress_tokens=list(range(32002, fx.VOCAB)),
                          eos_token_id=fx.EOS, pad_token_id=fx.EOS)
    hf_new = _hf_new_tokens(ref, ids.shape[1])
    assert (hf_new == fx.EOS).any(), "test needs a sequence that stops at eos"
    _assert_same_tokens(ours, hf_new)


@pytest.mark.parity
@pytest.mark.parametrize(
    "num_beams,num_return,length_penalty,early_stopping,min_new,max_new",
    [(2, 1, 1.0, False, 3, 14), (5, 1, 0.0, True, 2, 10), (3, 2, 1.5, "never", 0, 8)],
)
def test_beam_search_matches_hf(tiny, num_beams, num_return, length_penalty, early_stopping, min_new, max_new):
    hf, model, params = tiny
    ids, mask = fx.left_padded_ids(np.random.RandomState(1), [5, 2, 4], 5, high=32000)
    cfg = GenerationConfig(max_new_tokens=max_new, min_new_tokens=min_new, num_beams=num_beams,
                           num_return_sequences=num_return, length_penalty=length_penalty,
                           early_stopping=early_stopping, suppress_ranges=((32000, fx.VOCAB),))
    ours = generation.generate_from_ids(model, params, ids, mask, cfg)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
                          early_stopping=early_stopping, max_new_tokens=max_new, min_new_tokens=min_new,
                          suppress_tokens=list(range(32000, fx.VOCAB)), eos_token_id=fx.EOS, pad_token_id=fx.EOS)
    _assert_same_tokens(ours, _hf_new_tokens(ref, ids.shape[1]))


@pytest.mark.parity
def test_beam_sampling_matches_hf_on_the_same_draws(tiny, monkeypatch):
    """Beam sampling (do_sample + num_beams): HF's ``_beam_search`` with its ``torch.multinomial`` draw replaced by
    our draw on the same noise gives our tokens, so warpers (min_tokens_to_keep 2), accumulated scores and
    the beam bookkeeping all match; the draw itself is checked against multinomial's law below."""
    hf, model, params = tiny
    ids, mask = fx.left_padded_ids(np.random.RandomState(8), [5, 3], 5, high=32000)
    key = jax.random.key(7)
    kw = dict(max_new_tokens=8, min_new_tokens=2, num_beams=3, num_return_sequences=2, temperature=0.7, top_k=4,
              top_p=0.9)
    cfg = GenerationConfig(do_sample=True, suppress_ranges=((32000, fx.VOCAB),), **kw)
    ours = generation.generate_from_ids(model, params, ids, mask, cfg, rng=key)
    draws = []

    def multinomial(probs, num_samples, **_):  # sampling order of softmax(acc) = top-k order of log(probs) + noise
        idx = generation.sample_without_replacement(jax.random.fold_in(key, len(draws)),
                                                    jnp.asarray(torch.log(probs).numpy()), num_samples)
        draws.append(num_samples)
        return torch.tensor(np.asarray(idx), dtype=torch.long)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=True,
                          suppress_tokens=list(range(32000, fx.VOCAB)), eos_token_id=fx.EOS, pad_token_id=fx.EOS, **kw)
    assert len(draws) >= 3 and set(draws) == {6}  # HF drew 2 x num_beams candidates per step, through our patch
    _assert_same_tokens(ours, _hf_new_tokens(ref, ids.shape[1]))


def test_sample_without_replacement_follows_multinomial():
    """First draw ~ p, second ~ p_j / (1 - p_i) given the first (multinomial without replacement), 20k draws."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    n = 20000
    keys = jax.random.split(jax.random.key(3), n)
    idx = np.asarray(jax.vmap(lambda k: generation.sample_without_replacement(k, jnp.log(jnp.asarray(p))[None], 2)[0])(
        keys))
    first = np.bincount(idx[:, 0], minlength=4) / n
    np.testing.assert_allclose(first, p, atol=4 * np.sqrt(p * (1 - p) / n).max())
    second_given_0 = np.bincount(idx[idx[:, 0] == 0, 1], minlength=4) / np.sum(idx[:, 0] == 0)
    want = np.where(np.arange(4) == 0, 0.0, p / (1 - p[0]))
    np.testing.assert_allclose(second_given_0, want, atol=4 * np.sqrt(0.25 / np.sum(idx[:, 0] == 0)))


@pytest.mark.parity
def test_beam_search_from_embeds_matches_hf(tiny):
    """The understanding path: continuous features as inputs_embeds (HF returns only new tokens)."""
    hf, model, params = tiny
    rs = np.random.RandomState(2)
    embeds = rs.normal(size=(2, 6, 32)).astype(np.float32)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    cfg = GenerationConfig(max_new_tokens=10, min_new_tokens=4, num_beams=2, suppress_ranges=((32000, fx.VOCAB),))
    ours = generation.generate(model, params, jnp.asarray(embeds), jnp.asarray(mask), cfg)
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask), do_sample=False,
                          num_beams=2, max_new_tokens=10, min_new_tokens=4,
                          suppress_tokens=list(range(32000, fx.VOCAB)), eos_token_id=fx.EOS, pad_token_id=fx.EOS)
    _assert_same_tokens(ours, ref.numpy())


@pytest.mark.parity
@pytest.mark.parametrize("negative", [False, True])
def test_cfg_greedy_matches_hf_guidance(tiny, negative):
    """LLM CFG: uncond = [IMG] alone (HF default: the prompt's last token) or a left-padded negative prompt."""
    hf, model, params = tiny
    rs = np.random.RandomState(3)
    ids, mask = fx.left_padded_ids(rs, [5, 3], 5, high=32000, last=32000)
    kw = dict(max_new_tokens=10, min_new_tokens=3, suppress_ranges=((3, 32000),), eos_token_id=32001,
              pad_token_id=fx.EOS, guidance_scale=3.0)
    cfg = GenerationConfig(**kw)
    hf_kw = dict(do_sample=False, max_new_tokens=10, min_new_tokens=3, suppress_tokens=list(range(3, 32000)),
                 eos_token_id=32001, pad_token_id=fx.EOS, guidance_scale=3.0)
    embed = lambda x: model.apply({"params": params}, jnp.asarray(x), method=model.embed)  # noqa: E731
    if negative:
        neg, neg_mask = fx.left_padded_ids(rs, [4, 2], 4, high=32000, last=32000)
        ue, um = embed(neg), jnp.asarray(neg_mask)
        hf_kw.update(negative_prompt_ids=torch.tensor(neg), negative_prompt_attention_mask=torch.tensor(neg_mask))
    else:
        ue, um = embed(np.full((2, 1), 32000)), jnp.ones((2, 1), jnp.int32)
    ours = generation.generate(model, params, embed(ids), jnp.asarray(mask), cfg, uncond_embeds=ue, uncond_mask=um)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **hf_kw)
    hf_new = _hf_new_tokens(ref, ids.shape[1])
    # guidance really changes the result (else the test could not tell)
    plain = generation.generate_from_ids(model, params, ids, mask, GenerationConfig(**{**kw, "guidance_scale": None}))
    assert not np.array_equal(np.asarray(plain.tokens)[:, : hf_new.shape[1]], hf_new)
    _assert_same_tokens(ours, hf_new)
    if negative:
        return
    # the guidance scale is traced: another scale reuses the compiled program and still matches HF
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ours = generation.generate(model, params, embed(ids), jnp.asarray(mask), GenerationConfig(**{
            **kw, "guidance_scale": 1.5}), uncond_embeds=ue, uncond_mask=um)
        jax.block_until_ready(ours)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **{
            **hf_kw, "guidance_scale": 1.5})
    _assert_same_tokens(ours, _hf_new_tokens(ref, ids.shape[1]))


class _FixedLogitsModel(torch.nn.Module):
    """Stands in for the model inside HF's CFG processor: returns fixed unconditional logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kw):
        return CausalLMOutputWithPast(logits=self.logits[:, None, :], past_key_values=None)


@pytest.mark.parity
def test_processors_match_hf_warpers():
    rs = np.random.RandomState(4)
    v = 600
    scores = (rs.standard_normal((5, v)) * 3).astype(np.float32)
    uncond = (rs.standard_normal((5, v)) * 3).astype(np.float32)
    scores[0, :50] = scores[0, 50]  # ties at the top-k boundary
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.8, min_new_tokens=5,
                           eos_token_id=7, suppress_ranges=((3, 100), (550, 560)), guidance_scale=2.5)
    step = 2
    ours = np.asarray(generation.process_scores(jnp.asarray(scores), step, cfg, jnp.asarray(uncond)))
    prompt_len = 4
    input_ids = torch.zeros((5, prompt_len + step), dtype=torch.long)
    procs = hfp.LogitsProcessorList([
        hfp.UnbatchedClassifierFreeGuidanceLogitsProcessor(2.5, _FixedLogitsModel(torch.tensor(uncond))),
        hfp.MinNewTokensLengthLogitsProcessor(prompt_len, 5, 7),
        hfp.SuppressTokensLogitsProcessor(list(range(3, 100)) + list(range(550, 560))),
        hfp.TemperatureLogitsWarper(0.7),
        hfp.TopKLogitsWarper(40),
        hfp.TopPLogitsWarper(0.8),
    ])
    ref = procs(input_ids, torch.tensor(scores)).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    finite = ~np.isinf(ref)
    assert finite.sum(-1).min() >= 1 and (finite.sum(-1) < 40).any()
    np.testing.assert_allclose(ours[finite], ref[finite], atol=1e-5)
    # processed distributions equal
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(jnp.asarray(ours), -1)),
                               torch.softmax(torch.tensor(ref), -1).numpy(), atol=1e-6)


def test_sampling_respects_filters_and_rng(tiny):
    hf, model, params = tiny
    ids, mask = fx.left_padded_ids(np.random.RandomState(5), [4, 2], 4, high=32000, last=32000)
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=5,
                           suppress_ranges=((3, 32000),), eos_token_id=32001, num_return_sequences=3)
    a = generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(0))
    b = generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(0))
    c = generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(1))
    toks = np.asarray(a.tokens)
    assert toks.shape == (6, 8)
    np.testing.assert_array_equal(toks, np.asarray(b.tokens))
    assert not np.array_equal(toks, np.asarray(c.tokens))
    assert np.all((toks < 3) | (toks >= 32000)) and not np.any(toks == 32001)  # suppression + min_new_tokens
    # every sampled token is within the top-5 of its step (teacher-forced check with HF)
    full = np.concatenate([np.repeat(ids, 3, 0), toks], 1)
    fmask = np.concatenate([np.repeat(mask, 3, 0), np.ones_like(toks)], 1)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(full), attention_mask=torch.tensor(fmask),
                    position_ids=fx.hf_positions(fmask)).logits.numpy()
    for s in range(8):
        lg = logits[:, ids.shape[1] - 1 + s].copy()
        lg[:, 3:32000] = -np.inf
        top5 = np.argsort(-lg, -1)[:, :5]
        assert all(toks[r, s] in top5[r] for r in range(6))


def test_decode_loop_compiles_once_per_bucket(tiny):
    hf, model, params = tiny
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=10, suppress_ranges=((3, 32000),),
                           eos_token_id=32001)
    rs = np.random.RandomState(6)
    ids, mask = fx.left_padded_ids(rs, [3, 2], 3, high=32000)
    generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(0))
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # new prompt lengths (3, 5, 9 slots) within one length bucket (16) reuse the compiled program
        for seed, width in enumerate((3, 5, 9)):
            ids, mask = fx.left_padded_ids(rs, [width, 1 + seed % 3], width, high=32000)
            generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(seed))
        assert compiles == []
        # a new batch size compiles again (the counter does count)
        ids, mask = fx.left_padded_ids(rs, [4, 2, 3], 4, high=32000)
        generation.generate_from_ids(model, params, ids, mask, cfg, rng=jax.random.PRNGKey(0))
        assert len(compiles) >= 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=3, min_new_tokens=5).validate()
    with pytest.raises(ValueError, match="guidance"):
        GenerationConfig(num_beams=2, guidance_scale=3.0).validate()
