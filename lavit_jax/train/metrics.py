"""Training metrics: ``metrics.jsonl`` (strict JSON), TensorBoard event files and console lines; MFU.

``MetricsWriter(workdir, total_steps)`` appends one JSON object per logged step to
``WORKDIR/metrics.jsonl`` (``step``, ``loss`` and every other scalar; NaN/Inf are written as
``null``), the same scalars to TensorBoard (``WORKDIR/tensorboard/``, tensorboardX) and one line
to the console: a progress bar (tqdm: steps, loss, steps/s, examples or tokens/s, MFU) when the
console is a terminal, one plain line per logged step otherwise (log files of pod jobs). Only
process 0 writes.

``mfu(flops_per_step, steps_per_s, n_devices, peak)``: model FLOPs utilisation from the 6N +
attention formula (``Task.flops_per_step``) against the devices' peak (``peak_flops_per_device``:
dense bf16 numbers by device kind, or ``train.peak_tflops_per_device``).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
from tqdm import tqdm

# Dense bf16 peak FLOP/s per chip by ``device.device_kind`` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H800": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override (in TFLOP/s) if set, else by device kind; None if unknown (CPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops
    return None


def mfu(flops_per_step: float, steps_per_s: float, n_devices: int, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak of ``n_devices`` (None when the peak is unknown)."""
    if not peak or not flops_per_step:
        return None
    return flops_per_step * steps_per_s / (peak * n_devices)


def finite_or_none(v):
    """float(v), or None for NaN / +-Inf (strict JSON)."""
    v = float(v)
    return v if math.isfinite(v) else None


class MetricsWriter:
    """metrics.jsonl + TensorBoard + console for one run (append mode: a resumed run continues the files)."""

    def __init__(self, workdir: str, total_steps: int, unit: str = "examples", tensorboard: bool = True,
                 stream=None):
        self.total = total_steps
        self.unit = unit
        self.stream = stream or sys.stdout
        self.active = jax.process_index() == 0
        self.tb = None
        self.file = None
        self.bar = None
        if not self.active:
            return
        if getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(total=total_steps, file=self.stream, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
        os.makedirs(workdir, exist_ok=True)
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            # Imported here, not at the top: tensorboardX imports torch whenever it is installed (dev setups),
            # and the training runtime must not pay for (or depend on) torch when TensorBoard is off.
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> dict:
        """Writes one record; returns it (floats, None for non-finite values)."""
        record = {"step": int(step)}
        record.update({k: finite_or_none(v) if v is not None else None for k, v in metrics.items()})
        if not self.active:
            return record
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.bar is not None:
            if self.bar.n == 0 and step > 1:
                self.bar.reset(total=self.total)  # a resumed run: the bar starts at the restored step
            self.bar.n = int(step)
            self.bar.set_postfix_str(self.console_line(record).split(" | ", 1)[-1], refresh=True)
        else:
            print(self.console_line(record), file=self.stream, flush=True)
        return record

    def console_line(self, r: dict) -> str:
        def fmt(v):
            return "nan" if v is None else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}")

        width = len(str(self.total))
        parts = [f"step {r['step']:>{width}}/{self.total}", f"loss {fmt(r.get('loss'))}"]
        if r.get("steps_per_s") is not None:
            parts.append(f"{r['steps_per_s']:.2f} steps/s")
        rate = r.get(f"{self.unit}_per_s")
        if rate is not None:
            parts.append(f"{rate:,.0f} {self.unit}/s")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        skip = {"step", "loss", "steps_per_s", f"{self.unit}_per_s", "mfu", "seconds", "finite"}
        parts += [f"{k} {fmt(v)}" for k, v in r.items() if k not in skip]
        return " | ".join(parts)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
