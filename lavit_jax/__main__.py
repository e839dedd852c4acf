"""LaVIT from the command line, on a checkpoint converted by tools/convert_torch_weights.py.

    python -m lavit_jax caption IMAGE --checkpoint DIR [--keep argmax|sample] [--seed S] [--num-captions N]
                                [--sample] [--temperature T] [--top-p P] [--top-k K] [--repetition-penalty R]
    python -m lavit_jax vqa IMAGE QUESTION --checkpoint DIR [--keep argmax|sample] [--seed S] [--sample]
    python -m lavit_jax text2image PROMPT --out FILE.png [--decoder lowres|highres] [--steps N] [--guidance G]
                                   [--llm-guidance G] [--seed S] [--size PX] [--width W] [--height H]
                                   [--ratio R] [--no-safety-checker] [--greedy] [--num-beams N]
                                   [--negative-prompt TEXT] [--vae-dtype model] --checkpoint DIR
    python -m lavit_jax edit IMAGE PROMPT --out FILE.png [same options] [--keep argmax|sample] --checkpoint DIR
    python -m lavit_jax compose IMAGE PROMPT IMAGE --out FILE.png [same options as edit] --checkpoint DIR
    python -m lavit_jax reconstruct IMAGE --out FILE.png [--decoder] [--steps N] [--seed S] [--keep] --checkpoint DIR

``compose`` takes an interleaved prompt: each argument that names an existing file is an image (it
must be a readable image), ``ids:1,2,3`` is raw LLM token ids, any other is text, in order. Image-token
search: nucleus sampling (the release's default), ``--greedy``, or ``--num-beams N`` (with
``--llm-guidance 1``); ``--negative-prompt`` replaces [IMG] alone as the unconditional context of LLM
guidance; an empty prompt generates unconditionally. ``--num-images N`` (text2image, edit,
compose) draws N images, image i from seed + i: written as numbered files next to ``--out``
(``out.png`` -> ``out-1.png`` ... ``out-N.png``), or with ``--tile`` as one grid image at ``--out``
(ceil(sqrt(N)) columns, left to right then top to bottom); ``--ids-out`` then holds [N, L] ids.
Output size: ``--size`` (square), ``--width`` / ``--height``, or ``--ratio`` (the release's aspect-ratio
table, ``inference/defaults.py``); ``--original-size`` / ``--crops-coords-top-left`` / ``--target-size``
are the highres (SDXL) decoder's micro-conditioning. A checkpoint with a converted safety checker runs it on
every image (flagged ones are written black, with a warning); ``--no-safety-checker`` skips it.
``--checkpoint`` (default $LAVIT_CHECKPOINT) is a converted directory or a Hugging Face repo id,
downloaded and converted once (``--revision``, ``--config``; ``lavit_jax/hub.py``). Every argument is
checked before any weights are read; unset sizes and token counts follow the checkpoint. ``--out``
never replaces an input image, and replaces another existing file only with ``--overwrite`` (written
atomically). ``--keep``: the tokenizer's keep decisions, deterministic ``argmax`` or the reference's
``sample`` (hard Gumbel, seeded by ``--seed``). ``--vae-dtype``: the VAE decode's dtype (the release's:
the model precision for generation, float32 for ``reconstruct``). Errors (missing file, non-image,
empty question, a bad value, a checkpoint without the needed part) print one line ``error: ...`` and
exit with status 2; ``warning: ...``
lines do not stop the run. Progress bars go to stderr (plain lines when it is not a terminal);
``--verbose`` also shows the libraries' INFO logs (Orbax).

Video-LaVIT checkpoints add ``video-qa``, ``video-caption``, ``text2video``, ``image2video`` and
``reconstruct-video`` (``lavit_jax/video_cli.py`` lists their options).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import secrets
import sys

import numpy as np
from absl import flags
from absl import logging as absl_logging
from PIL import Image
from tqdm import std as tqdm_std

from lavit_jax import checkpoint, fsutil, hub, video_cli
from lavit_jax.data.image_io import load_image
from lavit_jax.inference import defaults
from lavit_jax.inference.lavit import LaVIT

DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "f16": "float16", "fp16": "float16"}
KEEP_MODES = ("argmax", "sample")
MICRO = ("original_size", "crops_coords_top_left", "target_size")
CLI_NAMES = {k: "--" + k.replace("_", "-") for k in defaults.API_NAMES}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``error: MESSAGE (see PROG --help)``, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(minimum: int, what: str):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: {what}")
        return value

    return parse


def _float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _top_p(text):
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value}: must be in (0, 1]")
    return value


def _positive_float(text):
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value}: must be > 0")
    return value


def _dtype(text):
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of float32, bfloat16, float16 (or f32, bf16, f16)")
    return DTYPES[text.lower()]


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lavit_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    positive = _int(1, "must be at least 1")

    def common(sp):
        sp.add_argument("--checkpoint", default=os.environ.get("LAVIT_CHECKPOINT"),
                        help="converted checkpoint directory, or a Hugging Face repo id (owner/name: downloaded "
                             "and converted once, see lavit_jax/hub.py) (default $LAVIT_CHECKPOINT)")
        sp.add_argument("--revision", default=None,
                        help="with a repo id --checkpoint: the branch, tag or commit (default: main)")
        sp.add_argument("--config", default=None,
                        help="with a repo id --checkpoint: the config file its conversion uses (default: the "
                             "release's configs/lavit_7b.py); the copy is stored in --dtype (bfloat16 or float32; "
                             "default bfloat16)")
        sp.add_argument("--dtype", type=_dtype, default=None,
                        help="compute dtype: float32, bfloat16 or float16 (default: the stored dtype)")
        sp.add_argument("--int8", action="store_true",
                        help="LLM weights quantised to int8 at load (weight-only, per-channel scales)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--verbose", action="store_true",
                        help="show each part's load time and the libraries' INFO logs (Orbax)")

    def keep(sp, seed=True):
        sp.add_argument("--keep", choices=KEEP_MODES, default=None,
                        help="tokenizer keep decisions: argmax (deterministic) or sample (the reference's hard "
                             f"Gumbel sample, seeded by --seed) (default {defaults.KEEP})")
        if seed:
            sp.add_argument("--seed", type=_int(0, "must be >= 0"), default=None, help="random seed (default 0)")

    def image_out(sp, task):
        sp.add_argument("--out", required=True, help="output image file (.png, .jpg, .webp, .bmp)")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing --out / --ids-out file")
        sp.add_argument("--decoder", choices=("lowres", "highres"), default=None,
                        help="pixel decoder (default highres when converted, else lowres)")
        sp.add_argument("--steps", type=positive, default=None, help=f"diffusion steps (default {task.steps})")
        sp.add_argument("--guidance", type=_float, default=None,
                        help=f"decoder classifier-free guidance (default {task.guidance})")
        sp.add_argument("--seed", type=_int(0, "must be >= 0"), default=None, help="random seed (default 0)")
        sp.add_argument("--size", type=_int(1, "must be a positive number of pixels"), default=None,
                        help="image side in pixels, a multiple of the decoder's downsampling factor (default: the "
                             "decoder's native size, from the checkpoint)")
        sp.add_argument("--width", type=_int(1, "must be a positive number of pixels"), default=None,
                        help="image width in pixels (default --size, else the decoder's native size)")
        sp.add_argument("--height", type=_int(1, "must be a positive number of pixels"), default=None,
                        help="image height in pixels (default --size, else the decoder's native size)")
        sp.add_argument("--ratio", choices=tuple(defaults.ASPECT_RATIOS), default=None,
                        help="aspect ratio, width:height, from the release's table (highres: its 1024-px sizes; "
                             "lowres: scaled to its native size); excludes --size/--width/--height")
        pair = _int(0, "must be >= 0")
        sp.add_argument("--original-size", type=pair, nargs=2, metavar=("H", "W"), default=None,
                        help="SDXL micro-conditioning, highres decoder only (default: the output size)")
        sp.add_argument("--crops-coords-top-left", type=pair, nargs=2, metavar=("TOP", "LEFT"), default=None,
                        help="SDXL micro-conditioning, highres decoder only (default 0 0)")
        sp.add_argument("--target-size", type=pair, nargs=2, metavar=("H", "W"), default=None,
                        help="SDXL micro-conditioning, highres decoder only (default: the output size)")
        sp.add_argument("--vae-dtype", choices=defaults.VAE_DTYPES, default=None,
                        help=f"dtype of the VAE decode (default {task.vae_dtype}, as the release; 'model': --dtype's)")
        sp.add_argument("--no-safety-checker", action="store_true",
                        help="skip the safety checker (it runs when the checkpoint has one, blacking out flagged "
                             "images with a warning)")
        sp.add_argument("--ids-out", default=None, help="also save the visual ids [B, N] (.npy) here")
        if task is not defaults.RECONSTRUCT:
            sp.add_argument("--num-images", type=positive, default=None,
                            help="images to draw, image i from seed + i (default 1): written as OUT-1.png ... "
                                 "OUT-N.png, or one grid with --tile")
            sp.add_argument("--tile", action="store_true",
                            help="with --num-images: write one grid image (ceil(sqrt(N)) columns) at --out")

    def sampling(sp, task):
        sp.add_argument("--llm-guidance", type=_float, default=None,
                        help=f"LLM classifier-free guidance (default {task.llm_guidance})")
        sp.add_argument("--top-k", type=_int(0, "must be >= 0 (0 disables top-k)"), default=None,
                        help=f"(default {task.top_k})")
        sp.add_argument("--top-p", type=_top_p, default=None, help=f"(default {task.top_p})")
        sp.add_argument("--min-new-tokens", type=_int(0, "must be >= 0"), default=None,
                        help="(default: the API's, at most --max-new-tokens)")
        sp.add_argument("--max-new-tokens", type=positive, default=None,
                        help=f"(default {task.max_new_tokens}; at most the visual tokens an image can have)")
        sp.add_argument("--greedy", action="store_true",
                        help="greedy image-token search instead of the release's nucleus sampling")
        sp.add_argument("--num-beams", type=positive, default=None,
                        help="beam search over image tokens (with --llm-guidance 1: beams run without guidance; "
                             "beam sampling unless --greedy)")
        sp.add_argument("--length-penalty", type=_float, default=None, help="beam search length penalty (default 1)")
        sp.add_argument("--negative-prompt", default=None,
                        help="unconditional context of LLM guidance instead of [IMG] alone (the release's "
                             "uncond_input_ids)")

    def understanding(sp, task):
        sp.add_argument("--sample", action="store_true",
                        help=f"sample instead of beam search ({task.num_beams} beams); seeded by --seed")
        sp.add_argument("--num-beams", type=positive, default=None,
                        help=f"beams (default {task.num_beams}; with --sample default 1, more: beam sampling)")
        sp.add_argument("--temperature", type=_positive_float, default=None,
                        help=f"sampling temperature, with --sample (default {task.temperature})")
        sp.add_argument("--top-p", type=_top_p, default=None, help=f"with --sample (default {task.top_p})")
        sp.add_argument("--top-k", type=_int(0, "must be >= 0 (0 disables top-k)"), default=None,
                        help=f"with --sample (default {task.top_k})")
        sp.add_argument("--repetition-penalty", type=_positive_float, default=None,
                        help="penalty on ids already generated, HF semantics; 1 disables it "
                             f"(default {task.repetition_penalty})")

    sp = sub.add_parser("caption", help="caption an image")
    sp.add_argument("image")
    common(sp)
    keep(sp)
    understanding(sp, defaults.CAPTION)
    sp.add_argument("--num-captions", type=positive, default=None,
                    help="captions to print, one a line (default 1; beam search uses max(2, N) beams)")
    sp = sub.add_parser("vqa", help="answer a question about an image")
    sp.add_argument("image")
    sp.add_argument("question")
    common(sp)
    keep(sp)
    understanding(sp, defaults.VQA)
    sp = sub.add_parser("text2image", help="generate an image from a text prompt")
    sp.add_argument("prompt")
    common(sp)
    image_out(sp, defaults.TEXT2IMAGE)
    sampling(sp, defaults.TEXT2IMAGE)
    sp = sub.add_parser("edit", help="generate an image from an image + text prompt")
    sp.add_argument("image")
    sp.add_argument("prompt")
    common(sp)
    image_out(sp, defaults.EDIT)
    sampling(sp, defaults.EDIT)
    keep(sp, seed=False)
    sp = sub.add_parser(
        "compose", help="generate an image from an interleaved prompt of images and texts",
        description="Generates an image from an interleaved multimodal prompt, e.g. a.jpg 'in the style of' b.jpg. "
                    "An argument that names an existing file is an image (it must be a readable image); any other "
                    "argument is text. Parts are joined in order as the release's multimodal_synthesis does.")
    sp.add_argument("parts", nargs="+", metavar="PART",
                    help="an image file, ids:1,2,3 (raw token ids) or a text, in prompt order")
    common(sp)
    image_out(sp, defaults.EDIT)
    sampling(sp, defaults.EDIT)
    keep(sp, seed=False)
    sp = sub.add_parser("reconstruct", help="tokenize an image and decode its visual tokens back to pixels")
    sp.add_argument("image")
    common(sp)
    image_out(sp, defaults.RECONSTRUCT)
    keep(sp, seed=False)
    video_cli.add_parsers(sub, common, keep, positive, _int, _float, _top_p, _positive_float)
    return p


# ------------------------------------------------------------------------------------------ checks


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_writable(path: str, flag: str, overwrite: bool, inputs) -> None:
    """``path`` may be written: its folder exists and takes files, it is no input, it exists only with overwrite."""
    for src in inputs:
        if os.path.exists(path) and _same_file(path, src):
            raise ValueError(f"{flag} {path} is an input of this command; write the result to another file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory not found: {parent} ({flag} {path})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")
    try:  # the real test: can a file be created there (permissions, read-only or full file system)
        probe = os.path.join(parent, f".{os.path.basename(path)}.probe-{secrets.token_hex(4)}")
        with open(probe, "wb") as f:
            f.write(b"\0")
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from e


def _check_ids_out(args, suffix: str, inputs) -> None:
    """``--ids-out`` (when given): a ``suffix`` file, not ``--out``, writable as ``_check_writable`` says."""
    if not args.ids_out:
        return
    if not args.ids_out.endswith(suffix):
        raise ValueError(f"--ids-out {args.ids_out}: use a {suffix} file name")
    if os.path.abspath(args.ids_out) == os.path.abspath(args.out):
        raise ValueError(f"--ids-out {args.ids_out} is the same file as --out")
    _check_writable(args.ids_out, "--ids-out", args.overwrite, inputs)


def _decoder_geometry(ckpt: str, manifest: dict, decoder: str | None) -> tuple[str, int, int] | None:
    """(decoder the task will use, its native side, its image-size factor: VAE x UNet downsampling), None if not
    converted."""
    if decoder is None:
        avail = checkpoint.available_decoders(ckpt)
        decoder = "highres" if "highres" in avail or not avail else "lowres"
    if checkpoint.DECODER_FOLDERS[decoder] not in manifest.get("parts", {}):
        return None  # the task reports the missing part
    return (decoder, *checkpoint.decoder_geometry(ckpt, decoder))


_IDS_PART = re.compile(r"^ids:\s*(\d+(\s*,\s*\d+)*)\s*$")


def _compose_parts(parts) -> tuple[list, list]:
    """(prompt parts: image paths, raw token ids and texts in order, the image paths) of ``compose``'s
    arguments. ``ids:1,2,3`` is raw LLM token ids."""
    images, out = [], []
    for part in parts:
        if os.path.isfile(part):
            load_image(part)  # an existing file must be a readable image
            images.append(part)
            out.append(part)
        elif part.startswith("ids:"):
            m = _IDS_PART.match(part)
            if m is None:
                raise ValueError(f"compose part {part!r}: raw token ids are written ids:1,2,3")
            out.append([int(t) for t in m.group(1).split(",")])
        else:
            out.append(part)
    return out, images


def output_paths(out: str, num_images: int | None, tile: bool) -> list[str]:
    """The files a generation command writes: ``out``, or ``out``'s stem + ``-1`` ... ``-N`` for N draws."""
    if not num_images or num_images == 1 or tile:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i + 1}{ext}" for i in range(num_images)]


