"""Video-LaVIT's motion condition encoder: motion latents -> the 3D UNet's motion context.

motion [B, T, gh, gw, 2] on the ``grid`` (16 x 16 in the release; the reference's [B, 2, T, gh, gw]
moved channels-last) -> features [B, T, gh*gw, out_dim] (row-major grid tokens per frame).

- ``in_proj`` 2 -> C, + ``pos_embed`` [1, gh*gw, C] (+ ``temp_pos`` [1, T, C] with ``add_temp_pos``);
- ``depth`` spatio-temporal blocks (the motion tokenizer's block: spatial attention over a frame's
  tokens, temporal attention over the frames at each position, MLP), under ``ops.scan.apply_layers``
  as ``blocks`` (stacked with ``scan_layers``, else ``blocks_0 ..``; ``MOTION_ENCODER_STACKS``);
- ``norm``, ``out_proj`` C -> out_dim.

``to_grid`` is the detokenizer's ``encode_motion`` resize: PyTorch bicubic (no antialias) of each
frame to the grid, in float32. Parameter names follow the released ``motion_encoder.*`` keys.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.motion_tokenizer import SpatioTemporalBlock
from lavit_jax.ops.layers import LayerNorm, dense
from lavit_jax.ops.resize import resize_bicubic
from lavit_jax.ops.scan import apply_layers

# (parent path, name) of the repeated blocks.
MOTION_ENCODER_STACKS = (((), "blocks"),)


def check_config(config) -> None:
    """Raises ValueError naming the field when the config cannot build the encoder."""
    if config.width % config.heads:
        raise ValueError(f"motion encoder config: width {config.width} is not a multiple of heads {config.heads}")
    if len(config.grid) != 2 or min(config.grid) < 1:
        raise ValueError(f"motion encoder config grid {tuple(config.grid)}: expected (h, w)")
    if config.depth < 1:
        raise ValueError(f"motion encoder config depth {config.depth}: expected at least 1 block")


def to_grid(motion, grid):
    """motion [B, T, h, w, C] -> [B, T, gh, gw, C]: PyTorch bicubic per frame, computed in float32."""
    x = jnp.moveaxis(motion.astype(jnp.float32), -1, 2)  # [B, T, C, h, w]
    x = resize_bicubic(x, tuple(grid))
    return jnp.moveaxis(x, 2, -1).astype(motion.dtype)


class MotionConditionEncoder(nn.Module):
    """motion [B, T, gh, gw, in_channels] on ``config.grid`` -> [B, T, gh*gw, out_dim]."""

    config: ml_collections.FrozenConfigDict

    @nn.compact
    def __call__(self, motion):
        cfg = self.config
        check_config(cfg)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        b, t, h, w, c_in = motion.shape
        if (h, w) != tuple(cfg.grid) or c_in != cfg.in_channels:
            raise ValueError(f"motion encoder input [B, T, H, W, C] = {tuple(motion.shape)}: config expects "
                             f"H, W = {tuple(cfg.grid)} and C = {cfg.in_channels} (resize with to_grid)")
        init = nn.initializers.truncated_normal(0.02)
        pos_embed = self.param("pos_embed", nn.with_logical_partitioning(init, (None, "pos", "embed")),
                               (1, h * w, cfg.width), param_dtype)
        x = dense(cfg.width, ("conv_in", "embed"), name="in_proj", **kw)(motion.astype(dtype))
        x = x.reshape(b, t, h * w, cfg.width) + pos_embed[:, None].astype(dtype)
        if cfg.add_temp_pos:
            if t != cfg.num_frames:
                raise ValueError(f"motion encoder input has {t} frames; temp_pos holds num_frames={cfg.num_frames}")
            temp_pos = self.param("temp_pos", nn.with_logical_partitioning(init, (None, "pos", "embed")),
                                  (1, t, cfg.width), param_dtype)
            x = x + temp_pos[:, :, None].astype(dtype)
        block_kwargs = dict(width=cfg.width, heads=cfg.heads, mlp_hidden=int(cfg.width * cfg.mlp_ratio),
                            eps=cfg.layernorm_eps, attention_impl=cfg.attention_impl, **kw)
        x, _ = apply_layers(SpatioTemporalBlock, cfg.depth, "blocks", x, scan=cfg.scan_layers, remat=cfg.remat,
                            block_kwargs=block_kwargs)
        x = LayerNorm(cfg.layernorm_eps, name="norm", **kw)(x)
        x = dense(cfg.out_dim, ("embed", "mlp"), name="out_proj", **kw)(x)
        return nn.with_logical_constraint(x, ("batch", None, "length", None))


def example_inputs(config, batch: int = 1, frames: int = 2):
    """Small example inputs for ``MotionConditionEncoder.init`` (only their shapes matter)."""
    gh, gw = config.grid
    return (jnp.zeros((batch, frames if not config.add_temp_pos else config.num_frames, gh, gw,
                       config.in_channels), jnp.float32),)
