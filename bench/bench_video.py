"""Video-LaVIT throughput: motion extraction, motion tokenizer, 3D UNet (JAX next to diffusers). Prints JSON.

    python bench/bench_video.py [--parts motion tokenizer unet] [--iters N] [--full] [--no-torch] [--video PATH]

Parts:
- motion: ``data.video_io`` on one video (default: a synthetic panning clip written with ``write_video``,
  12 fps, 144 frames, ``--video-size``): the MPEG-4 re-encode at 6 fps, the motion-vector decode, the
  per-clip dense maps + ``process_clip_motion`` + keyframe preprocessing, and all of it in one
  ``load_video_clips`` call. Frames per second are source frames (re-encode) or 6 fps frames (the rest).
- tokenizer: ``MotionTokenizer.tokenize`` (motion [B, 24, 20, 36, 2] -> 135 code ids per clip) under jit,
  clips per second at each ``--batch``. Random weights (speed does not depend on them). The official
  PyTorch module is not timed: it lives in the LaVIT repository (with timm, einops, torchvision and
  apex imports), is no installable package and is not vendored here; its outputs are checked against
  recorded fixtures by tests/test_motion_tokenizer_parity.py instead.
- unet: one classifier-free-guided call of the 3D UNet (batch 2: uncond + cond) on 24 frames, ours
  (``models.video_unet``) and diffusers' ``UNetSpatioTemporalConditionModel`` in the same run, with the
  same weights (a seeded diffusers module converted by ``convert.video_detokenizer.diffusers_rank_rule``;
  ``--unet-checkpoint DIR`` loads a release's ``video_detokenizer/unet/config.json`` and the ``unet.*``
  weights of ``video_3d_unet.bin`` into both instead). The comparison uses diffusers' plain SVD
  conditioning (one context token shared by every frame); ours is also timed in Video-LaVIT's motion
  mode (per-frame 16 x 16 motion context), which diffusers does not have. ``max_abs_diff`` is ours vs
  diffusers on the timed inputs (float32 only).

Timing: JAX functions are lowered and compiled first (``compile_s``), then one warm-up call, then the
median (and min) of ``--iters`` calls; PyTorch the same without compilation. PyTorch runs on CUDA when
its build has it, else on the CPU with its default thread count.

Shapes: by default reduced, so that the run takes about a minute on a 2-core CPU in float32: the
tokenizer at width 48 / 4 heads / 1 block per stage / 64 codes of dim 8 (the released input geometry
kept), the UNet at block_out_channels 4 x 32 with latents 16 x 16 (128 x 128 px). ``--full`` uses the
released sizes in bfloat16 (tokenizer width 512 / 3 blocks per stage / 1024 codes; SVD's UNet with
in_channels 10, latents 40 x 72 = 576 x 320 px) and adds ``seconds_per_clip``: the release's 25 guided
UNet steps for one 24-frame clip (the condition encoder and VAE decode are not included). On a GPU:

    python bench/bench_video.py --full --iters 10
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import video_lavit  # noqa: E402
from lavit_jax.convert import torch_io  # noqa: E402
from lavit_jax.convert import video_detokenizer as CV  # noqa: E402
from lavit_jax.data import video_io as V  # noqa: E402
from lavit_jax.models import motion_tokenizer as M  # noqa: E402
from lavit_jax.models import video_unet as VU  # noqa: E402
from lavit_jax.ops.config import freeze  # noqa: E402

FRAMES = V.CLIP_FRAMES  # 24 frames per clip
CFG_BATCH = 2  # uncond + cond
MOTION_GRID = (16, 16)
# Sizes shrunk for the CPU default (the released input geometry and frame count are kept).
TOKENIZER_REDUCED = dict(width=48, heads=4, blocks_per_stage=1, n_code=64, code_dim=8)
UNET_REDUCED = dict(
    block_out_channels=[32, 32, 32, 32], num_attention_heads=[1, 2, 4, 2], layers_per_block=1,
    cross_attention_dim=48, addition_time_embed_dim=16, projection_class_embeddings_input_dim=48,
)
# SVD's UNetSpatioTemporalConditionModel config with Video-LaVIT's 10 input channels (4 noisy latents,
# 4 keyframe latents, 2 motion) and 24 frames.
UNET_FULL = dict(
    sample_size=96, in_channels=10, out_channels=4, num_frames=24,
    down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
    block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[5, 10, 20, 20], layers_per_block=2,
    transformer_layers_per_block=1, cross_attention_dim=1024, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768,
)
LATENT_REDUCED = (16, 16)
LATENT_FULL = (40, 72)  # 320 x 576 px / 8
TIME_IDS = (6.0, 127.0, 0.02)  # fps, motion bucket, noise augmentation (the release's defaults)


# ------------------------------------------------------------------------------------------ timing


def median_time(fn, iters: int) -> dict:
    """One warm-up call, then ``iters`` timed calls: median / min seconds."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "warmup_s": warm, "iters": iters}


