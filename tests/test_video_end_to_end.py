"""Video-LaVIT end to end on a tiny random release (tests/video_release_fixture.py): conversion, then every video
task through the CLI, each writing a valid video of the requested frame count and size, with the generated motion
and keyframe ids equal to transformers' ``generate`` run the way the release runs it."""

import contextlib
import hashlib
import io
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from lavit_jax import __main__ as cli
from lavit_jax import checkpoint
from lavit_jax.convert import motion_tokenizer as convert_motion
from lavit_jax.convert import video_detokenizer as convert_video
from lavit_jax.data import video_io
from lavit_jax.inference import video_llm_tasks as vlt
from lavit_jax.inference import video_sampling
from lavit_jax.inference.video_lavit import VideoLaVIT
from tests.conftest import REPO
from tests.released_fixture import offline_hub_repo
from tests.test_video_llm_tasks import SlowLlama, release_video_embeds
from tests.video_release_fixture import VIDEO_SET, build_video_release
from tools import convert_torch_weights as conv

CONFIG = str(REPO / "configs" / "video_tiny.py")
VIDEO = VIDEO_SET / "video.mp4"
SIZE = ["--width", "128", "--height", "64", "--steps", "2"]


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _convert(src, out, *extra):
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = conv.main(["--src", str(src), "--out", str(out), "--config", CONFIG, "--dtype", "f32", *extra])
    return rc, log.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("video_e2e")
    rel = build_video_release(base / "released")
    before = _tree_hash(rel.root)
    rc, log = _convert(rel.root, base / "out", "--verify")
    assert rc == 0, log
    assert _tree_hash(rel.root) == before  # the source is only read
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(rel.root / "language_model" / "tokenizer.model"))
    return dict(rel=rel, out=base / "out", base=base, log=log, sp=sp,
                model=VideoLaVIT.from_pretrained(base / "out", compilation_cache=False))


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    return cap.out


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parity
def test_converted_video_parts_equal_the_release_files(env):
    for name in ("language_model_sft", "video_detokenizer/unet", "video_detokenizer/vae", "motion_tokenizer",
                 "highres_pixel_decoding/unet"):  # --verify against transformers / diffusers / direct loads
        assert f"verify {name}" in env["log"], env["log"]
    assert "FAIL" not in env["log"]
    manifest = checkpoint.read_manifest(str(env["out"]))
    assert manifest["model"] == "video_lavit"
    assert {"visual_tokenizer", "language_model", "language_model_sft", "motion_tokenizer", "video_detokenizer",
            "highres_pixel_decoding"} <= set(manifest["parts"])
    root, out = env["rel"].root, str(env["out"])
    det = checkpoint.load_video_detokenizer(out, unet_dtype="float32")
    ref = convert_video.load_video_detokenizer(root, det.motion_tokenizer.config, det.motion_encoder.config)
    for name in ("motion_tokenizer_params", "motion_encoder_params", "unet_params", "vae_params"):
        ours, theirs = getattr(det, name), getattr(ref, name)
        leaves_o, tree_o = jax_flatten(ours)
        leaves_r, tree_r = jax_flatten(theirs)
        assert tree_o == tree_r, name
        for a, b in zip(leaves_o, leaves_r, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # the SFT model's own motion tokenizer (its shards' model.motion_tokenizer.*) and understanding weights
    _, sft_mt = checkpoint.load_motion_tokenizer(out, sft=True)
    mt_ref = convert_motion.load_motion_tokenizer(root, det.motion_tokenizer.config)
    for a, b in zip(jax_flatten(sft_mt)[0], jax_flatten(mt_ref)[0], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vt = checkpoint.load_visual_tokenizer(out, understanding=True, decoders=False,
                                          understanding_part="language_model_sft")
    shard = {}
    for f in sorted((root / "language_model_sft").glob("pytorch_model-*.bin")):
        shard.update(torch.load(f, map_location="cpu", weights_only=True))
    w = shard["model.visual_tokenizer.vit_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(vt.params["vit_proj"]["kernel"]), w.T)
    plain = checkpoint.load_visual_tokenizer(out, decoders=False)
    assert not np.array_equal(np.asarray(plain.params["vit_proj"]["kernel"]), w.T)  # the SFT's, not the base's


def jax_flatten(tree):
    return jax.tree.flatten(tree)


@pytest.mark.parity
def test_converted_video_detokenizer_samples_as_the_release_loader(env):
    """A 2-step sample at 64 x 128 from the converted checkpoint equals one from the release files."""
    det = env["model"].video_detokenizer
    ref = convert_video.load_video_detokenizer(env["rel"].root, det.motion_tokenizer.config, det.motion_encoder.config)
    settings = env["model"].video_sampling(steps=2)
    key = np.random.default_rng(0)
    keyframe = key.uniform(-1, 1, (1, 64, 128, 3)).astype(np.float32)
    codes = key.integers(0, 64, (1, 135))
    ours = video_sampling.reconstruct_from_token(det, keyframe, codes, settings, height=64, width=128, seed=3)
    theirs = video_sampling.reconstruct_from_token(ref, keyframe, codes, settings, height=64, width=128, seed=3)
    np.testing.assert_array_equal(np.asarray(ours["frames_uint8"]), np.asarray(theirs["frames_uint8"]))
    assert settings.num_frames == 24 and settings.fps == 6


def _release_copy(env, tmp_path, parts):
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for p in parts:
        s = env["rel"].root / p
        (shutil.copytree if s.is_dir() else shutil.copyfile)(s, src / p)
    return src


def test_conversion_errors_name_the_file_and_field(env, tmp_path, capsys):
    # video_3d_unet.bin without a UNet key: an error listing it (the release loads it non-strictly)
    src = _release_copy(env, tmp_path, ["motion_tokenizer.bin", "video_3d_unet.bin", "video_detokenizer"])
    sd = torch.load(src / "video_3d_unet.bin", weights_only=True)
    dropped = sorted(k for k in sd if k.startswith("unet."))[0]
    del sd[dropped]
    torch.save(sd, src / "video_3d_unet.bin")
    rc, log = _convert(src, tmp_path / "out1")
    assert rc == 2 and "video_3d_unet.bin" in log and "missing" in log.lower(), log
    assert not (tmp_path / "out1").exists()
    # a truncated motion_tokenizer.bin
    (src / "motion_tokenizer.bin").write_bytes((env["rel"].root / "motion_tokenizer.bin").read_bytes()[:3000])
    rc, log = _convert(src, tmp_path / "out2")
    assert rc == 2 and "motion_tokenizer.bin" in log, log
    # widths that do not match the config: named field and file
    shutil.copyfile(env["rel"].root / "motion_tokenizer.bin", src / "motion_tokenizer.bin")
    bad = tmp_path / "bad_config.py"
    bad.write_text("from configs import video_tiny\n\ndef get_config():\n    c = video_tiny.get_config()\n"
                   "    c.motion_tokenizer.width = 40\n    return c\n")
    rc, log = _convert(src, tmp_path / "out3", "--config", str(bad))
    assert rc == 2 and "motion_tokenizer.width" in log and "motion_tokenizer.bin" in log, log
    # language_model_sft/ with both in-shard tokenizer keys and a visual_weight.bin: the in-shard keys win;
    # in-shard keys without the projector: an error naming the folder
    src2 = _release_copy(env, tmp_path / "b", ["visual_tokenizer", "language_model_sft"])
    torch.save({}, src2 / "language_model_sft" / "visual_weight.bin")
    rc, log = _convert(src2, tmp_path / "out5")
    assert rc == 0, log
    assert checkpoint.part_entry(str(tmp_path / "out5"), "language_model_sft")["visual_weight"]
    index = json.loads((src2 / "language_model_sft" / "pytorch_model.bin.index.json").read_text())
    shard = src2 / "language_model_sft" / index["weight_map"]["model.visual_tokenizer.vit_proj.weight"]
    sd = torch.load(shard, weights_only=True)
    del sd["model.visual_tokenizer.vit_proj.weight"], sd["model.visual_tokenizer.vit_proj.bias"]
    torch.save(sd, shard)
    rc, log = _convert(src2, tmp_path / "out6")
    assert rc == 2 and "vit_proj" in log and "language_model_sft" in log, log
    # the image model's config has no video sections
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = conv.main(["--src", str(src), "--out", str(tmp_path / "out4"), "--config",
                        str(REPO / "configs" / "tiny.py")])
    assert rc == 2 and "configs/video_lavit.py" in log.getvalue(), log.getvalue()


# ------------------------------------------------------------------------------------------ tasks


@pytest.mark.parity
def test_video_qa_cli_matches_hf_generate(env, capsys):
    """The answer printed by ``video-qa`` equals HF ``generate`` of the SFT LLaMA on the release's spliced
    chat embeddings, built from the same keyframe features and motion ids."""
    q = "What is the man doing in this video?"
    out = run_cli(["video-qa", VIDEO, q, "--checkpoint", env["out"], "--keep", "argmax", "--max-new-tokens", 10,
                   "--no-progress"], capsys).strip()
    m = env["model"]
    clips = m.load_clips(VIDEO)
    vt = m.sft_visual_tokenizer
    feats, lengths = vt.understanding_features(list(clips.keyframes_rgb), mode="argmax")
    codes = m.motion_codes(clips.motion)
    n = len(clips.start_indices)
    assert n == 2 and codes.shape == (2, 135)
    embeds, mask = release_video_embeds(env["rel"].llm_sft, SlowLlama(env["sp"]), [q],
                                        np.asarray(feats)[None], np.asarray(lengths)[None], [n], codes[None])
    with torch.no_grad():
        ref = env["rel"].llm_sft.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                          max_new_tokens=10, min_new_tokens=8,
                                          suppress_tokens=list(range(32000, 49412)), eos_token_id=2,
                                          pad_token_id=2, bos_token_id=1)[0].numpy()
    text = env["sp"].decode([int(t) for t in ref if 2 < t < env["sp"].get_piece_size()])
    assert out and out == text.split("\\n")[0].strip()


def _hf_after(hf, ids, start, **kw):
    prompt = torch.tensor([list(ids) + [start]])
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=2, **kw)[0].numpy()
    return out[out != 2], out[prompt.shape[1]:]


@pytest.mark.parity
def test_text2video_cli_ids_match_hf_and_the_video_is_valid(env, tmp_path, capsys):
    out, ids_out = tmp_path / "swan.mp4", tmp_path / "swan.npz"
    prompt = "a white swan moving on the lake"
    run_cli(["text2video", prompt, "--out", out, "--checkpoint", env["out"], *SIZE, "--keyframe-width", 128,
             "--keyframe-height", 64, "--keyframe-steps", 2, "--greedy", "--ids-out", ids_out, "--no-progress"], capsys)
    frames = video_io.read_video_frames(out)
    assert frames.shape == (24, 64, 128, 3)
    saved = np.load(ids_out)
    hf = env["rel"].llm
    text = env["sp"].encode(prompt)
    full, new = _hf_after(hf, text, 32000, do_sample=False, max_new_tokens=256, min_new_tokens=20,
                          guidance_scale=4.0, suppress_tokens=list(range(3, 32000)) + list(range(48386, 49412)),
                          eos_token_id=32001, bos_token_id=32000)
    assert len(saved["keyframe_codes_0"]) > 0
    np.testing.assert_array_equal(saved["keyframe_codes_0"], new[new >= 32002] - 32002)
    _, new_m = _hf_after(hf, full, 48386, do_sample=False, max_new_tokens=500, min_new_tokens=20, guidance_scale=7.0,
                         suppress_tokens=list(range(3, 48386)), eos_token_id=48387, bos_token_id=48386)
    motion = new_m[new_m > 48387][:135] - 48388
    assert len(motion) > 0
    motion = np.concatenate([motion, np.zeros(135 - len(motion), motion.dtype)])
    np.testing.assert_array_equal(saved["motion_codes_0"], motion)


def test_text2video_long_video_and_gif(env, tmp_path, capsys):
    out = tmp_path / "long.gif"
    run_cli(["text2video", "waves", "--out", out, "--checkpoint", env["out"], *SIZE, "--keyframe-width", 128,
             "--keyframe-height", 64, "--keyframe-steps", 2, "--num-clips", 2, "--no-progress"], capsys)
    with Image.open(out) as im:
        assert im.size == (128, 64) and im.n_frames <= 47  # Pillow merges identical consecutive frames
        assert im.n_frames > 24


@pytest.mark.parity
def test_image2video_cli_motion_ids_match_hf(env, tmp_path, capsys):
    img = tmp_path / "cat.png"
    y, x = np.mgrid[0:48, 0:80] / 48
    Image.fromarray((np.stack([x / 2, y, x * y], -1) * 255).clip(0, 255).astype(np.uint8)).save(img)
    out, ids_out = tmp_path / "cat.mp4", tmp_path / "cat.npz"
    run_cli(["image2video", img, "a cat", "--out", out, "--checkpoint", env["out"], *SIZE, "--greedy", "--keep",
             "argmax", "--ids-out", ids_out, "--no-progress"], capsys)
    assert video_io.read_video_frames(out).shape == (24, 64, 128, 3)
    saved = np.load(ids_out)
    ids, lengths = env["model"].visual_tokenizer.tokenize([str(img)], add_special=True, mode="argmax")
    image_ids = np.asarray(ids)[0, : int(np.asarray(lengths)[0])]
    assert image_ids[0] == 32000 and image_ids[-1] == 32001
    prompt = list(image_ids) + env["sp"].encode("a cat")
    np.testing.assert_array_equal(saved["prompt_ids"], prompt)
    _, new = _hf_after(env["rel"].llm, prompt, 48386, do_sample=False, max_new_tokens=500, min_new_tokens=20,
                       guidance_scale=7.0, suppress_tokens=list(range(3, 48386)), eos_token_id=48387,
                       bos_token_id=48386)
    motion = new[new > 48387][:135] - 48388
    np.testing.assert_array_equal(saved["motion_codes"],
                                  np.concatenate([motion, np.zeros(135 - len(motion), motion.dtype)]))


@pytest.mark.parity
def test_reconstruct_video_cli_tokenizes_each_clip(env, tmp_path, capsys):
    out, ids_out = tmp_path / "rec.mp4", tmp_path / "rec.npz"
    run_cli(["reconstruct-video", VIDEO, "--out", out, "--checkpoint", env["out"], *SIZE, "--max-clips", 1,
             "--ids-out", ids_out, "--no-progress"], capsys)
    assert video_io.read_video_frames(out).shape == (24, 64, 128, 3)
    saved = np.load(ids_out)
    clips = video_io.load_video_clips(VIDEO, max_clips=1)
    det = env["model"].video_detokenizer
    ref = det.motion_tokenizer.apply({"params": det.motion_tokenizer_params}, clips.motion, method="tokenize")
    np.testing.assert_array_equal(saved["motion_codes"], np.asarray(ref))
    assert list(saved["start_indices"]) == list(clips.start_indices)


def test_video_cli_errors(env, tmp_path, capsys):
    def err(argv):
        rc = cli.main([str(a) for a in argv])
        assert rc == 2
        return capsys.readouterr().err

    assert "not found" in err(["video-qa", tmp_path / "nope.mp4", "what?", "--checkpoint", env["out"]])
    text = tmp_path / "notavideo.mp4"
    text.write_text("hello")
    assert "notavideo.mp4" in err(["video-caption", text, "--checkpoint", env["out"]])
    assert "empty question" in err(["video-qa", VIDEO, " ", "--checkpoint", env["out"]])
    assert "video extension" in err(["reconstruct-video", VIDEO, "--out", tmp_path / "x.png", "--checkpoint",
                                     env["out"]])
    assert "multiple of 64" in err(["reconstruct-video", VIDEO, "--out", tmp_path / "x.mp4", "--width", 100,
                                    "--checkpoint", env["out"]])
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"x")
    assert "--overwrite" in err(["reconstruct-video", VIDEO, "--out", existing, "--checkpoint", env["out"]])
    assert existing.read_bytes() == b"x"
    image_ckpt = tmp_path / "image_ckpt"
    image_ckpt.mkdir()
    (image_ckpt / "lavit.json").write_text(json.dumps({"format": "lavit-jax/1", "parts": {}}))
    assert "Video-LaVIT" in err(["video-qa", VIDEO, "what?", "--checkpoint", image_ckpt])
    short = tmp_path / "short.mp4"
    video_io.write_video(short, np.zeros((1, 32, 32, 3), np.uint8), 6)
    assert "short.mp4" in err(["video-qa", short, "what?", "--checkpoint", env["out"]])
    assert vlt.MOTION_TOKENS == 135


