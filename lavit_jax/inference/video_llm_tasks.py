"""Video-LaVIT's LLM tasks: video question answering, text -> video ids, image -> motion ids.

Sequences follow the release (``VideoLaVIT/models/video_lavit_for_understanding.py``,
``modeling_video_lavit_hf.py`` and ``video_lavit_for_generation.py``); ids are ``lavit_jax.vocab``'s
([IMG] 32000, [/IMG] 32001, visual code k -> 32002 + k, [MOV] 48386, [/MOV] 48387, motion code k ->
48388 + k).

Understanding (the SFT model, ``language_model_sft/``) reads a Vicuna-v1 chat::

    <s>SYSTEM USER: <video>\\nQUESTION ASSISTANT:

where ``<video>`` becomes, for each clip in order, ``[IMG] keyframe features [/IMG] [MOV] 135 motion ids
[/MOV]``: the keyframe as the understanding tokenizer's continuous features (projected to the LLM width),
the motion as the motion tokenizer's discrete ids. Each text chunk is tokenized on its own (the
release's ``tokenizer_image_token``): BOS on the first chunk only. Greedy decoding with 8..512 new
tokens, every id >= 32000 suppressed; the answer is the text before the first literal ``\\n`` (the
release stops on that keyword; generating past it changes no earlier token).

Generation (the pretrained model, ``language_model/``), per clip:
- keyframe ids: prompt + [IMG]; ids 3..31999 and the motion range suppressed, eos [/IMG], LLM guidance
  against the prompt's last token (HF's default unconditional context), top-k sampling;
- motion ids: everything so far (prompt, [IMG], keyframe ids, [/IMG]) + [MOV]; ids 3..48385 suppressed,
  eos [/MOV], guidance 7, greedy for text -> video, sampled for image -> video; the ids > [/MOV] are the
  motion ids, cut or padded (with code 0) to the 135 the detokenizer takes.
Every row of a prompt batch is left-padded with the pad id 2 to a length bucket.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lavit_jax.compile_cache import cached_jit
from lavit_jax.inference.generation import GenerationConfig, embed_ids, generate
from lavit_jax.inference.llm_tasks import assemble, left_pad_rows
from lavit_jax.vocab import (
    BOS_ID,
    IMG_END,
    IMG_START,
    MOTION_OFFSET,
    MOV_END,
    MOV_START,
    NUM_MOTION_CODES,
    PAD_ID,
    TEXT_VOCAB,
    VISUAL_OFFSET,
)

# ------------------------------------------------------------------------------------------ defaults

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VIDEO_PLACEHOLDER = "<video>"
STOP_STRING = "\\n"  # the release's stop keyword: a literal backslash + n (its chat separator is " \\n </s>")
MOTION_TOKENS = 135  # motion ids per clip the detokenizer takes (3 x 5 x 9)
# Everything past the visual codes: [MOV], [/MOV] and the motion codes (the release's 48386 + 1026).
MOTION_RANGE = (MOV_START, MOTION_OFFSET + NUM_MOTION_CODES)
KEYFRAME_SUPPRESS = ((3, TEXT_VOCAB), MOTION_RANGE)  # generate_image_tokenids: text and motion ids


@dataclasses.dataclass(frozen=True)
class VideoUnderstandingDefaults:
    max_new_tokens: int = 512  # the release's notebook: max_length=512
    min_new_tokens: int = 8
    do_sample: bool = False  # use_nucleus_sampling=False
    top_p: float = 1.0
    temperature: float = 1.0
    max_clips: int = 16  # the notebook's max_video_clips
    describe_prompt: str = "Describe this video in detail."  # ours: the release has no captioning prompt


@dataclasses.dataclass(frozen=True)
class VideoGenerationDefaults:
    llm_guidance: float = 4.0  # keyframe ids (guidance_scale_for_llm)
    motion_guidance: float = 7.0  # motion ids (guidance_scale_for_motion)
    top_k: int = 50  # the notebook's top_k
    top_p: float = 1.0
    temperature: float = 1.0
    min_new_tokens: int = 20
    max_new_tokens: int = 500  # max_length
    keyframe_steps: int = 50  # the keyframe (image) detokenizer
    keyframe_guidance: float = 7.0  # guidance_scale_for_decoder in the notebook
    keyframe_size: tuple[int, int] = (576, 1024)  # (height, width): the notebook's '1:2'
    keyframe_vae_dtype: str = "model"  # image_decoding: the VAE in the model precision
    video_size: tuple[int, int] = (320, 576)  # (height, width)
    inverse_rate: float = 0.85  # long videos: the next keyframe starts from the last frame at this noise level


UNDERSTANDING = VideoUnderstandingDefaults()
GENERATION = VideoGenerationDefaults()


# ------------------------------------------------------------------------------------------ understanding


def chat_chunks(question: str) -> tuple[str, str]:
    """The Vicuna-v1 prompt around the video: (text before ``<video>``, text after it)."""
    prompt = f"{VICUNA_V1_SYSTEM} USER: {VIDEO_PLACEHOLDER}\n{question} ASSISTANT:"
    before, after = prompt.split(VIDEO_PLACEHOLDER, 1)
    return before, after


def chat_ids(tokenizer, questions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(before ids, before mask, after ids, after mask), each [B, L] int32 left-padded to a length bucket.

    before = BOS + ids of the text before ``<video>``; after = ids of the text after it (no BOS).
    """
    if VIDEO_PLACEHOLDER in "".join(questions):
        raise ValueError(f"a question contains {VIDEO_PLACEHOLDER!r}: the video's place in the prompt is fixed")
    rows = [chat_chunks(q) for q in questions]
    before = [[BOS_ID] + tokenizer.encode(b) for b, _ in rows]
    after = [tokenizer.encode(a) for _, a in rows]
    return (*left_pad_rows(before), *left_pad_rows(after))