def tile_images(images) -> Image.Image:
    """One grid of equal-size images: ceil(sqrt(N)) columns, left to right then top to bottom."""
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _check_inputs(args) -> None:
    """Every check that needs no weights, before any are read."""
    if getattr(args, "image", None) is not None:
        load_image(args.image)
    compose_images = _compose_parts(args.parts)[1] if args.command == "compose" else []
    # an empty prompt generates unconditionally, as in the release; a question must say something
    if getattr(args, "question", None) is not None and not args.question.strip():
        raise ValueError("empty question")
    if getattr(args, "num_beams", None) and args.num_beams > 1:
        if args.llm_guidance is None or args.llm_guidance != 1:
            raise ValueError(f"--num-beams {args.num_beams} runs without LLM guidance: pass --llm-guidance 1")
    if getattr(args, "negative_prompt", None) is not None:
        if not args.negative_prompt.strip():
            raise ValueError("empty --negative-prompt")
        if args.llm_guidance == 1:
            raise ValueError("--negative-prompt is the unconditional context of LLM guidance: --llm-guidance 1 "
                             "turns guidance off")
    if args.command in ("caption", "vqa") and not args.sample:
        for flag in ("temperature", "top_p", "top_k"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} only applies with --sample")
    _check_checkpoint_arg(args)
    for flag in ("guidance", "llm_guidance"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            warn(f"--{flag.replace('_', '-')} {value} is negative: it pushes the result away from the prompt")
    lo, hi = getattr(args, "min_new_tokens", None), getattr(args, "max_new_tokens", None)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"--min-new-tokens {lo} is larger than --max-new-tokens {hi}")
    has_out = getattr(args, "out", None) is not None
    if has_out:
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"output file {args.out}: use an image extension ({', '.join(IMAGE_EXTENSIONS)})")
        inputs = ([args.image] if getattr(args, "image", None) else []) + compose_images
        if getattr(args, "tile", False) and (args.num_images or 1) == 1:
            raise ValueError("--tile needs --num-images 2 or more")
        for path in output_paths(args.out, getattr(args, "num_images", None), getattr(args, "tile", False)):
            _check_writable(path, "--out", args.overwrite, inputs)
        _check_ids_out(args, ".npy", inputs)
    # the last check: a repo id is downloaded and converted here (once; later runs read the cache)
    args.checkpoint = _resolve_checkpoint(args)
    manifest = checkpoint.read_manifest(args.checkpoint)
    if not has_out:
        return
    picked = _decoder_geometry(args.checkpoint, manifest, args.decoder)
    if picked is not None:
        decoder, native, factor = picked
        defaults.image_size(native=native, factor=factor, decoder=decoder, size=args.size, width=args.width,
                            height=args.height, ratio=args.ratio, names=CLI_NAMES)
        defaults.micro_conditioning(decoder, **_given(args, *MICRO), names=CLI_NAMES)
    else:
        defaults.image_size(native=1024, factor=1, decoder="", size=args.size, width=args.width, height=args.height,
                            ratio=args.ratio, names=CLI_NAMES)  # the flags' consistency; the task names the part


