"""CLI latency on a tiny converted checkpoint: first vs second process, and compilations per bucket. Prints JSON.

    python bench/bench_latency.py [--workdir DIR] [--tasks caption vqa text2image reconstruct]

Builds a tiny released-layout checkpoint (the parity fixture's tokenizer, a random tiny LLaMA and
tiny SD-1.5/SDXL-style diffusers models), converts it, then for each CLI task times two separate
``python -m lavit_jax`` processes with the persistent compilation cache in a fresh directory (the
first fills it, the second reuses it) and one process with the cache off (the compile-everything
baseline). Finally, in one process, it counts XLA compilations while captioning 5 prompts of
different lengths (after a warm-up in the first bucket; each prompt's bucket is listed: a new bucket
compiles its programs once) and decoding with 3 step counts (all in one step bucket). The machine's load
average is reported with the times (a shared machine's times scale with it).
Compute on the tiny checkpoint takes milliseconds, so the times are start-up, loading and compilation.
Each process's CPU time (user + system) is reported next to its wall time: on a shared, loaded machine
the wall time stretches with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

TASKS = {
    "caption": lambda img, out: ["caption", img],
    "vqa": lambda img, out: ["vqa", img, "what colour is it?"],
    "text2image": lambda img, out: ["text2image", "a red square", "--out", out, "--steps", "3", "--size", "16",
                                    "--max-new-tokens", "16", "--min-new-tokens", "2"],
    "reconstruct": lambda img, out: ["reconstruct", img, "--out", out, "--steps", "3", "--size", "16"],
}


def build_checkpoint(workdir: str) -> str:
    from lavit_jax.convert.converter import convert
    from tests import tokenizer_fixture
    from tests.released_fixture import FIXTURE, build_released

    out = os.path.join(workdir, "converted")
    if not os.path.isfile(os.path.join(out, "lavit.json")):
        rel = build_released(os.path.join(workdir, "released"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            convert(str(rel.root), out, tokenizer_fixture.config_from_fixture(FIXTURE / "config.json"), "float32")
    return out


def run_cli(args, ckpt, cache_env):
    """(wall seconds, CPU seconds: user + system) of one CLI process."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", LAVIT_COMPILATION_CACHE=cache_env)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lavit_jax", *args, "--checkpoint", ckpt, "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return round(dt, 3), round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3)


def count_compilations(ckpt, img):
    from lavit_jax.inference.generation import length_bucket
    from lavit_jax.inference.lavit import LaVIT

    events = []
    listener = lambda name, *a, **k: events.append(name) if "backend_compile" in name else None  # noqa: E731
    model = LaVIT.from_pretrained(ckpt, compilation_cache=False)
    model.caption(img, prompt="a", max_new_tokens=4, min_new_tokens=1)  # warm up: compiles the bucket
    jax.monitoring.register_event_duration_secs_listener(listener)
    prompts = ["a", "a photo", "a photo of a", "a photo of a red thing on", "describe the picture in a few words"]
    _, _, tok = model.language_model
    per_prompt = []
    for p in prompts:
        before = len(events)
        model.caption(img, prompt=p, max_new_tokens=4, min_new_tokens=1)
        n = len(tok.encode(p))
        per_prompt.append({"prompt_tokens": n, "bucket": length_bucket(n), "compilations": len(events) - before})
    caption_compiles = len(events)
    ids, lengths = model.visual_tokenizer.tokenize(img)
    model.decode_ids(ids, lengths, steps=2, size=16)  # warm up
    events.clear()
    for steps in (3, 5, 7):
        model.decode_ids(ids, lengths, steps=steps, size=16)
    jax.monitoring.unregister_event_duration_listener(listener)
    return {"caption_prompts": per_prompt, "caption_compilations_after_warmup": caption_compiles,
            "decode_step_counts": [3, 5, 7], "decode_compilations_after_warmup": len(events)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = p.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="lavit_latency_")
    ckpt = build_checkpoint(workdir)
    img = os.path.join(workdir, "img.png")
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    results = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for task in args.tasks:
        cache = tempfile.mkdtemp(prefix="xla_cache_", dir=workdir)
        out = os.path.join(workdir, f"{task}.png")
        cli = TASKS[task](img, out)
        times = {}
        for run, cache_env in (("first_process", cache), ("second_process", cache), ("without_cache", "0")):
            times[f"{run}_s"], times[f"{run}_cpu_s"] = run_cli(cli, ckpt, cache_env)
            if os.path.exists(out):
                os.remove(out)
        results.append({"task": task, **times})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "CLI latency on the tiny converted checkpoint",
        "backend": jax.default_backend(), "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_1_5_15min": {"before": load_before,
                                                                "after": [round(x, 2) for x in os.getloadavg()]},
        "results": results, "compilations": count_compilations(ckpt, img),
    }, indent=1))


if __name__ == "__main__":
    main()
