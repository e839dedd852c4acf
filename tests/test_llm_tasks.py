"""Task functions: sequences built as the reference builds them, outputs equal to transformers generate."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch

from lavit_jax.data.text_tokenizer import load_text_tokenizer
from lavit_jax.inference import llm_tasks
from tests import llm_fixtures as fx

LINES = [
    "A photo of an astronaut riding a horse in the forest.", "Question: what is in the image? Answer: a dog",
    "a sculpture of a duck made of wool", "A small cactus wearing a straw hat and neon sunglasses in the desert.",
    "Cute adorable little goat, unreal engine, cozy interior lighting", "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    fx.train_tokenizer(d, LINES)
    return load_text_tokenizer(d), spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = fx.make_hf_model(seed=3)
    with torch.no_grad():  # favour ids of the small text vocabulary so captions decode to real words
        hf.get_output_embeddings().weight[3:400] *= 2.0
    model, params = fx.load_flax(fx.save_hf(hf, tmp_path_factory.mktemp("tasks")))
    return hf, model, params


def test_tokenizer_matches_sentencepiece(tok):
    ours, sp = tok
    texts = ["Question: what is a dog? Answer:", "a horse", ""]
    ids, mask = ours.encode_batch(texts)
    for i, t in enumerate(texts):
        ref = sp.encode(t)
        assert list(ids[i, mask[i] == 1]) == ref
        assert np.all(ids[i, mask[i] == 0] == 2) and np.all(mask[i, ids.shape[1] - len(ref):] == 1)
    assert ours.decode_batch([sp.encode("a sculpture of a duck")])[0] == "a sculpture of a duck"


@pytest.mark.parity
def test_converted_fast_tokenizer_matches_transformers(tok, tmp_path):
    """text_tokenizer.json (read with tokenizers alone) encodes, pads and decodes as transformers' LlamaTokenizer."""
    from lavit_jax.data import text_tokenizer

    hf, sp = tok
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    text_tokenizer.save_fast_tokenizer(src, tmp_path / text_tokenizer.FAST_FILE)
    fast = load_text_tokenizer(tmp_path)
    assert fast.fast is not None and fast.hf is None
    assert (fast.bos_id, fast.eos_id, fast.pad_id, fast.vocab_size) == (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size)
    texts = LINES + ["  two  spaces", "Ünïcödé 😀 and </s> <s> tags", "x", "new\nline", ""]
    for t in texts:
        assert fast.encode(t) == hf.encode(t), t
    for got, want in zip(fast.encode_batch(texts, length=32), hf.encode_batch(texts, length=32)):
        np.testing.assert_array_equal(got, want)
    rows = np.random.RandomState(0).randint(0, hf.vocab_size + 20, (16, 12))
    assert fast.decode_batch(rows, with_dropped=True) == hf.decode_batch(rows, with_dropped=True)


def test_decoding_counts_ids_without_text_and_empty_captions_say_why(tok, caplog):
    ours, sp = tok
    ids = [*sp.encode("a horse"), 5000, 31999]  # 400 pieces: the last two ids have no text
    texts, dropped = ours.decode_batch([ids, sp.encode("a dog")], with_dropped=True)
    assert texts == ["a horse", "a dog"] and dropped == [2, 0]
    with caplog.at_level("WARNING"):
        assert ours.decode_batch([ids]) == ["a horse"]
    assert "left out 2 generated ids" in caplog.text
    eos = ours.eos_id
    assert "EOS" in llm_tasks._empty_caption_note("", [eos], 0, ours)
    assert "have no text" in llm_tasks._empty_caption_note("", [5000, 6000], 2, ours)
    assert "'.'" in llm_tasks._empty_caption_note(". a horse", sp.encode(". a horse"), 0, ours)
    assert llm_tasks._empty_caption_note("a horse. a dog", sp.encode("a horse. a dog"), 0, ours) == ""
    assert llm_tasks._empty_caption_note("a horse", ids, 2, ours).startswith("left out: 2 of the")


