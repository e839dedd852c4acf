"""Video-LaVIT's motion VQ tokenizer: motion [B, 24, 20, 36, 2] -> 3 x 5 x 9 = 135 codes per clip.

Layout is channels-last throughout: motion [B, T, H, W, 2] (the reference's [B, 2, T, H, W]
moved), features [B, t, h, w, C], codes [B, t*h*w] in (t, h, w) order.

- Encoder: ``in_proj`` 2 -> C, + ``pos_embed`` [1, H*W, C] (row-major grid) + ``temp_pos``
  [1, T, C]; 4 stages of ``blocks_per_stage`` spatio-temporal blocks, each stage followed by a
  Conv3d k3 (stride ``down_strides[i]``) after explicit zero padding ``down_pads[i]``; ``norm``.
- Block: x += spatial_attention(norm0(x)) over each frame's tokens; x += temporal_attention(
  norm1(x)) over the frames at each position; x += mlp(norm2(x)). Attention is BEiT-style (fused
  qkv without bias, separate q_bias / v_bias).
- ``encode_task_layer`` C -> C -> tanh -> code_dim in float32, then the l2-normalised codebook.
- Decoder: ``in_proj`` code_dim -> C; per stage nearest upsample by ``up_factors[i]`` (float32),
  Conv3d k3 pad 1, blocks; ``norm``; ``decode_task_layer`` C -> C -> tanh -> 2.
- ``reconstruct`` / ``reconstruct_from_token``: decode, PyTorch bicubic per frame to (height,
  width), / ``motion_scale`` (the detokenizer's motion latents).

Submodule and parameter names follow the released ``motion_tokenizer.bin`` except the blocks: the
``blocks_per_stage`` blocks of stage ``s`` go through ``ops.scan.apply_layers`` as ``stage{s}_blocks``
(stacked on a leading ``layers`` axis with ``scan_layers``, else ``stage{s}_blocks_0 ..``), so the
released ``encoder.blocks.N`` is ``encoder/stage{N // blocks_per_stage}_blocks_{N % blocks_per_stage}``
unscanned. ``MOTION_TOKENIZER_STACKS`` lists the stacks for ``ops.scan.relayout``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.models.codebook import Codebook
from lavit_jax.models.eva_vit import EvaAttention
from lavit_jax.ops.layers import LayerNorm, Mlp, dense
from lavit_jax.ops.resize import resize_bicubic, upsample_nearest
from lavit_jax.ops.scan import apply_layers

NUM_STAGES = 4
_CONV_AXES = (None, "conv_h", "conv_w", "conv_in", "conv_out")


def _conv_out(n: int, pad: Sequence[int], stride: int, kernel: int = 3) -> int:
    return (n + pad[0] + pad[1] - kernel) // stride + 1


def token_grid(config) -> tuple[int, int, int]:
    """(t, h, w) of the code grid the encoder produces from the configured input."""
    t, h, w = config.input_frames, config.input_height, config.input_width
    for stride, pad in zip(config.down_strides, config.down_pads):
        t, h, w = (_conv_out(n, p, s) for n, p, s in zip((t, h, w), pad, stride))
    return t, h, w


def num_tokens(config) -> int:
    t, h, w = token_grid(config)
    return t * h * w


def check_config(config) -> None:
    """Raises ValueError naming the field when the config's geometry does not close up."""
    for field in ("down_strides", "down_pads", "up_factors"):
        if len(getattr(config, field)) != NUM_STAGES:
            raise ValueError(f"motion tokenizer config {field}: expected {NUM_STAGES} stages, "
                             f"got {len(getattr(config, field))}")
    if config.width % config.heads:
        raise ValueError(f"motion tokenizer config: width {config.width} is not a multiple of heads {config.heads}")
    grid = token_grid(config)
    for f in config.up_factors:
        grid = tuple(n * k for n, k in zip(grid, f))
    size = (config.input_frames, config.input_height, config.input_width)
    if grid != size:
        raise ValueError(f"motion tokenizer config up_factors: decoder output {grid} != input {size}")