def jax_timed(fn, args, iters: int) -> tuple[dict, object]:
    """Compiles ``jax.jit(fn)`` for ``args`` (timed apart), then ``median_time`` of the compiled call."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = None

    def call():
        nonlocal out
        out = jax.block_until_ready(compiled(*args))

    rec = median_time(call, iters)
    return {"compile_s": compile_s, **rec}, out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "av", "pillow", "torch", "diffusers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------ motion


def synthetic_video(folder: str, size: tuple[int, int], frames: int = 144, fps: int = 12) -> str:
    """A panning noise texture (2 px right, 1 px down per frame) written as H.264 .mp4."""
    h, w = size
    rng = np.random.default_rng(0)
    tex = rng.integers(0, 256, ((h + frames) // 2 + 1, (w + 2 * frames) // 2 + 1, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(tex, 2, 0), 2, 1)  # 2 x 2 texels: a motion search finds the pan
    clip = np.stack([tex[frames - i:frames - i + h, 2 * (frames - i):2 * (frames - i) + w] for i in range(frames)])
    return V.write_video(os.path.join(folder, "pan.mp4"), clip, fps=fps)


def bench_motion(path: str, iters: int, threads: int) -> dict:
    reencode = median_time(lambda: V.reencode_mpeg4(path, threads=threads), iters)
    stream = V.reencode_mpeg4(path, threads=threads)
    decode = median_time(lambda: V.read_motion_vectors(stream, name=path), iters)
    decoded = V.read_motion_vectors(stream, name=path)
    starts = V.select_clip_starts(decoded.frame_types, name=path)

    def clips():
        for s in starts:
            V.process_clip_motion(V.clip_dense_motion(decoded, int(s)))
        V.image_io.preprocess([decoded.keyframes[int(s)] for s in starts], size=224)

    clip_rec = median_time(clips, iters)
    total = median_time(lambda: V.load_video_clips(path, threads=threads), iters)
    with V.av.open(path) as c:
        s = c.streams.video[0]
        src_frames = sum(1 for _ in c.decode(s))
        src = {"frames": src_frames, "width": s.codec_context.width, "height": s.codec_context.height,
               "codec": s.codec_context.name, "fps": float(s.average_rate) if s.average_rate else None}
    n6 = len(decoded.frame_types)
    return {
        "video": path, "source": src, "frames_at_6fps": n6, "clips": len(starts), "encoder_threads": threads,
        "reencode": {**reencode, "source_frames_per_s": src_frames / reencode["median_s"]},
        "motion_vector_decode": {**decode, "frames_per_s": n6 / decode["median_s"]},
        "clip_processing": {**clip_rec, "clips_per_s": len(starts) / clip_rec["median_s"]},
        "load_video_clips": {**total, "source_frames_per_s": src_frames / total["median_s"],
                             "clips_per_s": len(starts) / total["median_s"]},
    }


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_config(full: bool, dtype: str):
    c = video_lavit.motion_tokenizer_config()
    if not full:
        for k, v in TOKENIZER_REDUCED.items():
            setattr(c, k, v)
    c.dtype = dtype
    c.attention_impl = "auto"
    return freeze(c)


def bench_tokenizer(full: bool, batches: list[int], iters: int, dtype: str) -> dict:
    from flax.core import meta

    cfg = tokenizer_config(full, dtype)
    model = M.MotionTokenizer(cfg)
    shape = (cfg.input_frames, cfg.input_height, cfg.input_width, cfg.in_channels)
    params = meta.unbox(jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), method="tokenize"))(
        jax.random.key(0))["params"])
    nparams = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    results = []
    for b in batches:
        x = jax.random.normal(jax.random.key(b), (b, *shape), jnp.float32)
        rec, codes = jax_timed(lambda p, x: model.apply({"params": p}, x, method="tokenize"), (params, x), iters)
        results.append({"batch": b, "clips_per_s": b / rec["median_s"], "tokens_per_clip": int(codes.shape[1]),
                        **rec})
    return {
        "config": {k: cfg[k] for k in ("width", "heads", "blocks_per_stage", "n_code", "code_dim")},
        "input": list(shape), "tokens": list(M.token_grid(cfg)), "params": nparams, "dtype": dtype,
        "jax": results,
        "torch": "not measured: the official motion tokenizer is in the LaVIT repository (not an installable "
                 "package, not vendored); parity is tested on recorded fixtures",
    }


# ------------------------------------------------------------------------------------------ unet


def unet_setup(full: bool, checkpoint: str | None):
    """(diffusers config dict, torch state dict {key: numpy}) of the timed UNet."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    if checkpoint:
        config_file = os.path.join(checkpoint, CV.DETOKENIZER_DIR, "unet", "config.json")
        weights = os.path.join(checkpoint, CV.VIDEO_3D_UNET_FILE)
        for need in (config_file, weights):
            if not os.path.isfile(need):
                raise FileNotFoundError(f"--unet-checkpoint {checkpoint}: {need} not found (expected a release root "
                                        f"with {CV.VIDEO_3D_UNET_FILE} and {CV.DETOKENIZER_DIR}/unet/config.json)")
        with open(config_file) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        sd = torch_io.strip_prefix(torch_io.load_torch_file(weights), CV.UNET_PREFIX)
        if not sd:
            raise ValueError(f"--unet-checkpoint {checkpoint}: no {CV.UNET_PREFIX}* weights in {weights}")
        return cfg, sd
    cfg = dict(UNET_FULL)
    if not full:
        cfg.update(UNET_REDUCED)
    torch.manual_seed(0)
    tm = UNetSpatioTemporalConditionModel(**cfg)
    with torch.no_grad():  # off the zero / identity initialisation some layers start at
        for p in tm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, {k: v.numpy() for k, v in tm.state_dict().items()}


