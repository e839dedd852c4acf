"""LaVIT end to end: a converted checkpoint behind one object with the task methods.

    model = LaVIT.from_pretrained("converted/")          # written by tools/convert_torch_weights.py
    model.caption("cat.jpg")                             # -> "a cat sitting on a sofa"
    model.vqa("cat.jpg", "what animal is this?")         # -> "cat"
    model.text2image("a duck made of wool", seed=0)      # -> PIL image (SDXL decoder, 1024 px)
    model.edit("cat.jpg", "in the snow")                 # image + text prompt -> PIL image
    model.reconstruct("cat.jpg")                         # image -> visual tokens -> PIL image

Parts are loaded on first use (the LLM is not read for ``reconstruct``, the diffusion UNets not for
``caption``); a task whose part the checkpoint lacks raises ``CheckpointPartError`` naming it.

Pipelines (DESIGN.md): understanding = tokenizer features (merger + projector from ``visual_weight.bin``)
between [IMG] and [/IMG] -> LLM beam search; generation = text (or image ids + text) + [IMG] -> LLM
sampling with LLM classifier-free guidance -> visual ids -> token decoder -> guided DDIM -> VAE.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint

DECODER_FOLDERS = {"lowres": "pixel_decoding", "highres": "highres_pixel_decoding"}
DECODER_SIZES = {"lowres": 512, "highres": 1024}


class CheckpointPartError(FileNotFoundError):
    """The converted checkpoint lacks a part a task needs."""


def _as_list(x):
    """(list of inputs, whether a single input was given)."""
    if isinstance(x, list | tuple):
        return list(x), False
    return [x], True


def _check_text(texts, what="prompt"):
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"empty {what}: {t!r}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class _Stages:
    """A tqdm bar over the stages of a task (``progress=True``), else a no-op."""

    def __init__(self, names, enabled):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

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
    attention_impl: see ``lavit_jax.attention`` ('xla' is the reference path).
    """

    def __init__(self, ckpt_dir: str, manifest: dict, *, dtype=None, attention_impl: str = "xla"):
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        self.manifest = manifest
        self.dtype = jnp.dtype(dtype or manifest.get("dtype", "float32"))
        self.attention_impl = attention_impl
        self._cache: dict = {}

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *, dtype=None, attention_impl: str = "xla") -> LaVIT:
        """Opens a directory written by ``tools/convert_torch_weights.py`` (parts load on first use)."""
        ckpt_dir = os.fspath(ckpt_dir)
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
        return cls(ckpt_dir, checkpoint.read_manifest(ckpt_dir), dtype=dtype, attention_impl=attention_impl)

    # ------------------------------------------------------------------------------------------ parts

    @property
    def parts(self) -> list[str]:
        return list(self.manifest.get("parts", {}))

    def require(self, part: str, task: str) -> dict:
        entry = self.manifest.get("parts", {}).get(part)
        if entry is None:
            raise CheckpointPartError(
                f"checkpoint {self.ckpt_dir} has no {part}/ part, needed for {task} "
                f"(converted parts: {', '.join(self.parts) or 'none'})")
        return entry

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def visual_tokenizer(self):
        """The dynamic visual tokenizer (generation path: ids) with the token decoders present."""
        from lavit_jax.models import tokenizer as T

        self.require("visual_tokenizer", "the visual tokenizer")
        return self._cached("vt", lambda: T.load_converted(self.ckpt_dir))

    @property
    def understanding_tokenizer(self):
        """The tokenizer with ``visual_weight.bin``'s merger + projector laid over (understanding path)."""
        from lavit_jax.models import tokenizer as T

        def build():
            vt = self.visual_tokenizer
            lm = self.require("language_model", "image understanding")
            if not lm.get("visual_weight"):
                return vt
            over = checkpoint.load_tree(os.path.join(self.ckpt_dir, "language_model", "visual_weight"))
            return T.VisualTokenizer(vt.config, _merge(vt.params, over))

        return self._cached("vt_und", build)

    @property
    def language_model(self):
        """(LlamaForCausalLM, params, TextTokenizer)."""
        from lavit_jax.data.text_tokenizer import load_text_tokenizer
        from lavit_jax.models import llama

        def build():
            entry = self.require("language_model", "the language model")
            root = os.path.join(self.ckpt_dir, "language_model")
            cfg = llama.llama_config_from_hf(entry["config"])
            cfg.dtype = cfg.param_dtype = self.dtype.name
            cfg.attention_impl = self.attention_impl
            params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype),
                                  checkpoint.load_tree(os.path.join(root, "params")))
            return llama.LlamaForCausalLM(cfg), params, load_text_tokenizer(root)

        return self._cached("llm", build)

    def available_decoders(self) -> list[str]:
        vt = self.manifest.get("parts", {}).get("visual_tokenizer", {})
        return [d for d, folder in DECODER_FOLDERS.items()
                if folder in self.manifest.get("parts", {}) and f"{d}_decoder" in vt.get("files", [])]

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
        from lavit_jax.inference import sampling as diffusion
        from lavit_jax.inference import schedulers
        from lavit_jax.inference.detokenizer import Detokenizer
        from lavit_jax.models.unet import UNet2DConditionModel, load_unet_config
        from lavit_jax.models.vae import AutoencoderKL, load_vae_config

        decoder = self._pick_decoder(decoder, "image decoding")

        def build():
            root = os.path.join(self.ckpt_dir, DECODER_FOLDERS[decoder])
            vt = self.visual_tokenizer
            unet_cfg = load_unet_config(os.path.join(root, "unet_config.json"))
            vae_cfg = load_vae_config(os.path.join(root, "vae_config.json"))
            with open(os.path.join(root, "scheduler_config.json")) as f:
                sched = schedulers.scheduler_config(json.load(f), kind="ddim")
            unet = UNet2DConditionModel(unet_cfg, dtype=self.dtype, param_dtype=self.dtype,
                                        attention_impl=self.attention_impl)
            unet_params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype),
                                       checkpoint.load_tree(os.path.join(root, "unet")))
            vae_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                                      checkpoint.load_tree(os.path.join(root, "vae")))
            pipe = diffusion.DiffusionPipeline(unet_params=unet_params, vae_params=vae_params, unet=unet,
                                               vae=AutoencoderKL(vae_cfg), scheduler_config=sched)
            uncond = np.load(os.path.join(root, "uncond_embeddings.npy")) if decoder == "lowres" else None
            return Detokenizer(vt.config, vt.params["quantize"]["embedding"], vt.decoder_params[decoder], pipe,
                               decoder, uncond, default_size=DECODER_SIZES[decoder])

        return self._cached(("detok", decoder), build)

    # ------------------------------------------------------------------------------------------ understanding

    def _features(self, images):
        return self.understanding_tokenizer.understanding_features(images)

    def caption(self, images, *, num_beams: int = 2, max_new_tokens: int = 36, min_new_tokens: int = 8,
                prompt: str | None = None, progress: bool = False):
        """Image(s) (path / PIL / array, or a list) -> caption str (or list of str)."""
        from lavit_jax.inference import llm_tasks

        imgs, single = _as_list(images)
        self.require("visual_tokenizer", "caption")
        self.require("language_model", "caption")
        stages = _Stages(["tokenize", "language model"], progress)
        model, params, tok = self.language_model
        feats, lengths = self._features(imgs)
        stages.done(0)
        out = llm_tasks.caption(model, params, tok, feats, lengths, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, prompt=prompt)
        stages.done(1)
        return out[0] if single else out

    def vqa(self, images, questions, *, num_beams: int = 5, max_new_tokens: int = 10, min_new_tokens: int = 2,
            apply_lemmatizer: bool = True, progress: bool = False):
        """Image(s) + question(s) -> answer str (or list). One question per image."""
        from lavit_jax.inference import llm_tasks

        imgs, single = _as_list(images)
        qs, _ = _as_list(questions)
        _check_text(qs, "question")
        if len(qs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(qs)} questions")
        self.require("visual_tokenizer", "vqa")
        self.require("language_model", "vqa")
        stages = _Stages(["tokenize", "language model"], progress)
        model, params, tok = self.language_model
        feats, lengths = self._features(imgs)
        stages.done(0)
        res = llm_tasks.vqa(model, params, tok, feats, lengths, qs, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            apply_lemmatizer=apply_lemmatizer)
        stages.done(1)
        return res.answers[0] if single else res.answers

    # ------------------------------------------------------------------------------------------ generation

    @staticmethod
    def _generation_config(llm_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens):
        from lavit_jax.inference import llm_tasks

        return llm_tasks.image_generation_config(
            guidance_scale=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens)

    @staticmethod
    def _visual_ids(out, what):
        from lavit_jax.inference import llm_tasks

        codes, lengths = llm_tasks.image_codes_from_ids(out.tokens)
        lengths = np.asarray(lengths)
        if np.any(lengths == 0):
            raise ValueError(f"the language model generated no visual tokens for {what}; try another seed")
        valid = np.arange(codes.shape[1])[None] < lengths[:, None]
        ids = np.where(valid, np.asarray(codes) + llm_tasks.VISUAL_OFFSET, 0)
        return ids.astype(np.int32), lengths.astype(np.int32)

    def text2image_ids(self, prompts, *, llm_guidance: float = 4.0, top_k: int = 50, top_p: float = 1.0,
                       temperature: float = 1.0, min_new_tokens: int = 20, max_new_tokens: int = 200, seed: int = 0):
        """Prompt(s) -> visual ids [B, N] in LLM space (code + 32002, padded with 0) and lengths [B]."""
        from lavit_jax.inference import llm_tasks

        texts, _ = _as_list(prompts)
        _check_text(texts)
        model, params, tok = self.language_model
        cfg = self._generation_config(llm_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
        out = llm_tasks.text_to_image_ids(model, params, tok, texts, jax.random.key(seed), config=cfg)
        return self._visual_ids(out, "the prompt")

    def edit_ids(self, images, prompts, *, llm_guidance: float = 5.0, top_k: int = 50, top_p: float = 1.0,
                 temperature: float = 1.0, min_new_tokens: int = 20, max_new_tokens: int = 200, seed: int = 0):
        """Image(s) + prompt(s) (multimodal prompt: image tokens then text then [IMG]) -> visual ids, lengths."""
        from lavit_jax.inference import llm_tasks

        imgs, _ = _as_list(images)
        texts, _ = _as_list(prompts)
        _check_text(texts)
        if len(texts) == 1 and len(imgs) > 1:
            texts = texts * len(imgs)
        if len(texts) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(texts)} prompts")
        image_ids, image_lengths = self.visual_tokenizer.tokenize(imgs, add_special=False)
        model, params, tok = self.language_model
        cfg = self._generation_config(llm_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
        out = llm_tasks.multimodal_to_image_ids(model, params, tok, image_ids, image_lengths, texts,
                                                jax.random.key(seed), config=cfg)
        return self._visual_ids(out, "the multimodal prompt")

    def decode_ids(self, ids, lengths, *, decoder: str | None = None, steps: int = 25, guidance: float = 7.0,
                   seed: int = 0, size: int | None = None, noise=None, progress: bool = False) -> list:
        """Visual ids [B, N] (LLM space) + lengths [B] -> list of B PIL images."""
        from lavit_jax.inference.sampling import to_pil

        detok = self.detokenizer(decoder)
        images, _ = detok.generate(ids, lengths, steps=steps, guidance=guidance, seed=seed, size=size, noise=noise,
                                   progress=progress)
        return to_pil(images)

    def _decode_stage(self, ids, lengths, stages, single, return_ids, **decode_kw):
        """The last stage of the image tasks: ids -> PIL image(s), optionally with (ids, lengths)."""
        images = self.decode_ids(ids, lengths, **decode_kw)
        stages.done(1)
        images = images[0] if single else images
        return (images, (ids, lengths)) if return_ids else images

    def text2image(self, prompts, *, decoder: str | None = None, steps: int = 25, guidance: float = 7.0,
                   llm_guidance: float = 4.0, seed: int = 0, size: int | None = None, top_k: int = 50,
                   top_p: float = 1.0, temperature: float = 1.0, min_new_tokens: int = 20, max_new_tokens: int = 200,
                   return_ids: bool = False, progress: bool = False):
        """Prompt(s) -> PIL image (or list). ``decoder`` 'highres' (SDXL, default when converted) or 'lowres'.
        With ``return_ids`` also returns (ids, lengths) of the generated visual tokens."""
        prompts_, single = _as_list(prompts)
        _check_text(prompts_)
        decoder = self._pick_decoder(decoder, "text2image")
        self.require("language_model", "text2image")
        stages = _Stages(["language model", "diffusion"], progress)
        ids, lengths = self.text2image_ids(prompts_, llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
                                           temperature=temperature, min_new_tokens=min_new_tokens,
                                           max_new_tokens=max_new_tokens, seed=seed)
        stages.done(0)
        return self._decode_stage(ids, lengths, stages, single, return_ids, decoder=decoder, steps=steps,
                                  guidance=guidance, seed=seed, size=size, progress=progress)

    def edit(self, images, prompts, *, decoder: str | None = None, steps: int = 25, guidance: float = 7.0,
             llm_guidance: float = 5.0, seed: int = 0, size: int | None = None, top_k: int = 50, top_p: float = 1.0,
             temperature: float = 1.0, min_new_tokens: int = 20, max_new_tokens: int = 200, return_ids: bool = False,
             progress: bool = False):
        """Image(s) + prompt -> PIL image (or list): generation from the multimodal prompt."""
        imgs, single = _as_list(images)
        texts, _ = _as_list(prompts)
        _check_text(texts)
        decoder = self._pick_decoder(decoder, "edit")
        self.require("language_model", "edit")
        stages = _Stages(["language model", "diffusion"], progress)
        ids, lengths = self.edit_ids(imgs, texts, llm_guidance=llm_guidance, top_k=top_k, top_p=top_p,
                                     temperature=temperature, min_new_tokens=min_new_tokens,
                                     max_new_tokens=max_new_tokens, seed=seed)
        stages.done(0)
        return self._decode_stage(ids, lengths, stages, single, return_ids, decoder=decoder, steps=steps,
                                  guidance=guidance, seed=seed, size=size, progress=progress)

    def reconstruct(self, images, *, decoder: str | None = None, steps: int = 50, guidance: float = 5.0,
                    seed: int = 0, size: int | None = None, return_ids: bool = False, progress: bool = False):
        """Image(s) -> visual tokens -> PIL image(s) (tokenize then detokenize; no LLM)."""
        imgs, single = _as_list(images)
        decoder = self._pick_decoder(decoder, "reconstruct")
        stages = _Stages(["tokenize", "diffusion"], progress)
        ids, lengths = self.visual_tokenizer.tokenize(imgs, add_special=False)
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        stages.done(0)
        return self._decode_stage(ids, lengths, stages, single, return_ids, decoder=decoder, steps=steps,
                                  guidance=guidance, seed=seed, size=size, progress=progress)
