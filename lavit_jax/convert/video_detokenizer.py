"""The released video detokenizer -> Flax params: ``video_3d_unet.bin`` and ``video_detokenizer/{unet,vae,scheduler}``.

- ``video_3d_unet.bin`` holds the motion-conditioned UNet (``unet.*``, diffusers
  ``UNetSpatioTemporalConditionModel`` names) and the motion condition encoder (``motion_encoder.*``,
  the official names) of the reference's ``VideoDetokenizer`` wrapper. The reference loads it
  non-strictly; here every missing, unexpected (any other prefix included) and mis-shaped key of both
  parts is reported in one error naming the file.
- ``video_detokenizer/unet/config.json`` gives the UNet sizes (its weights are the ones above);
  ``video_detokenizer/vae/`` is a diffusers ``AutoencoderKLTemporalDecoder`` folder;
  ``video_detokenizer/scheduler/scheduler_config.json`` SVD's ``EulerDiscreteScheduler``.

Key rules: diffusers keys by ``convert.diffusers.diffusers_path`` (indices joined with ``_``), weights
by the rank of the Flax param (2: Linear, transposed; 4 / 5: Conv2d / Conv3d to [*k, I, O]; 1: norm
``scale``), ``time_mixer.mix_factor`` as it is; the motion encoder by ``convert.motion_tokenizer``'s rule
(``blocks.N`` -> ``blocks_N``, then stacked with ``scan.relayout`` when the config scans its layers).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import torch_io
from lavit_jax.convert.diffusers import diffusers_path, load_diffusers_state_dict
from lavit_jax.convert.motion_tokenizer import load_motion_tokenizer
from lavit_jax.convert.motion_tokenizer import torch_key_to_flax as motion_key_to_flax
from lavit_jax.inference.video_sampling import VideoDetokenizer, build_video_detokenizer, svd_scheduler_config
from lavit_jax.models import motion_encoder as me_lib
from lavit_jax.models import vae_temporal as vae_lib
from lavit_jax.models import video_unet as unet_lib
from lavit_jax.ops import scan
from lavit_jax.ops.config import freeze

VIDEO_3D_UNET_FILE = "video_3d_unet.bin"
DETOKENIZER_DIR = "video_detokenizer"
UNET_PREFIX = "unet."
MOTION_ENCODER_PREFIX = "motion_encoder."


def _np_dtype(dtype):
    return np.float32 if dtype is None else np.dtype(jnp.dtype(dtype))


def diffusers_rank_rule(shapes: dict[tuple[str, ...], tuple[int, ...]]):
    """diffusers key -> (Flax path, transform), by the rank of the Flax param (Conv3d included)."""

    def rule(key: str):
        if not key.endswith((".weight", ".bias")):
            return diffusers_path(key), np.asarray
        stem, leaf = key.rsplit(".", 1)
        path = diffusers_path(stem)
        if leaf == "bias":
            return path + ("bias",), np.asarray
        kernel = path + ("kernel",)
        rank = len(shapes.get(kernel, ()))
        if rank == 2:
            return kernel, torch_io.linear_t
        if rank >= 3:
            return kernel, torch_io.conv_t
        return path + ("scale",), np.asarray

    return rule


def _shapes(model, args):
    return torch_io.param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"]))


def unet_param_shapes(config) -> dict:
    """Flat {flax path: shape} of UNetSpatioTemporalConditionModel(config)'s params (no compute)."""
    return _shapes(unet_lib.UNetSpatioTemporalConditionModel(config), unet_lib.example_inputs(config))


def motion_encoder_param_shapes(config) -> dict:
    """Flat {unscanned flax path: shape} of MotionConditionEncoder(config)'s params."""
    cfg = freeze(config, scan_layers=False)
    return _shapes(me_lib.MotionConditionEncoder(cfg), me_lib.example_inputs(cfg))


def temporal_vae_param_shapes(config) -> dict:
    return _shapes(vae_lib.AutoencoderKLTemporalDecoder(config), vae_lib.example_inputs(config))


def convert_video_3d_unet(state_dict, unet_config, motion_encoder_config, *, source: str = "<state dict>",
                          dtype=None) -> tuple[dict, dict]:
    """``video_3d_unet.bin`` {key: array} -> (UNet params, motion encoder params in the config's layout).

    One ``WeightMismatchError`` naming ``source`` lists every problem of both parts.
    """
    u_shapes = unet_param_shapes(unet_config)
    m_shapes = motion_encoder_param_shapes(motion_encoder_config)
    shapes = {("unet",) + k: v for k, v in u_shapes.items()}
    shapes.update({("motion_encoder",) + k: v for k, v in m_shapes.items()})
    u_rule = diffusers_rank_rule(u_shapes)

    def rule(key: str):
        if key.startswith(UNET_PREFIX):
            path, fn = u_rule(key[len(UNET_PREFIX):])
            return ("unet",) + path, fn
        if key.startswith(MOTION_ENCODER_PREFIX):
            path, fn = motion_key_to_flax(key[len(MOTION_ENCODER_PREFIX):], np.ndim(state_dict[key]))
            return ("motion_encoder",) + path, fn
        return (key,), np.asarray  # not a path of the model: reported as unexpected

    tree = torch_io.assign_params(state_dict, rule, shapes, source=source, dtype=_np_dtype(dtype))
    motion = scan.relayout(tree["motion_encoder"], me_lib.MOTION_ENCODER_STACKS, motion_encoder_config.scan_layers)
    return tree["unet"], motion


