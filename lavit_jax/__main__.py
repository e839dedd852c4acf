"""LaVIT from the command line, on a checkpoint converted by tools/convert_torch_weights.py.

    python -m lavit_jax caption IMAGE --checkpoint DIR
    python -m lavit_jax vqa IMAGE QUESTION --checkpoint DIR
    python -m lavit_jax text2image PROMPT --out FILE.png [--decoder lowres|highres] [--steps N] [--guidance G]
                                   [--llm-guidance G] [--seed S] [--size PX] --checkpoint DIR
    python -m lavit_jax edit IMAGE PROMPT --out FILE.png [same options] --checkpoint DIR
    python -m lavit_jax reconstruct IMAGE --out FILE.png [--decoder] [--steps] [--guidance] [--seed] [--size]

``--checkpoint`` defaults to $LAVIT_CHECKPOINT. Errors (missing file, non-image, empty prompt, a
checkpoint without the needed part) print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from lavit_jax.inference import defaults


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lavit_jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--checkpoint", default=os.environ.get("LAVIT_CHECKPOINT"),
                        help="converted checkpoint directory (default $LAVIT_CHECKPOINT)")
        sp.add_argument("--dtype", default=None, help="compute dtype (default: the stored dtype)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    def image_out(sp, task):
        sp.add_argument("--out", required=True, help="output image file (.png)")
        sp.add_argument("--decoder", choices=("lowres", "highres"), default=None,
                        help="pixel decoder (default highres when converted, else lowres)")
        sp.add_argument("--steps", type=int, default=task.steps, help="diffusion steps")
        sp.add_argument("--guidance", type=float, default=task.guidance, help="decoder classifier-free guidance")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 / 1024)")
        sp.add_argument("--ids-out", default=None, help="also save the visual ids [B, N] (.npy) here")

    def sampling(sp, task):
        sp.add_argument("--llm-guidance", type=float, default=task.llm_guidance, help="LLM classifier-free guidance")
        sp.add_argument("--top-k", type=int, default=task.top_k)
        sp.add_argument("--top-p", type=float, default=task.top_p)
        sp.add_argument("--min-new-tokens", type=int, default=task.min_new_tokens)
        sp.add_argument("--max-new-tokens", type=int, default=task.max_new_tokens)

    sp = sub.add_parser("caption", help="caption an image")
    sp.add_argument("image")
    common(sp)
    sp = sub.add_parser("vqa", help="answer a question about an image")
    sp.add_argument("image")
    sp.add_argument("question")
    common(sp)
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
    sp = sub.add_parser("reconstruct", help="tokenize an image and decode its visual tokens back to pixels")
    sp.add_argument("image")
    common(sp)
    image_out(sp, defaults.RECONSTRUCT)
    return p


def _check_inputs(args) -> None:
    """Cheap checks before any weights are read."""
    from lavit_jax import checkpoint
    from lavit_jax.data.image_io import load_image

    if getattr(args, "image", None) is not None:
        load_image(args.image)
    for field in ("prompt", "question"):
        value = getattr(args, field, None)
        if value is not None and not value.strip():
            raise ValueError(f"empty {field}")
    if not args.checkpoint:
        raise ValueError("no checkpoint: pass --checkpoint DIR or set LAVIT_CHECKPOINT")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {args.checkpoint}")
    checkpoint.read_manifest(args.checkpoint)
    out = getattr(args, "out", None)
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"output directory not found: {parent}")
        ext = os.path.splitext(out)[1].lower()
        if ext not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            raise ValueError(f"output file {out}: use an image extension such as .png")


def run(args) -> None:
    import numpy as np

    from lavit_jax.inference.lavit import LaVIT

    _check_inputs(args)
    model = LaVIT.from_pretrained(args.checkpoint, dtype=args.dtype)
    progress = not args.no_progress
    if args.command == "caption":
        print(model.caption(args.image, progress=progress))
        return
    if args.command == "vqa":
        print(model.vqa(args.image, args.question, progress=progress))
        return
    image_kw = dict(decoder=args.decoder, steps=args.steps, guidance=args.guidance, seed=args.seed, size=args.size,
                    return_ids=True, progress=progress)
    if args.command in ("text2image", "edit"):
        image_kw.update(llm_guidance=args.llm_guidance, top_k=args.top_k, top_p=args.top_p,
                        min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens)
    if args.command == "text2image":
        image, (ids, lengths) = model.text2image(args.prompt, **image_kw)
    elif args.command == "edit":
        image, (ids, lengths) = model.edit(args.image, args.prompt, **image_kw)
    else:
        image, (ids, lengths) = model.reconstruct(args.image, **image_kw)
    image.save(args.out)
    if args.ids_out:
        np.save(args.ids_out, np.asarray(ids)[:, : int(np.max(lengths))])
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}, {int(lengths[0])} visual tokens)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
