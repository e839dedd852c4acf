"""Jit-compiled generation for ``LlamaForCausalLM``: KV-cache prefill + ``lax.while_loop`` decode.

Reproduces ``transformers`` ``generate`` (v5 semantics) for the settings LaVIT uses:

- greedy / sampling (temperature, top-k, top-p), min/max new tokens, suppressed token ranges, eos,
  several sequences per prompt (``num_return_sequences``, copies adjacent as HF's repeat_interleave);
- beam search (``num_beams``, ``length_penalty``, ``early_stopping`` True/False/"never"), the same
  vectorised algorithm as HF's ``_beam_search`` (2*num_beams candidates, finished-hypothesis merge,
  early-stop heuristic), and beam sampling (``do_sample`` with ``num_beams`` > 1: the 2*num_beams
  candidates are drawn without replacement from the softmax of the accumulated scores, as HF's
  ``torch.multinomial``, here by the Gumbel top-k trick; warpers keep at least 2 tokens, as HF's do
  in beam methods);
- LLM classifier-free guidance on log-probs: ``uncond + g * (cond - uncond)``
  (HF ``UnbatchedClassifierFreeGuidanceLogitsProcessor``); the unconditional branch runs in the same
  batch with its own context (e.g. [IMG] alone, or a negative prompt) and, as in HF, position ids
  counted from the start of its own (padded) context.

Processor order (HF): guidance, repetition penalty, min-new-tokens (ban eos), suppression, then for
sampling only temperature, top-k, top-p. The repetition penalty sees the ids generated so far only
(HF with ``inputs_embeds``: the prompt has no ids).

Inputs are embeddings (``inputs_embeds [B, T, C]``, left-padded, ``attention_mask [B, T]``) so text ids,
discrete visual ids and continuous visual features all enter the same way. Outputs are the new tokens
only: ``tokens [B * R, max_new_tokens]`` (pad-filled after eos / the end) and ``lengths [B * R]``.
Everything is compiled once per (model, GenerationConfig, input shapes): ``jax.jit`` with the model
(frozen config, hashable) and the GenerationConfig as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax.compile_cache import cached_jit
from lavit_jax.models.llama import default_positions, init_cache

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Static generation settings (hashable; one compilation per distinct value).

    suppress_ranges: half-open id ranges ``((lo, hi), ...)`` whose logits are set to -inf.
    top_k 0 / top_p 1.0 disable the warper. guidance_scale None or 1 disables CFG.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | None = 2
    pad_token_id: int = 2
    suppress_ranges: tuple[tuple[int, int], ...] = ()
    guidance_scale: float | None = None
    repetition_penalty: float = 1.0

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} > max_new_tokens={self.max_new_tokens}")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise ValueError(f"num_return_sequences={self.num_return_sequences} > num_beams={self.num_beams}")
            if self.use_guidance:
                raise ValueError("classifier-free guidance with beam search is not supported")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={self.early_stopping!r}: use True, False or 'never'")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        for r in self.suppress_ranges:
            if len(r) != 2 or r[0] > r[1]:
                raise ValueError(f"suppress_ranges entry {r!r} is not a (lo, hi) pair with lo <= hi")

    @property
    def use_guidance(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1


# The static config's guidance_scale when the scale is passed as a traced value (any value that turns CFG on).
TRACED_GUIDANCE = 0.0


class GenerationOutput(NamedTuple):
    tokens: jax.Array  # [B * R, max_new_tokens] int32, pad after the end
    lengths: jax.Array  # [B * R] int32, generated tokens incl. eos
    scores: jax.Array  # [B * R] float32: beam score (beam search), else 0


# ------------------------------------------------------------------------------------ logits processors


def suppress_mask(vocab_size: int, ranges) -> np.ndarray:
    """Boolean [V]: True where a token id lies in one of the half-open ``ranges``."""
    ids = np.arange(vocab_size)
    mask = np.zeros(vocab_size, bool)
    for lo, hi in ranges:
        mask |= (ids >= lo) & (ids < hi)
    return mask


def top_k_filter(scores, top_k: int, min_tokens_to_keep: int = 1):
    """HF TopKLogitsWarper: -inf below the k-th largest score (ties kept). scores [N, V]."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, NEG_INF, scores)


def top_p_filter(scores, top_p: float, min_tokens_to_keep: int = 1):
    """HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - top_p. scores [N, V]."""
    order = jnp.argsort(scores, axis=-1)  # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cum <= (1.0 - top_p)
    v = scores.shape[-1]
    remove_sorted = remove_sorted & (jnp.arange(v) < v - min_tokens_to_keep)
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
    return jnp.where(remove, NEG_INF, scores)


