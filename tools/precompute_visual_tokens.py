"""Precompute the visual ids of a stage-2 data source once, for ``train.visual_ids_from``.

    python tools/precompute_visual_tokens.py --config configs/tiny.py:lm --data synthetic:16
        --out out/tiny_visual_ids.array_record [--tokenizer_from CONVERTED_DIR] [--batch_size 8] [--overwrite]

Runs the frozen visual tokenizer (``--tokenizer_from``, default the config's ``train.tokenizer_from``;
none: the seeded random tokenizer stage 2 builds from the config, for tests) with argmax keep
decisions over every image of ``--data`` (a JSONL file of ``{"image": PATH, "text": STR}`` lines, a
folder of images or ``synthetic:N``; default the config's ``train.data_dir``) and writes one
ArrayRecord record per data record, in order (``lavit_jax/data/visual_records.py``): the image, the
text and the visual ids. The tokenizer computes in the config's ``train.compute_dtype``, as stage 2
does on the fly. The output is written to a temporary sibling and renamed into place when complete;
an existing output is refused without ``--overwrite``. Errors are one line ``error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lavit_jax.data import input_pipeline, visual_records  # noqa: E402
from lavit_jax.data.image_io import ImageInputError, preprocess  # noqa: E402
from lavit_jax.models.tokenizer import DynamicVisualTokenizer, to_llm_ids  # noqa: E402
from lavit_jax.train import lm  # noqa: E402

log = logging.getLogger("precompute_visual_tokens")


def load_config(spec: str):
    """``get_config(STAGE)`` of ``FILE.py[:STAGE]`` (default stage lm)."""
    path, _, stage = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: file not found: {path}")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("lavit_config", path))
    module.__spec__.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path} has no get_config()")
    return module.get_config(stage or "lm")


def data_records(spec: str) -> list[dict]:
    """[{image: path | synthetic index | None, text: str | None}] of a JSONL file, an image folder or synthetic:N."""
    if spec.startswith("synthetic:"):
        return [{"image": i, "text": None} for i in range(int(spec.split(":", 1)[1]))]
    if os.path.isdir(spec):
        return [{"image": p, "text": None} for p in input_pipeline.list_images(spec)]
    return input_pipeline.read_jsonl(spec)


def _pixels(image, size: int):
    """Preprocessed [S, S, 3] pixels of a record's image, or None if unreadable (logged)."""
    try:
        src = input_pipeline.synthetic_image(image) if isinstance(image, int) else image
        return preprocess(src, size)[0]
    except (ImageInputError, OSError, ValueError) as e:
        log.warning("unreadable image %s: %s (its record gets no visual ids)", image, e)
        return None


def precompute(config, data: str, out: str, *, batch_size: int = 32, overwrite: bool = False) -> int:
    """Writes the records of ``data`` to ``out`` (see the module docstring); returns how many."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} exists (pass --overwrite to replace it)")
    records = data_records(data)
    tok_config = lm.tokenizer_config(config)
    model = DynamicVisualTokenizer(tok_config)
    params = lm.tokenizer_params(config, model)
    size = tok_config.image_size

    @jax.jit
    def tokenize(p, x):
        codes, lengths = model.apply({"params": p}, x, mode="argmax", method="tokenize")
        return to_llm_ids(codes, lengths)

    def encoded():
        for start in range(0, len(records), batch_size):
            block = records[start:start + batch_size]
            pixels = [None if r["image"] is None else _pixels(r["image"], size) for r in block]
            x = np.zeros((batch_size, size, size, 3), np.float32)  # one compiled shape: the last block is padded
            for i, p in enumerate(pixels):
                if p is not None:
                    x[i] = p
            ids, lengths = jax.device_get(tokenize(params, x))
            for i, r in enumerate(block):
                vis = None if pixels[i] is None else ids[i, :lengths[i]]
                yield visual_records.encode_record(start + i, r["image"], r["text"], vis)

    return visual_records.write_records(out, encoded(), overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="FILE.py[:STAGE] (default stage lm): tokenizer and train.* keys")
    p.add_argument("--tokenizer_from", default=None, help="converted checkpoint (default: the config's "
                   "train.tokenizer_from; none: the seeded random tokenizer)")
    p.add_argument("--data", default=None, help="JSONL file, image folder or synthetic:N (default train.data_dir)")
    p.add_argument("--out", required=True, help="output FILE.array_record")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = load_config(args.config)
        if args.tokenizer_from is not None:
            config.train.tokenizer_from = args.tokenizer_from
        data = args.data or config.train.get("data_dir", "")
        if not data:
            raise ValueError("--data: no data (and the config has no train.data_dir)")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size={args.batch_size}: must be >= 1")
        n = precompute(config, data, args.out, batch_size=args.batch_size, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {n} records to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
