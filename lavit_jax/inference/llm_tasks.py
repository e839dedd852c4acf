"""LaVIT's LLM tasks: captioning, VQA, text -> image ids, multimodal prompt -> image ids.

Sequences follow the reference (``LaVIT/models/lavit_for_understanding.py`` / ``lavit_for_generation.py``)
and are built under ``jit`` with static shapes: every part is a padded array plus lengths, the real
parts are concatenated in order and the whole sequence is left-padded (mask 0 at the padding).

Token ids: [IMG] = 32000, [/IMG] = 32001, visual code k -> 32002 + k; text pad = eos = 2.

Inputs from the visual tokenizer:
- understanding: ``feats [B, N, C]`` (kept tokens compacted to the front, already projected to the LLM
  width) + ``lengths [B]``;
- generation: ``ids [B, N]`` int32 already offset by +32002 (compacted to the front) + ``lengths [B]``.

Sequences:
- caption: [IMG] feats [/IMG]; beam 2, 8-36 new tokens, ids >= 32000 suppressed, eos 2; text cut at '.'.
- vqa: [IMG] feats [/IMG] "Question: {q} Answer:"; beam 5, 2-10 new tokens, length_penalty 0,
  early stopping; the reference's answer post-processing (+ spaCy lemmatisation when available).
- text -> image ids: text (no BOS) [IMG]; sampling top-k/top-p, ids 3..31999 suppressed, eos 32001,
  guidance against [IMG] alone (or a negative prompt).
- multimodal -> image ids: image ids (no [IMG]/[/IMG], as the reference's ``tokenize_image(add_special=False)``)
  then text then [IMG]; same sampling.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from lavit_jax.compile_cache import cached_jit
from lavit_jax.inference import defaults
from lavit_jax.inference.generation import GenerationConfig, GenerationOutput, embed_ids, generate, length_bucket
from lavit_jax.models.tokenizer import compact
from lavit_jax.vocab import IMG_END, IMG_START, PAD_ID, TEXT_VOCAB, VISUAL_OFFSET

# ------------------------------------------------------------------------------------ sequence assembly


def assemble(segments, pad_value=0):
    """Concatenates the real parts of padded segments, left-padding the result (static shapes).

    segments: list of (values [B, L_i, ...], lengths [B], align) with align "front" (real items first,
    e.g. visual tokens) or "back" (left-padded, e.g. tokenized text). Returns (values [B, sum L_i, ...],
    mask [B, sum L_i] int32) with the real items right-aligned in segment order.
    """
    source = jnp.concatenate([s[0] for s in segments], axis=1)
    b = source.shape[0]
    total = source.shape[1]
    lens = [jnp.asarray(s[1], jnp.int32).reshape(b) for s in segments]
    real = sum(lens)
    slot = jnp.arange(total)[None, :]
    k = slot - (total - real)[:, None]  # index into the concatenated real sequence
    idx = jnp.zeros((b, total), jnp.int32)
    base, off = 0, jnp.zeros((b,), jnp.int32)
    for (vals, _, align), n in zip(segments, lens):
        width = vals.shape[1]
        if align not in ("front", "back"):
            raise ValueError(f"segment align {align!r}: use 'front' or 'back'")
        start = jnp.broadcast_to(base + (0 if align == "front" else width - n), (b,))
        inside = (k >= off[:, None]) & (k < (off + n)[:, None])
        idx = jnp.where(inside, start[:, None] + k - off[:, None], idx)
        base += width
        off = off + n
    mask = (k >= 0).astype(jnp.int32)
    gather_idx = idx.reshape(idx.shape + (1,) * (source.ndim - 2))
    out = jnp.take_along_axis(source, gather_idx, axis=1)
    keep = mask.reshape(mask.shape + (1,) * (source.ndim - 2)).astype(bool)
    return jnp.where(keep, out, jnp.asarray(pad_value, source.dtype)), mask


def encode_texts(tokenizer, texts):
    """Left-padded text ids and mask [B, L] with L a length bucket, so prompt lengths share compiled programs."""
    longest = max((len(tokenizer.encode(t)) for t in texts), default=0)
    return tokenizer.encode_batch(texts, length=length_bucket(max(longest, 1)))


def _const(value, b, dtype=jnp.int32):
    return jnp.full((b, 1), value, dtype), jnp.ones((b,), jnp.int32), "front"


@cached_jit(static_argnames=("model",))
def _understanding_inputs(model, params, feats, lengths, text_ids, text_mask):
    b = feats.shape[0]
    emb = lambda ids: model.apply({"params": params}, ids, method=model.embed)  # noqa: E731
    start = emb(jnp.full((b, 1), IMG_START, jnp.int32))
    end = emb(jnp.full((b, 1), IMG_END, jnp.int32))
    dt = start.dtype
    one = jnp.ones((b,), jnp.int32)
    segs = [(start, one, "front"), (feats.astype(dt), lengths, "front"), (end, one, "front")]
    if text_ids is not None:
        segs.append((emb(text_ids), text_mask.sum(-1), "back"))
    return assemble(segs)


@cached_jit(static_argnames=("model", "config"))
def _understanding_generate(model, config, params, feats, lengths, text_ids, text_mask, rng):
    """Input assembly and generation in one compiled program per (config, prompt bucket, batch)."""
    embeds, mask = _understanding_inputs(model, params, feats, lengths, text_ids, text_mask)
    return generate(model, params, embeds, mask, config, rng=rng)


def understanding_generate(model, params, feats, lengths, text_ids, text_mask, config, rng=None):
    """``generate`` after [IMG] feats[:len] [/IMG] (text): feats [B, N, C], lengths [B], text ids / mask [B, L]
    (a length bucket) or None. One compiled program (not one for the inputs and one for the search)."""
    config.validate()
    if config.do_sample and rng is None:
        raise ValueError("do_sample=True needs an rng key")
    return _understanding_generate(model, config, params, feats, np.asarray(lengths, np.int32),
                                   text_ids, text_mask, rng)


def understanding_inputs(model, params, feats, lengths, text_ids=None, text_mask=None):
    """[IMG] feats[:len] [/IMG] (text) -> (embeds [B, N+2(+L), C], mask), left-padded. Jitted."""
    return _understanding_inputs(model, params, jnp.asarray(feats), jnp.asarray(lengths, jnp.int32), text_ids,
                                 text_mask)


@cached_jit
def image_prompt_ids(text_ids, text_mask):
    """text + [IMG] -> (ids [B, T], mask [B, T]) left-padded with pad id 2 (text-to-image). Jitted."""
    b = text_ids.shape[0]
    segs = [(jnp.asarray(text_ids, jnp.int32), jnp.asarray(text_mask).sum(-1), "back")]
    segs.append(_const(IMG_START, b))
    return assemble(segs, pad_value=PAD_ID)


def image_codes_from_ids(tokens):
    """Generated ids [N, M] -> (codes [N, M] = id - 32002 compacted to the front, lengths [N]).

    Keeps every id >= 32002 (the reference's filter); other ids (eos, pad, [IMG]...) are dropped.
    """
    tokens = jnp.asarray(tokens)
    return compact(tokens - VISUAL_OFFSET, (tokens >= VISUAL_OFFSET).astype(jnp.float32))


# ------------------------------------------------------------------------------------ understanding


def understanding_config(
    task: defaults.UnderstandingDefaults, tokenizer, vocab_size: int, *, num_beams=None, max_new_tokens=None,
    min_new_tokens=None, length_penalty=None, num_return_sequences=1, do_sample=False, temperature=None,
    top_p=None, top_k=None, repetition_penalty=None, early_stopping=False,
) -> GenerationConfig:
    """Caption / VQA generation settings: ``task``'s defaults for every None; ids >= 32000 suppressed.

    ``num_beams`` None: 1 when sampling, else max(task.num_beams, num_return_sequences).
    """
    pick = lambda v, d: d if v is None else v  # noqa: E731
    if num_beams is None:
        num_beams = 1 if do_sample else max(task.num_beams, num_return_sequences)
    return GenerationConfig(
        max_new_tokens=pick(max_new_tokens, task.max_new_tokens),
        min_new_tokens=pick(min_new_tokens, task.min_new_tokens),
        num_beams=num_beams, length_penalty=pick(length_penalty, task.length_penalty), early_stopping=early_stopping,
        num_return_sequences=num_return_sequences, do_sample=do_sample, temperature=pick(temperature, task.temperature),
        top_p=pick(top_p, task.top_p), top_k=pick(top_k, task.top_k),
        repetition_penalty=pick(repetition_penalty, task.repetition_penalty), eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, suppress_ranges=((IMG_START, int(vocab_size)),),
    )


def caption(
    model, params, tokenizer, feats, lengths, *, num_beams=None, max_new_tokens=defaults.CAPTION.max_new_tokens,
    min_new_tokens=defaults.CAPTION.min_new_tokens, length_penalty=defaults.CAPTION.length_penalty, num_captions=1,
    prompt=None, do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=None, rng=None,
) -> list:
    """Captions from continuous visual features feats [B, N, C] + lengths [B] (reference ``generate``).

    Beam search by default (``num_beams`` None: max(2, num_captions)); ``do_sample`` samples (needs ``rng``;
    top-p / top-k / temperature default to ``defaults.CAPTION``). Returns B strings, or with
    ``num_captions`` > 1 B lists of ``num_captions`` strings (best beam first).
    """
    b = feats.shape[0]
    text_ids = text_mask = None
    if prompt:
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        text_ids, text_mask = encode_texts(tokenizer, prompts)  # numpy: no device program per shape
    cfg = understanding_config(
        defaults.CAPTION, tokenizer, model.config.vocab_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, length_penalty=length_penalty, num_return_sequences=num_captions,
        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
    )
    out = understanding_generate(model, params, feats, lengths, text_ids, text_mask, cfg, rng)
    tokens, n = np.asarray(out.tokens), np.asarray(out.lengths)
    texts, dropped = tokenizer.decode_batch(tokens, n, with_dropped=True)
    texts = [Caption(t.strip().split(".")[0], _empty_caption_note(t, row[:k], d, tokenizer))
             for t, row, k, d in zip(texts, tokens, n, dropped, strict=True)]
    if num_captions == 1:
        return texts
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(b)]


class Caption(str):
    """A caption (a ``str``); ``note`` says why it is empty ('' when it is not), or which generated ids had
    no text (a text tokenizer smaller than the LLM's text vocabulary)."""

    note: str

    def __new__(cls, text: str, note: str = ""):
        out = super().__new__(cls, text)
        out.note = note
        return out


def _empty_caption_note(text: str, ids, dropped: int, tokenizer) -> str:
    ids = [int(i) for i in ids]
    if dropped:
        why = (f"{dropped} of the {len(ids)} generated ids have no text in the text tokenizer "
               f"({tokenizer.vocab_size} pieces, fewer than the LLM's {TEXT_VOCAB} text ids)")
        return why if not text.strip().split(".")[0] else f"left out: {why}"
    if text.strip().split(".")[0]:
        return ""
    if not ids or ids[0] == tokenizer.eos_id:
        return "the model ended the caption at once (its first generated token is EOS)"
    if not text.strip():
        return "the generated ids are all special tokens"
    return "the generated text starts with '.' (the release keeps the text before the first '.')"


class Answer(str):
    """A VQA answer (a ``str``) that also says how it was post-processed: ``answer_processing`` is
    'lemmatized' (lower-cased, nouns and verbs lemmatised with spaCy, as the release) or 'lowercase-only'
    (spaCy's ``en_core_web_sm`` not installed) or 'none' (post-processing turned off)."""

    answer_processing: str

    def __new__(cls, text: str, answer_processing: str):
        out = super().__new__(cls, text)
        out.answer_processing = answer_processing
        return out


class VqaAnswers(NamedTuple):
    answers: list  # of Answer
    lemmatized: bool
    note: str


def postprocess_answer(text: str) -> str:
    """The reference's VQA answer clean-up (first line, before 'question:', 'Long answer:', ',', '.')."""
    text = text.strip()
    text = text.split("\n")[0]
    text = text.split("question:")[0]
    text = text.split("Long answer:")[0]
    text = text.split(",")[0]
    return text.split(".")[0]


@functools.cache
def _spacy_lemmatizer():
    """spaCy's ``en_core_web_sm`` pipeline, or None when spaCy or the model is not installed (loaded once)."""
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except Exception as e:  # spaCy or its English model not installed
        logging.getLogger(__name__).warning("VQA lemmatisation skipped: %s", e)
        return None


def lemmatize(answers, nlp):
    """Reference lemmatisation: lower-case; NOUN/VERB tokens -> lemma."""
    out = []
    for a in answers:
        doc = nlp(a.lower())
        out.append(" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in doc))
    return out


def vqa(
    model, params, tokenizer, feats, lengths, questions, *, prompt=defaults.VQA.prompt, num_beams=None,
    max_new_tokens=defaults.VQA.max_new_tokens, min_new_tokens=defaults.VQA.min_new_tokens,
    length_penalty=defaults.VQA.length_penalty, apply_lemmatizer=True, do_sample=False, temperature=None, top_p=None,
    top_k=None, repetition_penalty=None, rng=None,
) -> VqaAnswers:
    """Answers ``questions`` (list of str) about feats [B, N, C] + lengths [B] (reference ``predict_answers``).

    Beam search (5 beams) by default; ``do_sample`` samples instead (needs ``rng``), as for ``caption``.

    Lemmatisation uses spaCy's ``en_core_web_sm`` only when installed; ``note`` says when it was skipped.
    """
    if isinstance(questions, str):
        questions = [questions]
    texts = [prompt.format(q) for q in questions] if prompt else list(questions)
    text_ids, text_mask = encode_texts(tokenizer, texts)  # numpy: no device program per shape
    cfg = understanding_config(
        defaults.VQA, tokenizer, model.config.vocab_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, length_penalty=length_penalty, early_stopping=True, do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
    )
    out = understanding_generate(model, params, feats, lengths, text_ids, text_mask, cfg, rng)
    answers = [postprocess_answer(t) for t in tokenizer.decode_batch(np.asarray(out.tokens), np.asarray(out.lengths))]
    if not apply_lemmatizer:
        return VqaAnswers([Answer(a, "none") for a in answers], False, "post-processing off")
    nlp = _spacy_lemmatizer()
    if nlp is None:
        return VqaAnswers([Answer(a.lower(), "lowercase-only") for a in answers], False,
                          "lower-cased only: spaCy's English model en_core_web_sm is not installed "
                          "(pip install spacy && python -m spacy download en_core_web_sm)")
    return VqaAnswers([Answer(a, "lemmatized") for a in lemmatize(answers, nlp)], True,
                      "lower-cased and lemmatised with spaCy en_core_web_sm")


# ------------------------------------------------------------------------------------ image generation

IMAGE_SUPPRESS = ((3, TEXT_VOCAB),)  # text ids (0..2 stay: unk, bos, eos)


def image_generation_config(
    *, guidance_scale=defaults.TEXT2IMAGE.llm_guidance, top_k=defaults.TEXT2IMAGE.top_k,
    top_p=defaults.TEXT2IMAGE.top_p, temperature=defaults.TEXT2IMAGE.temperature,
    min_new_tokens=defaults.TEXT2IMAGE.min_new_tokens, max_new_tokens=defaults.TEXT2IMAGE.max_new_tokens,
    num_return_sequences=1, do_sample=True, num_beams=1, length_penalty=1.0, suppress_ranges=IMAGE_SUPPRESS,
) -> GenerationConfig:
    """The reference's image-token generation settings (ids 3..31999 suppressed, eos [/IMG] = 32001):
    nucleus sampling by default, greedy (``do_sample=False``) or beam search (``num_beams``).
    ``suppress_ranges``: Video-LaVIT also suppresses its motion ids (``video_llm_tasks.KEYFRAME_SUPPRESS``)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
        num_return_sequences=num_return_sequences, eos_token_id=IMG_END, pad_token_id=PAD_ID,
        suppress_ranges=tuple(suppress_ranges), guidance_scale=guidance_scale,
    )


def _image_ids_generate(model, params, ids, mask, rng, cfg, negative_ids, negative_mask) -> GenerationOutput:
    embed = lambda x: embed_ids(model, params, jnp.asarray(x, jnp.int32))  # noqa: E731
    uncond = uncond_mask = None
    if cfg.use_guidance:
        b = ids.shape[0]
        if negative_ids is None:  # HF's default unconditional context: the prompt's last token, [IMG]
            uncond = embed(jnp.full((b, 1), IMG_START, jnp.int32))
            uncond_mask = jnp.ones((b, 1), jnp.int32)
        else:
            negative_ids = jnp.asarray(negative_ids, jnp.int32)
            if negative_ids.shape[0] == 1 and b > 1:
                negative_ids = jnp.repeat(negative_ids, b, axis=0)
                negative_mask = None if negative_mask is None else jnp.repeat(jnp.asarray(negative_mask), b, axis=0)
            uncond = embed(negative_ids)
            uncond_mask = jnp.ones(negative_ids.shape, jnp.int32)
            if negative_mask is not None:
                uncond_mask = jnp.asarray(negative_mask)
    return generate(model, params, embed(ids), mask, cfg, rng=rng, uncond_embeds=uncond, uncond_mask=uncond_mask)


def text_to_image_ids(
    model, params, tokenizer, texts, rng, *, config: GenerationConfig | None = None, negative_ids=None,
    negative_mask=None,
) -> GenerationOutput:
    """Samples visual ids for ``texts``: sequence = text (no BOS, left-padded with 2) + [IMG].

    ``negative_ids [B or 1, Ln]`` (+ mask) replace the default unconditional context [IMG].
    Returns ``GenerationOutput`` of ids (>= 32002 are visual; use ``image_codes_from_ids``).
    """
    cfg = config or image_generation_config()
    text_ids, text_mask = encode_texts(tokenizer, texts)
    ids, mask = image_prompt_ids(text_ids, text_mask)
    return _image_ids_generate(model, params, ids, mask, rng, cfg, negative_ids, negative_mask)


def token_prompt_ids(rows):
    """Token prompts -> (ids [B, T], mask [B, T]) int32: each row's parts concatenated, then [IMG].

    rows: B lists of 1-D id sequences (visual ids already +32002, text ids without BOS), in prompt
    order, as the release's ``multimodal_synthesis`` concatenates them. Left-padded with 2 (mask 0) to
    ``length_bucket`` of the longest row, so prompt lengths share compiled programs.
    """
    return left_pad_rows([np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in row] + [np.array([IMG_START])])
                          for row in rows])


def left_pad_rows(seqs, pad=PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """1-D id sequences -> (ids [B, T], mask [B, T]) int32, left-padded with ``pad`` (mask 0) to
    ``length_bucket`` of the longest (at least 1), so prompt lengths share compiled programs."""
    width = length_bucket(max(max((len(s) for s in seqs), default=1), 1))
    ids = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
    return ids, mask


def token_prompt_cap(rows) -> int:
    """The release's new-token limit for token prompts: the longest row's token count ([IMG] not counted).

    (``generate_image_tokenids`` sets ``max_length = max(len(x) for x in prompts)`` and passes it as
    ``max_new_tokens`` when the prompt is given as tokens, as ``multimodal_synthesis`` always does.)
    """
    return int(max(sum(len(np.asarray(p).reshape(-1)) for p in row) for row in rows))


def token_prompt_to_image_ids(
    model, params, ids, mask, rng, *, config: GenerationConfig | None = None, negative_ids=None, negative_mask=None,
) -> GenerationOutput:
    """Samples visual ids after token prompts ids [B, T] + mask [B, T] from ``token_prompt_ids``."""
    cfg = config or image_generation_config(guidance_scale=defaults.EDIT.llm_guidance)
    return _image_ids_generate(model, params, jnp.asarray(ids), jnp.asarray(mask), rng, cfg, negative_ids,
                               negative_mask)
