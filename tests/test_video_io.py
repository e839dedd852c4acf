"""Video input pipeline: parity with the reference's motion extraction on the fixture's video.mp4,
plus the re-encode, clip selection and error paths on small synthetic videos.

Parity sets: every ../shared/fixtures/video/* with io.npz (and $LAVIT_VIDEO_FIXTURES); none found
is a failure.
"""

import json

import av
import numpy as np
import pytest

from lavit_jax.data import video_io as V
from tests.conftest import video_fixture_dirs

VIDEO_FIXTURES = video_fixture_dirs()


def _close(ours, ref, floor: float, rel: float = 1e-4):
    """max |ours - ref| <= max(rel x max |ref|, the fixture's float-noise floor)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    tol = max(rel * np.abs(ref).max(), floor)
    assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


@pytest.fixture(scope="module", params=VIDEO_FIXTURES or [None],
                ids=lambda p: p.name if p is not None else "no-video-fixture")
def fixture_set(request):
    d = request.param
    if d is None:
        pytest.fail("no Video-LaVIT fixture set: ../shared/fixtures/video/*/io.npz or $LAVIT_VIDEO_FIXTURES")
    io = dict(np.load(d / "io.npz"))
    cfg = json.loads((d / "config.json").read_text())
    video = d / "video.mp4"
    decoded = V.extract_motions(video, reencode=False)
    clips = V.load_video_clips(video, reencode=False, max_clips=cfg["max_clips"])
    return io, cfg, decoded, clips


@pytest.mark.parity
def test_frame_types(fixture_set):
    io, _, decoded, clips = fixture_set
    assert "".join(decoded.frame_types) == "".join(io["video_frame_types"])
    assert clips.frame_types == decoded.frame_types


@pytest.mark.parity
def test_clip_start_indices(fixture_set):
    io, cfg, decoded, clips = fixture_set
    np.testing.assert_array_equal(clips.start_indices, io["clip_start_indices"])
    np.testing.assert_array_equal(V.select_clip_starts(decoded.frame_types, max_clips=cfg["max_clips"]),
                                  io["clip_start_indices"])


@pytest.mark.parity
def test_clip0_raw_motion_vectors(fixture_set):
    io, _, decoded, clips = fixture_set
    start = int(clips.start_indices[0])
    fields = ("source", "w", "h", "src_x", "src_y", "dst_x", "dst_y", "motion_x", "motion_y", "motion_scale")
    rows = []
    for j in range(V.CLIP_FRAMES):
        mv = decoded.motion_vectors[start + j]
        if mv is not None and len(mv):
            rows.append(np.stack([np.full(len(mv), j)] + [mv[f].astype(np.int64) for f in fields], 1))
    np.testing.assert_array_equal(np.concatenate(rows), io["clip0_raw_motion_vectors"])


@pytest.mark.parity
def test_clip0_dense_motion_exact(fixture_set):
    io, _, decoded, clips = fixture_set
    dense = V.clip_dense_motion(decoded, int(clips.start_indices[0]))
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, io["clip0_dense_motion"])


@pytest.mark.parity
def test_motion_clips(fixture_set):
    io, cfg, _, clips = fixture_set
    assert clips.motion.dtype == np.float32
    _close(clips.motion.transpose(0, 4, 1, 2, 3), io["motion_clips"], cfg["float_noise"]["motion_clips"])


@pytest.mark.parity
def test_motion_clips_from_dense_maps(fixture_set):
    """MotionVectorProcessor alone, on the reference's own dense maps of clip 0."""
    io, cfg, _, _ = fixture_set
    ours = V.process_clip_motion(io["clip0_dense_motion"])
    _close(ours, io["motion_clips"][0], cfg["float_noise"]["motion_clips"])


@pytest.mark.parity
def test_keyframes(fixture_set):
    io, cfg, _, clips = fixture_set
    assert clips.keyframes_rgb.dtype == np.uint8
    np.testing.assert_array_equal(clips.keyframes_rgb, io["keyframes_rgb"])
    _close(clips.pixel_values.transpose(0, 3, 1, 2), io["keyframe_pixel_values"],
           cfg["float_noise"]["keyframe_pixel_values"])


def test_video_fixture_discovery_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAVIT_VIDEO_FIXTURES", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    dirs = video_fixture_dirs()
    assert dirs[-2:] == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("LAVIT_VIDEO_FIXTURES")
    assert all((p / "io.npz").is_file() for p in video_fixture_dirs())