class SpatioTemporalBlock(nn.Module):
    """x [B, T, S, C] -> ([B, T, S, C], None): spatial attention per frame, temporal per position, MLP.

    (The ``(x, None)`` return is the ``ops.scan`` block contract.)"""

    width: int
    heads: int
    mlp_hidden: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, s, c = x.shape
        x = x.reshape(b * t, s, c)
        h = LayerNorm(self.eps, name="norm0", **kw)(x)
        x = x + EvaAttention(self.width, self.heads, attention_impl=self.attention_impl,
                             name="spatial_attention", **kw)(h)
        x = x.reshape(b, t, s, c).transpose(0, 2, 1, 3).reshape(b * s, t, c)
        h = LayerNorm(self.eps, name="norm1", **kw)(x)
        x = x + EvaAttention(self.width, self.heads, attention_impl=self.attention_impl,
                             name="temporal_attention", **kw)(h)
        h = LayerNorm(self.eps, name="norm2", **kw)(x)
        x = x + Mlp(self.mlp_hidden, name="mlp", **kw)(h)
        x = x.reshape(b, s, t, c).transpose(0, 2, 1, 3)
        return nn.with_logical_constraint(x, ("batch", None, "length", "embed")), None


class Conv3dLayer(nn.Module):
    """Zero-pad ``padding`` ((t0, t1), (h0, h1), (w0, w1)), then Conv3d k3 with ``strides``.

    x [B, T, H, W, C] -> [B, T', H', W', features]. ``upsample``: nearest-upsample by these (t, h,
    w) factors first, in float32 (the decoder's Upsample). Holds the ``conv`` of the reference.
    """

    features: int
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[tuple[int, int], ...] = ((1, 1), (1, 1), (1, 1))
    upsample: tuple[int, int, int] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.upsample is not None:
            x = upsample_nearest(x.astype(jnp.float32), self.upsample, axes=(1, 2, 3)).astype(x.dtype)
        conv = nn.Conv(
            self.features, (3, 3, 3), strides=tuple(self.strides), padding=tuple(tuple(p) for p in self.padding),
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), _CONV_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            name="conv",
        )
        return conv(x)


def _block_kwargs(cfg):
    return dict(width=cfg.width, heads=cfg.heads, mlp_hidden=int(cfg.width * cfg.mlp_ratio), eps=cfg.layernorm_eps,
                dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), attention_impl=cfg.attention_impl)


def stage_blocks_name(stage: int) -> str:
    """The ``apply_layers`` name of a stage's blocks (``stage{s}_blocks``)."""
    return f"stage{stage}_blocks"


def run_stage(cfg, stage: int, x):
    """The ``blocks_per_stage`` blocks of ``stage`` (scanned or unrolled per ``cfg.scan_layers``). x [B, T, S, C]."""
    x, _ = apply_layers(SpatioTemporalBlock, cfg.blocks_per_stage, stage_blocks_name(stage), x,
                        scan=cfg.scan_layers, remat=cfg.remat,
                        block_kwargs=_block_kwargs(cfg))
    return x


class MotionEncoder(nn.Module):
    """motion [B, T, H, W, in_channels] -> features [B, t, h, w, C] (after the final norm)."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        b, t, h, w, _ = x.shape
        if (t, h, w) != (cfg.input_frames, cfg.input_height, cfg.input_width):
            raise ValueError(f"motion tokenizer input [B, T, H, W, C] = {tuple(x.shape)}: config expects "
                             f"T, H, W = {(cfg.input_frames, cfg.input_height, cfg.input_width)}")
        init = nn.initializers.truncated_normal(0.02)
        pos_embed = self.param("pos_embed", nn.with_logical_partitioning(init, (None, "pos", "embed")),
                               (1, h * w, cfg.width), param_dtype)
        temp_pos = self.param("temp_pos", nn.with_logical_partitioning(init, (None, "pos", "embed")),
                              (1, t, cfg.width), param_dtype)
        x = dense(cfg.width, ("conv_in", "embed"), name="in_proj", **kw)(x.astype(dtype))
        x = x.reshape(b, t, h * w, cfg.width)
        x = x + pos_embed[:, None].astype(dtype)
        x = x + temp_pos[:, :, None].astype(dtype)
        for stage in range(NUM_STAGES):
            x = run_stage(cfg, stage, x)
            x = x.reshape(b, t, h, w, cfg.width)
            x = Conv3dLayer(cfg.width, tuple(cfg.down_strides[stage]), tuple(cfg.down_pads[stage]),
                            name=f"down_sample_layers_{stage}", **kw)(x)
            _, t, h, w, _ = x.shape
            x = x.reshape(b, t, h * w, cfg.width)
        x = LayerNorm(cfg.layernorm_eps, name="norm", **kw)(x)
        return x.reshape(b, t, h, w, cfg.width)


class MotionDecoder(nn.Module):
    """quantized codes [B, t, h, w, code_dim] -> features [B, T, H, W, C] (after the final norm)."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        x = dense(cfg.width, ("code_dim", "embed"), name="in_proj", **kw)(z.astype(dtype))
        for stage in range(NUM_STAGES):
            x = Conv3dLayer(cfg.width, upsample=tuple(cfg.up_factors[stage]), name=f"up_sample_layers_{stage}",
                            **kw)(x)
            b, t, h, w, c = x.shape
            x = run_stage(cfg, stage, x.reshape(b, t, h * w, c))
            x = x.reshape(b, t, h, w, c)
        return LayerNorm(cfg.layernorm_eps, name="norm", **kw)(x)


