"""Detokenizer stage: diffusion training of the tiny UNet on the frozen tokenizer + token decoder condition."""

import jax
import numpy as np

from lavit_jax.train import trainer
from tests.train_configs import small_config


def test_diffusion_loss_falls_with_ema_and_frozen_parts(tmp_path):
    c = small_config("detokenizer", tmp_path / "w", steps=30, batch_size=8, lr=2e-3, log_every=3,
                     data_dir="synthetic:8", cond_dropout=0.25, ema_decay=0.8)
    prog = trainer.program(c)
    init = jax.device_get(prog.init_state().params)
    state, hist = trainer.train(c)
    losses = [h["loss"] for h in hist]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    assert 0 < np.mean([h["cond_dropped"] for h in hist]) < 1  # some conditions dropped for guidance
    params = jax.device_get(state.params)
    for part in ("vae", "tokenizer", "uncond"):  # frozen
        for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(init[part]), strict=True):
            np.testing.assert_array_equal(a, b)
    for part in ("unet", "decoder"):  # trained, with EMA weights between the init and the final params
        p, e, i = (jax.tree.leaves(t[part]) for t in (params, jax.device_get(state.ema), init))
        assert any(not np.array_equal(x, y) for x, y in zip(p, i, strict=True))
        moved = [np.linalg.norm(x - y) for x, y in zip(e, i, strict=True)]
        gap = [np.linalg.norm(x - y) for x, y in zip(e, p, strict=True)]
        assert sum(moved) > 0 and sum(gap) > 0 and sum(gap) < sum(np.linalg.norm(x - y) for x, y in zip(p, i))
