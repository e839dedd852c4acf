"""Packing variable-length token sequences into fixed [N, L] rows (numpy, host side).

A sequence ``s`` of n tokens becomes n - 1 next-token pairs: inputs ``s[:-1]``, targets ``s[1:]``,
so it takes n - 1 slots of a row. Sequences are placed greedily, first fit, in the order given: each
goes into the lowest-numbered row with room for it, else a new row. Per row:

- ``tokens``, ``targets``: int32 ids (``pad_id`` in the padding),
- ``loss_weights``: float32, the weight of each target token (1 by default, 0 in the padding),
- ``segment_ids``: int32, 1, 2, ... for the sequences of the row in placement order, 0 for padding
  (the ``q_segment_ids`` / ``kv_segment_ids`` of ``lavit_jax.ops.attention.dot_product_attention``),
- ``positions``: int32, 0, 1, ... restarting at every segment (0 in the padding).

``items`` / ``max_items`` optionally cap what a row holds besides its slots (e.g. the images whose pixels
travel with their row): sequence i counts ``items[i]`` and a row takes at most ``max_items`` in all.

Sequences longer than ``L + 1`` tokens are truncated to their first ``L + 1`` tokens (``truncate=True``,
the default) or rejected with a ValueError naming the sequence (``truncate=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACKED_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


def _as_ids(seq, i: int) -> np.ndarray:
    a = np.asarray(seq)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"sequences[{i}]: expected a 1-D array of integer token ids, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def pack_sequences(
    sequences: Sequence,
    length: int,
    *,
    loss_weights: Sequence | None = None,
    num_rows: int | None = None,
    pad_id: int = 0,
    truncate: bool = True,
    items: Sequence[int] | None = None,
    max_items: int | None = None,
) -> dict[str, np.ndarray]:
    """sequences: 1-D int token arrays (n >= 2 tokens each) -> dict of [N, length] arrays (``PACKED_KEYS``).

    loss_weights: optional per-token weights, one array per sequence with its length; a target
    ``s[j]`` gets weight ``loss_weights[i][j]``. num_rows: pad the result with empty rows to exactly
    this many (ValueError if the sequences need more); by default N is the number of rows used.
    items, max_items: per-sequence counts and the most a row holds (first fit also skips rows without room).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if loss_weights is not None and len(loss_weights) != len(sequences):
        raise ValueError(f"loss_weights: {len(loss_weights)} arrays for {len(sequences)} sequences")
    counts = [0] * len(sequences) if items is None else [int(c) for c in items]
    if len(counts) != len(sequences):
        raise ValueError(f"items: {len(counts)} counts for {len(sequences)} sequences")
    cap = float("inf") if max_items is None else int(max_items)
    if any(c > cap for c in counts):
        raise ValueError(f"items: a sequence counts {max(counts)}, more than max_items={cap}")
    pieces = []  # (tokens [n], weights [n]) after truncation
    for i, seq in enumerate(sequences):
        ids = _as_ids(seq, i)
        w = np.ones(len(ids), np.float32) if loss_weights is None else np.asarray(loss_weights[i], np.float32)
        if w.shape != ids.shape:
            raise ValueError(f"loss_weights[{i}] has shape {w.shape}, sequences[{i}] has {ids.shape}")
        if len(ids) < 2:
            raise ValueError(f"sequences[{i}] has {len(ids)} token(s); need at least 2 (an input and a target)")
        if len(ids) > length + 1:
            if not truncate:
                raise ValueError(
                    f"sequences[{i}] has {len(ids)} tokens, more than length + 1 = {length + 1} (truncate=False)"
                )
            ids, w = ids[: length + 1], w[: length + 1]
        pieces.append((ids, w))

    # Greedy first fit: the lowest-numbered row with enough free slots.
    free: list[int] = []
    held: list[int] = []  # items per row
    rows: list[list[int]] = []  # indices into pieces, in placement order
    for p, (ids, _) in enumerate(pieces):
        need, c = len(ids) - 1, counts[p]
        r = next((r for r, f in enumerate(free) if f >= need and held[r] + c <= cap), None)
        if r is None:
            r = len(free)
            free.append(length)
            held.append(0)
            rows.append([])
        free[r] -= need
        held[r] += c
        rows[r].append(p)

    n = len(rows) if num_rows is None else num_rows
    if len(rows) > n:
        raise ValueError(f"num_rows={num_rows}: the sequences need {len(rows)} rows of length {length}")
    out = {
        "tokens": np.full((n, length), pad_id, np.int32),
        "targets": np.full((n, length), pad_id, np.int32),
        "loss_weights": np.zeros((n, length), np.float32),
        "segment_ids": np.zeros((n, length), np.int32),
        "positions": np.zeros((n, length), np.int32),
    }
    for r, members in enumerate(rows):
        at = 0
        for seg, p in enumerate(members, start=1):
            ids, w = pieces[p]
            k = len(ids) - 1
            sl = slice(at, at + k)
            out["tokens"][r, sl] = ids[:-1]
            out["targets"][r, sl] = ids[1:]
            out["loss_weights"][r, sl] = w[1:]
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(k)
            at += k
    return out