class MotionTokenizer(nn.Module):
    """The motion VQ tokenizer. ``__call__(motion)`` -> dict of every stage (see ``encode``/``decode``).

    Methods (``model.apply(variables, ..., method=...)``):
    - ``encode(motion)`` -> dict(features [B,t,h,w,C], to_quantizer [B,t,h,w,d] float32,
      quantized [B,t,h,w,d] float32, codes [B, t*h*w] int32)
    - ``tokenize(motion)`` -> codes [B, t*h*w] int32
    - ``decode(quantized)`` -> motion [B, T, H, W, 2]
    - ``reconstruct(motion, height, width)`` / ``reconstruct_from_token(codes, height, width)``
      -> [B, T, height, width, 2] resized (PyTorch bicubic) and divided by ``motion_scale``
    """

    config: ml_collections.ConfigDict

    def setup(self):
        cfg = self.config
        check_config(cfg)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.encoder = MotionEncoder(cfg)
        self.decoder = MotionDecoder(cfg)
        f32 = dict(dtype=jnp.float32, param_dtype=param_dtype)
        self.encode_task_layer_0 = dense(cfg.width, ("embed", "mlp"), **f32)
        self.encode_task_layer_2 = dense(cfg.code_dim, ("mlp", "code_dim"), **f32)
        self.decode_task_layer_0 = dense(cfg.width, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype)
        self.decode_task_layer_2 = dense(cfg.in_channels, ("mlp", "out"), dtype=dtype, param_dtype=param_dtype)
        self.quantize = Codebook(cfg.n_code, cfg.code_dim, param_dtype=param_dtype)

    def encode(self, motion):
        features = self.encoder(motion)
        h = jnp.tanh(self.encode_task_layer_0(features.astype(jnp.float32)))
        to_quantizer = self.encode_task_layer_2(h)
        quantized, codes = self.quantize(to_quantizer)
        return dict(features=features, to_quantizer=to_quantizer, quantized=quantized,
                    codes=codes.reshape(codes.shape[0], -1))

    def tokenize(self, motion):
        return self.encode(motion)["codes"]

    def decode(self, quantized):
        x = self.decoder(quantized)
        return self.decode_task_layer_2(jnp.tanh(self.decode_task_layer_0(x)))

    def codes_to_quantized(self, codes):
        """codes [B, t*h*w] -> codebook rows on the grid [B, t, h, w, d]."""
        t, h, w = token_grid(self.config)
        if codes.shape[-1] != t * h * w:
            raise ValueError(f"motion codes [B, N] = {tuple(codes.shape)}: expected N = {t * h * w} ({t}x{h}x{w})")
        rows = self.quantize.lookup(codes)
        return rows.reshape(codes.shape[0], t, h, w, rows.shape[-1])

    def _to_latent(self, rec, height: int, width: int):
        dtype = rec.dtype
        x = rec.astype(jnp.float32).transpose(0, 1, 4, 2, 3)  # [B, T, 2, H, W]
        x = resize_bicubic(x, (height, width)) / self.config.motion_scale
        return x.transpose(0, 1, 3, 4, 2).astype(dtype)

    def reconstruct(self, motion, height: int, width: int):
        return self._to_latent(self.decode(self.encode(motion)["quantized"]), height, width)

    def reconstruct_from_token(self, codes, height: int, width: int):
        return self._to_latent(self.decode(self.codes_to_quantized(codes)), height, width)

    def __call__(self, motion):
        out = self.encode(motion)
        out["reconstruction"] = self.decode(out["quantized"])
        return out


# (parent path, name) of the repeated blocks: each stage's blocks of the encoder and the decoder.
MOTION_TOKENIZER_STACKS = tuple(((part,), stage_blocks_name(s)) for part in ("encoder", "decoder")
                                for s in range(NUM_STAGES))
