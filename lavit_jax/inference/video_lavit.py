"""Video-LaVIT end to end: a converted Video-LaVIT checkpoint behind one object with the task methods.

    model = VideoLaVIT.from_pretrained("converted_video/")     # written by tools/convert_torch_weights.py
    model.answer("clip.mp4", "What is the man doing?")        # -> str (the SFT model's chat)
    model.describe("clip.mp4")                                # -> str
    model.text2video("a white swan moving on the lake")       # -> frames uint8 [24, 320, 576, 3]
    model.image2video("swan.jpg")                             # -> frames uint8 [24, 320, 576, 3]
    model.reconstruct_video("clip.mp4")                       # video -> keyframe + motion tokens -> frames

``VideoLaVIT`` is a ``LaVIT`` (the image tasks run on its visual tokenizer, pretrained LLM and keyframe
decoder: text -> image ids never sample motion ids here). Parts load on first use.

Pipelines (``video_llm_tasks`` has the sequences):
- understanding: the video re-encoded to MPEG-4 Part 2 at 6 fps (``data.video_io``), up to 16 clips of
  24 frames; each clip's keyframe -> the understanding tokenizer's continuous features (merger + projector
  of ``language_model_sft/``), its motion -> the motion tokenizer's 135 ids; the Vicuna-v1 chat -> the SFT
  LLM, greedy;
- text -> video: the pretrained LLM samples keyframe ids after the prompt, then motion ids after those;
  the keyframe ids -> the SDXL-style keyframe decoder (``image_detokenizer/``) -> the keyframe, resized
  (PIL bicubic) to the video size; keyframe + motion codes -> the video detokenizer (SVD-style 3D UNet,
  Euler, per-frame guidance 1 -> 4) -> 24 frames. Long videos chain clips: the next clip's prompt is
  everything generated so far, its keyframe is decoded from the previous clip's last frame, noised;
- image -> video: [IMG] image ids [/IMG] + text -> motion ids (sampled); the image itself is the keyframe;
- reconstruction: each clip's keyframe and motion tokens -> the video detokenizer (no LLM).
Outputs are uint8 frames [F, H, W, 3] (``data.video_io.write_video`` writes them as MP4 or GIF).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lavit_jax import checkpoint, hub, vocab
from lavit_jax.checkpoint import CheckpointPartError
from lavit_jax.compile_cache import cached_jit
from lavit_jax.data import video_io
from lavit_jax.data.image_io import load_image
from lavit_jax.inference import sampling, video_sampling
from lavit_jax.inference import video_llm_tasks as vlt
from lavit_jax.inference.lavit import LaVIT, _as_list, _check_text, _Stages, token_ids_part
from lavit_jax.inference.visual_tokenizer import model_keep_mode
from lavit_jax.inference.visual_tokenizer import understanding_features as _understanding_features

__all__ = ["VideoLaVIT", "CheckpointPartError"]

U, G = vlt.UNDERSTANDING, vlt.GENERATION


@cached_jit(static_argnames=("model",))
def tokenize_motion(model, params, motion):
    """Motion-tokenizer input [N, T, h, w, 2] -> codes [N, 135] int32."""
    return model.apply({"params": params}, motion, method="tokenize")


def _to_unit_range(image: Image.Image) -> np.ndarray:
    """PIL RGB -> [H, W, 3] float32 in [-1, 1] (torchvision ``to_tensor`` then 2x - 1, as the release)."""
    return np.asarray(image.convert("RGB"), np.float32) / 255.0 * 2.0 - 1.0


def _check_size(size, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if (not isinstance(size, tuple | list) or len(size) != 2
            or not all(isinstance(v, int | np.integer) and v > 0 for v in size)):
        raise ValueError(f"{name}={size!r}: expected (height, width), two positive integers")
    return int(size[0]), int(size[1])


class VideoLaVIT(LaVIT):
    """A converted Video-LaVIT checkpoint with the video task methods. Use ``VideoLaVIT.from_pretrained(dir)``.

    Options as ``LaVIT`` (``dtype``, ``attention_impl``, ``low_memory``, ``verbose``, ``llm_weights``).
    """

    image_suppress_ranges = vlt.KEYFRAME_SUPPRESS

    @classmethod
    def from_pretrained(cls, ckpt_dir, *, config=None, **kw) -> VideoLaVIT:
        """As ``LaVIT.from_pretrained``: a converted directory, or a hub repo id (``"rain1011/Video-LaVIT-v1"``)
        converted once with ``config`` (default ``configs/video_lavit.py``)."""
        if config is None and hub.is_repo_id(os.fspath(ckpt_dir)):
            config = hub.VIDEO_RELEASE_CONFIG
        return super().from_pretrained(ckpt_dir, config=config, **kw)

    def __init__(self, ckpt_dir: str, manifest: dict, **kw):
        if manifest.get("model", "lavit") != "video_lavit":
            raise CheckpointPartError(f"{ckpt_dir} is a {manifest.get('model', 'lavit')} checkpoint, not Video-LaVIT: "
                                      "open it with LaVIT.from_pretrained")
        super().__init__(ckpt_dir, manifest, **kw)

    # ------------------------------------------------------------------------------------------ parts

    @property
    def sft_language_model(self):
        """(LlamaForCausalLM, params, TextTokenizer) of ``language_model_sft/`` (video understanding)."""
        self.require("language_model_sft", "video understanding")
        return self._cached("llm_sft", lambda: checkpoint.load_language_model(
            self.ckpt_dir, part="language_model_sft", dtype=self.dtype, attention_impl=self.attention_impl,
            weights=self.llm_weights))

    @property
    def sft_visual_tokenizer(self):
        """The visual tokenizer with the SFT model's understanding weights (merger + projector)."""
        self.require("visual_tokenizer", "video understanding")
        self.require("language_model_sft", "video understanding")
        return self._cached("vt_sft", lambda: checkpoint.load_visual_tokenizer(
            self.ckpt_dir, understanding=True, decoders=False, understanding_part="language_model_sft"))

    @property
    def video_detokenizer(self) -> video_sampling.VideoDetokenizer:
        self.require("video_detokenizer", "video decoding")
        self.require("motion_tokenizer", "video decoding")
        return self._cached("video_detok", lambda: checkpoint.load_video_detokenizer(
            self.ckpt_dir, unet_dtype=self.dtype, attention_impl=self.attention_impl))

    @property
    def understanding_motion_tokenizer(self):
        """(MotionTokenizer, params): the SFT model's own when it has one, else ``motion_tokenizer/``."""
        self.require("motion_tokenizer", "motion tokenization")
        self.require("language_model_sft", "video understanding")
        return self._cached("motion_tok_sft", lambda: checkpoint.load_motion_tokenizer(self.ckpt_dir, sft=True))

    def video_sampling(self, **overrides) -> video_sampling.VideoSampling:
        """The video detokenizer's sampling settings (the release's, stored at conversion) with ``overrides``."""
        return checkpoint.video_sampling_settings(self.ckpt_dir, **overrides)

    # ------------------------------------------------------------------------------------------ inputs

    @staticmethod
    def load_clips(video, *, max_clips: int = U.max_clips, fps: int = video_io.FPS) -> video_io.VideoClips:
        """A video file -> its clips (motion-tokenizer input, keyframes), as the release's video processor."""
        if isinstance(video, video_io.VideoClips):
            return video
        if not isinstance(max_clips, int) or max_clips < 1:
            raise ValueError(f"max_clips={max_clips!r} must be an integer >= 1")
        return video_io.load_video_clips(video, fps=fps, max_clips=max_clips)

    def motion_codes(self, motion) -> np.ndarray:
        """Motion-tokenizer input [N, T, h, w, 2] -> codes [N, 135] (the understanding motion tokenizer)."""
        model, params = self.understanding_motion_tokenizer
        return np.asarray(tokenize_motion(model, params, jnp.asarray(motion, jnp.float32)))

    # ------------------------------------------------------------------------------------------ understanding

    def answer(self, videos, questions, *, max_new_tokens: int = U.max_new_tokens,
               min_new_tokens: int = U.min_new_tokens, do_sample: bool = U.do_sample, top_p: float = U.top_p,
               temperature: float = U.temperature, max_clips: int = U.max_clips, keep: str = "sample",
               seed: int = 0, progress: bool = False):
        """Video(s) + question(s) -> answer str (or a list): the SFT model's chat, greedy by default.

        ``keep``: the keyframes' token selector decisions ('sample': the release's hard Gumbel sample from
        ``seed``; 'argmax'). ``do_sample`` samples the answer (nucleus, ``top_p``) from ``seed``.
        """
        vids, single = _as_list(videos)
        qs, _ = _as_list(questions)
        _check_text(qs, "question")
        if len(qs) != len(vids):
            raise ValueError(f"{len(vids)} videos but {len(qs)} questions")
        model_keep_mode(keep)
        sampling = self._understanding_sampling(do_sample, temperature, top_p, None, None, None, seed)
        self.require("visual_tokenizer", "video understanding")
        model, params, tok = self.sft_language_model
        cfg = vlt.video_chat_config(tok, model.config.vocab_size, max_new_tokens=max_new_tokens,
                                    min_new_tokens=min_new_tokens, do_sample=do_sample, top_p=top_p,
                                    temperature=temperature)
        cfg.validate()
        stages = _Stages(["motion vectors", "tokenize", "language model"], progress)
        clips = [self.load_clips(v, max_clips=max_clips) for v in vids]
        stages.done(0)
        n = max(len(c.start_indices) for c in clips)
        vt = self.sft_visual_tokenizer
        pixels = np.concatenate([c.pixel_values for c in clips])
        feats, lengths = _understanding_features(vt.model, vt.params, jnp.asarray(pixels), jax.random.key(seed),
                                                 model_keep_mode(keep))
        codes = self.motion_codes(np.concatenate([c.motion for c in clips]))
        feats, lengths = np.asarray(feats), np.asarray(lengths)
        b = len(clips)
        all_feats = np.zeros((b, n) + feats.shape[1:], feats.dtype)
        all_lengths = np.zeros((b, n), np.int32)
        all_codes = np.zeros((b, n, codes.shape[1]), np.int32)
        clip_mask = np.zeros((b, n), np.int32)
        at = 0
        for i, c in enumerate(clips):
            k = len(c.start_indices)
            all_feats[i, :k], all_lengths[i, :k], all_codes[i, :k] = feats[at:at + k], lengths[at:at + k], \
                codes[at:at + k]
            clip_mask[i, :k] = 1
            at += k
        stages.done(1)
        answers, _ = vlt.answer_video(model, params, tok, qs, all_feats, all_lengths, clip_mask, all_codes,
                                      config=cfg, rng=sampling["rng"])
        stages.done(2)
        return answers[0] if single else answers

    def describe(self, videos, *, prompt: str = U.describe_prompt, **kw):
        """Video(s) -> a description: ``answer`` with ``prompt`` (ours: the release has no captioning prompt)."""
        vids, single = _as_list(videos)
        out = self.answer(vids, [prompt] * len(vids), **kw)
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------ generation

    def _video_settings(self, steps, min_guidance, max_guidance, video_size):
        overrides = dict(steps=steps, min_guidance=min_guidance, max_guidance=max_guidance)
        settings = self.video_sampling(**overrides)
        height, width = _check_size(video_size, "video_size")
        return settings, height, width

    def _decode_clip(self, keyframe: Image.Image, codes, settings, height, width, seed, progress):
        """Keyframe (PIL) + motion codes [135] -> frames uint8 [F, H, W, 3]."""
        det = self.video_detokenizer
        det.latent_size(height, width)  # checks the size before any work
        if keyframe.size != (width, height):
            keyframe = keyframe.resize((width, height), Image.BICUBIC)
        out = video_sampling.reconstruct_from_token(det, _to_unit_range(keyframe)[None], np.asarray(codes)[None],
                                                    settings, height=height, width=width, seed=seed,
                                                    progress=progress)
        return np.asarray(out["frames_uint8"][0])

    def _motion_config(self, do_sample, motion_guidance, top_k, top_p, temperature, min_new_tokens, max_new_tokens):
        cfg = vlt.motion_generation_config(guidance_scale=motion_guidance, do_sample=do_sample, top_k=top_k,
                                           top_p=top_p, temperature=temperature, min_new_tokens=min_new_tokens,
                                           max_new_tokens=max_new_tokens)
        cfg.validate()
        return cfg

    @staticmethod
    def _warn_motion_count(counts):
        for c in counts:
            if c != vlt.MOTION_TOKENS:
                print(f"warning: the language model generated {c} motion ids, not {vlt.MOTION_TOKENS}: "
                      f"{'cut' if c > vlt.MOTION_TOKENS else 'padded with code 0'} to {vlt.MOTION_TOKENS} "
                      "(as the release)", file=sys.stderr)

    def _keyframe(self, kcodes, size, steps, guidance, seed, last_frame=None, inverse_rate=G.inverse_rate):
        """Keyframe codes -> PIL keyframe from the keyframe decoder (``image_decoding``); for a later clip of a
        long video it starts from ``last_frame`` (the previous clip's last, uint8) noised to step
        int(inverse_rate * steps), as the release's ``regenerate_noise``."""
        detok = self.detokenizer("highres")
        ids = (np.asarray(kcodes) + vocab.VISUAL_OFFSET).astype(np.int32)[None]
        lengths = np.array([ids.shape[1]], np.int32)
        kw = {}
        if last_frame is not None:
            level = int(inverse_rate * steps)
            frame = Image.fromarray(np.asarray(last_frame)).resize((size[1], size[0]), Image.BICUBIC)
            kw = dict(latents=sampling.noised_latents(detok.pipeline, _to_unit_range(frame)[None], steps, level,
                                                      seed=seed), start_step=level)
        images, _ = detok.generate(ids, lengths, steps=steps, guidance=guidance, seed=seed, size=tuple(size),
                                   vae_dtype=self._vae_dtype(G.keyframe_vae_dtype), **kw)
        return sampling.to_pil(images)[0]

    def text2video(self, prompt: str, *, num_clips: int = 1, keyframe_size=G.keyframe_size,
                   video_size=G.video_size, llm_guidance: float = G.llm_guidance,
                   motion_guidance: float = G.motion_guidance, top_k: int = G.top_k, top_p: float = G.top_p,
                   temperature: float = G.temperature, min_new_tokens: int = G.min_new_tokens,
                   max_new_tokens: int | None = None, keyframe_steps: int = G.keyframe_steps,
                   keyframe_guidance: float = G.keyframe_guidance, inverse_rate: float = G.inverse_rate,
                   steps: int | None = None, min_guidance: float | None = None, max_guidance: float | None = None,
                   do_sample: bool = True, seed: int = 0, return_ids: bool = False, progress: bool = False):
        """A text prompt -> video frames uint8 [24 + 23 (num_clips - 1), H, W, 3] (``video_size`` = (height,
        width)); with ``return_ids`` also a list of per-clip dicts (keyframe codes, motion codes, keyframe PIL).

        As the release's ``generate_video``: keyframe ids sampled (top-k ``top_k``, LLM guidance
        ``llm_guidance``; greedy with ``do_sample=False``, its ``use_nucleus_sampling=False``), motion ids
        greedy with guidance ``motion_guidance``; the keyframe decoded at
        ``keyframe_size`` (``keyframe_steps``, ``keyframe_guidance``), the video by the video detokenizer
        (``steps``, per-frame guidance ``min_guidance`` -> ``max_guidance``: the release's when None).
        ``max_new_tokens`` (None: the visual tokens an image has) bounds the keyframe ids; motion ids are
        bounded by the release's 500. Long videos (``num_clips`` > 1): each clip's prompt is everything
        generated before it; its keyframe is decoded from the previous clip's last frame noised to step
        int(``inverse_rate`` x ``keyframe_steps``); joined, each later clip's first frame is dropped.
        """
        _check_text([prompt], allow_empty=True)
        if not isinstance(num_clips, int) or num_clips < 1:
            raise ValueError(f"num_clips={num_clips!r} must be an integer >= 1")
        if not 0.0 <= inverse_rate < 1.0:
            raise ValueError(f"inverse_rate={inverse_rate} must be in [0, 1)")
        settings, height, width = self._video_settings(steps, min_guidance, max_guidance, video_size)
        ksize = _check_size(keyframe_size, "keyframe_size")
        capacity = self._image_token_capacity()
        kcfg = self._generation_config(
            llm_guidance=llm_guidance, top_k=top_k, top_p=top_p, temperature=temperature,
            min_new_tokens=min_new_tokens, max_new_tokens=capacity if max_new_tokens is None else max_new_tokens,
            do_sample=do_sample, num_beams=1, length_penalty=1.0, negative_prompt=None)
        mcfg = self._motion_config(False, motion_guidance, top_k, top_p, temperature, min_new_tokens,
                                   G.max_new_tokens)
        self.require("video_detokenizer", "text2video")
        self._pick_decoder("highres", "the keyframe of text2video")
        model, params, tok = self.language_model
        rows = [np.asarray(tok.encode(prompt), np.int64)]
        frames, info, last = [], [], None
        for clip in range(num_clips):
            stages = _Stages(["keyframe ids", "motion ids", "keyframe", "video"], progress)
            kcodes, rows = vlt.keyframe_ids(model, params, rows, jax.random.fold_in(jax.random.key(seed), clip), kcfg)
            if len(kcodes[0]) == 0:
                raise ValueError("the language model generated no keyframe tokens; try another seed")
            stages.done(0)
            mcodes, counts, rows = vlt.motion_ids(model, params, rows, None, mcfg)
            self._warn_motion_count(counts)
            stages.done(1)
            keyframe = self._keyframe(kcodes[0], ksize, keyframe_steps, keyframe_guidance, seed + clip, last,
                                      inverse_rate)
            stages.done(2)
            video = self._decode_clip(keyframe, mcodes[0], settings, height, width, seed + clip, progress)
            stages.done(3)
            last = video[-1]
            frames.append(video if clip == 0 else video[1:])
            info.append(dict(keyframe_codes=kcodes[0], motion_codes=mcodes[0], keyframe=keyframe))
        out = np.concatenate(frames)
        return (out, info) if return_ids else out

    def image2video(self, image, prompt: str = "", *, video_size=G.video_size,
                    motion_guidance: float = G.motion_guidance, do_sample: bool = True, top_k: int = G.top_k,
                    top_p: float = G.top_p, temperature: float = G.temperature,
                    min_new_tokens: int = G.min_new_tokens, max_new_tokens: int = G.max_new_tokens,
                    steps: int | None = None, min_guidance: float | None = None, max_guidance: float | None = None,
                    keep: str = "sample", seed: int = 0, return_ids: bool = False, progress: bool = False):
        """An image (+ an optional text) -> video frames uint8 [24, H, W, 3]: the release's
        ``multimodal_video_generate`` on [image] (+ [text]): motion ids sampled (``do_sample``) after
        [IMG] image ids [/IMG] + text + [MOV]; the image, resized to ``video_size``, is the keyframe."""
        _check_text([prompt], allow_empty=True)
        if token_ids_part(image) is not None or isinstance(image, str) and not image.strip():
            raise ValueError("image2video takes an image (a path, PIL image or array) as its first argument")
        settings, height, width = self._video_settings(steps, min_guidance, max_guidance, video_size)
        mcfg = self._motion_config(do_sample, motion_guidance, top_k, top_p, temperature, min_new_tokens,
                                   max_new_tokens)
        model_keep_mode(keep)
        self.require("video_detokenizer", "image2video")
        pil = load_image(image)
        stages = _Stages(["tokenize", "motion ids", "video"], progress)
        ids, lengths = self.visual_tokenizer.tokenize([pil], add_special=True, mode=keep, seed=seed)
        row = np.asarray(ids)[0, : int(np.asarray(lengths)[0])].astype(np.int64)
        model, params, tok = self.language_model
        if prompt:
            row = np.concatenate([row, np.asarray(tok.encode(prompt), np.int64)])
        stages.done(0)
        key = jax.random.key(seed) if do_sample else None
        mcodes, counts, _ = vlt.motion_ids(model, params, [row], key, mcfg)
        self._warn_motion_count(counts)
        stages.done(1)
        video = self._decode_clip(pil, mcodes[0], settings, height, width, seed, progress)
        stages.done(2)
        return (video, dict(prompt_ids=row, motion_codes=mcodes[0])) if return_ids else video

    def reconstruct_video(self, video, *, video_size=G.video_size, steps: int | None = None,
                          min_guidance: float | None = None, max_guidance: float | None = None,
                          max_clips: int = U.max_clips, seed: int = 0, return_ids: bool = False,
                          progress: bool = False):
        """A video -> each clip's keyframe and motion tokens -> the video detokenizer -> frames uint8
        [N * 24, H, W, 3] (the clips one after another; no LLM). The keyframe is the clip's first frame
        resized (PIL bicubic) to ``video_size``; the motion is tokenized by the generation motion tokenizer
        and decoded from its codes (the release's ``reconstruct_from_token(decode_from_token=True)``)."""
        settings, height, width = self._video_settings(steps, min_guidance, max_guidance, video_size)
        det = self.video_detokenizer
        det.latent_size(height, width)
        stages = _Stages(["motion vectors", "tokenize", "video"], progress)
        clips = self.load_clips(video, max_clips=max_clips)
        stages.done(0)
        codes = np.asarray(tokenize_motion(det.motion_tokenizer, det.motion_tokenizer_params,
                                           jnp.asarray(clips.motion, jnp.float32)))
        stages.done(1)
        frames = [self._decode_clip(Image.fromarray(k), c, settings, height, width, seed + i, progress)
                  for i, (k, c) in enumerate(zip(clips.keyframes_rgb, codes, strict=True))]
        stages.done(2)
        out = np.concatenate(frames)
        return (out, dict(motion_codes=codes, start_indices=clips.start_indices)) if return_ids else out
