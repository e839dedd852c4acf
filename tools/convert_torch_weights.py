"""Convert a released LaVIT checkpoint directory (PyTorch) into a lavit-jax checkpoint (Orbax).

    python tools/convert_torch_weights.py --src RELEASED_DIR --out OUT_DIR [--dtype bf16|f32]
        [--config configs/lavit_7b.py] [--overwrite] [--verify]

Parts converted when present in --src (the released layout):
  visual_tokenizer/        eva_vitg_psz14.bin, tokenizer_encoder.bin, tokenizer_decoder.bin,
                           highres_tokenizer_decoder.bin
  language_model/          config.json, pytorch_model-*.bin + index (or safetensors), tokenizer.model,
                           visual_weight.bin (stage-2 merger + projector, for understanding)
  pixel_decoding/          SD-1.5 unet/, vae/, scheduler/, uncond_embeddings.bin
  highres_pixel_decoding/  SDXL unet/, vae/, scheduler/
Parts absent from --src are listed and skipped; a part that is present must be complete.
Tensors are streamed (memory-mapped shards, one tensor cast at a time): the resident set stays near
the largest part's params in the target dtype (see lavit_jax/convert/converter.py).
Weights are read with torch.load(weights_only=True) or safetensors: nothing in the files runs.
Every part is checked (files present and whole, configs, tokenizer widths against --config) before
anything is written. The source is only read, and --out may neither contain it nor lie inside it.
Output is written into a temporary sibling directory and renamed into place when every part
succeeded, so a failed run leaves no output that looks complete; --overwrite replaces only an
existing lavit-jax checkpoint. What a killed run left behind is removed by the next run.
Progress goes to stderr (plain lines when stderr is not a terminal); errors are one line
``error: ...`` with exit status 2; --verify exits 1 when a part differs beyond tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lavit_jax.convert.converter import convert, load_config_file  # noqa: E402

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}
DEFAULT_DTYPE = "bf16"
DEFAULT_CONFIG = os.path.join(REPO, "configs", "lavit_7b.py")
# Messages transformers / diffusers print while --verify loads the PyTorch references. The files are
# read safely all the same: safetensors, or pickles with torch.load(weights_only=True) (diffusers
# says "unsafe serialization" when a folder has .bin weights only, then loads them with weights_only).
_REFERENCE_LOADER_NOISE = ("Defaulting to unsafe serialization", "An error occurred while trying to fetch",
                           "Cannot initialize model with low cpu memory usage")


class _DropNoise(logging.Filter):
    def filter(self, record):
        return not any(n in record.getMessage() for n in _REFERENCE_LOADER_NOISE)


@contextlib.contextmanager
def quiet_reference_loaders():
    """Silences the loaders' progress bars and the messages above while --verify reads the references."""
    import diffusers
    import transformers

    tlog = transformers.utils.logging
    handlers = diffusers.utils.logging.get_logger().handlers + tlog.get_logger().handlers  # the libraries' roots
    noise = _DropNoise()
    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    for h in handlers:
        h.addFilter(noise)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(noise)
        if bars:
            tlog.enable_progress_bar()


def one_line(message: str, width: int = 800) -> str:
    """An error message on one line: its lines joined, each clipped to ``width`` characters."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()] or ["unknown error"]
    return " ".join(ln if len(ln) <= width else ln[:width] + " ..." for ln in lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="released checkpoint directory (only read)")
    p.add_argument("--out", required=True, help="output directory (created atomically; must not contain --src)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=sorted(DTYPES),
                   help=f"stored parameter dtype (default: {DEFAULT_DTYPE}); the VAEs are always stored in float32")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config file giving the visual tokenizer's widths and head counts (default: "
                        "configs/lavit_7b.py, the release; configs/tiny.py for the test fixture)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing lavit-jax checkpoint at --out once conversion succeeded")
    p.add_argument("--verify", action="store_true", help="compare converted parts with their PyTorch references")
    args = p.parse_args(argv)
    try:
        config = load_config_file(args.config)
        name = os.path.relpath(args.config, REPO) if os.path.abspath(args.config).startswith(REPO + os.sep) \
            else args.config
        manifest = convert(args.src, args.out, config.tokenizer, DTYPES[args.dtype], args.overwrite,
                           config_name=name, video_config=config)
        if args.verify:
            from lavit_jax.convert import verify

            with quiet_reference_loaders():
                ok = verify.verify(args.src, args.out, manifest)
            if not ok:
                return 1
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.out)}: {', '.join(manifest['parts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