def repetition_penalty(scores, tokens, step, penalty: float):
    """HF RepetitionPenaltyLogitsProcessor on the first ``step`` ids of each row.

    scores [N, V]; tokens [N, M] int (ids generated so far in columns < step, the rest ignored); for ids
    present: score < 0 ? score * penalty : score / penalty.
    """
    n, v = scores.shape
    seen = jnp.arange(tokens.shape[1])[None, :] < step
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], tokens.shape)
    present = jnp.zeros((n, v), jnp.int32).at[rows, jnp.clip(tokens, 0, v - 1)].add(seen.astype(jnp.int32)) > 0
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(present, penalised, scores)


def process_scores(scores, step, cfg: GenerationConfig, uncond_scores=None, tokens=None, guidance_scale=None):
    """Applies HF's processors in HF's order to next-token scores [N, V] at new-token index ``step``.

    tokens [N, M]: the ids generated so far (columns < step), needed when ``cfg.repetition_penalty != 1``.
    guidance_scale: the CFG scale as a (traced) value, else ``cfg.guidance_scale``.
    """
    if cfg.use_guidance:
        cond = jax.nn.log_softmax(scores, axis=-1)
        unc = jax.nn.log_softmax(uncond_scores, axis=-1)
        g = cfg.guidance_scale if guidance_scale is None else guidance_scale
        scores = g * (cond - unc) + unc
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, tokens, step, cfg.repetition_penalty)
    v = scores.shape[-1]
    if cfg.min_new_tokens > 0 and cfg.eos_token_id is not None:
        is_eos = jnp.arange(v) == cfg.eos_token_id
        scores = jnp.where(is_eos & (step < cfg.min_new_tokens), NEG_INF, scores)
    if cfg.suppress_ranges:
        scores = jnp.where(jnp.asarray(suppress_mask(v, cfg.suppress_ranges)), NEG_INF, scores)
    if cfg.do_sample:
        keep = 2 if cfg.num_beams > 1 else 1  # HF: beam methods keep a non-eos continuation (1 eos id + 1)
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            scores = top_k_filter(scores, cfg.top_k, keep)
        if cfg.top_p < 1.0:
            scores = top_p_filter(scores, cfg.top_p, keep)
    return scores


# ------------------------------------------------------------------------------------ helpers