def _reference_understanding(hf, feats, lengths, text_ids=None, text_mask=None):
    """The reference's compute_dynamic_visual_embeds + pad_input_embeds, in torch."""
    emb = hf.get_input_embeddings()
    with torch.no_grad():
        special = emb(torch.tensor([32000, 32001]))
        eos = emb(torch.tensor([fx.EOS]))
        parts = [torch.cat([special[:1], torch.tensor(f[:n]), special[1:]]) for f, n in zip(feats, lengths)]
        width = max(len(p) for p in parts)
        img = eos.repeat(len(parts), width, 1)
        img_mask = torch.zeros(len(parts), width, dtype=torch.long)
        for i, p in enumerate(parts):
            img[i, -len(p):] = p
            img_mask[i, -len(p):] = 1
        if text_ids is None:
            return img, img_mask
        temb = emb(torch.tensor(text_ids))
        out, out_mask = [], []
        for i in range(len(parts)):
            tm = torch.tensor(text_mask[i])
            n = int(tm.sum())
            pad = len(tm) - n
            out.append(torch.cat([temb[i, :pad], img[i], temb[i, pad:]]))
            out_mask.append(torch.cat([tm[:pad], img_mask[i], tm[pad:]]))
        return torch.stack(out), torch.stack(out_mask)


def test_assemble_orders_real_parts_and_left_pads():
    a = jnp.array([[5, 6, 7], [8, 0, 0]])
    b = jnp.array([[0, 1, 2], [3, 4, 9]])
    vals, mask = llm_tasks.assemble([(a, jnp.array([3, 1]), "front"), (b, jnp.array([2, 1]), "back")], pad_value=-1)
    np.testing.assert_array_equal(np.asarray(vals), [[-1, 5, 6, 7, 1, 2], [-1, -1, -1, -1, 8, 9]])
    np.testing.assert_array_equal(np.asarray(mask), [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])


def _feats(seed=0):
    rs = np.random.RandomState(seed)
    return rs.normal(size=(2, 5, 32)).astype(np.float32), np.array([5, 2], np.int32)


@pytest.mark.parity
def test_caption_matches_reference_pipeline(tiny, tok):
    hf, model, params = tiny
    tokenizer = tok[0]
    feats, lengths = _feats(0)
    ours = llm_tasks.caption(model, params, tokenizer, jnp.asarray(feats), jnp.asarray(lengths), max_new_tokens=12)
    embeds, mask = _reference_understanding(hf, feats, lengths)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=2, max_new_tokens=12,
                          min_new_tokens=8, suppress_tokens=list(range(32000, fx.VOCAB)), bos_token_id=1,
                          eos_token_id=fx.EOS, pad_token_id=fx.EOS, length_penalty=1.0)
    ref = [t.strip().split(".")[0] for t in tokenizer.hf.batch_decode(out, skip_special_tokens=True)]
    assert any(ref), "captions should contain text"
    assert ours == ref
    assert all(c.note == "" for c in ours if c)  # a non-empty caption of text ids carries no note


@pytest.mark.parity
def test_vqa_matches_reference_pipeline(tiny, tok):
    hf, model, params = tiny
    tokenizer = tok[0]
    feats, lengths = _feats(1)
    questions = ["what is in the image?", "is it a dog"]
    res = llm_tasks.vqa(model, params, tokenizer, jnp.asarray(feats), jnp.asarray(lengths), questions)
    text_ids, text_mask = tokenizer.encode_batch([f"Question: {q} Answer:" for q in questions])
    embeds, mask = _reference_understanding(hf, feats, lengths, text_ids, text_mask)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=5, max_new_tokens=10,
                          min_new_tokens=2, suppress_tokens=list(range(32000, fx.VOCAB)), eos_token_id=fx.EOS,
                          pad_token_id=fx.EOS, length_penalty=0.0, early_stopping=True)
    ref = [llm_tasks.postprocess_answer(t) for t in tokenizer.hf.batch_decode(out, skip_special_tokens=True)]
    has_spacy_model = importlib.util.find_spec("en_core_web_sm") is not None
    if not has_spacy_model:
        assert not res.lemmatized and "not installed" in res.note
        assert res.answers == [r.lower() for r in ref]  # always lower-cased, even without spaCy
        assert all(a.answer_processing == "lowercase-only" for a in res.answers)
    assert llm_tasks.postprocess_answer(" a dog, sitting. Long answer: x") == "a dog"


