"""Sharded, resumable prediction: the items are cut into shards of ``shard_size``; each finished shard is written
atomically to ``WORKDIR/predictions/shard-NNNNN.json`` ({"ids": [...], "predictions": [...]}); a rerun reads
the finished shards and predicts only the others. ``WORKDIR/run.json`` records what the predictions are of
(task, checkpoint, data, config, settings); a workdir of another run is refused, never mixed or overwritten.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from lavit_jax.fsutil import atomic_write_json

RUN_FILE = "run.json"


def shard_path(workdir: str, index: int) -> str:
    return os.path.join(workdir, "predictions", f"shard-{index:05d}.json")


def check_workdir(workdir: str, signature: dict) -> None:
    """Creates ``workdir`` with ``run.json`` = ``signature``, or checks an existing one records the same run."""
    path = os.path.join(workdir, RUN_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--workdir {workdir}: {RUN_FILE} is unreadable ({e}); pick another workdir") from None
        diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
        if diff:
            raise ValueError(f"--workdir {workdir} holds the predictions of another run (it differs in "
                             f"{', '.join(diff[:4])}): pick another workdir")
        return
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise FileExistsError(f"--workdir {workdir}: exists and is not an eval.py workdir (no {RUN_FILE})")
    os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
    atomic_write_json(path, signature)


def _finished(path: str, ids: list) -> list | None:
    """The predictions of a finished shard, or None (absent, or written for other items: then redone)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("ids") != ids or len(data.get("predictions", ())) != len(ids):
        return None
    return data["predictions"]


def run_shards(items: Sequence[dict], shard_size: int, workdir: str, predict: Callable[[list], list], *,
               max_shards: int | None = None, progress: bool | None = None, desc: str = "eval") -> list | None:
    """Predictions of every item (in item order), predicting the unfinished shards with ``predict(items)``.

    ``max_shards``: predict at most that many shards in this call, then return None if any are left (a rerun
    continues). ``progress``: a tqdm bar over items (default: when stderr is a terminal).
    """
    if shard_size < 1:
        raise ValueError(f"--shard_size {shard_size}: expected >= 1")
    n = math.ceil(len(items) / shard_size)
    bar = tqdm(total=len(items), desc=desc, unit="item",
               disable=not (sys.stderr.isatty() if progress is None else progress))
    out, done_now = [], 0
    try:
        for s in range(n):
            chunk = list(items[s * shard_size:(s + 1) * shard_size])
            ids = [it["id"] for it in chunk]
            path = shard_path(workdir, s)
            preds = _finished(path, ids)
            if preds is None:
                if max_shards is not None and done_now >= max_shards:
                    return None
                preds = list(predict(chunk))
                if len(preds) != len(chunk):
                    raise RuntimeError(f"shard {s}: {len(preds)} predictions for {len(chunk)} items")
                atomic_write_json(path, {"ids": ids, "predictions": preds})
                done_now += 1
            out.extend(preds)
            bar.update(len(chunk))
    finally:
        bar.close()
    return out
