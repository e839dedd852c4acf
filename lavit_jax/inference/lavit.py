"""LaVIT end to end: a converted checkpoint behind one object with the task methods.

    model = LaVIT.from_pretrained("converted/")          # written by tools/convert_torch_weights.py
    model.caption("cat.jpg")                             # -> "a cat sitting on a sofa"
    model.vqa("cat.jpg", "what animal is this?")         # -> "cat"
    model.text2image("a duck made of wool", seed=0)      # -> PIL image (SDXL decoder, 1024 px)
    model.edit("cat.jpg", "in the snow")                 # image + text prompt -> PIL image
    model.generate_image(["cat.jpg", "in the style of", "dog.png"])   # interleaved prompt -> PIL image
    model.reconstruct("cat.jpg")                         # image -> visual tokens -> PIL image

Parts are loaded on first use (the LLM is not read for ``reconstruct``, the diffusion UNets not for
``caption``); a task whose part the checkpoint lacks raises ``CheckpointPartError`` naming it.

Pipelines: understanding = tokenizer features (merger + projector from ``visual_weight.bin``)
between [IMG] and [/IMG] -> LLM beam search; generation = text (or image ids + text) + [IMG] -> LLM
sampling with LLM classifier-free guidance -> visual ids -> token decoder -> guided DDIM -> VAE.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lavit_jax import checkpoint, compile_cache, hub, vocab
from lavit_jax.checkpoint import DECODER_FOLDERS, CheckpointPartError
from lavit_jax.data import image_io
from lavit_jax.data.image_io import load_image
from lavit_jax.inference import defaults, llm_tasks
from lavit_jax.inference.sampling import to_pil
from lavit_jax.ops import quant

__all__ = ["LaVIT", "CheckpointPartError"]


def _as_list(x):
    """(list of inputs, whether a single input was given). A 4-D array is a batch (e.g. pre-normalised
    [B, 3, 224, 224] pixels, as the release's methods take tensors)."""
    if isinstance(x, list | tuple):
        return list(x), False
    if hasattr(x, "__array__") and getattr(x, "ndim", 0) == 4:
        x = np.asarray(x)
        image_io.check_batch_layout(x)
        return list(x), False
    return [x], True


def _check_text(texts, what="prompt", allow_empty: bool = False):
    """Every item is a str (non-blank unless ``allow_empty``: generation prompts may be empty, as in the
    release, which then generates from [IMG] alone)."""
    for t in texts:
        if not isinstance(t, str) or (not allow_empty and not t.strip()):
            raise ValueError(f"empty {what}: {t!r}" if isinstance(t, str) else f"{what} {t!r} is not a str")


def token_ids_part(p) -> np.ndarray | None:
    """A raw token-id prompt part (a list / tuple of ints or a 1-D integer array) -> int32 ids, else None."""
    if isinstance(p, np.ndarray) and p.ndim == 1 and np.issubdtype(p.dtype, np.integer):
        ids = p
    elif isinstance(p, list | tuple) and all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in p):
        ids = np.asarray(p, np.int64)
    else:
        return None
    if ids.size == 0:
        raise ValueError("a token-id prompt part is empty")
    return ids.astype(np.int32)


def prompt_parts(parts) -> list:
    """An interleaved prompt -> its parts: str for texts, int32 arrays for raw token ids, PIL images for
    images (opened and checked).

    A str naming an existing file is an image path (it must be a readable image), any other str is
    text; a list of ints or a 1-D integer array is raw LLM token ids (the release's ``is_token_prompt``);
    ``os.PathLike``, PIL images and other arrays are images.
    """
    if isinstance(parts, str) or not isinstance(parts, list | tuple) or not parts:
        raise ValueError("a multimodal prompt is a non-empty list of texts, token ids and images")
    out = []
    for p in parts:
        ids = token_ids_part(p)
        if ids is not None:
            out.append(ids)
        elif isinstance(p, str) and not os.path.isfile(p):
            out.append(p)
        else:
            out.append(load_image(p))
    return out


def _is_image(part) -> bool:
    return not isinstance(part, str | np.ndarray)


def _check_num_images(num_images):
    if not isinstance(num_images, int | np.integer) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an integer >= 1")


class _Stages:
    """A tqdm bar over the stages of a task (``progress=True``), else a no-op."""

    def __init__(self, names, enabled):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=len(names), desc=names[0], unit="stage")
        self.names = names

    def done(self, i):
        if self.bar is not None:
            self.bar.update(1)
            if i + 1 < len(self.names):
                self.bar.set_description(self.names[i + 1])
            else:
                self.bar.close()


