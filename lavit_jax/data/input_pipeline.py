"""Grain input pipelines for training: images (stage 1, detokenizer) and image/text examples (stage 2).

``image_batches(spec, image_size, batch_size, seed)``: a repeating, shuffled Grain dataset of
[batch_size, S, S, 3] float32 CLIP-normalised batches from an image folder (searched recursively)
or ``synthetic:N`` (N deterministic random-blob images). ``diffusion_batches`` adds the same images
at the VAE's resolution in [-1, 1] (the detokenizer stage).

``lm_examples(spec, image_size, seed, examples, ...)``: a repeating, shuffled Grain dataset whose
elements are lists of ``examples`` stage-2 examples, each a dict ``kind`` (0 image->text, 1
text->image, 2 text only), ``text`` (int32 text ids), ``pixels`` [S, S, 3] float32 (zeros for
text-only examples and kinds not in ``pixels_for``) and ``index`` (the position in the global
stream, for per-example random draws). Sources: ``synthetic:N`` (deterministic images and learnable
id patterns) or a JSONL file (``{"image": PATH, "text": STR}`` per line, image optional, paths
relative to the file; text ids from ``text_tokenizer``). With ``visual_ids`` (precomputed records,
``data/visual_records.py``, record k for source record k) each example also has ``visual_ids``
(int32 LLM ids; empty for text-only examples).

Every iterator has ``get_state()/set_state()`` (saved with the training checkpoint), shuffling is
deterministic (``seed``), each process reads its own shard (``process_index`` of ``process_count``,
default ``jax.process_index()`` / ``jax.process_count()``), and ``workers > 0`` decodes in that many
worker processes with prefetch. A corrupt or unreadable image is logged with its path, counted
(``skipped_images()``, in this process) and skipped; it never stops the run.
"""

from __future__ import annotations

import json
import logging
import os

import grain
import jax
import numpy as np
from PIL import Image

from lavit_jax.data import visual_records
from lavit_jax.data.image_io import ImageInputError, load_image, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
KIND_IMAGE_TO_TEXT, KIND_TEXT_TO_IMAGE, KIND_TEXT = 0, 1, 2
_SKIPPED = {"count": 0}
log = logging.getLogger(__name__)


def skipped_images() -> int:
    """Images skipped as unreadable so far in this process (decoding in worker processes is not counted)."""
    return _SKIPPED["count"]