def unet_inputs(cfg: dict, latent: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = latent
    d = cfg["cross_attention_dim"]
    x = rng.standard_normal((CFG_BATCH, FRAMES, cfg["in_channels"], h, w)).astype(np.float32)  # [B, F, C, h, w]
    plain_ctx = rng.standard_normal((CFG_BATCH, 1, d)).astype(np.float32)
    motion_ctx = rng.standard_normal((CFG_BATCH, FRAMES, MOTION_GRID[0] * MOTION_GRID[1], d)).astype(np.float32)
    ids = np.tile(np.asarray([TIME_IDS], np.float32), (CFG_BATCH, 1))
    return x, plain_ctx, motion_ctx, ids, np.float32(0.25 * np.log(20.0))


def bench_unet(full: bool, iters: int, dtype: str, checkpoint: str | None, no_torch: bool, motion_mode: bool,
               latent: tuple[int, int]) -> dict:
    cfg, sd = unet_setup(full, checkpoint)
    x, plain_ctx, motion_ctx, ids, t = unet_inputs(cfg, latent)
    jdtype = jnp.dtype(dtype)
    x_cl = np.ascontiguousarray(np.moveaxis(x, 2, -1))  # ours: [B, F, h, w, C]
    rec = {"config": {k: cfg.get(k) for k in ("block_out_channels", "num_attention_heads", "layers_per_block",
                                                "cross_attention_dim", "in_channels")},
           "weights": checkpoint or "seeded random (diffusers init + 0.02 N(0, 1))",
           "unet_batch": CFG_BATCH, "frames": FRAMES, "latent_hw": list(latent), "dtype": dtype}
    out_plain = None
    for mode in ("plain", "motion") if motion_mode else ("plain",):
        ucfg = VU.video_unet_config(cfg, motion_conditioning=mode == "motion", motion_grid=MOTION_GRID)
        shapes = CV.unet_param_shapes(ucfg)
        params = torch_io.assign_params(sd, CV.diffusers_rank_rule(shapes), shapes, source="diffusers UNet")
        params = jax.tree.map(lambda a: jnp.asarray(a, jdtype), params)
        if mode == "plain":
            rec["params"] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        model = VU.UNetSpatioTemporalConditionModel(ucfg, dtype=jdtype, param_dtype=jdtype, attention_impl="auto")
        ctx = plain_ctx if mode == "plain" else motion_ctx
        args = (params, jnp.asarray(x_cl, jdtype), jnp.float32(t), jnp.asarray(ctx, jdtype), jnp.asarray(ids))
        timed, out = jax_timed(lambda p, *a, model=model: model.apply({"params": p}, *a), args, iters)
        rec[f"jax_{mode}"] = {"steps_per_s": 1.0 / timed["median_s"], **timed,
                              "device": str(jax.devices()[0].device_kind)}
        if mode == "plain":
            out_plain = np.asarray(out, np.float32)
        del params
    if not no_torch:
        rec["torch_plain"], ref = bench_torch_unet(cfg, sd, x, plain_ctx, ids, t, iters, dtype)
        rec["jax_over_torch"] = rec["jax_plain"]["steps_per_s"] / rec["torch_plain"]["steps_per_s"]
        if dtype == "float32":
            rec["max_abs_diff"] = float(np.abs(out_plain - np.moveaxis(ref, 2, -1)).max())
            rec["max_abs_ref"] = float(np.abs(ref).max())
    return rec


def bench_torch_unet(cfg, sd, x, ctx, ids, t, iters: int, dtype: str):
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = UNetSpatioTemporalConditionModel(**cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, strict=True)
    model = model.to(device=device).eval()
    if tdtype != torch.float32:
        model = model.to(dtype=tdtype)
    args = [torch.tensor(a, device=device, dtype=tdtype) for a in (x, np.float32(t), ctx)]
    ids_t = torch.tensor(ids, device=device, dtype=tdtype)
    out = None

    def call():
        nonlocal out
        with torch.no_grad():
            out = model(*args, ids_t).sample
        if device == "cuda":
            torch.cuda.synchronize()

    timed = median_time(call, iters)
    return ({"steps_per_s": 1.0 / timed["median_s"], **timed, "device": device, "threads": torch.get_num_threads()},
            out.float().cpu().numpy())


# ------------------------------------------------------------------------------------------ main


def parse_hw(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 320x576), got {s!r}") from None
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"{s}: height and width must be even and at least 16")
    return h, w