# --- synthetic videos -------------------------------------------------------------------------

PAN = (2, 1)  # px per source frame (x, y)


def _write_video(path, n=64, fps=12, size=(64, 96), codec="mpeg4", gop=None, b_frames=0):
    """A panning noise texture (PAN px per frame), written with PyAV."""
    h, w = size
    tex = np.random.default_rng(0).integers(0, 256, (h + 2 * n, w + 2 * n, 3), dtype=np.uint8)  # even sizes
    tex = np.repeat(np.repeat(tex[::2, ::2], 2, 0), 2, 1)  # 2x2 texels: easier motion search
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop is not None:
            s.codec_context.gop_size = gop
        s.codec_context.max_b_frames = b_frames
        for i in range(n):
            y0, x0 = 2 * n - PAN[1] * i, 2 * n - PAN[0] * i  # content moves right/down
            img = np.ascontiguousarray(tex[y0:y0 + h, x0:x0 + w])
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("video") / "pan.mp4", b_frames=2)


def test_reencode_settings(synthetic):
    data = V.reencode_mpeg4(synthetic, threads=1)
    assert data[:4] == b"\x00\x00\x01\xb0"  # raw MPEG-4 Part 2: starts with a visual object sequence header
    with av.open(__import__("io").BytesIO(data), format="m4v") as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
        types = "".join(av.video.frame.PictureType(f.pict_type).name for f in c.decode(video=0))
    assert len(types) == 32  # 64 frames at 12 fps -> 32 at 6 fps
    assert types == ("I" + "P" * 11) * 2 + "I" + "P" * 7


def test_pan_motion_is_recovered(synthetic):
    decoded = V.extract_motions(synthetic, threads=1)
    w, h = decoded.width, decoded.height
    dx, dy = [], []
    for mv in decoded.motion_vectors:
        if mv is not None and len(mv):
            d = mv["source"] * np.stack([mv["motion_x"], mv["motion_y"]]) / mv["motion_scale"]
            dx.append(d[0])
            dy.append(d[1])
    # at 6 fps every frame moves 2 source frames: (4, 2) px
    assert np.median(np.concatenate(dx)) == 2 * PAN[0]
    assert np.median(np.concatenate(dy)) == 2 * PAN[1]
    dense = V.dense_motion(decoded.motion_vectors[1], w, h)
    valid = dense[0] > V.NO_MOTION
    expect = 2 * PAN[0] / w / (V.MOTION_STD[0] / V.RESCALE)
    assert np.isclose(np.median(dense[0][valid]), expect)


def test_load_video_clips_synthetic(synthetic):
    clips = V.load_video_clips(synthetic, threads=1)
    np.testing.assert_array_equal(clips.start_indices, [12])  # I-frames 0, 12, 24: the second one
    assert clips.motion.shape == (1, 24, 20, 36, 2) and clips.motion.dtype == np.float32
    assert clips.keyframes_rgb.shape == (1, 64, 96, 3) and clips.keyframes_rgb.dtype == np.uint8
    assert clips.pixel_values.shape == (1, 224, 224, 3)
    assert np.all(clips.motion[0, 0] == 0)  # the clip's I-frame has no motion
    assert np.all(clips.motion[0, 20:] == 0)  # frames past the end of the video (20 real frames)
    assert np.median(clips.motion[0, 1:12, ..., 0]) > 0  # panning right