def test_vqa_compiles_one_program_per_prompt_bucket(tiny, tok):
    """Questions of new lengths within a length bucket reuse the compiled program; a new bucket compiles one
    program (input assembly and beam search together), not one per stage."""
    _, model, params = tiny
    tokenizer = tok[0]
    feats, lengths = (jnp.asarray(a) for a in _feats(1))
    ask = lambda q: llm_tasks.vqa(model, params, tokenizer, feats, lengths, [q, q], max_new_tokens=3)  # noqa: E731
    n_tokens = lambda q: len(tokenizer.encode(f"Question: {q} Answer:"))  # noqa: E731
    short, longer = "is it a dog", "what is in the image?"
    assert n_tokens(short) != n_tokens(longer) and max(n_tokens(short), n_tokens(longer)) <= 16  # one bucket
    many = "the quick brown fox jumps over the lazy dog"
    assert 16 < n_tokens(many) <= 32  # the next bucket
    ask(short)  # compiles the 16-token bucket
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ask(longer)
        within = len(compiles)
        ask(many)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert within == 0
    assert len(compiles) == 1


@pytest.mark.parity
def test_text_to_image_ids_matches_hf_cfg(tiny, tok):
    hf, model, params = tiny
    tokenizer, sp = tok
    texts = ["a horse in the forest", "a duck"]
    cfg = llm_tasks.image_generation_config(guidance_scale=3.0, do_sample=False, min_new_tokens=4, max_new_tokens=10)
    ours = llm_tasks.text_to_image_ids(model, params, tokenizer, texts, jax.random.PRNGKey(0), config=cfg)
    # reference sequence: text without BOS, left-padded with 2, then [IMG]
    enc = [sp.encode(t) for t in texts]
    width = max(map(len, enc))
    ids = np.array([[2] * (width - len(e)) + e + [32000] for e in enc])
    mask = np.array([[0] * (width - len(e)) + [1] * (len(e) + 1) for e in enc])
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=10, min_new_tokens=4, suppress_tokens=list(range(3, 32000)),
                          eos_token_id=32001, pad_token_id=2, guidance_scale=3.0)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(ours.tokens)[:, : ref.shape[1]], ref)
    codes, n = llm_tasks.image_codes_from_ids(ours.tokens)
    for row, c, k in zip(ref, np.asarray(codes), np.asarray(n)):
        expected = [t - 32002 for t in row if t >= 32002]
        assert list(c[:k]) == expected and np.all(c[k:] == 0)


def test_multimodal_sequence_and_sampling(tiny, tok):
    hf, model, params = tiny
    tokenizer, sp = tok
    image_ids = np.array([[32005, 32010, 32003, 0], [32060, 0, 0, 0]], np.int32)
    image_lengths = np.array([3, 1], np.int32)
    texts = ["a duck", "in the desert"]
    rows = [[image_ids[i, : image_lengths[i]], tokenizer.encode(t)] for i, t in enumerate(texts)]
    ids, mask = llm_tasks.token_prompt_ids(rows)
    for i, t in enumerate(texts):
        expected = list(image_ids[i, : image_lengths[i]]) + sp.encode(t) + [32000]
        got = np.asarray(ids[i])[np.asarray(mask[i]) == 1]
        assert list(got) == expected and np.all(np.asarray(mask[i])[-len(expected):] == 1)
    out = llm_tasks.token_prompt_to_image_ids(
        model, params, ids, mask, jax.random.PRNGKey(1),
        config=llm_tasks.image_generation_config(min_new_tokens=5, max_new_tokens=8, num_return_sequences=2),
    )
    toks = np.asarray(out.tokens)
    assert toks.shape == (4, 8)
    assert np.all((toks < 3) | (toks >= 32000))  # text ids 3..31999 suppressed
    assert not np.any(toks[:, :5] == 32001)  # min_new_tokens


# ------------------------------------------------------------------------------------ sampling options