def test_hub_repo_id_of_a_video_release_converts_once(env, tmp_path, monkeypatch, capsys):
    """A Video-LaVIT repo in an offline Hugging Face cache: downloaded parts include the video ones, converted once
    with the video config, then read from the cache; the CLI's video commands take the repo id too."""
    from lavit_jax import hub

    commit = offline_hub_repo(env["rel"].root, "fake/Video-LaVIT-tiny", "89abcdef0123456789abcdef0123456789abcdef",
                              tmp_path, monkeypatch)
    model = VideoLaVIT.from_pretrained("fake/Video-LaVIT-tiny", config=CONFIG, conversion_dtype="float32",
                                       compilation_cache=False)
    expected = hub.converted_dir("fake/Video-LaVIT-tiny", commit, "float32")
    assert model.ckpt_dir == expected and "converting fake/Video-LaVIT-tiny" in capsys.readouterr().err
    assert sorted(model.parts) == sorted(checkpoint.read_manifest(str(env["out"]))["parts"])
    out = run_cli(["video-qa", VIDEO, "what?", "--checkpoint", "fake/Video-LaVIT-tiny", "--config", CONFIG,
                   "--dtype", "float32", "--keep", "argmax", "--max-new-tokens", 9, "--no-progress"], capsys)
    want = env["model"].answer(VIDEO, "what?", keep="argmax", max_new_tokens=9)
    assert out.strip() == want
    with pytest.raises(ValueError, match="configs/video_lavit.py"):  # the image release's config lacks the video parts
        hub.resolve("fake/Video-LaVIT-tiny", conversion_dtype="bfloat16", config=str(REPO / "configs" / "tiny.py"))
