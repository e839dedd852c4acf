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
