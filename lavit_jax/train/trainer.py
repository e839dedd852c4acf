"""The one training loop for every stage (``tokenizer``, ``lm``, ``detokenizer``).

``train(config, max_steps=None)`` -> (final TrainState, logged metric records). The stage
(``config.train.stage``) supplies a ``Task`` (``lavit_jax/train/task.py``); the loop owns:

- checks before any model work, each a one-line error naming the config field: the stage name,
  unknown ``train.*`` / top-level keys, ``mesh_shape`` against the device count, ``train.batch_size``
  against the data-parallel size (data x fsdp), the process count and ``train.grad_accum_steps``;
- the ``(data, fsdp, tensor)`` mesh (all processes' devices); params, optimizer state and EMA
  sharded from the params' logical axis names; one ``jax.jit`` step with in/out shardings and the
  state donated; float32 master weights with the models computing in ``train.compute_dtype``;
  gradient accumulation over ``train.grad_accum_steps`` microbatches; global-norm clipping; optax
  schedules (``train.schedule``); remat policies by name in the model configs (``remat``);
- per-process data (each process decodes its block of every global batch, the same global batches
  for any process count; global arrays via ``jax.make_array_from_process_local_data``);
- Orbax checkpoints every ``train.save_every`` steps (and at the end), the last
  ``train.keep_checkpoints`` kept, holding the TrainState and the Grain iterator state; automatic
  resume from ``train.workdir`` (a corrupt newest step falls back to the newest intact one); SIGTERM
  saves the current step and returns;
- the NaN/Inf guard: a non-finite loss or gradient norm skips that update on device and stops the
  run with ``NonFiniteError`` naming the step; nothing is saved after the last finite step;
- ``metrics.jsonl``, TensorBoard and console lines (loss, steps/s, examples or tokens/s, MFU).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.core import meta
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lavit_jax.ops import sharding
from lavit_jax.train import checkpoints as ckpt_lib
from lavit_jax.train import metrics as metrics_lib
from lavit_jax.train.detokenizer import DetokenizerTask
from lavit_jax.train.lm import LMTask
from lavit_jax.train.task import COMMON_TRAIN_KEYS, TrainState, count_params, global_batch, make_optimizer
from lavit_jax.train.tokenizer import TokenizerTask

STAGES = {"tokenizer": TokenizerTask, "lm": LMTask, "detokenizer": DetokenizerTask}
TOP_LEVEL_KEYS = frozenset({"name", "tokenizer", "llm", "detokenizer", "mesh_shape", "logical_axis_rules",
                            "checkpoint", "train"})


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the run stopped (last finite checkpoint kept)."""


# ------------------------------------------------------------------------------------------ config checks


def _unknown_key_error(field: str, known) -> ValueError:
    parent, _, key = field.rpartition(".")
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    return ValueError(f"config {field}: unknown key{hint}")


def task_class(config):
    """The Task class of ``config.train.stage`` (ValueError naming the field for an unknown stage)."""
    stage = config.train.get("stage", "tokenizer")
    if stage not in STAGES:
        raise ValueError(f"config train.stage={stage!r}: expected one of {', '.join(STAGES)}")
    return STAGES[stage]


def check_keys(config, cls) -> None:
    for k in config.keys():
        if k not in TOP_LEVEL_KEYS:
            raise _unknown_key_error(k, TOP_LEVEL_KEYS)
    known = COMMON_TRAIN_KEYS | cls.train_keys
    for k in config.train.keys():
        if k not in known:
            raise _unknown_key_error(f"train.{k}", known)