def load_video_3d_unet(path, unet_config, motion_encoder_config, dtype=None) -> tuple[dict, dict]:
    """(UNet params, motion encoder params) from ``video_3d_unet.bin`` (the file or the checkpoint root)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, VIDEO_3D_UNET_FILE)
    return convert_video_3d_unet(torch_io.load_torch_file(path), unet_config, motion_encoder_config, source=path,
                                 dtype=dtype)


def read_video_unet_config(path, *, motion_conditioning: bool = True, motion_grid=(16, 16)):
    """``video_detokenizer/unet/config.json`` (the file or its folder) -> ``video_unet_config``."""
    return checkpoint.load_json_config(
        path, "config.json",
        lambda d: unet_lib.video_unet_config(d, motion_conditioning=motion_conditioning, motion_grid=motion_grid),
        "video UNet config")


def read_temporal_vae_config(path):
    """``video_detokenizer/vae/config.json`` (the file or its folder) -> ``temporal_vae_config``."""
    return checkpoint.load_json_config(path, "config.json", vae_lib.temporal_vae_config, "temporal VAE config")


def read_svd_scheduler_config(path):
    """``video_detokenizer/scheduler/scheduler_config.json`` (the file or its folder) -> ``svd_scheduler_config``."""
    return checkpoint.load_json_config(path, "scheduler_config.json", svd_scheduler_config, "scheduler config")


def temporal_vae_params_from_state_dict(state_dict, config, *, source: str, dtype=None) -> dict:
    """AutoencoderKLTemporalDecoder params from a diffusers state dict; all problems in one error."""
    shapes = temporal_vae_param_shapes(config)
    return torch_io.assign_params(state_dict, diffusers_rank_rule(shapes), shapes, source=source,
                                  dtype=_np_dtype(dtype))


def load_temporal_vae(folder, config=None, dtype=None):
    """(config, params) of the temporal VAE from a diffusers ``vae/`` folder."""
    folder = os.fspath(folder)
    config = config or read_temporal_vae_config(folder)
    return config, temporal_vae_params_from_state_dict(load_diffusers_state_dict(folder), config, source=folder,
                                                       dtype=dtype)


def load_video_detokenizer(root, motion_tokenizer_config, motion_encoder_config, *, unet_dtype=jnp.float32,
                           attention_impl: str | None = "auto") -> VideoDetokenizer:
    """The whole video detokenizer of a release root (``motion_tokenizer.bin``, ``video_3d_unet.bin``,
    ``video_detokenizer/``): modules and float32 params (the UNet in ``unet_dtype``), VAE in float32.

    ``motion_encoder_config.grid`` is also the UNet's temporal-context grid.
    """
    root = os.fspath(root)
    det_dir = os.path.join(root, DETOKENIZER_DIR)
    mt_cfg = freeze(motion_tokenizer_config)
    me_cfg = freeze(motion_encoder_config)
    unet_cfg = read_video_unet_config(os.path.join(det_dir, "unet"), motion_grid=tuple(me_cfg.grid))
    if unet_cfg.cross_attention_dim[0] != me_cfg.out_dim:
        raise ValueError(f"{os.path.join(det_dir, 'unet', 'config.json')}: cross_attention_dim "
                         f"{unet_cfg.cross_attention_dim[0]} != the motion encoder's out_dim {me_cfg.out_dim}")
    vae_cfg, vae_params = load_temporal_vae(os.path.join(det_dir, "vae"))
    sched_cfg = read_svd_scheduler_config(os.path.join(det_dir, "scheduler"))
    unet_params, me_params = load_video_3d_unet(root, unet_cfg, me_cfg)
    mt_params = load_motion_tokenizer(root, mt_cfg)
    return build_video_detokenizer(
        motion_tokenizer_config=mt_cfg, motion_encoder_config=me_cfg, unet_config=unet_cfg, vae_config=vae_cfg,
        scheduler_config=sched_cfg, motion_tokenizer_params=checkpoint.to_device(mt_params),
        motion_encoder_params=checkpoint.to_device(me_params),
        unet_params=checkpoint.to_device(unet_params, jnp.dtype(unet_dtype)),
        vae_params=checkpoint.to_device(vae_params), unet_dtype=unet_dtype, attention_impl=attention_impl)
