"""Training entry point. Stage 1: the dynamic visual tokenizer (lavit_jax/tokenizer_training.py).

    python train.py --config configs/tiny.py [--config.train.steps=100] [--config.train.data_dir=DIR]
    python train.py --config configs/lavit_7b.py --config.train.data_dir=/data/images \\
        --config.train.init_from=/ckpt/LaVIT-7B-v2-converted --config.mesh_shape='(-1,1,1)'

Sharded with jit over a (data, fsdp, tensor) mesh: params by the logical-axis rules, the batch over
data+fsdp. Orbax checkpoints (params, optimizer, EMA codebook, RNG and the Grain iterator state) every
train.save_every steps in train.workdir; a restart resumes from the latest. Metrics are printed as
JSON lines. Multi-host: set LAVIT_DISTRIBUTED=1 to call jax.distributed.initialize().
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn
from flax.core import meta
from ml_collections import config_flags

from lavit_jax.ops import sharding
from lavit_jax.train import tokenizer as st


def define_flags():
    """Command-line flags (defined only when run as a script, so train.py can be imported)."""
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this run (for smoke runs).")


def load_init(config, params):
    """Overwrites the tokenizer part of ``params`` with a converted checkpoint (tools/convert_torch_weights.py)."""
    from lavit_jax import checkpoint

    src = config.train.init_from
    if not src:
        return params
    if not os.path.isfile(os.path.join(src, checkpoint.MANIFEST)):
        raise FileNotFoundError(f"config train.init_from={src!r} is not a converted checkpoint (no "
                                f"{checkpoint.MANIFEST}); convert the released weights with "
                                "tools/convert_torch_weights.py")
    loaded = checkpoint.load_visual_tokenizer(src, scan_layers=config.tokenizer.scan_layers).params
    params = dict(params)
    # vit_proj (the understanding projector) is not part of stage 1.
    loaded = {k: v for k, v in loaded.items() if k in params["tokenizer"]}
    params["tokenizer"] = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), loaded, params["tokenizer"])
    return params


def param_shardings(mesh, rules, abstract_boxed):
    """NamedShardings of the params from their logical axis names (optimizer state follows them)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)


def train(config, max_steps=None):
    import orbax.checkpoint as ocp

    from lavit_jax.data.input_pipeline import image_batches

    tc = config.train
    if tc.stage != "tokenizer":
        raise ValueError(f"config train.stage={tc.stage!r}: only 'tokenizer' (stage 1) is implemented")
    data = image_batches(tc.data_dir, config.tokenizer.image_size, tc.batch_size, tc.seed)
    it = iter(data)
    mesh = sharding.make_mesh(tuple(config.mesh_shape))
    rules = sharding.rules_from_config(config.logical_axis_rules)
    rng = jax.random.key(tc.seed)

    boxed = jax.eval_shape(lambda: st.init_params(config, rng))
    param_sh = param_shardings(mesh, rules, boxed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(lambda: meta.unbox(st.init_params(config, rng)), out_shardings=param_sh)()
    params = jax.device_put(load_init(config, params), param_sh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda p: st.init_state(config, rng, p))(params)

    workdir = os.path.abspath(tc.workdir)
    mgr = ocp.CheckpointManager(workdir, options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints))
    if mgr.latest_step() is not None:
        step = mgr.latest_step()
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            data=ocp.args.JsonRestore()))
        state = restored["state"]
        it.set_state(restored["data"])
        print(json.dumps({"resumed_from_step": int(step)}), flush=True)

    batch_sh = sharding.batch_sharding(mesh, 4, rules)
    step_fn = jax.jit(lambda s, x: st.train_step(config, s, x), donate_argnums=(0,))
    start = int(state.step)
    last = min(tc.steps, start + max_steps) if max_steps else tc.steps
    t0 = time.time()
    history = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start, last):
            pixels = jax.device_put(next(it), batch_sh)
            state, metrics = step_fn(state, pixels)
            done = step + 1
            if done % tc.log_every == 0 or done == last:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m.update(step=done, seconds=round(time.time() - t0, 2))
                history.append(m)
                print(json.dumps(m), flush=True)
            if done % tc.save_every == 0 or done == last:
                mgr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(it.get_state())))
    mgr.wait_until_finished()
    mgr.close()
    return state, history


def main(argv):
    del argv
    if os.environ.get("LAVIT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    train(flags.FLAGS.config, flags.FLAGS.max_steps)


if __name__ == "__main__":
    define_flags()
    app.run(main)
