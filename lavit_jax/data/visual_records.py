"""Precomputed visual ids: one ArrayRecord file, record k for record k of a stage-2 data source.

``tools/precompute_visual_tokens.py`` writes it (the frozen tokenizer, argmax keep decisions);
stage 2 reads it with ``train.visual_ids_from``. Each record is UTF-8 JSON::

    {"index": k, "image": PATH | N (synthetic) | null, "text": STR | null, "visual_ids": [id, ...] | null}

``visual_ids`` are LLM ids (code + ``vocab.VISUAL_OFFSET``), null where the record has no image or
its image could not be read. ``image`` is what the data source names (the absolute path a JSONL
line resolves to, or the synthetic index): the reader checks it against the data it is paired with.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from lavit_jax.data import array_records


def encode_record(index: int, image, text, visual_ids) -> bytes:
    """One record (see the module docstring); visual_ids: int ids or None."""
    ids = None if visual_ids is None else [int(i) for i in np.asarray(visual_ids).reshape(-1)]
    image = int(image) if isinstance(image, int | np.integer) else image
    return json.dumps({"index": int(index), "image": image, "text": text, "visual_ids": ids}).encode()


def decode_record(raw: bytes) -> dict:
    """A record -> dict with ``visual_ids`` as an int32 array (None if absent)."""
    rec = json.loads(raw.decode())
    if rec.get("visual_ids") is not None:
        rec["visual_ids"] = np.asarray(rec["visual_ids"], np.int32)
    return rec


def open_records(path: str, field: str = "train.visual_ids_from"):
    """A random-access source (``grain.sources.ArrayRecordDataSource``) of the records of ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {field}={path!r}: file not found (write it with "
                                "tools/precompute_visual_tokens.py)")
    try:
        return grain.sources.ArrayRecordDataSource(path)
    except Exception as e:  # noqa: BLE001 (array_record raises RuntimeError/ValueError for a bad file)
        raise ValueError(f"config {field}={path!r}: not an ArrayRecord file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def write_records(path: str, records, overwrite: bool = False) -> int:
    """Writes ``records`` (bytes) to ``path`` atomically (``array_records.write_atomic``); refuses an existing
    ``path`` unless ``overwrite``. Returns the number of records."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output exists: {path} (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return array_records.write_atomic(path, records)
