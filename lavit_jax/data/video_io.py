"""Video input for Video-LaVIT: codec motion vectors -> motion-tokenizer clips, plus keyframes.

Pipeline (the reference's ``extract_motions`` + ``MotionVectorProcessor`` + clip selection):

1. ``reencode_mpeg4``: any video PyAV can decode -> a raw MPEG-4 Part 2 stream at the reference's
   settings (``fps`` filter to 6 fps, ``mpeg4`` at 8000 kb/s, GOP 12, no B-frames, as
   ``ffmpeg -i SRC -filter:v fps=6 -b:v 8000k -c:v mpeg4 -f rawvideo OUT``).
2. ``read_motion_vectors``: decode with ``flags2=+export_mvs``; per frame its picture type, the
   codec's motion vectors (structured array read by field name) and, for I-frames, RGB uint8.
3. ``dense_motion``: one frame's vectors -> [2, H, W] float64 map: source * motion_xy /
   motion_scale written at (dst_x, dst_y) clipped to the frame, divided by (W, H) and by
   ``MOTION_STD`` (/ 10 when ``rescale``); ``NO_MOTION`` (-10000) where no vector lands.
4. ``select_clip_starts``: I-frames followed by a full GOP and a full clip, every second one, at
   most ``max_clips`` spread by linspace.
5. ``process_clip_motion``: [T, 2, H, W] -> [2, T, 20, 36]: pad to multiples of 16 with
   NO_MOTION, 16x16 max-pool, NO_MOTION -> 0, the mid-clip I-frame replaced by the mean of its
   neighbours, PyTorch bicubic to the tokenizer grid.
6. ``load_video_clips``: all of it, plus each clip's keyframe as RGB uint8 and CLIP-normalised
   224 x 224 pixels. Outputs are channels-last: motion [N, T, h, w, 2], pixels [N, 224, 224, 3].

Whole frames: ``read_video_frames`` (any file PyAV or, for GIFs, Pillow decodes -> uint8 [T, H, W, 3]) and
``write_video`` (uint8 frames -> ``.mp4`` H.264 or ``.gif``, written atomically, never overwriting unless
asked).

All arithmetic follows the reference's dtypes (float64 maps, float32 from the clip tensors on) so
that the results are bit-identical to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Sequence

import av
import numpy as np

from lavit_jax import fsutil
from lavit_jax.data import image_io
from lavit_jax.ops.resize import resize_bicubic

MOTION_STD = (0.0993703, 0.1130276)  # std of (x / W, y / H) motion over the training set
RESCALE = 10.0  # the tokenizer input is the normalised motion x 10 (std / 10)
NO_MOTION = -10000.0  # fill where no vector lands; pooled values below NO_MOTION_THRESHOLD become 0
NO_MOTION_THRESHOLD = -1000.0
MACROBLOCK = 16
GOP = 12  # one I-frame then 11 P-frames
FPS = 6
BITRATE = 8_000_000
CLIP_FRAMES = 24
MOTION_GRID = (20, 36)  # (h, w) of the tokenizer input
MAX_CLIPS = 8

_PICTURE_TYPES = {"NONE": "?", "I": "I", "P": "P", "B": "B", "S": "S", "SI": "i", "SP": "p", "BI": "b"}


class VideoInputError(ValueError):
    """A video cannot be turned into motion clips; the message names the file."""


class UnreadableVideoError(VideoInputError):
    """Missing, empty, not a video, or undecodable."""


class NoMotionVectorsError(VideoInputError):
    """The decoded stream carries no motion vectors (e.g. all intra frames, or a codec without them)."""


class VideoTooShortError(VideoInputError):
    """Fewer frames than one motion step needs."""


@dataclasses.dataclass
class DecodedVideo:
    """What one decode pass yields. ``motion_vectors[i]`` is None for frames without vectors."""

    frame_types: list[str]
    motion_vectors: list[np.ndarray | None]
    width: int
    height: int
    keyframes: dict[int, np.ndarray]  # frame index -> RGB uint8 [H, W, 3] (I-frames only)


@dataclasses.dataclass
class VideoClips:
    """Tokenizer input and keyframes of the selected clips (N clips)."""

    motion: np.ndarray  # [N, T, h, w, 2] float32, channels-last tokenizer input
    keyframes_rgb: np.ndarray  # [N, H, W, 3] uint8, each clip's first (I-)frame
    pixel_values: np.ndarray  # [N, S, S, 3] float32, CLIP-normalised keyframes
    start_indices: np.ndarray  # [N] int64 frame index of each clip's first frame
    frame_types: list[str]  # per frame of the (re-encoded) video, 'I' / 'P' / ...


def _describe_source(path) -> str:
    return os.fspath(path) if isinstance(path, str | os.PathLike) else f"<{type(path).__name__}>"


def _check_file(path) -> str:
    if not isinstance(path, str | os.PathLike):
        return _describe_source(path)
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UnreadableVideoError(f"video file not found: {p}")
    if os.path.isdir(p):
        raise UnreadableVideoError(f"video path is a directory: {p}")
    if os.path.getsize(p) == 0:
        raise UnreadableVideoError(f"video file is empty (0 bytes): {p}")
    return p


def _open(source, name: str, **kwargs):
    try:
        return av.open(source, **kwargs)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UnreadableVideoError(f"not a readable video: {name} ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _decoding(container, name: str):
    """Closes ``container`` at the end; a decode failure becomes an ``UnreadableVideoError`` naming ``name``."""
    try:
        yield
    except av.FFmpegError as e:
        raise UnreadableVideoError(f"cannot decode video {name} ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def _video_stream(container, name: str):
    if not container.streams.video:
        container.close()
        raise UnreadableVideoError(f"no video stream in {name}")
    return container.streams.video[0]


def reencode_mpeg4(path, fps: int = FPS, bitrate: int = BITRATE, gop: int = GOP, threads: int = 0) -> bytes:
    """Any video -> raw MPEG-4 Part 2 bytes (m4v), as the reference's ffmpeg command writes them.

    fps filter (ffmpeg's ``fps``, rounding to nearest) -> yuv420p -> ``mpeg4`` with ``bitrate``,
    ``gop`` and no B-frames. ``threads`` is the encoder's thread count; 0 = auto, what the reference's
    command uses. The mpeg4 encoder cuts one slice per thread, so the bitstream (and its vectors)
    depends on it: pass a fixed number for results that do not depend on the machine.
    """
    name = _check_file(path)
    src = _open(os.fspath(path) if isinstance(path, str | os.PathLike) else path, name)
    out = io.BytesIO()
    n_out = 0
    try:
        stream = _video_stream(src, name)
        stream.thread_type = "AUTO"
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("fps", f"fps={fps}"),
                 graph.add("format", "pix_fmts=yuv420p"), graph.add("buffersink")]
        for a, b in zip(chain[:-1], chain[1:]):
            a.link_to(b)
        graph.configure()
        with av.open(out, "w", format="rawvideo") as dst:
            enc = dst.add_stream("mpeg4", rate=fps)
            enc.width, enc.height, enc.pix_fmt = stream.codec_context.width, stream.codec_context.height, "yuv420p"
            enc.bit_rate = bitrate
            cc = enc.codec_context
            cc.gop_size = gop
            cc.max_b_frames = 0
            cc.thread_type = "SLICE"
            cc.thread_count = threads

            def drain():
                nonlocal n_out
                while True:
                    try:
                        frame = graph.pull()
                    except (av.BlockingIOError, av.EOFError):
                        return
                    frame.pict_type = av.video.frame.PictureType.NONE
                    for packet in enc.encode(frame):
                        dst.mux(packet)
                    n_out += 1

            step = None
            for i, frame in enumerate(src.decode(stream)):
                if frame.pts is None:  # a stream without timestamps: number the frames at its rate
                    if step is None:
                        rate = stream.average_rate or stream.guessed_rate or fps
                        step = max(int(round(1 / (float(rate) * float(stream.time_base)))), 1)
                    frame.pts = i * step
                graph.push(frame)
                drain()
            graph.push(None)
            drain()
            for packet in enc.encode(None):
                dst.mux(packet)
    except av.FFmpegError as e:
        raise UnreadableVideoError(f"cannot decode or re-encode video {name} ({type(e).__name__}: {e})") from e
    finally:
        src.close()
    if n_out == 0:
        raise VideoTooShortError(f"video {name} has no frames at {fps} fps")
    return out.getvalue()


def read_motion_vectors(source, name: str | None = None) -> DecodedVideo:
    """Decodes ``source`` (path or bytes of an already re-encoded stream) with motion-vector export."""
    if isinstance(source, bytes | bytearray):
        name = name or "<re-encoded stream>"
        container = _open(io.BytesIO(bytes(source)), name, format="m4v")
    else:
        name = name or _check_file(source)
        container = _open(os.fspath(source), name)
    types: list[str] = []
    mvs: list[np.ndarray | None] = []
    keyframes: dict[int, np.ndarray] = {}
    width = height = 0
    with _decoding(container, name):
        stream = _video_stream(container, name)
        stream.codec_context.options = {"flags2": "+export_mvs"}
        for i, frame in enumerate(container.decode(stream)):
            width, height = frame.width, frame.height
            kind = _PICTURE_TYPES.get(av.video.frame.PictureType(frame.pict_type).name, "?")
            types.append(kind)
            side = frame.side_data.get("MOTION_VECTORS")
            mvs.append(side.to_ndarray() if side is not None else None)
            if kind == "I":
                keyframes[i] = frame.to_ndarray(format="rgb24")
    if not types:
        raise UnreadableVideoError(f"no decodable video frames in {name}")
    return DecodedVideo(types, mvs, width, height, keyframes)


def dense_motion(mv: np.ndarray | None, width: int, height: int, rescale: bool = True) -> np.ndarray:
    """One frame's motion vectors -> [2, height, width] float64 normalised motion, NO_MOTION elsewhere.

    ``mv``: structured array with fields source, dst_x, dst_y, motion_x, motion_y, motion_scale.
    Later vectors overwrite earlier ones at the same position (as the reference's numpy assignment).
    """
    out = np.full((height, width, 2), NO_MOTION, np.float64)
    if mv is not None and len(mv):
        std = np.asarray([MOTION_STD], np.float64)
        if rescale:
            std = std / RESCALE
        px = np.clip(mv["dst_x"].astype(np.int64), 0, width - 1)
        py = np.clip(mv["dst_y"].astype(np.int64), 0, height - 1)
        src = mv["source"].astype(np.int64)[:, None]
        motion = np.stack([mv["motion_x"], mv["motion_y"]], 1).astype(np.int64)
        v = src * motion / mv["motion_scale"].astype(np.int64)[:, None]
        v[:, 0] = v[:, 0] / width
        v[:, 1] = v[:, 1] / height
        v = (v - 0.0) / std
        out[py, px] = v
    return out.transpose(2, 0, 1)


def select_clip_starts(frame_types: Sequence[str], num_frames: int = CLIP_FRAMES, max_clips: int = MAX_CLIPS,
                       gop: int = GOP, name: str = "video") -> np.ndarray:
    """Clip start frames, as the reference's ``LaVITEvalVideoProcessor.sample_video_clips``.

    I-frames whose next I-frame is exactly ``gop`` frames later and that leave ``num_frames`` frames
    are the candidates (if at least 2 exist; otherwise all I-frames); every second one from index 1
    (from 0 if there are at most 2); at most ``max_clips`` of them, spread by linspace.
    """
    total = len(frame_types)
    starts = np.where(np.asarray(list(frame_types)) == "I")[0]
    if len(starts) == 0:
        raise NoMotionVectorsError(f"video {name} has no I-frame to start a clip at")
    if len(starts) > 1:
        filtered = starts[:-1][starts[:-1] + gop == starts[1:]]
    else:
        filtered = starts
    filtered = filtered[filtered + num_frames <= total]
    if len(filtered) >= 2:
        starts = filtered
    if len(starts) / 2 <= max_clips:
        selected = starts[1::2] if len(starts) > 2 else starts[0::2]
    else:
        starts = starts[1::2]
        if len(starts) > max_clips:
            selected = starts[np.linspace(0, len(starts) - 1, max_clips, dtype=int)]
        else:
            selected = starts
    return np.asarray(selected, np.int64)


def clip_dense_motion(decoded: DecodedVideo, start: int, num_frames: int = CLIP_FRAMES,
                      rescale: bool = True) -> np.ndarray:
    """Frames start .. start + num_frames - 1 as dense maps [num_frames, 2, H, W] float32.

    Frames past the end of the video are NO_MOTION (the reference pads short clips so).
    """
    h, w = decoded.height, decoded.width
    out = np.full((num_frames, 2, h, w), NO_MOTION, np.float32)
    for j, i in enumerate(range(start, min(start + num_frames, len(decoded.frame_types)))):
        out[j] = dense_motion(decoded.motion_vectors[i], w, h, rescale).astype(np.float32)
    return out


def process_clip_motion(motions: np.ndarray, size: Sequence[int] = MOTION_GRID, gop: int = GOP) -> np.ndarray:
    """The reference's ``MotionVectorProcessor``: [T, 2, H, W] float32 -> [2, T, size[0], size[1]] float32."""
    motions = np.asarray(motions, np.float32)
    t, c, h, w = motions.shape
    if t <= gop + 1:
        raise ValueError(f"motion clip of {t} frames: needs more than {gop + 1} (frame {gop} is interpolated)")
    ph, pw = -(-h // MACROBLOCK) * MACROBLOCK, -(-w // MACROBLOCK) * MACROBLOCK
    padded = np.full((t, c, ph, pw), NO_MOTION, np.float32)
    padded[:, :, :h, :w] = motions
    pooled = padded.reshape(t, c, ph // MACROBLOCK, MACROBLOCK, pw // MACROBLOCK, MACROBLOCK).max(axis=(3, 5))
    pooled[pooled < NO_MOTION_THRESHOLD] = 0.0
    # the I-frame in the middle of the clip has no vectors: the mean of its neighbours
    # (the reference's trilinear x1.5 of frames gop-1 and gop+1, middle output)
    half = np.float32(0.5)
    pooled[gop] = half * pooled[gop - 1] + half * pooled[gop + 1]
    resized = resize_bicubic(pooled, tuple(size))
    return np.ascontiguousarray(resized.transpose(1, 0, 2, 3))


def extract_motions(path, reencode: bool = True, fps: int = FPS, threads: int = 0) -> DecodedVideo:
    """Re-encodes (unless ``reencode=False``: ``path`` is already such a stream) and decodes vectors."""
    name = _check_file(path)
    if reencode:
        return read_motion_vectors(reencode_mpeg4(path, fps=fps, threads=threads), name=name)
    return read_motion_vectors(path, name=name)


def load_video_clips(path, *, reencode: bool = True, fps: int = FPS, num_frames: int = CLIP_FRAMES,
                     max_clips: int = MAX_CLIPS, motion_size: Sequence[int] = MOTION_GRID,
                     image_size: int = 224, threads: int = 0) -> VideoClips:
    """A video file -> the motion-tokenizer input and keyframes of its clips (see the module docstring).

    ``reencode=False`` reads ``path`` as an already re-encoded MPEG-4 Part 2 stream (the reference's
    ``raw_file=False``). Raises a ``VideoInputError`` subclass naming the file when the video cannot
    be read, has fewer than 2 frames, or carries no motion vectors.
    """
    name = _check_file(path)
    decoded = extract_motions(path, reencode=reencode, fps=fps, threads=threads)
    if len(decoded.frame_types) < 2:
        at = f" at {fps} fps" if reencode else ""
        raise VideoTooShortError(
            f"video {name} has {len(decoded.frame_types)} frame(s){at}: at least 2 are needed for motion")
    if all(m is None or len(m) == 0 for m in decoded.motion_vectors):
        raise NoMotionVectorsError(
            f"video {name} carries no motion vectors ({len(decoded.frame_types)} frames, types "
            f"{''.join(sorted(set(decoded.frame_types)))}); is it an MPEG-4 Part 2 / H.264 stream with P-frames?")
    starts = select_clip_starts(decoded.frame_types, num_frames, max_clips, name=name)
    motion = np.stack([process_clip_motion(clip_dense_motion(decoded, int(s), num_frames), motion_size)
                       for s in starts])
    keyframes = np.stack([decoded.keyframes[int(s)] for s in starts])
    pixels = image_io.preprocess(list(keyframes), size=image_size)
    return VideoClips(
        motion=np.ascontiguousarray(motion.transpose(0, 2, 3, 4, 1)),
        keyframes_rgb=keyframes,
        pixel_values=pixels,
        start_indices=starts,
        frame_types=decoded.frame_types,
    )


# --------------------------------------------------------------------------------------------------
# Whole-frame decoding and video files out
# --------------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".gif")
MP4_CODECS = ("libx264", "mpeg4")  # the first one this PyAV build can encode is used
MP4_CRF = 18  # libx264 constant-rate factor: visually near-lossless
MP4_MPEG4_QSCALE = 2  # the mpeg4 fallback's fixed quantiser (1 best .. 31)
GIF_MAX_FPS = 50.0  # GIF delays are whole 1/100 s and players raise delays under 2/100 s to 1/10 s


def _is_gif(p: str) -> bool:
    with open(p, "rb") as f:
        return f.read(6) in (b"GIF87a", b"GIF89a")


def read_video_frames(path) -> np.ndarray:
    """Every frame of a video file as RGB uint8 [T, H, W, 3] (GIFs via Pillow, composited; the rest via PyAV).

    Raises ``UnreadableVideoError`` naming the file when it is missing, empty, not a video or has no frames.
    """
    name = _check_file(path)
    if isinstance(path, str | os.PathLike) and _is_gif(name):
        from PIL import Image, ImageSequence

        try:
            with Image.open(name) as im:
                frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
        except (OSError, ValueError) as e:
            raise UnreadableVideoError(f"cannot decode GIF {name} ({type(e).__name__}: {e})") from e
    else:
        container = _open(os.fspath(path) if isinstance(path, str | os.PathLike) else path, name)
        with _decoding(container, name):
            stream = _video_stream(container, name)
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise UnreadableVideoError(f"no decodable video frames in {name}")
    return np.stack(frames)


def _frames_array(frames, path: str) -> np.ndarray:
    """frames [T, H, W, 3] uint8, or a sequence of [H, W, 3] frames or of [T, H, W, 3] clips (joined in order)."""
    if isinstance(frames, list | tuple):
        if not frames:
            raise ValueError(f"write_video {path}: no frames (empty sequence)")
        parts = [np.asarray(f) for f in frames]
        ranks = {p.ndim for p in parts}
        if ranks not in ({3}, {4}):
            raise ValueError(f"write_video {path}: a sequence must hold [H, W, 3] frames or [T, H, W, 3] clips, "
                             f"got shapes {sorted({p.shape for p in parts})}")
        for i, p in enumerate(parts[1:], 1):
            if p.shape[-3:] != parts[0].shape[-3:]:
                raise ValueError(f"write_video {path}: element {i} has frame size {p.shape[-3:]}, element 0 "
                                 f"{parts[0].shape[-3:]}; all frames must have one size")
            if p.dtype != parts[0].dtype:
                raise TypeError(f"write_video {path}: element {i} is {p.dtype}, element 0 {parts[0].dtype}")
        arr = np.stack(parts) if ranks == {3} else np.concatenate(parts)
    else:
        arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        hint = (" (a batch of clips? write one file per clip, or pass list(frames) to join them)"
                if arr.ndim == 5 else "")
        raise ValueError(f"write_video {path}: frames must be [T, H, W, 3] RGB, got shape {arr.shape}{hint}")
    if arr.dtype != np.uint8:
        raise TypeError(f"write_video {path}: frames must be uint8, got {arr.dtype} (convert first, e.g. "
                        "video_sampling.frames_to_uint8 for [-1, 1] floats)")
    if min(arr.shape[:3]) < 1:
        raise ValueError(f"write_video {path}: no frames (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def _mp4_codec() -> str:
    for name in MP4_CODECS:
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
                return name
            except (av.FFmpegError, ValueError):
                continue
    raise RuntimeError(f"this PyAV build can encode none of {MP4_CODECS}: cannot write .mp4 (write a .gif)")


def _write_mp4(tmp: str, frames: np.ndarray, fps: float) -> None:
    from fractions import Fraction

    codec = _mp4_codec()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, "w", format="mp4") as dst:
        stream = dst.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        cc = stream.codec_context
        cc.time_base = 1 / rate
        if codec == "libx264":
            cc.options = {"crf": str(MP4_CRF), "preset": "medium"}
        else:
            cc.qscale = MP4_MPEG4_QSCALE
            cc.flags |= av.codec.context.Flags.qscale
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, cc.time_base
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)


def gif_durations_ms(n: int, fps: float) -> list[int]:
    """Per-frame GIF delays (ms, whole 1/100 s): frame i starts at round(100 i / fps) / 100 s, so the
    clip keeps its length (6 fps -> 170, 160, 170, ... ms) where one rounded delay would drift."""
    starts = np.round(np.arange(n + 1) * 100.0 / fps).astype(np.int64)
    return [int(d) * 10 for d in np.diff(starts)]


def _gif_frame(img: np.ndarray):
    from PIL import Image

    im = Image.fromarray(img)
    colors = np.unique(img.reshape(-1, 3), axis=0)
    if len(colors) <= 256:  # exact: a palette of the frame's own colours
        pal = Image.new("P", (1, 1))
        pal.putpalette(colors.astype(np.uint8).ravel().tolist() + [0] * (3 * (256 - len(colors))))
        return im.quantize(palette=pal, dither=Image.Dither.NONE)
    return im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def _write_gif(tmp: str, frames: np.ndarray, fps: float) -> None:
    images = [_gif_frame(f) for f in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=gif_durations_ms(len(images), fps), disposal=1, optimize=False)


def write_video(path, frames, fps: float, *, overwrite: bool = False, pad_odd: bool = False) -> str:
    """Writes RGB uint8 ``frames`` [T, H, W, 3] (or a sequence of frames / of clips, joined) to ``path``.

    By extension:
    - ``.mp4``: H.264 (libx264, CRF ``MP4_CRF``; MPEG-4 Part 2 where the PyAV build lacks libx264), yuv420p
      (lossy; chroma at half resolution). yuv420p needs even sizes: an odd height or width is a ValueError
      naming the size unless ``pad_odd=True``, which repeats the last row / column (the file is then
      one pixel larger).
    - ``.gif`` (Pillow): loops forever; delays in whole 1/100 s (``gif_durations_ms``), so ``fps`` <=
      ``GIF_MAX_FPS``. A frame with at most 256 colours is stored exactly, others quantised to 256 (median
      cut, no dithering). Pillow stores a run of identical frames as one frame with their summed delay:
      it plays the same, but a reader counts fewer frames.

    Atomic (``fsutil.atomic_write``): ``path`` is absent or whole, never partly written. An existing
    ``path`` is a FileExistsError unless ``overwrite=True``; the directory must exist. Returns the
    absolute path.
    """
    p = os.path.abspath(os.fspath(path))
    ext = os.path.splitext(p)[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(f"write_video {p}: unsupported extension {ext or '(none)'!r}; accepted: "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise TypeError(f"write_video {p}: fps must be a number, got {fps!r}") from None
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"write_video {p}: fps must be positive and finite, got {fps}")
    if ext == ".gif" and fps > GIF_MAX_FPS:
        raise ValueError(f"write_video {p}: {fps:g} fps is above the {GIF_MAX_FPS:g} a GIF can play (delays are "
                         "whole 1/100 s); drop frames or write an .mp4")
    arr = _frames_array(frames, p)
    if ext == ".mp4":
        t, h, w, _ = arr.shape
        if h % 2 or w % 2:
            if not pad_odd:
                raise ValueError(f"write_video {p}: frame size {h}x{w} (H x W) is odd; .mp4 (yuv420p) needs even "
                                 "sizes: crop, pass pad_odd=True (repeats the last row / column) or write a .gif")
            arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"write_video {p}: directory {parent} does not exist")
    if os.path.isdir(p):
        raise IsADirectoryError(f"write_video {p}: is a directory")
    if not overwrite and os.path.lexists(p):
        raise FileExistsError(f"write_video {p}: file exists (pass overwrite=True to replace it)")
    write = _write_mp4 if ext == ".mp4" else _write_gif
    try:
        fsutil.atomic_write(p, lambda tmp: write(tmp, arr, fps), overwrite=overwrite)
    except FileExistsError as e:
        raise FileExistsError(f"write_video {p}: {e} (pass overwrite=True to replace it)") from None
    return p