def list_images(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config train.data_dir: image folder not found: {data_dir}")
    files = sorted(
        os.path.join(root, f) for root, _, names in os.walk(data_dir) for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise FileNotFoundError(f"config train.data_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in {data_dir}")
    return files


def synthetic_image(index: int, size: int = 64) -> np.ndarray:
    """A deterministic random-blob image [size, size, 3] uint8 for smoke runs."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3), np.float32)
    for _ in range(4):
        cx, cy, r = rng.random(3) * [1, 1, 0.4] + [0, 0, 0.1]
        img += rng.random(3) * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _load_pixels(item, image_size: int):
    """Preprocessed [S, S, 3] float32 of a synthetic index or an image path; None (logged, counted) if unreadable."""
    try:
        return preprocess(synthetic_image(item) if isinstance(item, int | np.integer) else str(item), image_size)[0]
    except (ImageInputError, OSError, ValueError) as e:
        _SKIPPED["count"] += 1
        log.warning("skipping unreadable image %s: %s", item, e)
        return None


def _process(process_index, process_count) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _load_block(items, load):
    """Decodes a block of items; an unreadable one is replaced by the next readable one of the block."""
    out = [load(x) for x in items]
    n = len(out)
    if all(o is None for o in out):
        raise ValueError(f"config train.data_dir: none of the {n} images of a batch block is readable "
                         f"(e.g. {items[0]}); see the warnings above")
    return [o if o is not None else next(out[(i + j) % n] for j in range(1, n) if out[(i + j) % n] is not None)
            for i, o in enumerate(out)]


def _stack(examples):
    if isinstance(examples[0], dict):
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return np.stack(examples)


def sharded_batches(source: list, load, local_batch: int, seed: int = 0, *, process_index=None, process_count=None,
                    workers: int = 0, collate=_stack, what: str = "images", field: str = "train.batch_size",
                    indexed: bool = False):
    """This process's part of a global batch stream, as a Grain dataset of ``collate``d blocks.

    The stream is ``source`` shuffled (``seed``) and repeated; global batch g is its elements
    [g B, (g+1) B) with B = local_batch x process_count, and process p decodes and yields block
    [p b, (p+1) b) of each (b = local_batch). So the global batches do not depend on the number of
    processes. ``load(item)`` returns an example or None for an unreadable item (replaced by the next
    readable one of its block); with ``indexed`` it gets (position in the stream, item).
    """
    pi, pc = _process(process_index, process_count)
    if len(source) < local_batch * pc:
        raise ValueError(f"config train.data_dir: {len(source)} {what}, fewer than {field}={local_batch * pc}")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if indexed:
        ds = ds.map_with_index(lambda i, item: (i, item))
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=list)
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.map(lambda items: collate(_load_block(items, load)))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=8))
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


def _image_source(spec: str) -> list:
    if spec.startswith("synthetic:"):
        return list(range(int(spec.split(":", 1)[1])))
    return list_images(spec)


def image_batches(spec: str, image_size: int, batch_size: int, seed: int = 0, *, process_index=None,
                  process_count=None, workers: int = 0):
    """A repeating, shuffled Grain dataset of [batch_size, S, S, 3] float32 batches (batch_size per process)."""
    return sharded_batches(_image_source(spec), lambda item: _load_pixels(item, image_size), batch_size, seed,
                           process_index=process_index, process_count=process_count, workers=workers)


def _diffusion_example(item, tokenizer_size: int, resolution: int):
    """{'pixels': CLIP-normalised [S, S, 3], 'images': [-1, 1] [R, R, 3]} of one image; None if unreadable."""
    try:
        img = load_image(synthetic_image(item) if isinstance(item, int | np.integer) else str(item))
    except (ImageInputError, OSError, ValueError) as e:
        _SKIPPED["count"] += 1
        log.warning("skipping unreadable image %s: %s", item, e)
        return None
    pixels = preprocess(img, tokenizer_size)[0]
    images = np.asarray(img.resize((resolution, resolution), Image.BICUBIC), np.float32) / 127.5 - 1.0
    return {"pixels": pixels, "images": images}


def diffusion_batches(spec: str, tokenizer_size: int, resolution: int, batch_size: int, seed: int = 0, *,
                      process_index=None, process_count=None, workers: int = 0):
    """Batches {'pixels' [B, S, S, 3] (tokenizer input), 'images' [B, R, R, 3] in [-1, 1] (VAE input)}."""
    return sharded_batches(_image_source(spec), lambda item: _diffusion_example(item, tokenizer_size, resolution),
                           batch_size, seed, process_index=process_index, process_count=process_count,
                           workers=workers)


# ------------------------------------------------------------------------------------------ stage 2


def synthetic_text(index: int, text_vocab: int = 256, first_id: int = 3) -> np.ndarray:
    """Deterministic learnable text ids for example ``index``: an arithmetic progression mod ``text_vocab``."""
    rng = np.random.default_rng(10_000 + index)
    n = int(rng.integers(8, 25))
    start, step = int(rng.integers(0, text_vocab)), int(rng.integers(1, 4))
    return (first_id + (start + step * np.arange(n)) % text_vocab).astype(np.int32)


def read_jsonl(path: str) -> list[dict]:
    """Records {image: abs path or None, text: str} of a JSONL file (one-line errors naming the file and line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config train.data_dir: JSONL file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"config train.data_dir: {path} line {n} is not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"config train.data_dir: {path} line {n} has no \"text\" string")
            image = rec.get("image")
            out.append({"image": os.path.join(root, image) if image else None, "text": rec["text"]})
    if not out:
        raise ValueError(f"config train.data_dir: {path} has no records")
    return out


def lm_examples(spec: str, image_size: int, seed: int, examples: int, *, mix=(0.4, 0.4, 0.2), text_tokenizer=None,
                max_text_tokens: int = 512, process_index=None, process_count=None, workers: int = 0,
                visual_ids=None, visual_ids_name: str = "", pixels_for=(KIND_IMAGE_TO_TEXT, KIND_TEXT_TO_IMAGE)):
    """Lists of ``examples`` stage-2 examples (see the module docstring); kinds drawn with probabilities ``mix``.

    visual_ids: a random-access source of precomputed records aligned with the data (its name
    ``visual_ids_name`` in errors); pixels_for: the kinds whose images are decoded.
    """
    mix = np.asarray(mix, np.float64)
    if mix.shape != (3,) or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"config train.mix={tuple(mix)}: expected 3 non-negative fractions "
                         "(image->text, text->image, text only)")
    cum = np.cumsum(mix / mix.sum())
    if spec.startswith("synthetic:"):
        records = list(range(int(spec.split(":", 1)[1])))
    else:
        if text_tokenizer is None:
            raise ValueError("config train.text_tokenizer: a JSONL source needs the text tokenizer "
                             "(a converted checkpoint directory)")
        records = [dict(r, index=k) for k, r in enumerate(read_jsonl(spec))]
    field = f"config train.visual_ids_from={visual_ids_name!r}"
    if visual_ids is not None and len(visual_ids) != len(records):
        raise ValueError(f"{field} has {len(visual_ids)} records, train.data_dir={spec!r} has {len(records)} "
                         "(precompute it from the same data)")
    pixels_for = tuple(pixels_for)

    def load(i_rec):
        i, rec = i_rec
        u = np.random.default_rng([seed, i]).random()
        if isinstance(rec, int):
            text, image, k = synthetic_text(rec), rec, rec
        else:
            text = np.asarray(text_tokenizer.encode(rec["text"])[:max_text_tokens], np.int32)
            image, k = rec["image"], rec["index"]
        if len(text) == 0:
            log.warning("skipping a record with empty text (image %s)", image)
            return None
        kind = min(int(np.searchsorted(cum, u, side="right")), KIND_TEXT) if image is not None else KIND_TEXT
        out = {"kind": kind, "text": text, "index": i}
        if visual_ids is not None:
            vis = visual_records.decode_record(visual_ids[k])
            if vis.get("image") != image:
                raise ValueError(f"{field}: record {k} is for image {vis.get('image')!r}, train.data_dir record "
                                 f"{k} is {image!r} (precompute it from the same data)")
            if kind != KIND_TEXT and vis["visual_ids"] is None:
                log.warning("skipping image %s: it has no precomputed visual ids (unreadable when precomputed)",
                            image)
                return None
            out["visual_ids"] = vis["visual_ids"] if kind != KIND_TEXT else np.zeros((0,), np.int32)
        if kind == KIND_TEXT or kind not in pixels_for:
            out["pixels"] = np.zeros((image_size, image_size, 3), np.float32)
        else:
            out["pixels"] = _load_pixels(image, image_size)
            if out["pixels"] is None:
                return None
        return out

    # The kind is drawn per position in the global stream: independent of the process count.
    return sharded_batches(records, load, examples, seed, process_index=process_index, process_count=process_count,
                           workers=workers, collate=list, what="examples", field="train.examples_per_batch",
                           indexed=True)
