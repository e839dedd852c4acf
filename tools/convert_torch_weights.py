"""Convert a released LaVIT checkpoint directory (PyTorch) into a lavit-jax checkpoint (Orbax).

    python tools/convert_torch_weights.py --src RELEASED_DIR --out OUT_DIR [--dtype bf16|f32]
        [--config configs/lavit_7b.py] [--overwrite] [--verify]

Parts converted when present in --src (see DESIGN.md for the released layout):
  visual_tokenizer/        eva_vitg_psz14.bin, tokenizer_encoder.bin, tokenizer_decoder.bin,
                           highres_tokenizer_decoder.bin
  language_model/          config.json, pytorch_model-*.bin + index (or safetensors), tokenizer.model,
                           visual_weight.bin (stage-2 merger + projector, for understanding)
  pixel_decoding/          SD-1.5 unet/, vae/, scheduler/, uncond_embeddings.bin
  highres_pixel_decoding/  SDXL unet/, vae/, scheduler/
Parts absent from --src are listed and skipped; a part that is present must be complete.
Tensors are streamed (memory-mapped shards, one tensor cast at a time): the resident set stays near
the largest part's params in the target dtype (see lavit_jax/converters.py).
Weights are read with torch.load(weights_only=True) or safetensors: nothing in the files runs.
The source is only read. Output is written into a temporary sibling directory and renamed into
place when every part succeeded, so a failed run leaves no output that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lavit_jax import checkpoint  # noqa: E402

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("lavit_config", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def convert_visual_tokenizer(src: str, out: str, config, dtype: str, log) -> dict:
    """visual_tokenizer/ -> OUT/visual_tokenizer/{tokenizer,lowres_decoder,highres_decoder}."""
    from tqdm import tqdm

    from lavit_jax.models import tokenizer as T

    vt_src = os.path.join(src, "visual_tokenizer")
    vt_out = os.path.join(out, "visual_tokenizer")
    tcfg = config.tokenizer
    required = [T.VISUAL_TOKENIZER_FILES["encoder"], T.VISUAL_TOKENIZER_FILES["tokenizer"]]
    missing = [f for f in required if not os.path.isfile(os.path.join(vt_src, f))]
    if missing:
        raise FileNotFoundError(f"{vt_src}: missing {', '.join(missing)}")
    done = []
    steps = ["tokenizer", "lowres_decoder", "highres_decoder"]
    for name in tqdm(steps, desc="visual_tokenizer", unit="file", file=sys.stderr):
        if name == "tokenizer":
            tree = T.load_visual_tokenizer(vt_src, tcfg, dtype)
        else:
            path = os.path.join(vt_src, T.VISUAL_TOKENIZER_FILES[name])
            if not os.path.isfile(path):
                log(f"  visual_tokenizer: {os.path.basename(path)} absent, {name} not converted")
                continue
            tree = T.load_token_decoder(path, tcfg, name == "highres_decoder", dtype)
        checkpoint.save_tree(os.path.join(vt_out, name), tree)
        done.append(name)
        del tree
    return {"files": done, "config": tcfg.to_dict()}


def convert_language_model(src, out, config, dtype, log):
    from lavit_jax.convert import converter as converters

    return converters.convert_language_model(src, out, config, dtype, log)


def convert_pixel_decoding(src, out, config, dtype, log):
    from lavit_jax.convert import converter as converters

    return converters.convert_pixel_decoding(src, out, config, dtype, log)


def convert_highres_pixel_decoding(src, out, config, dtype, log):
    from lavit_jax.convert import converter as converters

    return converters.convert_highres_pixel_decoding(src, out, config, dtype, log)


PARTS = {
    "visual_tokenizer": convert_visual_tokenizer,
    "language_model": convert_language_model,
    "pixel_decoding": convert_pixel_decoding,
    "highres_pixel_decoding": convert_highres_pixel_decoding,
}


def convert(src: str, out: str, config, dtype: str = "bfloat16", overwrite: bool = False, log=print) -> dict:
    """Converts every part present in ``src``; returns the manifest written to OUT/lavit.json."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory not found: {src}")
    if os.path.abspath(out) == src or os.path.abspath(out).startswith(src + os.sep):
        raise ValueError(f"--out {out} must not be inside --src {src}: the source is never modified")
    present = [p for p in PARTS if os.path.isdir(os.path.join(src, p))]
    absent = [p for p in PARTS if p not in present]
    if not present:
        raise FileNotFoundError(f"{src}: none of the released parts found ({', '.join(PARTS)})")
    for p in absent:
        log(f"absent in source, not converted: {p}/")
    manifest = {"format": "lavit-jax/1", "dtype": dtype, "source": src, "parts": {}, "absent": absent}
    with checkpoint.atomic_output_dir(out, overwrite) as tmp:
        for part in present:
            t0 = time.time()
            manifest["parts"][part] = PARTS[part](src, tmp, config, dtype, log)
            log(f"converted {part}/ in {time.time() - t0:.1f}s")
        with open(os.path.join(tmp, checkpoint.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
    return manifest


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
        manifest = convert(args.src, args.out, load_config(args.config), DTYPES[args.dtype], args.overwrite)
        if args.verify:
            from tools import verify_conversion

            ok = verify_conversion.verify(args.src, args.out, manifest)
            if not ok:
                return 1
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(args.out)}: {', '.join(manifest['parts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
