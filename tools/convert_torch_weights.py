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
The source is only read. Output is written into a temporary sibling directory and renamed into
place when every part succeeded, so a failed run leaves no output that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lavit_jax.convert.converter import convert  # noqa: E402

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}


def load_config(path: str):
    """``get_config()`` of a config file (``configs/*.py``)."""
    spec = importlib.util.spec_from_file_location("lavit_config", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="released checkpoint directory (read only)")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="stored parameter dtype")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "lavit_7b.py"),
                   help="config file giving the tokenizer widths (configs/lavit_7b.py for the release)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once conversion succeeded")
    p.add_argument("--verify", action="store_true", help="compare converted parts with their PyTorch references")
    args = p.parse_args(argv)
    try:
        manifest = convert(args.src, args.out, load_config(args.config).tokenizer, DTYPES[args.dtype], args.overwrite)
        if args.verify:
            from lavit_jax.convert import verify

            ok = verify.verify(args.src, args.out, manifest)
            if not ok:
                return 1
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.out)}: {', '.join(manifest['parts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
