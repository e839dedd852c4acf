"""What a training stage supplies to the one training loop (``lavit_jax/train/trainer.py``).

A stage is a ``Task``: its model and params init (and what is frozen), how a converted checkpoint
initialises it, its data, the per-step loss and the updates that are not gradient steps (EMA
codebook, EMA weights). The loop owns everything else: mesh, shardings, jit/donation, the
optimizer, gradient accumulation, checkpoints, logging, resume and the NaN guard.

``TrainState`` is the one state every stage trains: step, params (float32 master weights),
optimizer state, ``ema`` (the stage's EMA state, ``{}`` if none) and the base RNG key (raw uint32
key data; the step key is ``fold_in(key, step)``, so it needs no updating and resumes exactly).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.core import meta

from lavit_jax.data import input_pipeline
from lavit_jax.ops import sharding

# train.* keys every stage reads (the stages add their own in ``Task.train_keys``).
COMMON_TRAIN_KEYS = frozenset({
    "stage", "data_dir", "batch_size", "steps", "lr", "schedule", "warmup_steps", "min_lr_ratio", "weight_decay",
    "b1", "b2", "grad_clip", "grad_accum_steps", "compute_dtype", "init_from", "workdir", "save_every",
    "keep_checkpoints", "log_every", "seed", "data_workers", "tensorboard", "peak_tflops_per_device",
})

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")


@struct.dataclass
class TrainState:
    """step [] int32, params, opt_state, ema (stage EMA state), rng [2] uint32 (key data of the base key)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array


def learning_rate_schedule(tc: ml_collections.ConfigDict):
    """optax schedule from train.{schedule, lr, warmup_steps, steps, min_lr_ratio}: linear warmup, then decay."""
    kind = tc.get("schedule", "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"config train.schedule={kind!r}: expected one of {SCHEDULES}")
    warm = int(tc.warmup_steps)
    end = tc.lr * tc.get("min_lr_ratio", 0.0)
    decay_steps = max(int(tc.steps), warm + 1)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warm, decay_steps, end_value=end)
    warmup = optax.linear_schedule(0.0, tc.lr, max(warm, 1))
    if kind == "linear":
        after = optax.linear_schedule(tc.lr, end, decay_steps - warm)
    elif kind == "constant":
        after = optax.constant_schedule(tc.lr)
    else:  # rsqrt: lr * sqrt(warmup / step) after warmup
        after = lambda s: tc.lr * jnp.sqrt(max(warm, 1) / (s + max(warm, 1)))  # noqa: E731
    return optax.join_schedules([warmup, after], [warm]) if warm else after


def make_optimizer(tc: ml_collections.ConfigDict, labels):
    """AdamW with global-norm clipping on the 'train' leaves, nothing on the 'frozen' ones.

    labels: a tree (or a function of the params) of 'train' / 'frozen'. Weight decay skips 1-D
    params (norms, biases). Returns (optax transform, schedule).
    """
    schedule = learning_rate_schedule(tc)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule


def count_params(params, labels=None) -> dict:
    """{'train': n, 'frozen': n} parameter counts (all 'train' without labels)."""
    params = meta.unbox(params)
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
    if labels is None:
        return {"train": int(sum(sizes)), "frozen": 0}
    labs = jax.tree.leaves(labels)
    out = {"train": 0, "frozen": 0}
    for n, lab in zip(sizes, labs, strict=True):
        out[lab] += n
    return out


def global_batch(host: dict, mesh, rules):
    """Process-local numpy arrays [local_batch, ...] -> (global jax arrays sharded on the batch rule, shardings)."""
    shardings = {k: sharding.batch_sharding(mesh, np.ndim(v), rules) for k, v in host.items()}
    arrays = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in host.items()}
    return arrays, shardings


class Task:
    """Base class of a training stage. Subclasses set ``stage``, ``train_keys`` and override what they need.

    Arrays in a batch have the (global) batch as their leading axis; ``loss`` sees one (micro)batch.
    """

    stage = ""
    train_keys: frozenset = frozenset()
    host_only_keys: tuple = ()  # train.* keys read on the host only (runs differing in them share compilations)
    unit = "examples"  # throughput unit on the console: 'examples' (images) or 'tokens'

    def __init__(self, config: ml_collections.ConfigDict, mesh, rules):
        self.config = config
        self.tc = config.train
        self.mesh = mesh
        self.rules = rules

    # ----------------------------------------------------------------- host side
    def check(self) -> None:
        """Stage config checks, before any model init (raise ValueError naming the config field)."""

    def check_sources(self) -> None:
        """Checks the files the run reads besides its data (init_from, ...), after the data source opened."""

    def dataset(self, process_index: int, process_count: int, local_batch: int):
        """A Grain dataset: ``iter()`` of it yields host batches and has get_state()/set_state()."""
        raise NotImplementedError

    def prepare(self, host_batch) -> dict:
        """A host batch -> dict of numpy arrays [local_batch, ...] for the step (default: as is)."""
        return host_batch

    def host_metrics(self) -> dict:
        """Host-side counters merged into the logged metrics; default: the unreadable images skipped so far
        (``input_pipeline.skipped_images``), when there are any."""
        n = input_pipeline.skipped_images()
        return {"skipped_images": n} if n else {}

    def load_init(self, params):
        """Overlays a converted checkpoint (``train.init_from``) on freshly initialised params."""
        return params

    def before_step(self, state: TrainState, step: int, shardings) -> TrainState:
        """Host hook before step ``step`` runs (e.g. k-means codebook init); returns the (re-sharded) state."""
        return state

    def flops_per_step(self, batch_size: int, counts: dict) -> float:
        """Model FLOPs of one training step on ``batch_size`` examples (6N + attention), for MFU.

        counts: {'train': n, 'frozen': n} parameter counts (``count_params``)."""
        return 0.0

    def units_per_step(self, batch_size: int) -> int:
        return batch_size

    # ----------------------------------------------------------------- traced
    def init_params(self, rng):
        """Boxed (logically partitioned) params of the stage's model."""
        raise NotImplementedError

    def labels(self, params):
        """'train' / 'frozen' per leaf (default: everything trains)."""
        return jax.tree.map(lambda _: "train", params)

    def init_ema(self, params):
        """The stage's EMA state from the (unboxed) params; ``{}`` if none."""
        return {}

    def ema_shardings(self, ema_abstract, param_shardings, replicated):
        """Shardings of the EMA state: replicated unless it mirrors the params (EMA weights)."""
        if jax.tree.structure(ema_abstract) == jax.tree.structure(param_shardings):
            return param_shardings
        return jax.tree.map(lambda _: replicated, ema_abstract)

    def loss(self, params, ema, batch, rng, step):
        """-> (loss scalar, metrics dict of scalars, stats pytree passed to ``update``)."""
        raise NotImplementedError

    def combine_stats(self, a, b):
        """Combines the stats of two microbatches (gradient accumulation); default: sum."""
        return jax.tree.map(jnp.add, a, b)

    def update(self, params, ema, stats, rng, step):
        """After the optimizer step: -> (params, ema, extra metrics). Default: unchanged."""
        return params, ema, {}
