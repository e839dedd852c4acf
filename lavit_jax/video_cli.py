"""The Video-LaVIT commands of ``python -m lavit_jax`` (on a checkpoint converted from the Video-LaVIT release).

Usage, after ``python -m lavit_jax`` (README.md's Video-LaVIT section runs each of them on a tiny checkpoint):

    video-qa VIDEO QUESTION --checkpoint DIR [--max-clips N] [--max-new-tokens N] [--min-new-tokens N]
             [--sample] [--top-p P] [--temperature T] [--keep argmax|sample] [--seed S]
    video-caption VIDEO --checkpoint DIR [same options] [--prompt TEXT]
    text2video PROMPT --out OUT.mp4 --checkpoint DIR [--width W] [--height H] [--keyframe-width W]
             [--keyframe-height H] [--steps N] [--keyframe-steps N] [--keyframe-guidance G] [--llm-guidance G]
             [--motion-guidance G] [--top-k K] [--top-p P] [--greedy] [--num-clips N] [--inverse-rate R]
             [--seed S] [--ids-out F.npz] [--overwrite]
    image2video IMAGE [PROMPT] --out OUT.gif --checkpoint DIR [--width W] [--height H] [--steps N] [--greedy]
             [--motion-guidance G] [--top-k K] [--top-p P] [--keep argmax|sample] [--seed S] [--ids-out F.npz]
    reconstruct-video VIDEO --out OUT.mp4 --checkpoint DIR [--width W] [--height H] [--steps N] [--max-clips N]
             [--seed S] [--ids-out F.npz]

Videos are read with PyAV (any container/codec its FFmpeg decodes) and re-encoded to MPEG-4 Part 2 at
6 fps for the motion vectors, as the release does. Outputs are written by extension (``.mp4``: PyAV;
``.gif``: Pillow) at the clips' 6 fps, atomically; an existing file is replaced only with
``--overwrite``, an input never. Sizes are (width, height) in pixels, multiples of the video
detokenizer's factor (64 for the release). Every input is checked (the video decoded and its motion
vectors read) before any weights are loaded; errors print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import os

import numpy as np

from lavit_jax import checkpoint, fsutil, hub
from lavit_jax.data import video_io
from lavit_jax.data.image_io import load_image
from lavit_jax.inference import video_llm_tasks as vlt

VIDEO_COMMANDS = ("video-qa", "video-caption", "text2video", "image2video", "reconstruct-video")
U, G = vlt.UNDERSTANDING, vlt.GENERATION


def add_parsers(sub, common, keep, positive, _int, _float, _top_p, _positive_float) -> None:
    """Adds the video subcommands to ``python -m lavit_jax``'s subparsers (the shared option helpers passed in)."""

    def understanding(sp):
        sp.add_argument("--max-clips", type=positive, default=None, help=f"clips read (default {U.max_clips})")
        sp.add_argument("--max-new-tokens", type=positive, default=None, help=f"(default {U.max_new_tokens})")
        sp.add_argument("--min-new-tokens", type=_int(0, "must be >= 0"), default=None,
                        help=f"(default {U.min_new_tokens})")
        sp.add_argument("--sample", action="store_true", help="sample the answer (nucleus) instead of greedy")
        sp.add_argument("--top-p", type=_top_p, default=None, help=f"with --sample (default {U.top_p})")
        sp.add_argument("--temperature", type=_positive_float, default=None,
                        help=f"with --sample (default {U.temperature})")

    def video_out(sp, keyframe: bool):
        sp.add_argument("--out", required=True, help="output video (.mp4 or .gif)")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing --out / --ids-out file")
        px = _int(1, "must be a positive number of pixels")
        sp.add_argument("--width", type=px, default=None, help=f"video width (default {G.video_size[1]})")
        sp.add_argument("--height", type=px, default=None, help=f"video height (default {G.video_size[0]})")
        sp.add_argument("--steps", type=positive, default=None,
                        help="video detokenizer steps (default: the release's, stored at conversion)")
        sp.add_argument("--min-guidance", type=_float, default=None, help="first frame's guidance (default 1)")
        sp.add_argument("--max-guidance", type=_float, default=None, help="last frame's guidance (default 4)")
        sp.add_argument("--ids-out", default=None, help="also save the generated token codes here (.npz)")
        if keyframe:
            sp.add_argument("--keyframe-width", type=px, default=None,
                            help=f"keyframe width (default {G.keyframe_size[1]})")
            sp.add_argument("--keyframe-height", type=px, default=None,
                            help=f"keyframe height (default {G.keyframe_size[0]})")
            sp.add_argument("--keyframe-steps", type=positive, default=None,
                            help=f"keyframe decoder steps (default {G.keyframe_steps})")
            sp.add_argument("--keyframe-guidance", type=_float, default=None,
                            help=f"keyframe decoder guidance (default {G.keyframe_guidance})")
            sp.add_argument("--llm-guidance", type=_float, default=None,
                            help=f"LLM guidance of the keyframe ids (default {G.llm_guidance})")

    def motion(sp):
        sp.add_argument("--motion-guidance", type=_float, default=None,
                        help=f"LLM guidance of the motion ids (default {G.motion_guidance})")
        sp.add_argument("--top-k", type=_int(0, "must be >= 0 (0 disables top-k)"), default=None,
                        help=f"(default {G.top_k})")
        sp.add_argument("--top-p", type=_top_p, default=None, help=f"(default {G.top_p})")

    sp = sub.add_parser("video-qa", help="answer a question about a video (Video-LaVIT)")
    sp.add_argument("video")
    sp.add_argument("question")
    common(sp)
    keep(sp)
    understanding(sp)
    sp = sub.add_parser("video-caption", help="describe a video (Video-LaVIT)")
    sp.add_argument("video")
    common(sp)
    keep(sp)
    understanding(sp)
    sp.add_argument("--prompt", default=None, help=f"the request (default {U.describe_prompt!r})")
    sp = sub.add_parser("text2video", help="generate a video clip from a text prompt (Video-LaVIT)")
    sp.add_argument("prompt")
    common(sp)
    video_out(sp, keyframe=True)
    motion(sp)
    sp.add_argument("--seed", type=_int(0, "must be >= 0"), default=None, help="random seed (default 0)")
    sp.add_argument("--greedy", action="store_true", help="greedy keyframe ids instead of the release's sampling")
    sp.add_argument("--num-clips", type=positive, default=None,
                    help="clips of 24 frames, chained as the release's long videos (default 1)")
    sp.add_argument("--inverse-rate", type=_float, default=None,
                    help=f"long videos: the next keyframe starts from the last frame at this noise level "
                         f"(default {G.inverse_rate})")
    sp = sub.add_parser("image2video", help="animate an image (+ an optional text) into a video clip (Video-LaVIT)")
    sp.add_argument("image")
    sp.add_argument("prompt", nargs="?", default="")
    common(sp)
    video_out(sp, keyframe=False)
    motion(sp)
    keep(sp)
    sp.add_argument("--greedy", action="store_true", help="greedy motion ids instead of the release's sampling")
    sp = sub.add_parser("reconstruct-video",
                        help="tokenize a video (keyframes + motion tokens) and decode it back (Video-LaVIT)")
    sp.add_argument("video")
    common(sp)
    video_out(sp, keyframe=False)
    sp.add_argument("--max-clips", type=positive, default=None, help=f"clips read (default {U.max_clips})")
    sp.add_argument("--seed", type=_int(0, "must be >= 0"), default=None, help="random seed (default 0)")