def mesh_shape(shape, n_devices: int) -> tuple[int, int, int]:
    """config ``mesh_shape`` (data, fsdp, tensor; one -1 allowed) -> the concrete shape for ``n_devices``."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"config mesh_shape={shape!r}: expected 3 integers (data, fsdp, tensor)") from None
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config mesh_shape={shape}: expected 3 positive integers (data, fsdp, tensor), "
                         "at most one of them -1")
    rest = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if n_devices % rest:
            raise ValueError(f"config mesh_shape={shape}: {rest} devices per slice does not divide the "
                             f"{n_devices} devices")
        shape = tuple(n_devices // rest if s == -1 else s for s in shape)
    elif rest != n_devices:
        raise ValueError(f"config mesh_shape={shape} needs {rest} devices, but there are {n_devices}")
    return shape


def check_batch(tc, shape, process_count: int) -> None:
    dp = shape[0] * shape[1]
    b, accum = int(tc.batch_size), int(tc.get("grad_accum_steps", 1))
    if b < 1:
        raise ValueError(f"config train.batch_size={b}: must be >= 1")
    if accum < 1 or b % accum:
        raise ValueError(f"config train.grad_accum_steps={accum}: must be >= 1 and divide train.batch_size={b}")
    if (b // accum) % dp:
        what = f"train.batch_size={b}" if accum == 1 else f"train.batch_size / train.grad_accum_steps = {b // accum}"
        raise ValueError(f"config {what} is not divisible by the data-parallel size {dp} "
                         f"(mesh_shape data x fsdp = {shape[0]} x {shape[1]})")
    if b % process_count:
        raise ValueError(f"config train.batch_size={b} is not divisible by the {process_count} processes")
    for k in ("steps", "save_every", "log_every", "keep_checkpoints"):
        if int(tc[k]) < 1:
            raise ValueError(f"config train.{k}={tc[k]}: must be >= 1")


def build_mesh(shape, devices=None):
    """A (data, fsdp, tensor) mesh of Auto axes over ``devices`` (default: every process's devices)."""
    return jax.make_mesh(tuple(shape), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


# ------------------------------------------------------------------------------------------ the step


def _split_micro(x, k: int):
    """[B, ...] -> [k, B/k, ...], microbatch j = rows j, j+k, ... (each stays spread over the batch shards)."""
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def make_train_step(task, tx, schedule, accum: int, batch_spec):
    """The pure step: (state, batch) -> (state, metrics); see the module docstring."""

    def grads_of(params, ema, batch, rng, step):
        def f(p):
            loss, metrics, stats = task.loss(p, ema, batch, rng, step)
            return loss, (metrics, stats)

        (_, (metrics, stats)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, metrics, stats

    def step_fn(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss_key, update_key = jax.random.split(key)
        if accum == 1:
            grads, metrics, stats = grads_of(state.params, state.ema, batch, loss_key, state.step)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)
            micro = jax.lax.with_sharding_constraint(micro, jax.tree.map(lambda s: P(None, *s), batch_spec))

            def body(carry, xs):
                mb, i = xs
                g, m, s = grads_of(state.params, state.ema, mb, jax.random.fold_in(loss_key, i), state.step)
                if carry is None:
                    return (g, m, s), None
                cg, cm, cs = carry
                return (jax.tree.map(jnp.add, cg, g), jax.tree.map(jnp.add, cm, m), task.combine_stats(cs, s)), None

            first = jax.tree.map(lambda x: x[0], micro)
            carry, _ = body(None, (first, 0))
            carry, _ = jax.lax.scan(body, carry, (jax.tree.map(lambda x: x[1:], micro), jnp.arange(1, accum)))
            grads, metrics, stats = carry
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, ema, extra = task.update(params, state.ema, stats, update_key, state.step)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        skipped = state.replace(step=state.step + 1)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
        metrics = dict(metrics, **extra, grad_norm=grad_norm, lr=schedule(state.step),
                       finite=finite.astype(jnp.float32))
        return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return step_fn


# ------------------------------------------------------------------------------------------ the loop


class _Preemption:
    """SIGTERM sets a flag (checked after each step); the previous handler comes back on exit."""

    def __init__(self):
        self.flag = False
        self.old = None

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self.old = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _local(x):
    """A replicated (global) array's value on this host (works when other processes hold devices too)."""
    return np.asarray(x.addressable_data(0))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _fit(s: NamedSharding, a) -> NamedSharding:
    """``s`` with the mesh axes dropped from dimensions of ``a`` they do not divide (replicated there)."""
    spec = list(s.spec) + [None] * (len(a.shape) - len(s.spec))
    for i, axes in enumerate(spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if names and a.shape[i] % int(np.prod([s.mesh.shape[n] for n in names])):
            spec[i] = None
    return NamedSharding(s.mesh, P(*spec))


# train.* keys that change no traced computation (a run differing only in them reuses the compiled program);
# a stage adds its own (``Task.host_only_keys``). (init_from is not among these: the detokenizer stage takes its
# model configs from it.)
HOST_ONLY_TRAIN_KEYS = ("workdir", "log_every", "save_every", "keep_checkpoints", "tensorboard", "data_workers",
                        "peak_tflops_per_device")


def fingerprint(config, host_only=()) -> str:
    d = config.to_dict()
    d.pop("mesh_shape", None)  # the resolved shape is part of the program key
    skip = set(HOST_ONLY_TRAIN_KEYS) | set(host_only)
    d["train"] = {k: v for k, v in d["train"].items() if k not in skip}
    return json.dumps(d, sort_keys=True, default=str)


class Program:
    """The compiled parts of a run (task, mesh, optimizer, jitted init / create / step), cached per config.

    Runs in one process whose configs differ only in ``HOST_ONLY_TRAIN_KEYS`` and the stage's
    ``host_only_keys`` (a resumed run, tests) reuse the compiled functions instead of compiling them again.
    """

    def __init__(self, task, mesh, rules):
        self.task, self.mesh, self.rules = task, mesh, rules
        tc = task.tc
        rng = jax.random.key(tc.seed)
        self.repl = NamedSharding(mesh, P())
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: task.init_params(rng))
        params_abstract = meta.unbox(boxed)
        self.param_sh = jax.tree.map(_fit, sharding.logical_sharding(boxed, mesh, rules), params_abstract)
        self.labels = task.labels(params_abstract)
        self.counts = count_params(params_abstract, self.labels)
        self.tx, self.schedule = make_optimizer(tc, self.labels)

        def create(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
                              ema=task.init_ema(p), rng=jax.random.key_data(jax.random.fold_in(rng, 1)))

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract = jax.eval_shape(create, params_abstract)
        self.state_sh = TrainState(
            step=self.repl, params=self.param_sh, rng=self.repl,
            opt_state=optax.tree_map_params(
                self.tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, abstract.opt_state,
                self.param_sh, transform_non_params=lambda _: self.repl,
                is_leaf=lambda x: isinstance(x, optax.MaskedNode)),
            ema=task.ema_shardings(abstract.ema, self.param_sh, self.repl),
        )
        self.state_abstract = _abstract(abstract, self.state_sh)
        self._init = jax.jit(lambda: meta.unbox(task.init_params(rng)), out_shardings=self.param_sh)
        self._create = jax.jit(create, in_shardings=(self.param_sh,), out_shardings=self.state_sh)
        self._steps = {}

    def init_state(self) -> TrainState:
        """A fresh TrainState (random init, then ``train.init_from`` laid over it), placed by its shardings."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            params = self._init()
            params = jax.device_put(self.task.load_init(params), self.param_sh)
            return self._create(params)

    def step_fn(self, batch_sh: dict):
        key = tuple(sorted((k, str(v.spec)) for k, v in batch_sh.items()))
        if key not in self._steps:
            spec = {k: v.spec for k, v in batch_sh.items()}
            accum = int(self.task.tc.get("grad_accum_steps", 1))
            fn = make_train_step(self.task, self.tx, self.schedule, accum, spec)
            self._steps[key] = jax.jit(fn, in_shardings=(self.state_sh, batch_sh), out_shardings=(self.state_sh, None),
                                       donate_argnums=(0,))
        return self._steps[key]


_PROGRAMS: dict = {}
_MAX_PROGRAMS = 4


def program(config, *, devices=None) -> Program:
    """Checks the config (one-line errors naming the field, before any model work) and returns its Program."""
    cls = task_class(config)
    check_keys(config, cls)
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(config.mesh_shape, len(devices))
    check_batch(config.train, shape, jax.process_count())
    key = (fingerprint(config, cls.host_only_keys), tuple(d.id for d in devices), shape)
    prog = _PROGRAMS.get(key)
    if prog is not None:
        prog.task.config, prog.task.tc = config, config.train  # host-only keys may differ
        prog.task.check()
        return prog
    mesh = build_mesh(shape, devices)
    rules = sharding.rules_from_config(config.logical_axis_rules)
    task = cls(config, mesh, rules)
    task.check()
    prog = Program(task, mesh, rules)
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
        _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = prog
    return prog


def train(config, max_steps: int | None = None, *, devices=None, log=None):
    """Trains ``config.train.stage`` (see the module docstring). Returns (state, records of logged steps).

    ``max_steps``: stop after this many steps in this run (a checkpoint is saved there). ``devices``:
    the mesh's devices (default all; tests pass one device for the single-device reference).
    """
    ckpt_lib.quiet_orbax()  # Orbax's INFO/WARNING logging off for this run only
    try:
        return _train(config, max_steps, devices=devices, log=log)
    finally:
        ckpt_lib.quiet_orbax(verbose=True)


def _train(config, max_steps, *, devices, log):
    log = log or (lambda msg: print(msg, flush=True))
    prog = program(config, devices=devices)
    task, mesh, rules = prog.task, prog.mesh, prog.rules
    tc = task.tc
    pc, pi = jax.process_count(), jax.process_index()
    data = task.dataset(pi, pc, tc.batch_size // pc)  # a missing data source fails here, before model work
    task.check_sources()
    it = iter(data)

    counts = prog.counts
    workdir = os.path.abspath(tc.workdir)
    ckpt = ckpt_lib.Checkpoints(workdir, tc.keep_checkpoints, tc.stage, prog.state_abstract.params)
    state, data_state, restored_step = ckpt.restore(prog.state_abstract)
    if state is None:
        state = prog.init_state()
    else:
        it.set_state(data_state)
        log(f"resumed from step {restored_step} in {workdir}")
    start = int(_local(state.step))
    last = min(tc.steps, start + max_steps) if max_steps else tc.steps

    n_dev = mesh.devices.size
    flops = task.flops_per_step(tc.batch_size, counts)
    peak = metrics_lib.peak_flops_per_device(tc.get("peak_tflops_per_device", 0.0))
    writer = metrics_lib.MetricsWriter(workdir, tc.steps, task.unit, tensorboard=tc.get("tensorboard", True))
    if start == 0:
        log(f"stage {tc.stage}: {counts['train']:,} trained + {counts['frozen']:,} frozen params, mesh "
            f"{dict(mesh.shape)}, global batch {tc.batch_size}, {tc.steps} steps, workdir {workdir}")
    history, pending = [], []
    t0 = time.time()
    timer = {"t": t0, "step": start}
    last_saved = ckpt.latest_step()

    def process(entries):
        """Reads finished steps' metrics: NaN guard for each, a record for the logged ones."""
        nonlocal last_saved
        for done, m in entries:
            m = jax.tree.map(_local, m)
            finite = bool(m.pop("finite"))
            if finite and not (done % tc.log_every == 0 or done == last):
                continue
            now = time.time()
            rate = (done - timer["step"]) / max(now - timer["t"], 1e-9)
            timer.update(t=now, step=done)
            rec = dict(m, **task.host_metrics(), seconds=round(now - t0, 3), steps_per_s=rate)
            rec[f"{task.unit}_per_s"] = rate * task.units_per_step(tc.batch_size)
            rec["mfu"] = metrics_lib.mfu(flops, rate, n_dev, peak)
            history.append(writer.write(done, rec))
            if not finite:
                bad = ", ".join(f"{k}={m[k]}" for k in ("loss", "grad_norm") if not math.isfinite(float(m[k])))
                kept = (f"the last finite checkpoint (step {last_saved}) in {workdir} is kept" if last_saved
                        else f"no checkpoint was written to {workdir}")
                raise NonFiniteError(f"non-finite {bad} at step {done}: training stopped; {kept} and nothing "
                                     "after it was saved (lower train.lr or check the data)")

    try:
        with _Preemption() as pre, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start, last):
                state = task.before_step(state, step, prog.state_sh)
                batch, batch_sh = global_batch(task.prepare(next(it)), mesh, rules)
                state, m = prog.step_fn(batch_sh)(state, batch)
                done = step + 1
                pending.append((done, m))
                process(pending[:-1])  # one step behind: the device keeps working meanwhile
                del pending[:-1]
                stop = pre.flag or (pc > 1 and ckpt.reached_preemption(done))
                if done % tc.save_every == 0 or done == last or stop:
                    process(pending)
                    pending.clear()
                    ckpt.save(done, state, it.get_state())
                    last_saved = done
                if stop:
                    log(f"preempted (SIGTERM): saved step {done} in {workdir}; rerun the same command to resume")
                    break
            process(pending)
            pending.clear()
    finally:
        ckpt.close()
        writer.close()
    return state, history