def main(argv=None):
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["motion", "tokenizer", "unet"],
                   choices=["motion", "tokenizer", "unet"])
    p.add_argument("--full", action="store_true", help="released shapes in bfloat16 (meant for a GPU)")
    p.add_argument("--iters", type=int, default=3 if on_cpu else 10, help="timed calls per measurement (median)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="tokenizer clips per call (default 1 8)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="JAX and PyTorch dtype (default: bfloat16 with --full, else float32)")
    p.add_argument("--video", default=None, help="video for the motion part (default: a synthetic clip)")
    p.add_argument("--video-size", type=parse_hw, default=(144, 256), help="synthetic video HxW (default 144x256)")
    p.add_argument("--encoder-threads", type=int, default=0, help="mpeg4 re-encode threads (0 = auto)")
    p.add_argument("--latent", type=parse_hw, default=None,
                   help="UNet latent HxW (default 16x16, 40x72 with --full)")
    p.add_argument("--unet-checkpoint", default=None,
                   help="release root with video_3d_unet.bin and video_detokenizer/unet/config.json")
    p.add_argument("--no-motion-mode", action="store_true", help="skip our UNet in Video-LaVIT's motion mode")
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be at least 1")
    dtype = args.dtype or ("bfloat16" if args.full else "float32")
    batches = args.batch or [1, 8]
    latent = args.latent or (LATENT_FULL if args.full else LATENT_REDUCED)

    report = {
        "benchmark": "video",
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": {"before": [round(v, 2) for v in os.getloadavg()]},
        "versions": versions(), "shapes": "full" if args.full else "reduced",
        "note": None if args.full else "reduced sizes (not the released model): tokenizer "
                + json.dumps(TOKENIZER_REDUCED) + ", UNet " + json.dumps(UNET_REDUCED),
    }
    if "motion" in args.parts:
        with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
            path = args.video or synthetic_video(tmp, args.video_size)
            report["motion_extraction"] = bench_motion(path, args.iters, args.encoder_threads)
            if not args.video:
                report["motion_extraction"]["video"] = f"synthetic {args.video_size[0]}x{args.video_size[1]}"
        print(json.dumps({"motion_extraction": "done"}), file=sys.stderr, flush=True)
    if "tokenizer" in args.parts:
        report["motion_tokenizer"] = bench_tokenizer(args.full, batches, args.iters, dtype)
        print(json.dumps({"motion_tokenizer": "done"}), file=sys.stderr, flush=True)
    if "unet" in args.parts:
        u = bench_unet(args.full, args.iters, dtype, args.unet_checkpoint, args.no_torch, not args.no_motion_mode,
                       latent)
        steps = video_lavit.video_sampling_config().steps
        u["seconds_per_clip"] = {"steps": steps, "jax_plain": steps * u["jax_plain"]["median_s"]}
        if "jax_motion" in u:
            u["seconds_per_clip"]["jax_motion"] = steps * u["jax_motion"]["median_s"]
        if "torch_plain" in u:
            u["seconds_per_clip"]["torch_plain"] = steps * u["torch_plain"]["median_s"]
        u["seconds_per_clip"]["note"] = "guided UNet steps only, at these shapes (no condition encoder, no VAE)"
        report["unet"] = u
    report["load_average_1_5_15min"]["after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