def _left_pad(x, length):
    """Left-pads axis 1 of x to ``length`` with zeros."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)


def _lengths(tokens, n_steps, eos):
    m = tokens.shape[1]
    if eos is None:
        return jnp.full((tokens.shape[0],), n_steps, jnp.int32)
    is_eos = tokens == eos
    first = jnp.argmax(is_eos, axis=1)
    return jnp.where(jnp.any(is_eos, axis=1), first + 1, jnp.minimum(n_steps, m)).astype(jnp.int32)


# ------------------------------------------------------------------------------------ greedy / sampling


@cached_jit(static_argnames=("model", "cfg"))
def _sample_generate(model, cfg: GenerationConfig, params, embeds, mask, rng, uncond_embeds, uncond_mask,
                     guidance_scale=None):
    r = cfg.num_return_sequences
    embeds = jnp.repeat(embeds, r, axis=0)
    mask = jnp.repeat(mask.astype(jnp.int32), r, axis=0)
    n, t = mask.shape
    m = cfg.max_new_tokens
    positions = default_positions(mask)
    if cfg.use_guidance:
        uncond_embeds = jnp.repeat(uncond_embeds, r, axis=0)
        uncond_mask = jnp.repeat(uncond_mask.astype(jnp.int32), r, axis=0)
        tu = uncond_mask.shape[1]
        tm = max(t, tu)
        # HF runs the unconditional branch without position ids: positions count from its first slot.
        upos = jnp.broadcast_to(jnp.arange(tm) - (tm - tu), (n, tm))
        embeds = jnp.concatenate([_left_pad(embeds, tm), _left_pad(uncond_embeds.astype(embeds.dtype), tm)], 0)
        mask = jnp.concatenate([_left_pad(mask, tm), _left_pad(uncond_mask, tm)], 0)
        positions = jnp.concatenate([_left_pad(positions, tm), upos], 0)
        t = tm
    rows = mask.shape[0]
    slots = t + m
    cache = init_cache(model.config, rows, slots)
    key_mask = jnp.concatenate([mask, jnp.zeros((rows, m), jnp.int32)], axis=1)
    logits, cache = model.apply(
        {"params": params}, inputs_embeds=embeds, attention_mask=key_mask, positions=positions, cache=cache,
        cache_index=0,
    )
    last_pos = positions[:, -1]

    def select(logits_last, step, finished, key, tokens):
        unc = logits_last[n:] if cfg.use_guidance else None
        scores = process_scores(logits_last[:n], step, cfg, unc, tokens, guidance_scale)
        if cfg.do_sample:
            tok = jax.random.categorical(jax.random.fold_in(key, step), scores, axis=-1)
        else:
            tok = jnp.argmax(scores, axis=-1)
        tok = jnp.where(finished, cfg.pad_token_id, tok).astype(jnp.int32)
        done = finished | (tok == cfg.eos_token_id) if cfg.eos_token_id is not None else finished
        return tok, done

    if rng is None:
        rng = jax.random.PRNGKey(0)
    tokens = jnp.full((n, m), cfg.pad_token_id, jnp.int32)
    tok, finished = select(logits[:, -1], 0, jnp.zeros((n,), bool), rng, tokens)
    tokens = tokens.at[:, 0].set(tok)

    def cond(state):
        i, _, finished, _, _ = state
        return (i < m) & ~jnp.all(finished)

    def body(state):
        i, tokens, finished, cache, key_mask = state
        prev = tokens[:, i - 1]
        feed = jnp.concatenate([prev, prev]) if cfg.use_guidance else prev
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((rows, 1), jnp.int32), (0, t + i - 1))
        logits, cache = model.apply(
            {"params": params}, input_ids=feed[:, None], attention_mask=key_mask, positions=(last_pos + i)[:, None],
            cache=cache, cache_index=t + i - 1,
        )
        tok, finished = select(logits[:, -1], i, finished, rng, tokens)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        return i + 1, tokens, finished, cache, key_mask

    i, tokens, finished, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, finished, cache, key_mask))
    return GenerationOutput(tokens, _lengths(tokens, i, cfg.eos_token_id), jnp.zeros((n,), jnp.float32))


# ------------------------------------------------------------------------------------ beam search


def sample_without_replacement(key, scores, k: int):
    """k indices drawn without replacement from softmax(``scores``) [B, N] (in draw order; as
    ``torch.multinomial(softmax(scores), k)``): the Gumbel top-k trick. -> indices [B, k] int32."""
    return jax.lax.top_k(scores + jax.random.gumbel(key, scores.shape, jnp.float32), k)[1]


@cached_jit(static_argnames=("model", "cfg"))
def _beam_generate(model, cfg: GenerationConfig, params, embeds, mask, rng):
    nb = cfg.num_beams
    b = embeds.shape[0]
    m = cfg.max_new_tokens
    k = 2 * nb if cfg.eos_token_id is not None else 2 * nb  # HF: max(2, 1 + n_eos) * num_beams
    embeds = jnp.repeat(embeds, nb, axis=0)
    mask = jnp.repeat(mask.astype(jnp.int32), nb, axis=0)
    rows, t = mask.shape
    positions = default_positions(mask)
    last_pos = positions[:, -1]
    cache = init_cache(model.config, rows, t + m)
    key_mask = jnp.concatenate([mask, jnp.zeros((rows, m), jnp.int32)], axis=1)
    logits, cache = model.apply(
        {"params": params}, inputs_embeds=embeds, attention_mask=key_mask, positions=positions, cache=cache,
        cache_index=0,
    )
    fill = cfg.pad_token_id
    lp = cfg.length_penalty
    eos = cfg.eos_token_id
    top_nb_mask = jnp.arange(k) < nb
    batch_offset = (jnp.arange(b) * nb)[:, None]

    def gather(x, idx):  # x [B, N, ...], idx [B, J] -> [B, J, ...]
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    def step(logits_last, i, st):
        (run_seq, run_scores, seqs, beam_scores, finished, unsat, cache) = st
        v = logits_last.shape[-1]
        log_probs = jax.nn.log_softmax(logits_last.astype(jnp.float32), axis=-1)
        log_probs = process_scores(log_probs, i, cfg, tokens=run_seq.reshape(b * nb, m))
        log_probs = log_probs.reshape(b, nb, v) + run_scores[:, :, None]
        log_probs = log_probs.reshape(b, nb * v)
        if cfg.do_sample:  # beam sampling: HF draws the candidates with torch.multinomial
            topk_idx = sample_without_replacement(jax.random.fold_in(rng, i), log_probs, k)
            topk_lp = jnp.take_along_axis(log_probs, topk_idx, axis=1)
        else:
            topk_lp, topk_idx = jax.lax.top_k(log_probs, k)
        src_beam = topk_idx // v
        topk_ids = (topk_idx % v).astype(jnp.int32)
        topk_seq = gather(run_seq, src_beam)
        topk_seq = jax.lax.dynamic_update_slice(topk_seq, topk_ids[:, :, None], (0, 0, i))
        hits = jnp.broadcast_to(i + 1 >= m, topk_ids.shape)
        if eos is not None:
            hits = hits | (topk_ids == eos)
        # running beams for the next step
        run_lp = topk_lp + hits.astype(jnp.float32) * -1.0e9
        next_idx = jax.lax.top_k(run_lp, nb)[1]
        run_seq = gather(topk_seq, next_idx)
        run_scores = gather(run_lp, next_idx)
        run_src = gather(src_beam, next_idx)
        # finished hypotheses
        just_done = hits & top_nb_mask[None, :]
        fin_lp = topk_lp / (jnp.float32(i + 1) ** lp)
        full = jnp.all(finished, axis=-1, keepdims=True) & (cfg.early_stopping is True)
        fin_lp = fin_lp + full.astype(jnp.float32) * -1.0e9
        fin_lp = fin_lp + (~unsat).astype(jnp.float32) * -1.0e9
        fin_lp = fin_lp + (~just_done).astype(jnp.float32) * -1.0e9
        merged_seq = jnp.concatenate([seqs, topk_seq], axis=1)
        merged_scores = jnp.concatenate([beam_scores, fin_lp], axis=1)
        merged_fin = jnp.concatenate([finished, just_done], axis=1)
        keep = jax.lax.top_k(merged_scores, nb)[1]
        seqs = gather(merged_seq, keep)
        beam_scores = gather(merged_scores, keep)
        finished = gather(merged_fin, keep)
        # reorder the cache to the surviving beams
        flat_src = (run_src + batch_offset).reshape(-1)
        cache = jax.tree.map(lambda c: jnp.take(c, flat_src, axis=1), cache)  # [L, B*nb, ...]
        # early-stop heuristic (evaluated at cur_len = i + 1 new tokens)
        best_len = m if (cfg.early_stopping == "never" and lp > 0.0) else i + 1
        best_running = run_scores[:, :1] / (jnp.float32(best_len) ** lp)
        worst_fin = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), -1.0e9)
        unsat = unsat & jnp.any(best_running > worst_fin, axis=-1, keepdims=True)
        go_on = jnp.any(unsat) & ~(jnp.all(finished) & (cfg.early_stopping is True)) & ~jnp.all(hits)
        return (run_seq, run_scores, seqs, beam_scores, finished, unsat, cache), go_on

    run_seq = jnp.full((b, nb, m), fill, jnp.int32)
    run_scores = jnp.concatenate([jnp.zeros((b, 1)), jnp.full((b, nb - 1), -1.0e9)], axis=1).astype(jnp.float32)
    seqs = run_seq
    beam_scores = jnp.full((b, nb), -1.0e9, jnp.float32)
    finished = jnp.zeros((b, nb), bool)
    unsat = jnp.ones((b, 1), bool)
    st, go_on = step(logits[:, -1], 0, (run_seq, run_scores, seqs, beam_scores, finished, unsat, cache))

    def cond(state):
        i, go_on, *_ = state
        return go_on & (i < m)

    def body(state):
        i, _, key_mask, st = state
        run_seq, cache = st[0], st[-1]
        prev = jax.lax.dynamic_slice_in_dim(run_seq, i - 1, 1, axis=2).reshape(rows, 1)
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((rows, 1), jnp.int32), (0, t + i - 1))
        logits, cache = model.apply(
            {"params": params}, input_ids=prev, attention_mask=key_mask, positions=(last_pos + i)[:, None],
            cache=cache, cache_index=t + i - 1,
        )
        st, go_on = step(logits[:, -1], i, st[:-1] + (cache,))
        return i + 1, go_on, key_mask, st

    i, _, _, st = jax.lax.while_loop(cond, body, (jnp.int32(1), go_on, key_mask, st))
    seqs, beam_scores = st[2], st[3]
    r = cfg.num_return_sequences
    tokens = seqs[:, :r].reshape(b * r, m)
    scores = beam_scores[:, :r].reshape(b * r)
    return GenerationOutput(tokens, _lengths(tokens, i, eos), scores)


# ------------------------------------------------------------------------------------ entry points

def length_bucket(length: int) -> int:
    """Padded sequence length: 16 for up to 16 tokens, else the next multiple of 32."""
    length = int(length)
    return 16 if length <= 16 else -(-length // 32) * 32


def _left_pad_host(x, extra: int):
    """Left-pads axis 1 with zeros on the host (no per-shape device program), then one transfer."""
    x = np.asarray(x)
    return jax.device_put(np.pad(x, [(0, 0), (extra, 0)] + [(0, 0)] * (x.ndim - 2)))


def pad_to_bucket(embeds, mask):
    """Left-pads [B, T, C] embeddings and their [B, T] mask to ``length_bucket(T)`` (masked slots).

    Left padding is invisible to the model (masked keys, positions counted from the first real token),
    so prompts of different lengths within a bucket share one compiled program. Host-side for concrete arrays
    (no program per shape); inside a trace (a caller's jitted program) a pad of that program.
    """
    t = embeds.shape[1]
    extra = length_bucket(t) - t
    if not extra:
        return embeds, mask
    if isinstance(embeds, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):  # inside a caller's program
        pad = lambda x: jnp.pad(x, [(0, 0), (extra, 0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        return pad(embeds), pad(mask)
    return _left_pad_host(embeds, extra), _left_pad_host(mask, extra)


@cached_jit(static_argnames=("model",))
def embed_ids(model, params, ids):
    """Token embeddings of ids [B, T] with the model's own table (jitted; the model is static)."""
    return model.apply({"params": params}, ids, method=model.embed)


def generate(
    model,
    params,
    inputs_embeds,
    attention_mask,
    config: GenerationConfig,
    *,
    rng=None,
    uncond_embeds=None,
    uncond_mask=None,
) -> GenerationOutput:
    """Generates new tokens after left-padded prompts.

    model: ``LlamaForCausalLM``; params: its params; inputs_embeds [B, T, C]; attention_mask [B, T]
    (1 = real token, left padding); rng: PRNG key for sampling; uncond_embeds [B, Tu, C] +
    uncond_mask [B, Tu]: unconditional context for guidance (required when ``config.guidance_scale``
    is set). Returns ``GenerationOutput(tokens [B*R, max_new], lengths [B*R], scores [B*R])``.
    """
    config.validate()
    if inputs_embeds.ndim != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"inputs_embeds {inputs_embeds.shape} / attention_mask {attention_mask.shape}: expected [B, T, C] / [B, T]"
        )
    inputs_embeds, attention_mask = pad_to_bucket(inputs_embeds, attention_mask)
    if config.do_sample and rng is None:
        raise ValueError("do_sample=True needs an rng key")
    if config.num_beams > 1:
        return _beam_generate(model, config, params, inputs_embeds, attention_mask,
                              jax.random.key(0) if rng is None else rng)
    if config.use_guidance:
        if uncond_embeds is None:
            raise ValueError("guidance_scale is set: pass uncond_embeds (e.g. the [IMG] embedding) and uncond_mask")
        if uncond_mask is None:
            uncond_mask = jnp.ones(uncond_embeds.shape[:2], jnp.int32)
        if uncond_embeds.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(f"uncond_embeds batch {uncond_embeds.shape[0]} != inputs batch {inputs_embeds.shape[0]}")
        # The unconditional context is not bucketed: HF counts its positions from its first slot, padding
        # included, so extra padding would move them (LaVIT's is [IMG] alone: one shape).
        # The scale is traced: every guidance scale shares one compiled program.
        guidance = jnp.float32(config.guidance_scale)
        config = dataclasses.replace(config, guidance_scale=TRACED_GUIDANCE)
    else:
        uncond_embeds = uncond_mask = guidance = None
    return _sample_generate(model, config, params, inputs_embeds, attention_mask, rng, uncond_embeds, uncond_mask,
                            guidance)


def generate_from_ids(model, params, input_ids, attention_mask, config: GenerationConfig, **kw) -> GenerationOutput:
    """``generate`` on token ids [B, T] (embedded with the model's own table), left-padded to a length bucket."""
    extra = length_bucket(np.shape(input_ids)[1]) - np.shape(input_ids)[1]
    if extra:
        input_ids, attention_mask = _left_pad_host(input_ids, extra), _left_pad_host(attention_mask, extra)
    embeds = embed_ids(model, params, jnp.asarray(input_ids, jnp.int32))
    return generate(model, params, embeds, jnp.asarray(attention_mask), config, **kw)