def _given(args, *names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def check_inputs(args, check_writable, check_ids_out, resolve_checkpoint) -> dict:
    """Every check that needs no weights; reads the input video's clips (returned under 'clips'). The CLI's own
    output checks (``check_writable``, ``check_ids_out``) and checkpoint resolution are passed in."""
    found = {}
    if getattr(args, "question", None) is not None and not args.question.strip():
        raise ValueError("empty question")
    if args.command in ("video-qa", "video-caption") and not args.sample:
        for flag in ("temperature", "top_p"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} only applies with --sample")
    lo, hi = getattr(args, "min_new_tokens", None), getattr(args, "max_new_tokens", None)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"--min-new-tokens {lo} is larger than --max-new-tokens {hi}")
    inputs = []
    if getattr(args, "image", None) is not None:
        load_image(args.image)
        inputs.append(args.image)
    if getattr(args, "video", None) is not None:
        inputs.append(args.video)
    if getattr(args, "out", None) is not None:
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in video_io.VIDEO_EXTENSIONS:
            raise ValueError(f"output file {args.out}: use a video extension ({', '.join(video_io.VIDEO_EXTENSIONS)})")
        check_writable(args.out, "--out", args.overwrite, inputs)
        check_ids_out(args, ".npz", inputs)
    if args.config is None and args.checkpoint and hub.is_repo_id(args.checkpoint):
        args.config = hub.VIDEO_RELEASE_CONFIG  # the Video-LaVIT release's conversion config
    args.checkpoint = resolve_checkpoint(args)
    manifest = checkpoint.read_manifest(args.checkpoint)
    if manifest.get("model", "lavit") != "video_lavit":
        raise ValueError(f"--checkpoint {args.checkpoint} is a {manifest.get('model', 'lavit')} checkpoint: "
                         f"{args.command} needs one converted from the Video-LaVIT release")
    if getattr(args, "out", None) is not None:
        factor = checkpoint.video_size_factor(args.checkpoint)
        keyframe_factor = None
        if args.command == "text2video" and "highres" in checkpoint.available_decoders(args.checkpoint):
            keyframe_factor = checkpoint.decoder_geometry(args.checkpoint, "highres")[1]
        for flag in ("width", "height", "keyframe_width", "keyframe_height"):
            v = getattr(args, flag, None)
            f = keyframe_factor if flag.startswith("keyframe") else factor
            if v is not None and f and v % f:
                raise ValueError(f"--{flag.replace('_', '-')} {v} is not a multiple of {f}")
    if getattr(args, "video", None) is not None:
        found["clips"] = video_io.load_video_clips(args.video, max_clips=getattr(args, "max_clips", None)
                                                   or U.max_clips)
    return found