@cached_jit(static_argnames=("model",))
def _video_chat_inputs(model, params, before, before_mask, feats, feat_lengths, clip_mask, motion_ids, after,
                       after_mask):
    b, n_clips = clip_mask.shape
    emb = lambda ids: model.apply({"params": params}, ids, method=model.embed)  # noqa: E731
    const = lambda i: emb(jnp.full((b, 1), i, jnp.int32))  # noqa: E731
    start, end, mov, mov_end = const(IMG_START), const(IMG_END), const(MOV_START), const(MOV_END)
    dt = start.dtype
    segs = [(emb(before), before_mask.sum(-1), "back")]
    for c in range(n_clips):
        on = clip_mask[:, c].astype(jnp.int32)
        segs += [(start, on, "front"), (feats[:, c].astype(dt), feat_lengths[:, c] * on, "front"), (end, on, "front"),
                 (mov, on, "front"), (emb(motion_ids[:, c] + MOTION_OFFSET), motion_ids.shape[-1] * on, "front"),
                 (mov_end, on, "front")]
    segs.append((emb(after), after_mask.sum(-1), "back"))
    return assemble(segs)


def video_chat_inputs(model, params, tokenizer, questions, feats, feat_lengths, clip_mask, motion_codes):
    """Embeddings of the chat with each row's clips in place of ``<video>``.

    feats [B, C, N, D] (understanding features, compacted) + feat_lengths [B, C]; clip_mask [B, C] (1 for a
    real clip, real clips first); motion_codes [B, C, 135] (motion codes 0..n-1). Returns (embeds [B, T, D],
    mask [B, T]) left-padded.
    """
    before, before_mask, after, after_mask = (jnp.asarray(a) for a in chat_ids(tokenizer, questions))
    return _video_chat_inputs(model, params, before, before_mask, jnp.asarray(feats),
                              jnp.asarray(feat_lengths, jnp.int32), jnp.asarray(clip_mask, jnp.int32),
                              jnp.asarray(motion_codes, jnp.int32), after, after_mask)


def video_chat_config(tokenizer, vocab_size: int, *, max_new_tokens=UNDERSTANDING.max_new_tokens,
                      min_new_tokens=UNDERSTANDING.min_new_tokens, do_sample=UNDERSTANDING.do_sample,
                      top_p=UNDERSTANDING.top_p, temperature=UNDERSTANDING.temperature) -> GenerationConfig:
    """The release's understanding settings: ids >= 32000 suppressed, eos 2, greedy by default (top-k off: the
    release passes none and sets top_p only)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, top_k=0, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, suppress_ranges=((IMG_START, int(vocab_size)),))


def cut_at_stop(text: str) -> str:
    """The release's answer: the text before the first stop keyword, stripped."""
    return text.split(STOP_STRING)[0].strip()


def answer_video(model, params, tokenizer, questions, feats, feat_lengths, clip_mask, motion_codes, *,
                 config: GenerationConfig | None = None, rng=None):
    """Answers (list of str) and the GenerationOutput for B videos' clips (see ``video_chat_inputs``)."""
    cfg = config or video_chat_config(tokenizer, model.config.vocab_size)
    embeds, mask = video_chat_inputs(model, params, tokenizer, questions, feats, feat_lengths, clip_mask,
                                     motion_codes)
    out = generate(model, params, embeds, mask, cfg, rng=rng)
    texts = tokenizer.decode_batch(np.asarray(out.tokens), np.asarray(out.lengths))
    return [cut_at_stop(t) for t in texts], out