class LaVIT:
    """A converted LaVIT checkpoint with task methods. Use ``LaVIT.from_pretrained(dir)``.

    dtype: compute/param dtype for the LLM and UNets (default: the stored dtype); the VAE runs in float32.
    attention_impl: see ``lavit_jax.ops.attention`` ('xla' is the reference path).
    low_memory: free the language model once a generation task has its visual ids, before the diffusion
    stage loads (one stage in memory at a time; the LLM is read again by the next task that needs it).
    verbose: log each part's load time.
    llm_weights: "float" (as stored / ``dtype``) or "int8" (the LLM's projections and LM head quantised at load,
    weight-only with per-channel scales: ``lavit_jax.ops.quant``; activations stay in ``dtype``).
    """

    image_suppress_ranges = llm_tasks.IMAGE_SUPPRESS  # ids image-token generation never samples

    def __init__(self, ckpt_dir: str, manifest: dict, *, dtype=None, attention_impl: str = "xla",
                 low_memory: bool = False, verbose: bool = False, llm_weights: str = "float"):
        if llm_weights not in quant.WEIGHT_MODES:
            raise ValueError(f"llm_weights={llm_weights!r} is not one of {quant.WEIGHT_MODES}")
        self.llm_weights = llm_weights
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        self.manifest = manifest
        self.dtype = jnp.dtype(dtype or manifest.get("dtype", "float32"))
        self.attention_impl = attention_impl
        self.low_memory = low_memory
        self.verbose = verbose
        self._cache: dict = {}
        self.last_nsfw: list[bool] = []  # flags of the last decode_ids call (see decode_ids)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *, dtype=None, attention_impl: str = "xla",
                        compilation_cache: bool = True, low_memory: bool = False, verbose: bool = False,
                        revision: str | None = None, conversion_dtype: str = hub.DEFAULT_CONVERSION_DTYPE,
                        config=None, llm_weights: str = "float") -> LaVIT:
        """Opens a directory written by ``tools/convert_torch_weights.py``, or a Hugging Face Hub repo id
        (``"rain1011/LaVIT-7B-v2"``, at ``revision``): downloaded and converted once into a cache keyed by
        repo, commit and ``conversion_dtype`` (``lavit_jax.hub``; ``config``: the tokenizer config the
        conversion uses, default the release's). Parts load on first use.

        ``compilation_cache`` turns on JAX's persistent compilation cache (``lavit_jax.compile_cache``), so
        later processes reuse the compiled programs. ``low_memory``, ``verbose``, ``llm_weights``: see the class.
        """
        ckpt_dir = hub.resolve(ckpt_dir, revision=revision, conversion_dtype=conversion_dtype, config=config,
                               log=lambda msg: print(msg, file=sys.stderr))
        if compilation_cache:
            compile_cache.enable()
        return cls(ckpt_dir, checkpoint.read_manifest(ckpt_dir), dtype=dtype, attention_impl=attention_impl,
                   low_memory=low_memory, verbose=verbose, llm_weights=llm_weights)

    # ------------------------------------------------------------------------------------------ parts

    @property
    def parts(self) -> list[str]:
        return list(self.manifest.get("parts", {}))

    def require(self, part: str, task: str) -> dict:
        return checkpoint.part_entry(self.ckpt_dir, part, task, self.manifest)

    def _cached(self, key, build):
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = jax.block_until_ready(build())
            if self.verbose:
                print(f"loaded {key if isinstance(key, str) else '/'.join(key)} in {time.perf_counter() - t0:.2f}s",
                      file=sys.stderr)
        return self._cache[key]

    def release(self, part: str) -> None:
        """Drops a loaded part ('llm', 'vt', 'vt_und' or ('detok', decoder)) from memory."""
        self._cache.pop(part, None)

    @property
    def visual_tokenizer(self):
        """The dynamic visual tokenizer (generation path: ids) with the token decoders present."""
        self.require("visual_tokenizer", "the visual tokenizer")
        return self._cached("vt", lambda: checkpoint.load_visual_tokenizer(self.ckpt_dir))

    @property
    def understanding_tokenizer(self):
        """The tokenizer with ``visual_weight.bin``'s merger + projector laid over (understanding path; its
        token decoders are not read)."""
        self.require("language_model", "image understanding")
        return self._cached("vt_und", lambda: checkpoint.load_visual_tokenizer(self.ckpt_dir, understanding=True,
                                                                               decoders=False))

    @property
    def language_model(self):
        """(LlamaForCausalLM, params, TextTokenizer)."""
        return self._cached("llm", self._load_language_model)

    def _load_language_model(self):
        model, params, tok = checkpoint.load_language_model(self.ckpt_dir, dtype=self.dtype,
                                                            attention_impl=self.attention_impl,
                                                            weights=self.llm_weights)
        if tok.vocab_size < vocab.TEXT_VOCAB:
            print(f"warning: the text tokenizer of {self.ckpt_dir} has {tok.vocab_size} pieces, fewer than the "
                  f"LLM's {vocab.TEXT_VOCAB} text ids: generated ids {tok.vocab_size}..{vocab.TEXT_VOCAB - 1} "
                  "have no text and are left out of captions and answers", file=sys.stderr)
        return model, params, tok

    def available_decoders(self) -> list[str]:
        return checkpoint.available_decoders(self.ckpt_dir)

    def _pick_decoder(self, decoder: str | None, task: str) -> str:
        if decoder is None:
            avail = self.available_decoders()
            decoder = "highres" if "highres" in avail or not avail else "lowres"
        if decoder not in DECODER_FOLDERS:
            raise ValueError(f"decoder {decoder!r} is not one of {tuple(DECODER_FOLDERS)}")
        self.require(DECODER_FOLDERS[decoder], f"{task} with the {decoder} decoder")
        vt = self.require("visual_tokenizer", task)
        if f"{decoder}_decoder" not in vt.get("files", []):
            name = "highres_tokenizer_decoder.bin" if decoder == "highres" else "tokenizer_decoder.bin"
            raise CheckpointPartError(f"checkpoint {self.ckpt_dir} has no {decoder} token decoder "
                                      f"(visual_tokenizer/{name} was not converted), needed for {task}")
        return decoder

    def detokenizer(self, decoder: str = "highres"):
        """The ``Detokenizer`` (token decoder + UNet + VAE + DDIM) for 'lowres' or 'highres'."""
        decoder = self._pick_decoder(decoder, "image decoding")
        return self._cached(("detok", decoder), lambda: checkpoint.load_detokenizer(
            self.ckpt_dir, decoder, tokenizer=self.visual_tokenizer, dtype=self.dtype,
            attention_impl=self.attention_impl))

    # ------------------------------------------------------------------------------------------ understanding

    def _features(self, images, keep, seed):
        return self.understanding_tokenizer.understanding_features(images, mode=keep, seed=seed)

    @staticmethod
    def _understanding_sampling(do_sample, temperature, top_p, top_k, repetition_penalty, num_beams, seed) -> dict:
        """Checked sampling options for ``llm_tasks.caption`` / ``vqa`` (None = the task default)."""
        if num_beams is not None and num_beams < 1:
            raise ValueError(f"num_beams={num_beams} must be >= 1")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 disables top-k)")
        if repetition_penalty is not None and not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 disables it)")
        return dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, num_beams=num_beams,
                    rng=jax.random.key(seed) if do_sample else None)

    def caption(self, images, *, num_beams: int | None = None,
                max_new_tokens: int = defaults.CAPTION.max_new_tokens,
                min_new_tokens: int = defaults.CAPTION.min_new_tokens, prompt: str | None = None,
                num_captions: int = 1, do_sample: bool = False, temperature: float | None = None,
                top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                keep: str = defaults.KEEP, seed: int = 0, progress: bool = False):
        """Image(s) (path / PIL / array, or a list) -> caption str (or list of str).

        Beam search by default (``num_beams`` None: max(2, num_captions)); ``do_sample`` samples instead
        (one beam unless ``num_beams`` is given: beam sampling; ``top_p``/``top_k``/``temperature`` default to
        ``defaults.CAPTION``'s, drawn from ``seed``).
        ``repetition_penalty`` (HF semantics, on the generated ids) works with both. ``num_captions`` > 1:
        a list of that many captions per image (best beam first). ``keep``: the token selector's decisions,
        'sample' (the release's hard Gumbel sample, drawn from ``seed``) or 'argmax' (deterministic).
        """
        imgs, single = _as_list(images)
        if num_captions < 1:
            raise ValueError(f"num_captions={num_captions} must be >= 1")
        if num_beams is not None and not do_sample and num_captions > num_beams:
            raise ValueError(f"num_captions={num_captions} > num_beams={num_beams}: beam search returns at most "
                             "num_beams captions")
        sampling = self._understanding_sampling(do_sample, temperature, top_p, top_k, repetition_penalty, num_beams,
                                                seed)
        self.require("visual_tokenizer", "caption")
        self.require("language_model", "caption")
        stages = _Stages(["tokenize", "language model"], progress)
        model, params, tok = self.language_model
        feats, lengths = self._features(imgs, keep, seed)
        stages.done(0)
        out = llm_tasks.caption(model, params, tok, feats, lengths, max_new_tokens=max_new_tokens,
                                min_new_tokens=min_new_tokens, prompt=prompt, num_captions=num_captions, **sampling)
        stages.done(1)
        return out[0] if single else out

    def vqa(self, images, questions, *, num_beams: int | None = None,
            max_new_tokens: int = defaults.VQA.max_new_tokens, min_new_tokens: int = defaults.VQA.min_new_tokens,
            do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, repetition_penalty: float | None = None,
            apply_lemmatizer: bool = True, keep: str = defaults.KEEP, seed: int = 0, progress: bool = False):
        """Image(s) + question(s) -> answer (or list). One question per image.

        Answers are ``llm_tasks.Answer`` strings: lower-cased, nouns and verbs lemmatised with spaCy's
        ``en_core_web_sm`` as the release does when that model is installed; ``answer.answer_processing``
        says which ('lemmatized' or 'lowercase-only'). Beam search (5 beams) by default; ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``keep``, ``seed`` as for ``caption``.
        """
        imgs, single = _as_list(images)
        qs, _ = _as_list(questions)
        _check_text(qs, "question")
        if len(qs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(qs)} questions")
        sampling = self._understanding_sampling(do_sample, temperature, top_p, top_k, repetition_penalty, num_beams,
                                                seed)
        self.require("visual_tokenizer", "vqa")
        self.require("language_model", "vqa")
        stages = _Stages(["tokenize", "language model"], progress)
        model, params, tok = self.language_model
        feats, lengths = self._features(imgs, keep, seed)
        stages.done(0)
        res = llm_tasks.vqa(model, params, tok, feats, lengths, qs, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, apply_lemmatizer=apply_lemmatizer, **sampling)
        stages.done(1)
        return res.answers[0] if single else res.answers

    # ------------------------------------------------------------------------------------------ generation

    def _image_token_capacity(self) -> int:
        """Visual tokens an image has at most (the pixel decoder's queries): (image_size / patch_size)^2."""
        cfg = checkpoint.tokenizer_config(self.ckpt_dir)
        return (cfg.image_size // cfg.patch_size) ** 2

    def _generation_config(self, *, llm_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens,
                           do_sample, num_beams, length_penalty, negative_prompt):
        """Checked image-token generation settings (before any model work). ``max_new_tokens`` above the
        visual tokens an image can have is lowered to that number, with a warning: past it the pixel
        decoder has no queries left (the release's decoder fails there)."""
        capacity = self._image_token_capacity()
        if max_new_tokens > capacity:
            print(f"warning: max_new_tokens={max_new_tokens} is more than the {capacity} visual tokens an image "
                  f"has (the pixel decoder's queries): generating at most {capacity}", file=sys.stderr)
            max_new_tokens = capacity
            min_new_tokens = min(min_new_tokens, capacity)
        cfg = llm_tasks.image_generation_config(
            guidance_scale=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
            length_penalty=length_penalty, suppress_ranges=self.image_suppress_ranges)
        if cfg.num_beams > 1 and cfg.use_guidance:
            raise ValueError(f"num_beams={num_beams} with llm_guidance={llm_guidance}: beam search runs without LLM "
                             "guidance here; pass llm_guidance=1 (see the README's deviations)")
        cfg.validate()
        if negative_prompt is not None and not cfg.use_guidance:
            raise ValueError(f"negative_prompt is the unconditional context of LLM guidance; llm_guidance="
                             f"{llm_guidance} turns guidance off")
        return cfg

    @staticmethod
    def _negative_ids(tok, negative_prompt, batch: int):
        """``negative_prompt`` (str, list of B str, or raw token ids) -> (ids [1 or B, L], mask) or (None, None)."""
        if negative_prompt is None:
            return None, None
        ids = token_ids_part(negative_prompt)
        if ids is not None:
            return ids[None], np.ones((1, ids.size), np.int32)
        texts, _ = _as_list(negative_prompt)
        _check_text(texts, "negative_prompt")
        if len(texts) not in (1, batch):
            raise ValueError(f"{len(texts)} negative prompts for {batch} prompts (give one, or one per prompt)")
        return tok.encode_batch(texts)

    def _check_token_ids(self, ids, what="token-id prompt"):
        n = int(self.require("language_model", "a token-id prompt")["config"]["vocab_size"])
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"{what}: ids must be in [0, {n}) (the LLM's vocabulary), got {ids.min()}..{ids.max()}")

    @staticmethod
    def _visual_ids(out, what):
        codes, lengths = llm_tasks.image_codes_from_ids(out.tokens)
        lengths = np.asarray(lengths)
        if np.any(lengths == 0):
            raise ValueError(f"the language model generated no visual tokens for {what}; try another seed")
        valid = np.arange(codes.shape[1])[None] < lengths[:, None]
        ids = np.where(valid, np.asarray(codes) + vocab.VISUAL_OFFSET, 0)
        return ids.astype(np.int32), lengths.astype(np.int32)

    def text2image_ids(self, prompts, *, llm_guidance: float = defaults.TEXT2IMAGE.llm_guidance,
                       top_k: int = defaults.TEXT2IMAGE.top_k,
                       top_p: float = defaults.TEXT2IMAGE.top_p, temperature: float = defaults.TEXT2IMAGE.temperature,
                       min_new_tokens: int = defaults.TEXT2IMAGE.min_new_tokens,
                       max_new_tokens: int = defaults.TEXT2IMAGE.max_new_tokens, do_sample: bool = True,
                       num_beams: int = 1, length_penalty: float = 1.0, negative_prompt=None, seed: int = 0):
        """Prompt(s) -> visual ids [B, N] in LLM space (code + 32002, padded with 0) and lengths [B].

        As the release's ``generate_image_tokenids``: nucleus sampling by default (``do_sample``); greedy
        (``do_sample=False``); ``num_beams`` > 1 (with ``length_penalty``; needs ``llm_guidance=1``): beam
        sampling, or beam search with ``do_sample=False``.
        ``negative_prompt`` (a text, one per prompt, or raw token ids; the release's ``uncond_input_ids``)
        replaces [IMG] alone as the unconditional context of LLM guidance. An empty prompt generates
        unconditionally (from [IMG] alone), as in the release. ``max_new_tokens``: see ``_generation_config``.
        """
        texts, _ = _as_list(prompts)
        _check_text(texts, allow_empty=True)
        cfg = self._generation_config(
            llm_guidance=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
            length_penalty=length_penalty, negative_prompt=negative_prompt)
        model, params, tok = self.language_model
        neg, neg_mask = self._negative_ids(tok, negative_prompt, len(texts))
        if neg is not None and token_ids_part(negative_prompt) is not None:
            self._check_token_ids(neg, "negative_prompt")
        out = llm_tasks.text_to_image_ids(model, params, tok, texts, jax.random.key(seed), config=cfg,
                                          negative_ids=neg, negative_mask=neg_mask)
        return self._visual_ids(out, "the prompt")

    def _token_prompt_ids(self, rows, *, llm_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens,
                          do_sample, num_beams, length_penalty, negative_prompt, seed, keep, cap_to_prompt,
                          add_special, what):
        """Rows of interleaved parts (texts, raw ids, images) -> generated visual ids, lengths (see ``edit_ids``)."""
        images = [p for row in rows for p in row if _is_image(p)]
        for row in rows:
            for p in row:
                if isinstance(p, np.ndarray):
                    self._check_token_ids(p)
        if images:
            image_ids, image_lengths = self.visual_tokenizer.tokenize(images, add_special=add_special, mode=keep,
                                                                      seed=seed)
            image_ids, image_lengths = np.asarray(image_ids), np.asarray(image_lengths)
        model, params, tok = self.language_model
        token_rows, k = [], 0
        for row in rows:
            parts = []
            for p in row:
                if isinstance(p, str):
                    parts.append(np.asarray(tok.encode(p), np.int32))
                elif isinstance(p, np.ndarray):
                    parts.append(p)
                else:
                    parts.append(image_ids[k, : image_lengths[k]])
                    k += 1
            token_rows.append(parts)
        if cap_to_prompt:  # never more than an image can have (past that the pixel decoder has no queries)
            max_new_tokens = min(llm_tasks.token_prompt_cap(token_rows), self._image_token_capacity())
            min_new_tokens = min(min_new_tokens, max_new_tokens)  # HF stops at the cap before the minimum
        cfg = self._generation_config(
            llm_guidance=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
            length_penalty=length_penalty, negative_prompt=negative_prompt)
        neg, neg_mask = self._negative_ids(tok, negative_prompt, len(rows))
        if neg is not None and token_ids_part(negative_prompt) is not None:
            self._check_token_ids(neg, "negative_prompt")
        ids, mask = llm_tasks.token_prompt_ids(token_rows)
        out = llm_tasks.token_prompt_to_image_ids(model, params, ids, mask, jax.random.key(seed), config=cfg,
                                                  negative_ids=neg, negative_mask=neg_mask)
        return self._visual_ids(out, what)

    def edit_ids(self, images, prompts, *, llm_guidance: float = defaults.EDIT.llm_guidance,
                 top_k: int = defaults.EDIT.top_k, top_p: float = defaults.EDIT.top_p,
                 temperature: float = defaults.EDIT.temperature, min_new_tokens: int = defaults.EDIT.min_new_tokens,
                 max_new_tokens: int = defaults.EDIT.max_new_tokens, do_sample: bool = True, num_beams: int = 1,
                 length_penalty: float = 1.0, negative_prompt=None, seed: int = 0, keep: str = defaults.KEEP,
                 cap_to_prompt: bool = True):
        """Image(s) + prompt(s) (multimodal prompt: image tokens then text then [IMG]) -> visual ids, lengths.

        ``cap_to_prompt`` (default, as the release): the release's ``generate_image_tokenids`` replaces
        the new-token limit with the prompt's token count when the prompt is given as tokens (which
        ``multimodal_synthesis`` always does), so at most max(len(image ids) + len(text ids)) new tokens
        are generated, whatever ``max_new_tokens`` says, and (unlike the release, whose pixel decoder would fail)
        at most the visual tokens an image can have; ``cap_to_prompt=False`` keeps ``max_new_tokens``.
        Sampling, search and ``negative_prompt``: as ``text2image_ids``.
        Row i is ``generate_image_ids([images[i], prompts[i]])`` of a batch.
        """
        imgs, _ = _as_list(images)
        texts, _ = _as_list(prompts)
        _check_text(texts, allow_empty=True)
        if len(texts) == 1 and len(imgs) > 1:
            texts = texts * len(imgs)
        if len(texts) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(texts)} prompts")
        return self._token_prompt_ids(
            [[load_image(im), t] for im, t in zip(imgs, texts)], llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
            temperature=temperature, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
            do_sample=do_sample, num_beams=num_beams, length_penalty=length_penalty, negative_prompt=negative_prompt,
            seed=seed, keep=keep, cap_to_prompt=cap_to_prompt, add_special=False, what="the multimodal prompt")

    def generate_image_ids(self, parts, *, llm_guidance: float = defaults.EDIT.llm_guidance,
                           top_k: int = defaults.EDIT.top_k, top_p: float = defaults.EDIT.top_p,
                           temperature: float = defaults.EDIT.temperature,
                           min_new_tokens: int = defaults.EDIT.min_new_tokens,
                           max_new_tokens: int = defaults.EDIT.max_new_tokens, do_sample: bool = True,
                           num_beams: int = 1, length_penalty: float = 1.0, negative_prompt=None, seed: int = 0,
                           keep: str = defaults.KEEP, cap_to_prompt: bool = True, add_special: bool = False):
        """An interleaved prompt (list of texts, raw token ids and images, any order) -> visual ids [1, N], lengths [1].

        As the release's ``multimodal_synthesis``: each image becomes its visual ids (no [IMG]/[/IMG]:
        ``tokenize_image(add_special=False)``; ``add_special=True`` wraps each in [IMG] ... [/IMG]), each
        text its ids without BOS, raw ids stay as given, concatenated in order, then [IMG]. A prompt of
        raw ids alone is the release's ``generate_image(..., is_token_prompt=True)``. See ``prompt_parts`` for
        which parts are what, ``edit_ids`` for ``cap_to_prompt`` (the cap counts every part's tokens),
        ``text2image_ids`` for sampling, search and ``negative_prompt``.
        """
        parts = prompt_parts(parts)
        _check_text([p for p in parts if isinstance(p, str)], allow_empty=True)
        return self._token_prompt_ids(
            [parts], llm_guidance=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
            length_penalty=length_penalty, negative_prompt=negative_prompt, seed=seed, keep=keep,
            cap_to_prompt=cap_to_prompt, add_special=add_special, what="the multimodal prompt")

    def _output_shape(self, decoder: str, *, size=None, width=None, height=None, ratio=None, original_size=None,
                      crops_coords_top_left=None, target_size=None) -> dict:
        """Checked output size and SDXL micro-conditioning of ``decoder`` -> keyword arguments of ``decode_ids``
        (size (height, width) and the micro-conditioning given). See ``defaults.image_size``."""
        native, factor = checkpoint.decoder_geometry(self.ckpt_dir, decoder)
        hw = defaults.image_size(native=native, factor=factor, decoder=decoder, size=size, width=width,
                                 height=height, ratio=ratio)
        micro = defaults.micro_conditioning(decoder, original_size, crops_coords_top_left, target_size)
        return dict(size=hw, **micro)

    def _vae_dtype(self, vae_dtype: str) -> str:
        if vae_dtype not in defaults.VAE_DTYPES:
            raise ValueError(f"vae_dtype={vae_dtype!r}: expected one of {', '.join(defaults.VAE_DTYPES)}")
        return self.dtype.name if vae_dtype == "model" else vae_dtype

    def has_safety_checker(self) -> bool:
        return "safety_checker" in self.parts

    @property
    def safety_checker(self):
        """The converted ``SafetyChecker`` (diffusers' StableDiffusionSafetyChecker) of the checkpoint."""
        self.require("safety_checker", "the safety checker")
        return self._cached("safety", lambda: checkpoint.load_safety_checker(self.ckpt_dir))

    def decode_ids(self, ids, lengths, *, decoder: str | None = None, steps: int = defaults.TEXT2IMAGE.steps,
                   guidance: float = defaults.TEXT2IMAGE.guidance, seed: int = 0,
                   size: int | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
                   ratio: str | None = None, original_size: tuple[int, int] | None = None,
                   crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
                   safety_checker: bool | None = None, vae_dtype: str = defaults.TEXT2IMAGE.vae_dtype, noise=None,
                   progress: bool = False) -> list:
        """Visual ids [B, N] (LLM space) + lengths [B] -> list of B PIL images.

        Size: ``size`` (int or (height, width)), ``width`` / ``height`` or ``ratio`` (``defaults.ASPECT_RATIOS``);
        SDXL micro-conditioning (highres only): ``original_size``, ``crops_coords_top_left``, ``target_size``.
        ``safety_checker`` (None: on when the checkpoint has one): flagged images are black; each image's
        ``info["nsfw"]`` says whether it was flagged, and ``self.last_nsfw`` lists the flags of this call.
        ``vae_dtype``: the VAE decode's dtype, one of ``defaults.VAE_DTYPES`` ("model": this model's dtype; the
        release decodes generated images in the model precision and reconstructions in float32).
        """
        vae_dtype = self._vae_dtype(vae_dtype)
        detok = self.detokenizer(decoder)
        shape = self._output_shape(detok.decoder, size=size, width=width, height=height, ratio=ratio,
                                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                   target_size=target_size)
        check = self.has_safety_checker() if safety_checker is None else bool(safety_checker)
        if check:
            self.require("safety_checker", "the safety checker (pass safety_checker=False to skip it)")
        cfg = detok.token_decoder.config
        capacity = (cfg.image_size // cfg.patch_size) ** 2
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        if ids.shape[1] > capacity:  # padding past the decoder's queries (a long multimodal prompt's cap)
            if int(lengths.max()) > capacity:
                raise ValueError(f"{int(lengths.max())} visual tokens: the pixel decoder takes at most {capacity}")
            ids = ids[:, :capacity]
        images, _ = detok.generate(ids, lengths, steps=steps, guidance=guidance, seed=seed, noise=noise,
                                   progress=progress, vae_dtype=vae_dtype, **shape)
        flags = [False] * len(images)
        if check:
            images, has_nsfw = self.safety_checker(images)
            flags = [bool(f) for f in has_nsfw]
        pil = to_pil(images)
        for im, flag in zip(pil, flags):
            im.info["nsfw"] = flag
        self.last_nsfw = flags
        return pil

    def _decode_stage(self, ids, lengths, stages, single, return_ids, **decode_kw):
        """The last stage of the image tasks: ids -> PIL image(s), optionally with (ids, lengths)."""
        images = self.decode_ids(ids, lengths, **decode_kw)
        stages.done(1)
        images = images[0] if single else images
        return (images, (ids, lengths)) if return_ids else images

    def _decode_draws(self, runs, stages, single, return_ids, *, seed, **decode_kw):
        """Decodes draw i's (ids, lengths) with seed + i. One draw: as ``_decode_stage``; several: a list of
        images per prompt (a list of lists for several prompts), ids as a list of (ids, lengths) per draw."""
        if len(runs) == 1:
            return self._decode_stage(*runs[0], stages, single, return_ids, seed=seed, **decode_kw)
        draws = [self.decode_ids(ids, lengths, seed=seed + i, **decode_kw) for i, (ids, lengths) in enumerate(runs)]
        stages.done(1)
        per_prompt = [[d[b] for d in draws] for b in range(len(draws[0]))]
        images = per_prompt[0] if single else per_prompt
        return (images, runs) if return_ids else images

    def _draw_and_decode(self, draw, num_images, single, return_ids, progress, **decode_kw):
        """Runs ``draw(i)`` -> (ids, lengths) for i < ``num_images`` (the LLM stage), frees the LLM in
        ``low_memory`` mode, then decodes every draw (``_decode_draws``)."""
        stages = _Stages(["language model", "diffusion"], progress)
        runs = [draw(i) for i in range(num_images)]
        if self.low_memory:
            self.release("llm")  # one stage in memory at a time
        stages.done(0)
        return self._decode_draws(runs, stages, single, return_ids, progress=progress, **decode_kw)

    def text2image(self, prompts, *, decoder: str | None = None, steps: int = defaults.TEXT2IMAGE.steps,
                   guidance: float = defaults.TEXT2IMAGE.guidance,
                   llm_guidance: float = defaults.TEXT2IMAGE.llm_guidance, seed: int = 0,
                   size: int | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
                   ratio: str | None = None, original_size: tuple[int, int] | None = None,
                   crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
                   safety_checker: bool | None = None,
                   top_k: int = defaults.TEXT2IMAGE.top_k,
                   top_p: float = defaults.TEXT2IMAGE.top_p, temperature: float = defaults.TEXT2IMAGE.temperature,
                   min_new_tokens: int = defaults.TEXT2IMAGE.min_new_tokens,
                   max_new_tokens: int = defaults.TEXT2IMAGE.max_new_tokens, do_sample: bool = True,
                   num_beams: int = 1, length_penalty: float = 1.0, negative_prompt=None,
                   vae_dtype: str = defaults.TEXT2IMAGE.vae_dtype, num_images: int = 1,
                   return_ids: bool = False, progress: bool = False):
        """Prompt(s) -> PIL image (or list). ``decoder`` 'highres' (SDXL, default when converted) or 'lowres'.
        With ``return_ids`` also returns (ids, lengths) of the generated visual tokens.

        ``num_images`` > 1: that many images per prompt (a list; a list of lists for several prompts), image i
        drawn from seed + i (it is what ``num_images=1, seed=seed + i`` gives); ids: a list of (ids, lengths).
        Size (``size`` / ``width`` / ``height`` / ``ratio``), SDXL micro-conditioning, ``safety_checker`` and
        ``vae_dtype``: see ``decode_ids`` (checked before any model work); ``do_sample``, ``num_beams``,
        ``length_penalty`` and ``negative_prompt``: see ``text2image_ids``. An empty prompt is unconditional."""
        prompts_, single = _as_list(prompts)
        _check_text(prompts_, allow_empty=True)
        self._vae_dtype(vae_dtype)
        _check_num_images(num_images)
        decoder = self._pick_decoder(decoder, "text2image")
        shape = self._output_shape(decoder, size=size, width=width, height=height, ratio=ratio,
                                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                   target_size=target_size)
        self.require("language_model", "text2image")
        return self._draw_and_decode(
            lambda i: self.text2image_ids(prompts_, llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
                                          temperature=temperature, min_new_tokens=min_new_tokens,
                                          max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                          length_penalty=length_penalty, negative_prompt=negative_prompt,
                                          seed=seed + i),
            num_images, single, return_ids, progress, decoder=decoder, steps=steps, guidance=guidance, seed=seed,
            safety_checker=safety_checker, vae_dtype=vae_dtype, **shape)

    def edit(self, images, prompts, *, decoder: str | None = None, steps: int = defaults.EDIT.steps,
             guidance: float = defaults.EDIT.guidance, llm_guidance: float = defaults.EDIT.llm_guidance, seed: int = 0,
             size: int | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
             ratio: str | None = None, original_size: tuple[int, int] | None = None,
             crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
             safety_checker: bool | None = None,
             top_k: int = defaults.EDIT.top_k, top_p: float = defaults.EDIT.top_p,
             temperature: float = defaults.EDIT.temperature, min_new_tokens: int = defaults.EDIT.min_new_tokens,
             max_new_tokens: int = defaults.EDIT.max_new_tokens, do_sample: bool = True, num_beams: int = 1,
             length_penalty: float = 1.0, negative_prompt=None, vae_dtype: str = defaults.EDIT.vae_dtype,
             keep: str = defaults.KEEP, cap_to_prompt: bool = True,
             num_images: int = 1, return_ids: bool = False, progress: bool = False):
        """Image(s) + prompt -> PIL image (or list): generation from the multimodal prompt (see ``edit_ids`` for
        ``keep`` and ``cap_to_prompt``, ``text2image`` for ``num_images``). ``edit(img, text)`` is
        ``generate_image([img, text])``."""
        imgs, single = _as_list(images)
        texts, _ = _as_list(prompts)
        _check_text(texts, allow_empty=True)
        _check_num_images(num_images)
        self._vae_dtype(vae_dtype)
        decoder = self._pick_decoder(decoder, "edit")
        shape = self._output_shape(decoder, size=size, width=width, height=height, ratio=ratio,
                                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                   target_size=target_size)
        self.require("language_model", "edit")
        return self._draw_and_decode(
            lambda i: self.edit_ids(imgs, texts, llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
                                    temperature=temperature, min_new_tokens=min_new_tokens,
                                    max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                    length_penalty=length_penalty, negative_prompt=negative_prompt, seed=seed + i,
                                    keep=keep, cap_to_prompt=cap_to_prompt),
            num_images, single, return_ids, progress, decoder=decoder, steps=steps, guidance=guidance, seed=seed,
            safety_checker=safety_checker, vae_dtype=vae_dtype, **shape)

    def generate_image(self, parts, *, decoder: str | None = None, steps: int = defaults.EDIT.steps,
                       guidance: float = defaults.EDIT.guidance, llm_guidance: float = defaults.EDIT.llm_guidance,
                       seed: int = 0,
                       size: int | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
                       ratio: str | None = None, original_size: tuple[int, int] | None = None,
                       crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
                       safety_checker: bool | None = None,
                       top_k: int = defaults.EDIT.top_k,
                       top_p: float = defaults.EDIT.top_p, temperature: float = defaults.EDIT.temperature,
                       min_new_tokens: int = defaults.EDIT.min_new_tokens,
                       max_new_tokens: int = defaults.EDIT.max_new_tokens, do_sample: bool = True,
                       num_beams: int = 1, length_penalty: float = 1.0, negative_prompt=None,
                       vae_dtype: str = defaults.EDIT.vae_dtype, keep: str = defaults.KEEP,
                       cap_to_prompt: bool = True, add_special: bool = False, num_images: int = 1,
                       return_ids: bool = False, progress: bool = False):
        """An interleaved prompt, e.g. ``[img_a, "in the style of", img_b]`` (any number of images: path / PIL /
        array, and texts, in any order) -> PIL image (a list with ``num_images`` > 1). The prompt is built as
        the release's ``multimodal_synthesis`` builds it (see ``generate_image_ids``); options as ``edit``."""
        parts = prompt_parts(parts)
        _check_text([p for p in parts if isinstance(p, str)], allow_empty=True)
        _check_num_images(num_images)
        self._vae_dtype(vae_dtype)
        decoder = self._pick_decoder(decoder, "generate_image")
        shape = self._output_shape(decoder, size=size, width=width, height=height, ratio=ratio,
                                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                   target_size=target_size)
        self.require("language_model", "generate_image")
        if any(_is_image(p) for p in parts):
            self.require("visual_tokenizer", "generate_image")
        return self._draw_and_decode(
            lambda i: self.generate_image_ids(parts, llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
                                              temperature=temperature, min_new_tokens=min_new_tokens,
                                              max_new_tokens=max_new_tokens, do_sample=do_sample,
                                              num_beams=num_beams, length_penalty=length_penalty,
                                              negative_prompt=negative_prompt, seed=seed + i, keep=keep,
                                              cap_to_prompt=cap_to_prompt, add_special=add_special),
            num_images, True, return_ids, progress, decoder=decoder, steps=steps, guidance=guidance, seed=seed,
            safety_checker=safety_checker, vae_dtype=vae_dtype, **shape)

    def reconstruct(self, images, *, decoder: str | None = None, steps: int = defaults.RECONSTRUCT.steps,
                    guidance: float = defaults.RECONSTRUCT.guidance, seed: int = 0,
                    size: int | tuple[int, int] | None = None, width: int | None = None, height: int | None = None,
                    ratio: str | None = None, original_size: tuple[int, int] | None = None,
                    crops_coords_top_left: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None,
                    safety_checker: bool | None = None, vae_dtype: str = defaults.RECONSTRUCT.vae_dtype,
                    keep: str = defaults.KEEP, return_ids: bool = False, progress: bool = False):
        """Image(s) -> visual tokens -> PIL image(s) (tokenize then detokenize; no LLM). ``keep``/``seed``
        choose the token selector's decisions as for ``caption`` (``seed`` also seeds the diffusion noise)."""
        imgs, single = _as_list(images)
        self._vae_dtype(vae_dtype)
        decoder = self._pick_decoder(decoder, "reconstruct")
        shape = self._output_shape(decoder, size=size, width=width, height=height, ratio=ratio,
                                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                   target_size=target_size)
        stages = _Stages(["tokenize", "diffusion"], progress)
        ids, lengths = self.visual_tokenizer.tokenize(imgs, add_special=False, mode=keep, seed=seed)
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        stages.done(0)
        return self._decode_stage(ids, lengths, stages, single, return_ids, decoder=decoder, steps=steps,
                                  guidance=guidance, seed=seed, progress=progress,
                                  safety_checker=safety_checker, vae_dtype=vae_dtype, **shape)