def _size(args, w: str, h: str, default):
    return (getattr(args, h) or default[0], getattr(args, w) or default[1])


def run(args, model, found, progress: bool) -> None:
    """Runs a video command on a loaded ``VideoLaVIT`` and writes / prints its result."""
    if args.command in ("video-qa", "video-caption"):
        kw = _given(args, "keep", "seed", "max_new_tokens", "min_new_tokens", "top_p", "temperature")
        if args.sample:
            kw["do_sample"] = True
        if args.command == "video-qa":
            print(model.answer(found["clips"], args.question, progress=progress, **kw))
        else:
            print(model.describe(found["clips"], progress=progress, **_given(args, "prompt"), **kw))
        return
    video_size = _size(args, "width", "height", G.video_size)
    kw = dict(progress=progress, return_ids=True, video_size=video_size,
              **_given(args, "seed", "steps", "min_guidance", "max_guidance"))
    if args.command == "text2video":
        kw.update(_given(args, "llm_guidance", "motion_guidance", "top_k", "top_p", "keyframe_steps",
                         "keyframe_guidance", "num_clips", "inverse_rate"))
        kw["keyframe_size"] = _size(args, "keyframe_width", "keyframe_height", G.keyframe_size)
        if args.greedy:
            kw["do_sample"] = False
        frames, info = model.text2video(args.prompt, **kw)
        saved = {f"{k}_{i}": c[k] for i, c in enumerate(info) for k in ("keyframe_codes", "motion_codes")}
    elif args.command == "image2video":
        kw.update(_given(args, "motion_guidance", "top_k", "top_p", "keep"))
        if args.greedy:
            kw["do_sample"] = False
        frames, info = model.image2video(args.image, args.prompt, **kw)
        saved = dict(prompt_ids=info["prompt_ids"], motion_codes=info["motion_codes"])
    else:
        kw.update(_given(args, "max_clips"))
        frames, info = model.reconstruct_video(found["clips"], **kw)
        saved = dict(motion_codes=info["motion_codes"], start_indices=info["start_indices"])
    fps = model.video_sampling().fps
    video_io.write_video(args.out, frames, fps, overwrite=args.overwrite)
    if args.ids_out:
        fsutil.atomic_write(args.ids_out, lambda tmp: np.savez(tmp, **saved))
    print(f"wrote {args.out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps} fps)")