# ------------------------------------------------------------------------------------------ generation


def keyframe_generation_config(*, guidance_scale=GENERATION.llm_guidance, top_k=GENERATION.top_k,
                               top_p=GENERATION.top_p, temperature=GENERATION.temperature,
                               min_new_tokens=GENERATION.min_new_tokens, max_new_tokens=GENERATION.max_new_tokens,
                               do_sample=True) -> GenerationConfig:
    """``generate_image_tokenids``: text ids and the motion range suppressed, eos [/IMG]."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=IMG_END,
                            pad_token_id=PAD_ID, suppress_ranges=KEYFRAME_SUPPRESS,
                            guidance_scale=guidance_scale)


def motion_generation_config(*, guidance_scale=GENERATION.motion_guidance, do_sample=False, top_k=GENERATION.top_k,
                             top_p=GENERATION.top_p, temperature=GENERATION.temperature,
                             min_new_tokens=GENERATION.min_new_tokens,
                             max_new_tokens=GENERATION.max_new_tokens) -> GenerationConfig:
    """``generate_motion_tokenids``: ids 3..48385 suppressed, eos [/MOV]."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=MOV_END,
                            pad_token_id=PAD_ID, suppress_ranges=((3, MOV_START),), guidance_scale=guidance_scale)


def prompt_rows_ids(rows, start_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows (1-D id sequences) + ``start_id`` -> (ids [B, T], mask [B, T]) left-padded with 2."""
    return left_pad_rows([list(np.asarray(r, np.int64).reshape(-1)) + [start_id] for r in rows])


def _generate_after(model, params, rows, start_id: int, cfg: GenerationConfig, rng):
    """Generates after each row + ``start_id``; guidance against ``start_id`` alone (HF's default: the
    prompt's last token). Returns (new ids per row without pad ids, the rows continued as the release's
    ``output_list``: prompt + start + new ids, pad ids dropped)."""
    ids, mask = prompt_rows_ids(rows, start_id)
    embed = lambda x: embed_ids(model, params, jnp.asarray(x, jnp.int32))  # noqa: E731
    uncond = uncond_mask = None
    if cfg.use_guidance:
        uncond = embed(np.full((len(rows), 1), start_id, np.int32))
        uncond_mask = jnp.ones((len(rows), 1), jnp.int32)
    out = generate(model, params, embed(ids), jnp.asarray(mask), cfg, rng=rng, uncond_embeds=uncond,
                   uncond_mask=uncond_mask)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    new = [t[:n][t[:n] != PAD_ID].astype(np.int64) for t, n in zip(tokens, lengths, strict=True)]
    cont = [np.concatenate([np.asarray(r, np.int64).reshape(-1)[np.asarray(r).reshape(-1) != PAD_ID],
                            [start_id], n]) for r, n in zip(rows, new, strict=True)]
    return new, cont


def keyframe_ids(model, params, rows, rng, config: GenerationConfig | None = None):
    """Keyframe ids after token rows: (visual codes per row (ids - 32002 of the ids >= 32002), continued rows)."""
    new, cont = _generate_after(model, params, rows, IMG_START, config or keyframe_generation_config(), rng)
    return [n[n >= VISUAL_OFFSET] - VISUAL_OFFSET for n in new], cont


def motion_codes_from_ids(new_ids, num_tokens: int = MOTION_TOKENS) -> np.ndarray:
    """The release's ``video_decoding`` filter: ids > [/MOV] minus 48388, cut or padded with code 0 to
    ``num_tokens`` -> [B, num_tokens] int32. Also returns how many each row had (for warnings)."""
    out = np.zeros((len(new_ids), num_tokens), np.int32)
    counts = []
    for i, ids in enumerate(new_ids):
        m = np.asarray(ids)[np.asarray(ids) > MOV_END] - MOTION_OFFSET
        counts.append(len(m))
        out[i, :min(len(m), num_tokens)] = m[:num_tokens]
    return out, counts


def motion_ids(model, params, rows, rng, config: GenerationConfig | None = None):
    """Motion ids after token rows + [MOV]: (codes [B, 135], motion ids generated per row, continued rows)."""
    new, cont = _generate_after(model, params, rows, MOV_START, config or motion_generation_config(), rng)
    codes, counts = motion_codes_from_ids(new)
    return codes, counts, cont
