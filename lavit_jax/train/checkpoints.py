"""Training checkpoints in ``train.workdir``: Orbax steps (async), keep-last-K, resume with corrupt-step fallback.

Each step directory holds ``state`` (the whole ``TrainState``: params, optimizer state, EMA, step,
RNG) and ``data`` (the Grain iterator state, JSON). Orbax writes a step into a temporary directory
and renames it when complete, so a killed run leaves no step that looks complete; stale temporary
directories are removed when the manager opens.

``WORKDIR/run.json`` records the stage and the parameter shapes of the first run; a later run with
another stage or model shapes is refused (naming ``train.workdir``) instead of being mistaken for a
corrupt checkpoint. A step that fails to restore is moved to ``WORKDIR/corrupt/STEP`` (nothing is
deleted) with a one-line warning, and the newest intact step is used.

The loop saves only finite states (the NaN guard runs first), so keep-last-K rotation never removes
the last finite checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

RUN_FILE = "run.json"
CORRUPT_DIR = "corrupt"
# Arrays smaller than this are written by one replica: replica-parallel writing slices each replicated array
# per device first, one small compilation per (shape, device), tens of seconds at the first save.
MIN_REPLICA_PARALLEL_BYTES = 64 << 20


def _state_handler():
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class _OrbaxFilter(logging.Filter):
    """Drops orbax's records below ERROR (it logs every save at INFO and slow saves as warnings through absl)."""

    def filter(self, record):
        return record.levelno >= logging.ERROR or "orbax" not in record.pathname


_FILTER = _OrbaxFilter()


def quiet_orbax(verbose: bool = False) -> None:
    """Silences orbax's INFO/WARNING logging (through absl) unless ``verbose``."""
    logger = logging.getLogger("absl")
    if verbose:
        logger.removeFilter(_FILTER)
    elif _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def shapes_signature(params) -> dict:
    """{'a/b/c': [shape...]} of a param tree (for run.json)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(np.shape(v)) for path, v in flat}


class Checkpoints:
    """Orbax CheckpointManager over ``workdir`` with the checks above."""

    def __init__(self, workdir: str, keep: int, stage: str, params_abstract, log=None):
        self.workdir = os.path.abspath(workdir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._check_run_file(stage, params_abstract)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.mgr = ocp.CheckpointManager(self.workdir, options=options, item_handlers={
            "state": _state_handler(), "data": ocp.JsonCheckpointHandler()})

    def _check_run_file(self, stage, params_abstract):
        path = os.path.join(self.workdir, RUN_FILE)
        sig = {"stage": stage, "params": shapes_signature(params_abstract)}
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    old = json.load(f)
                except ValueError:
                    old = None
            if old is not None and old.get("stage") != stage:
                raise ValueError(f"config train.workdir={self.workdir} holds a {old.get('stage')!r} run, not "
                                 f"{stage!r}: pick another workdir")
            if old is not None and old.get("params") != sig["params"]:
                before, now = old.get("params", {}), sig["params"]
                diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))[:3]
                raise ValueError(f"config train.workdir={self.workdir} holds checkpoints of other model shapes "
                                 f"(e.g. {', '.join(diff)}): pick another workdir")
            return
        os.makedirs(self.workdir, exist_ok=True)
        tmp = path + f".tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(sig, f)
        os.replace(tmp, path)

    def all_steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def restore(self, state_abstract):
        """(state, data state, step) of the newest intact step, or (None, None, None) if there is none."""
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                restored = self.mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(state_abstract,
                                                 restore_args=ocp.checkpoint_utils.construct_restore_args(
                                                     state_abstract)),
                    data=ocp.args.JsonRestore()))
                return restored["state"], restored["data"], int(step)
            except Exception as e:  # noqa: BLE001 (any failure to read a step means it is unusable)
                moved = self._move_aside(step)
                older = [s for s in self.mgr.all_steps() if s < step]
                nxt = f"falling back to step {max(older)}" if older else "no older step: starting from scratch"
                self.log(f"warning: checkpoint step {step} in {self.workdir} is corrupt ({_first_line(e)}); "
                         f"moved to {moved}; {nxt}")
        return None, None, None

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.workdir, str(step))
        dst_root = os.path.join(self.workdir, CORRUPT_DIR)
        os.makedirs(dst_root, exist_ok=True)
        dst = os.path.join(dst_root, str(step))
        if os.path.exists(dst):
            dst = f"{dst}.{int(time.time())}"
        if jax.process_index() == 0 and os.path.exists(src):
            shutil.move(src, dst)
        self.mgr.reload()
        return dst

    def save(self, step: int, state, data_state) -> None:
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=True)

    def latest_step(self):
        return self.mgr.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.mgr.reached_preemption(step)

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()