def test_repetition_penalty_matches_hf_processor():
    """Ids in the first ``step`` columns are penalised as HF's RepetitionPenaltyLogitsProcessor does."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from lavit_jax.inference.generation import repetition_penalty

    rs = np.random.RandomState(0)
    scores = rs.normal(scale=3.0, size=(4, 50)).astype(np.float32)
    tokens = rs.randint(0, 50, size=(4, 9))
    tokens[:, 1] = tokens[:, 0]  # repeated ids
    for step, p in ((0, 1.3), (1, 1.3), (6, 1.3), (9, 0.7), (6, 2.5)):
        ours = repetition_penalty(jnp.asarray(scores), jnp.asarray(tokens), step, p)
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor(tokens[:, :step]), torch.tensor(scores).clone())
        ours, ref = np.asarray(ours), ref.numpy()
        np.testing.assert_array_equal(ours != scores, ref != scores)  # the same entries penalised
        # XLA's CPU float32 division (reciprocal based) is 1 ulp from torch's in places; multiplication is exact
        np.testing.assert_array_equal(ours[scores < 0], ref[scores < 0])
        np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=0)


def _hf_caption(hf, tokenizer, feats, lengths, **kw):
    embeds, mask = _reference_understanding(hf, feats, lengths)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, min_new_tokens=8,
                          suppress_tokens=list(range(32000, fx.VOCAB)), bos_token_id=1, eos_token_id=fx.EOS,
                          pad_token_id=fx.EOS, length_penalty=1.0, **kw)
    return [t.strip().split(".")[0] for t in tokenizer.hf.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parity
def test_num_captions_matches_hf_beams(tiny, tok):
    """num_captions=N (num_beams N) == transformers generate(num_beams=N, num_return_sequences=N), per image."""
    hf, model, params = tiny
    tokenizer = tok[0]
    feats, lengths = _feats(0)
    ours = llm_tasks.caption(model, params, tokenizer, jnp.asarray(feats), jnp.asarray(lengths), max_new_tokens=12,
                             num_captions=3)
    ref = _hf_caption(hf, tokenizer, feats, lengths, do_sample=False, num_beams=3, num_return_sequences=3)
    assert [len(c) for c in ours] == [3, 3]
    assert [c for row in ours for c in row] == ref


@pytest.mark.parity
@pytest.mark.parametrize("num_beams", [1, 2])
def test_repetition_penalty_in_generate_matches_hf(tiny, tok, num_beams):
    """Greedy and beam captions with a repetition penalty equal transformers generate's.

    Both penalise the ids generated so far (the prompt is embeddings). Unpadded prompts: transformers v5 also
    skips the first ``left-padding`` generated ids of each row (its ``prompt_ignore_length``, meant for prompt
    ids); the release's transformers 4.33, and we, do not.
    """
    hf, model, params = tiny
    tokenizer = tok[0]
    feats, _ = _feats(2)
    lengths = np.array([5, 5], np.int32)
    ours = llm_tasks.caption(model, params, tokenizer, jnp.asarray(feats), jnp.asarray(lengths), max_new_tokens=12,
                             num_beams=num_beams, repetition_penalty=1.8)
    ref = _hf_caption(hf, tokenizer, feats, lengths, do_sample=False, num_beams=num_beams, repetition_penalty=1.8)
    plain = _hf_caption(hf, tokenizer, feats, lengths, do_sample=False, num_beams=num_beams)
    assert ours == ref
    assert ref != plain, "the penalty should change these captions"


def test_sampled_captions_are_seeded(tiny, tok):
    hf, model, params = tiny
    tokenizer = tok[0]
    feats, lengths = (jnp.asarray(a) for a in _feats(0))
    run = lambda seed, **kw: llm_tasks.caption(  # noqa: E731
        model, params, tokenizer, feats, lengths, max_new_tokens=12, do_sample=True, rng=jax.random.key(seed),
        num_captions=2, top_k=20, top_p=0.95, temperature=1.5, repetition_penalty=1.2, **kw)
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    assert [len(r) for r in a] == [2, 2]
    res = llm_tasks.vqa(model, params, tokenizer, feats, lengths, ["what?", "who?"], do_sample=True,
                        rng=jax.random.key(0), apply_lemmatizer=False)
    assert len(res.answers) == 2


def test_token_prompt_ids_concatenate_parts_in_order(tok):
    """Interleaved prompt (image ids, text ids, image ids) -> the parts in order then [IMG], left-padded with 2."""
    tokenizer, sp = tok
    a, b = np.array([32005, 32010, 32003]), np.array([32060, 32061])
    rows = [[a, tokenizer.encode("in the style of"), b], [tokenizer.encode("a duck"), a]]
    ids, mask = llm_tasks.token_prompt_ids(rows)
    expected = [[32005, 32010, 32003] + sp.encode("in the style of") + [32060, 32061, 32000],
                sp.encode("a duck") + [32005, 32010, 32003, 32000]]
    assert ids.shape[1] == 16  # a length bucket
    for i, e in enumerate(expected):
        assert ids[i][mask[i] == 1].tolist() == e and mask[i, -len(e):].all() and mask[i].sum() == len(e)
        assert np.all(ids[i][mask[i] == 0] == 2)
    assert llm_tasks.token_prompt_cap(rows) == max(len(e) for e in expected) - 1
    # the release's rule: image ids + text ids of the longest prompt
    assert llm_tasks.token_prompt_cap([[a, tokenizer.encode("a duck")]]) == 3 + len(sp.encode("a duck"))