# ------------------------------------------------------------------------------------------ run


def _given(args, *names) -> dict:
    """{name: value} of the options the user set (None = unset: the API picks, from the checkpoint)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _check_checkpoint_arg(args) -> None:
    if not args.checkpoint:
        raise ValueError("no checkpoint: pass --checkpoint DIR or set LAVIT_CHECKPOINT")
    if not os.path.isdir(args.checkpoint) and not hub.is_repo_id(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {args.checkpoint} (nor a Hugging Face repo id "
                                "owner/name)")
    if args.revision is not None and os.path.isdir(args.checkpoint):
        raise ValueError(f"--revision applies to a repo id --checkpoint, not to the directory {args.checkpoint}")


def _resolve_checkpoint(args) -> str:
    """The converted directory of ``--checkpoint`` (a repo id is downloaded and converted here, once)."""
    _check_checkpoint_arg(args)
    if args.config is not None and os.path.isdir(args.checkpoint):
        raise ValueError(f"--config applies to a repo id --checkpoint, not to the directory {args.checkpoint}")
    if args.config is not None and not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config file not found: {args.config}")
    conversion = args.dtype if args.dtype in hub.CONVERSION_DTYPES else hub.DEFAULT_CONVERSION_DTYPE
    return hub.resolve(args.checkpoint, revision=args.revision, conversion_dtype=conversion, config=args.config,
                       log=lambda m: print(m, file=sys.stderr))


def run_video(args) -> None:
    from lavit_jax.inference.video_lavit import VideoLaVIT

    found = video_cli.check_inputs(args, _check_writable, _check_ids_out, _resolve_checkpoint)
    model = VideoLaVIT.from_pretrained(args.checkpoint, dtype=args.dtype,
                                       llm_weights="int8" if args.int8 else "float", verbose=args.verbose)
    video_cli.run(args, model, found, progress=not args.no_progress)


def run(args) -> None:
    if args.command in video_cli.VIDEO_COMMANDS:
        return run_video(args)
    _check_inputs(args)
    model = LaVIT.from_pretrained(args.checkpoint, dtype=args.dtype, llm_weights="int8" if args.int8 else "float",
                                  verbose=args.verbose)
    progress = not args.no_progress
    if args.command in ("caption", "vqa"):
        kw = _given(args, "keep", "seed", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")
        if args.sample:
            kw["do_sample"] = True
    if args.command == "caption":
        if args.num_captions is not None:
            kw["num_captions"] = args.num_captions
        out = model.caption(args.image, progress=progress, **kw)
        texts = out if isinstance(out, list) else [out]
        print("\n".join(texts))
        for text in texts:
            if getattr(text, "note", ""):
                print(f"warning: {'empty caption: ' if not text else ''}{text.note}", file=sys.stderr)
        return
    if args.command == "vqa":
        print(model.vqa(args.image, args.question, progress=progress, **kw))
        return
    kw = dict(return_ids=True, progress=progress,
              **_given(args, "decoder", "steps", "guidance", "seed", "size", "width", "height", "ratio", "vae_dtype",
                       *MICRO))
    for key in MICRO:
        if key in kw:
            kw[key] = tuple(kw[key])
    if args.no_safety_checker:
        kw["safety_checker"] = False
    if args.command in ("text2image", "edit", "compose"):
        kw.update(_given(args, "llm_guidance", "top_k", "top_p", "min_new_tokens", "max_new_tokens", "num_images",
                         "num_beams", "length_penalty", "negative_prompt"))
        if args.greedy:
            kw["do_sample"] = False
    if args.command in ("edit", "compose", "reconstruct"):
        kw.update(_given(args, "keep"))
    if args.command == "text2image":
        images, runs = model.text2image(args.prompt, **kw)
    elif args.command == "edit":
        images, runs = model.edit(args.image, args.prompt, **kw)
    elif args.command == "compose":
        images, runs = model.generate_image(_compose_parts(args.parts)[0], **kw)
    else:
        images, runs = model.reconstruct(args.image, **kw)
    if not isinstance(images, list):  # one draw
        images, runs = [images], [runs]
    flagged = sum(bool(getattr(im, "info", {}).get("nsfw")) for im in images)
    if flagged:
        warn(f"the safety checker flagged {flagged} of {len(images)} image{'s' if len(images) > 1 else ''} as NSFW: "
             "written black (--no-safety-checker skips the check)")
    paths = output_paths(args.out, len(images), args.tile) if args.command != "reconstruct" else [args.out]
    if len(paths) == 1 and len(images) > 1:
        images = [tile_images(images)]
    fmt = Image.registered_extensions()[os.path.splitext(args.out)[1].lower()]
    for path, image in zip(paths, images, strict=True):
        fsutil.atomic_write(path, lambda tmp, image=image: image.save(tmp, format=fmt))
    counts = [int(np.asarray(lengths)[0]) for _, lengths in runs]
    if args.ids_out:
        width = max(int(np.max(lengths)) for _, lengths in runs)
        arr = np.zeros((len(runs), width), np.int32)
        for i, (ids, lengths) in enumerate(runs):
            arr[i, : int(np.max(lengths))] = np.asarray(ids)[0, : int(np.max(lengths))]
        if len(runs) == 1:
            arr = np.asarray(runs[0][0])[:, : int(np.max(runs[0][1]))]
        fsutil.atomic_write(args.ids_out, lambda tmp: np.save(tmp, arr))
    size = f"{images[0].size[0]}x{images[0].size[1]}"
    print(f"wrote {', '.join(paths)} ({size}, {', '.join(map(str, counts))} visual tokens)")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves between nested bars


class _PlainLines(io.TextIOBase):
    """A non-terminal stderr for progress bars: each carriage-return redraw becomes one plain line."""

    def __init__(self, stream):
        self.stream, self.buf, self.last = stream, "", None

    def write(self, s):
        for part in re.split(r"([\r\n])", _ANSI.sub("", s)):
            if part in ("\r", "\n"):
                self._emit()
            else:
                self.buf += part
        return len(s)

    def _emit(self):
        line, self.buf = self.buf.strip(), ""
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False


def close_progress_bars() -> None:
    """Closes every open tqdm bar (the library's stage and diffusion bars) so an error prints on its own line."""
    for bar in list(tqdm_std.tqdm._instances):
        with contextlib.suppress(Exception):
            bar.close()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    verbosity = absl_logging.get_verbosity()
    threshold = flags.FLAGS["stderrthreshold"].value
    if args.verbose:
        absl_logging.use_absl_handler()
        absl_logging.set_verbosity(absl_logging.INFO)
        # once absl flags count as parsed (an absl app, Grain workers), INFO goes to a log file unless this says
        # stderr
        absl_logging.set_stderrthreshold("info")
    else:
        absl_logging.set_verbosity(absl_logging.WARNING)
    stderr = sys.stderr
    plain = not stderr.isatty()
    if plain:
        sys.stderr = _PlainLines(stderr)
    error = None
    try:
        run(args)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        error = f"error: {msg}"
    except Exception as e:
        if not _is_oom(e):
            raise
        size = f" at --size {args.size}" if getattr(args, "size", None) else ""
        error = (f"error: out of memory running {args.command}{size} "
                 "(try a smaller --size, --dtype bfloat16 or a device with more memory)")
    finally:
        close_progress_bars()
        if plain:
            sys.stderr.write("\n")  # the last redraw
            sys.stderr = stderr
        absl_logging.set_verbosity(verbosity)
        absl_logging.set_stderrthreshold(threshold)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    return 0


def exit_now(code: int) -> None:
    """Ends the process once every output is written: at-exit handlers run, the interpreter's teardown (the
    XLA client, thread pools, module objects: about a second on a small CPU) is skipped."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