def test_select_clip_starts():
    gop = "I" + "P" * 11
    # long video: every second full GOP from index 1, 8 of them by linspace
    np.testing.assert_array_equal(V.select_clip_starts(gop * 40), [12, 60, 132, 180, 252, 300, 372, 444])
    # a scene cut at 17 breaks the GOP starting at 12
    types = gop + "I" + "P" * 4 + gop * 3 + "I" + "P" * 11
    np.testing.assert_array_equal(V.select_clip_starts(types), [17, 41])
    # a single I-frame: the clip starts there
    np.testing.assert_array_equal(V.select_clip_starts("I" + "P" * 30), [0])
    with pytest.raises(V.NoMotionVectorsError, match="no I-frame"):
        V.select_clip_starts("P" * 30, name="x.mp4")


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(V.UnreadableVideoError, match="missing.mp4"):
        V.load_video_clips(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(V.UnreadableVideoError, match="empty.mp4"):
        V.load_video_clips(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.UnreadableVideoError, match="garbage.mp4"):
        V.load_video_clips(garbage)
    intra = _write_video(tmp_path / "intra.m4v", n=30, fps=6, gop=1)
    with pytest.raises(V.NoMotionVectorsError, match="intra.m4v"):
        V.load_video_clips(intra, reencode=False)
    single = _write_video(tmp_path / "single.mp4", n=1)
    with pytest.raises(V.VideoTooShortError, match="single.mp4"):
        V.load_video_clips(single)
    assert issubclass(V.VideoInputError, ValueError)


# --- video files out ---------------------------------------------------------------------------


def _smooth_clip(n=12, h=48, w=64):
    """A smooth colour ramp with a soft blob moving 3 px per frame: content a 4:2:0 codec keeps well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for i in range(n):
        blob = 120 * np.exp(-((x - 10 - 3 * i) ** 2 + (y - h / 2) ** 2) / 60)
        out.append(np.stack([40 + 2.5 * x + blob, 60 + 2 * y, 200 - 1.5 * x + 0.5 * blob], -1))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _palette_clip(n=6, h=20, w=30):
    """At most 256 colours per frame (8 levels per channel pattern): a GIF stores it exactly."""
    rng = np.random.default_rng(1)
    levels = np.array([0, 36, 73, 109, 146, 182, 219, 255], np.uint8)
    return levels[rng.integers(0, 6, (n, h, w, 3))]  # 6**3 = 216 colours; frames differ (none merged)


def test_write_video_mp4_round_trip(tmp_path):
    frames = _smooth_clip()
    out = V.write_video(tmp_path / "clip.mp4", frames, fps=6)
    assert out == str(tmp_path / "clip.mp4")
    with av.open(out) as c:
        s = c.streams.video[0]
        assert c.format.name.startswith("mov,mp4") and s.codec_context.name in ("h264", "mpeg4")
        assert s.average_rate == 6
    back = V.read_video_frames(out)
    assert back.shape == frames.shape and back.dtype == np.uint8
    err = np.abs(back.astype(np.int64) - frames.astype(np.int64))
    # Lossy: 8-bit RGB -> limited-range YUV 4:2:0 -> RGB alone moves smooth content by ~1 level (rounding,
    # chroma averaged over 2x2 on gradients of <= 2.5 levels / px); CRF 18 adds about as much. Measured
    # 1.6-1.8 per frame here (libx264); 4 leaves room for other encoder builds and the mpeg4 fallback,
    # while a wrong channel order, a flipped or a shifted frame costs tens of levels.
    per_frame = err.reshape(len(frames), -1).mean(1)
    assert per_frame.max() <= 4.0, per_frame
    # order kept: each decoded frame is nearest to its own source frame (the blob moves 3 px per frame)
    dist = np.abs(back[:, None].astype(np.int64) - frames[None].astype(np.int64)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(dist.argmin(1), np.arange(len(frames)))


def test_write_video_gif_round_trip(tmp_path):
    from PIL import Image

    frames = _palette_clip()
    out = V.write_video(tmp_path / "clip.gif", frames, fps=6)
    np.testing.assert_array_equal(V.read_video_frames(out), frames)  # <= 256 colours: exact
    with Image.open(out) as im:
        assert im.info["loop"] == 0 and im.n_frames == len(frames)
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert delays == V.gif_durations_ms(len(frames), 6) == [170, 160, 170, 170, 160, 170]  # sums to 1 s: no drift
    # more than 256 colours: median cut to 256 (measured mean error 2.2 here; a wrong palette mapping or
    # channel order costs tens)
    rich = _smooth_clip(n=3)
    back = V.read_video_frames(V.write_video(tmp_path / "rich.gif", rich, fps=10))
    assert back.shape == rich.shape
    assert np.abs(back.astype(np.int64) - rich).mean() <= 5.0


def test_write_video_joins_clips_and_frames(tmp_path):
    a, b = _palette_clip(n=2), _palette_clip(n=3)[:, ::-1]
    out = V.write_video(tmp_path / "joined.gif", [a, b], fps=4)
    np.testing.assert_array_equal(V.read_video_frames(out), np.concatenate([a, b]))
    out = V.write_video(tmp_path / "frames.gif", list(a), fps=4)
    np.testing.assert_array_equal(V.read_video_frames(out), a)
    with pytest.raises(ValueError, match="one size"):
        V.write_video(tmp_path / "x.gif", [a, a[:, :10]], fps=4)
    with pytest.raises(ValueError, match="batch of clips"):
        V.write_video(tmp_path / "x.gif", np.stack([a, a]), fps=4)
    with pytest.raises(TypeError, match="uint8, got float32"):
        V.write_video(tmp_path / "x.gif", a.astype(np.float32), fps=4)
    with pytest.raises(ValueError, match="fps must be positive"):
        V.write_video(tmp_path / "x.gif", a, fps=0)
    with pytest.raises(ValueError, match="60 fps"):
        V.write_video(tmp_path / "x.gif", a, fps=60)
    assert not list(tmp_path.glob("x.gif*")) and not list(tmp_path.glob(".x.gif*"))


def test_write_video_refuses_to_overwrite(tmp_path):
    first, second = _palette_clip(n=2), _palette_clip(n=3)
    path = tmp_path / "out.gif"
    V.write_video(path, first, fps=6)
    with pytest.raises(FileExistsError, match=str(path)):
        V.write_video(path, second, fps=6)
    np.testing.assert_array_equal(V.read_video_frames(path), first)  # untouched
    V.write_video(path, second, fps=6, overwrite=True)
    np.testing.assert_array_equal(V.read_video_frames(path), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif"]  # no temporary file left


def test_write_video_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(tmp, frames, fps):
        with open(tmp, "wb") as f:
            f.write(b"GIF89a partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(V, "_write_gif", broken)
    with pytest.raises(OSError, match="simulated"):
        V.write_video(tmp_path / "out.gif", _palette_clip(n=2), fps=6)
    assert list(tmp_path.iterdir()) == []


def test_write_video_bad_paths(tmp_path):
    frames = _palette_clip(n=2)
    with pytest.raises(ValueError, match=r"clip\.avi.*'\.avi'.*\.mp4, \.gif"):
        V.write_video(tmp_path / "clip.avi", frames, fps=6)
    with pytest.raises(ValueError, match=r"'\(none\)'"):
        V.write_video(tmp_path / "clip", frames, fps=6)
    with pytest.raises(FileNotFoundError, match="no_such_dir.*does not exist"):
        V.write_video(tmp_path / "no_such_dir" / "clip.mp4", frames, fps=6)
    with pytest.raises(V.UnreadableVideoError, match="missing.mp4"):
        V.read_video_frames(tmp_path / "missing.mp4")


def test_write_video_odd_sizes(tmp_path):
    frames = _smooth_clip(n=4, h=47, w=63)
    with pytest.raises(ValueError, match=r"47x63 \(H x W\) is odd"):
        V.write_video(tmp_path / "odd.mp4", frames, fps=6)
    assert not (tmp_path / "odd.mp4").exists()
    back = V.read_video_frames(V.write_video(tmp_path / "odd.mp4", frames, fps=6, pad_odd=True))
    assert back.shape == (4, 48, 64, 3)  # one row and one column repeated
    assert np.abs(back[:, :47, :63].astype(np.int64) - frames).mean() <= 4.0
    odd = _palette_clip(n=3, h=21, w=31)  # GIF has no parity constraint
    np.testing.assert_array_equal(V.read_video_frames(V.write_video(tmp_path / "odd.gif", odd, fps=6)), odd)


def test_read_video_frames_fixture_stream():
    """The fixture's raw MPEG-4 Part 2 stream (no container, no timestamps) decodes whole; its I-frames
    equal the keyframes of the motion-vector decode."""
    if not VIDEO_FIXTURES:
        pytest.skip("no Video-LaVIT fixture set")
    video = VIDEO_FIXTURES[0] / "video.mp4"
    frames = V.read_video_frames(video)
    decoded = V.extract_motions(video, reencode=False)
    assert frames.shape == (len(decoded.frame_types), decoded.height, decoded.width, 3)
    for i, key in decoded.keyframes.items():
        np.testing.assert_array_equal(frames[i], key)


def test_write_video_never_replaces_a_file_created_meanwhile(tmp_path, monkeypatch):
    """Another writer creates the path while ours encodes: the finished file is not published over it."""
    real = V._write_gif
    path = tmp_path / "out.gif"

    def racing(tmp, frames, fps):
        path.write_bytes(b"theirs")
        real(tmp, frames, fps)

    monkeypatch.setattr(V, "_write_gif", racing)
    with pytest.raises(FileExistsError, match="created while it was being written"):
        V.write_video(path, _palette_clip(n=2), fps=6)
    assert path.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif"]
