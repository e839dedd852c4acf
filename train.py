"""Training entry point for every stage: the visual tokenizer (stage 1), the LLM (stage 2), the detokenizer.

    python train.py --config configs/tiny.py [--config.train.steps=100] [--config.train.data_dir=DIR]
    python train.py --config configs/tiny.py:lm
    python train.py --config configs/lavit_7b.py:tokenizer --config.train.data_dir=/data/images \\
        --config.train.init_from=/ckpt/LaVIT-7B-v2-converted --config.mesh_shape='(-1,1,1)'

The stage is the part after ':' (tokenizer, lm, detokenizer; default tokenizer); the loop is
``lavit_jax/train/trainer.py``. Sharded with jit over a (data, fsdp, tensor) mesh. Orbax
checkpoints every train.save_every steps in train.workdir; rerunning the same command resumes from
the latest; SIGTERM saves and exits. JAX's persistent compilation cache is on, as for the CLI
(``LAVIT_COMPILATION_CACHE``, ``lavit_jax/compile_cache.py``), so a restarted run skips
compilation. Metrics go to WORKDIR/metrics.jsonl, TensorBoard event files in WORKDIR/tensorboard
and the console. Multi-host: set LAVIT_DISTRIBUTED=1 to call jax.distributed.initialize() (on TPU
pods and SLURM/Open MPI GPU clusters it finds its peers; elsewhere set LAVIT_COORDINATOR=host:port,
LAVIT_NUM_PROCESSES and LAVIT_PROCESS_ID).
Exit status: 0 done or preempted, 1 stopped by a non-finite loss, 2 bad config or input.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lavit_jax import compile_cache
from lavit_jax.train import trainer
from lavit_jax.train.trainer import NonFiniteError


def define_flags():
    """Command-line flags (defined only when run as a script, so train.py can be imported)."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (FILE.py or FILE.py:STAGE).")
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this run (for smoke runs).")


def flag_error_line(e: BaseException, argv) -> str:
    """One line for a command-line error (ml_collections reports unknown keys and bad config files verbosely)."""
    text = str(e).replace("\\n", "\n")
    m = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if m:
        good, bad = m.groups()
        flag = next((a.split("=", 1)[0] for a in argv if re.search(rf"\.{bad}(=|$)", a.split("=", 1)[0])), bad)
        return f"{flag}: unknown config key (did you mean {flag.rsplit('.', 1)[0]}.{good}?)"
    raised = re.findall(r"^\s*\w*(?:Error|Exception): (.+)$", text, re.M)
    if raised:
        return raised[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[:500] or type(e).__name__


def parse_flags(argv):
    """absl's flag parsing with one-line errors (exit status 2)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (flag/config parsing raises many kinds; all are usage errors)
        print(f"error: {flag_error_line(e, argv)}", file=sys.stderr)
        sys.exit(2)


def train(config, max_steps=None, **kwargs):
    """(final TrainState, logged metric records); see ``lavit_jax.train.trainer.train``."""
    return trainer.train(config, max_steps, **kwargs)


def initialize_distributed():
    """jax.distributed.initialize(): auto-detected on TPU pods and SLURM / Open MPI clusters; elsewhere from
    LAVIT_COORDINATOR (host:port), LAVIT_NUM_PROCESSES and LAVIT_PROCESS_ID. CPU processes talk through gloo."""
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("LAVIT_COORDINATOR"):
        jax.distributed.initialize(os.environ["LAVIT_COORDINATOR"], int(os.environ["LAVIT_NUM_PROCESSES"]),
                                   int(os.environ["LAVIT_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def main(argv):
    del argv
    if os.environ.get("LAVIT_DISTRIBUTED") == "1":
        initialize_distributed()
    compile_cache.enable()
    try:
        config = flags.FLAGS.config
        config.train  # noqa: B018 (a config file that failed to load raises on first use)
    except Exception as e:  # noqa: BLE001 (config_flags defers a config file's load errors to this access)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: --config: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    try:
        train(config, flags.FLAGS.max_steps)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
