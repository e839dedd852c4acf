"""Released-layout directory -> converter (with --verify) -> every CLI command, against a PyTorch-composed reference.

One tiny released checkpoint is built per module (tests/released_fixture.py) and converted once. The
references: HF ``generate`` on the sequence built as the reference builds it (features / ids from the
released tokenizer files loaded directly), and LaVIT's decoding loop with the diffusers UNet, VAE and
DDIM scheduler fed the same initial noise. Also the error paths of the CLI and the converter.
"""

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from lavit_jax import __main__ as cli
from lavit_jax import checkpoint
from lavit_jax.convert import tokenizer as CT
from lavit_jax.convert import verify as verify_conversion
from lavit_jax.data.image_io import preprocess
from lavit_jax.data.text_tokenizer import load_text_tokenizer
from lavit_jax.inference import llm_tasks
from lavit_jax.inference.lavit import CheckpointPartError, LaVIT
from lavit_jax.models.token_decoder import TokenDecoder
from tests import tokenizer_fixture as tfx
from tests.conftest import REPO
from tests.released_fixture import LLM_VOCAB, build_released, offline_hub_repo
from tests.test_diffusion import GUIDANCE, STEPS, torch_reference
from tests.test_llm_tasks import _reference_understanding
from tools import convert_torch_weights as conv

TINY = str(REPO / "configs" / "tiny.py")
SIZE, SEED = 16, 0
GEN = ["--steps", str(STEPS), "--guidance", str(GUIDANCE), "--size", str(SIZE), "--seed", str(SEED)]


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    rel = build_released(base / "released")
    before = _digest(rel.root)
    out = base / "converted"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = conv.main(["--src", str(rel.root), "--out", str(out), "--config", TINY, "--dtype", "f32", "--verify"])
    log = buf.getvalue()
    assert rc == 0, log
    assert _digest(rel.root) == before, "the source must not be modified"
    y, x = np.mgrid[0:64, 0:64] / 64
    img = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y) ** 0.5], -1)
    img[16:32, 16:32] = (1.0, 0.2, 0.1)
    Image.fromarray((img * 255).astype(np.uint8)).save(base / "img.png")
    tok_cfg = checkpoint.load_visual_tokenizer(str(out)).config
    return dict(rel=rel, out=out, log=log, img=base / "img.png", base=base, tok_cfg=tok_cfg,
                text=load_text_tokenizer(rel.root / "language_model"))


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out.strip(), cap.err


# ------------------------------------------------------------------------------------------ references


def reference_image(env, ids, decoder, seed=SEED):
    """LaVIT's decoding loop in PyTorch (diffusers UNet/VAE/DDIM) on ids [1, N] (LLM space)."""
    rel, root, cfg = env["rel"], env["rel"].root, env["tok_cfg"]
    highres = decoder == "highres"
    codebook = CT.load_codebook(root / "visual_tokenizer" / "tokenizer_encoder.bin")
    ids = np.asarray(ids)
    codes = codebook[ids - 32002][None]
    name = "highres_tokenizer_decoder.bin" if highres else "tokenizer_decoder.bin"
    params = CT.load_token_decoder(root / "visual_tokenizer" / name, cfg, highres)
    cond = TokenDecoder(cfg, highres).apply({"params": params}, jnp.asarray(codes), jnp.asarray([len(ids)]))
    cond = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), cond)
    folder = "highres_pixel_decoding" if highres else "pixel_decoding"
    sched = DDIMScheduler.from_pretrained(root / folder, subfolder="scheduler")
    # the same initial noise as the pipeline draws for ``seed``
    noise = jax.random.normal(jax.random.split(jax.random.key(seed))[0], (1, SIZE // 2, SIZE // 2, 4), jnp.float32)
    noise = torch.tensor(np.asarray(noise).transpose(0, 3, 1, 2))
    if highres:
        images, _ = torch_reference(rel.unet_highres, rel.vae_highres, sched, cond[0], noise, pooled=cond[1], size=SIZE)
    else:
        images, _ = torch_reference(rel.unet_lowres, rel.vae_lowres, sched, cond, noise, uncond=rel.uncond[0])
    return (images[0] * 255).round()


def assert_image_close(path, ref):
    got = np.asarray(Image.open(path).convert("RGB"), np.float64)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1.0, f"{path}: max diff {np.abs(got - ref).max()} (uint8 levels)"
    assert ref.std() > 1.0  # a non-trivial image


def released_tokenizer(env, understanding=False):
    root = env["rel"].root
    vw = root / "language_model" / "visual_weight.bin" if understanding else None
    return tfx.released_visual_tokenizer(root, env["tok_cfg"], decoders=(), understanding_weights=vw)


def hf_image_ids(env, prefix_ids, text, llm_guidance, min_new, max_new, **hf_kw):
    """HF generate (greedy = top-k 1 sampling) on [prefix ids] + text ids + [IMG] -> visual ids (>= 32002).
    ``hf_kw``: more ``generate`` arguments (``num_beams``, ``negative_prompt_ids``)."""
    ids = list(prefix_ids) + env["text"].encode(text) + [32000]
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = env["rel"].llm.generate(input_ids=torch.tensor([ids]), attention_mask=mask,
                                      do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new,
                                      suppress_tokens=list(range(3, 32000)), eos_token_id=32001, pad_token_id=2,
                                      guidance_scale=llm_guidance, **hf_kw)[0, len(ids):].numpy()
    return np.array([t for t in out if t >= 32002])


# ------------------------------------------------------------------------------------------ conversion


def test_conversion_verified_and_loadable(env):
    log = env["log"]
    for name in ("language_model", "pixel_decoding/unet", "pixel_decoding/vae", "highres_pixel_decoding/unet",
                 "highres_pixel_decoding/vae"):
        assert f"verify {name}: max abs diff" in log and f"verify {name}:" in log
    assert "FAIL" not in log
    manifest = checkpoint.read_manifest(str(env["out"]))
    assert set(manifest["parts"]) == {"visual_tokenizer", "language_model", "pixel_decoding", "highres_pixel_decoding"}
    assert manifest["parts"]["language_model"]["visual_weight"]
    model = LaVIT.from_pretrained(env["out"])
    assert model.available_decoders() == ["lowres", "highres"]
    # the converted LLM equals the HF weights
    _, params, _ = model.language_model
    hf = env["rel"].llm.state_dict()
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), hf["lm_head.weight"].numpy().T)


def test_verify_detects_a_bad_conversion(env, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(env["out"], bad)
    unet_dir = bad / "pixel_decoding" / "unet"
    tree = checkpoint.load_tree(str(unet_dir))
    tree["conv_in"]["kernel"] = tree["conv_in"]["kernel"] * 1.1
    shutil.rmtree(unet_dir)
    checkpoint.save_tree(str(unet_dir), tree)
    manifest = {"dtype": "float32", "parts": {"pixel_decoding": {}}}
    assert verify_conversion.verify(str(env["rel"].root), str(bad), manifest) is False
    assert "pixel_decoding/unet" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ CLI tasks


@pytest.mark.parity
def test_cli_caption_and_vqa_match_hf(env, capsys):
    img, ckpt = str(env["img"]), str(env["out"])
    rc, caption, err = run_cli(capsys, "caption", img, "--checkpoint", ckpt)
    assert rc == 0, err
    # the release's keep decisions: a hard Gumbel sample, here seeded as the CLI's default (--seed 0)
    feats, lengths = released_tokenizer(env, understanding=True).understanding_features(img, mode="sample", seed=0)
    feats, lengths = np.asarray(feats), np.asarray(lengths)
    hf, tok = env["rel"].llm, env["text"]
    embeds, mask = _reference_understanding(hf, feats, lengths)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=2, max_new_tokens=36,
                          min_new_tokens=8, suppress_tokens=list(range(32000, LLM_VOCAB)), bos_token_id=1,
                          eos_token_id=2, pad_token_id=2, length_penalty=1.0)
    ref = tok.hf.batch_decode(out, skip_special_tokens=True)[0].strip().split(".")[0]
    assert ref.strip() and caption == ref

    q = "what is in the image?"
    rc, answer, err = run_cli(capsys, "vqa", img, q, "--checkpoint", ckpt, "--no-progress")
    assert rc == 0, err
    text_ids, text_mask = tok.encode_batch([f"Question: {q} Answer:"])
    embeds, mask = _reference_understanding(hf, feats, lengths, text_ids, text_mask)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=5, max_new_tokens=10,
                          min_new_tokens=2, suppress_tokens=list(range(32000, LLM_VOCAB)), eos_token_id=2,
                          pad_token_id=2, length_penalty=0.0, early_stopping=True)
    ref = llm_tasks.postprocess_answer(tok.hf.batch_decode(out, skip_special_tokens=True)[0])
    nlp = llm_tasks._spacy_lemmatizer()
    ref = llm_tasks.lemmatize([ref], nlp)[0] if nlp is not None else ref.lower()  # always lower-cased
    assert answer == ref


@pytest.mark.parity
def test_cli_text2image_lowres_matches_reference(env, capsys):
    out_png, ids_npy = env["base"] / "t2i.png", env["base"] / "t2i.npy"
    rc, msg, err = run_cli(capsys, "text2image", "a duck made of wool", "--out", str(out_png), "--decoder", "lowres",
                           *GEN, "--llm-guidance", "3", "--top-k", "1", "--min-new-tokens", "4",
                           "--max-new-tokens", "12", "--ids-out", str(ids_npy), "--checkpoint", str(env["out"]))
    assert rc == 0, err
    assert "diffusion" in err  # progress bars on stderr
    ids = np.load(ids_npy)[0]
    ref_ids = hf_image_ids(env, [], "a duck made of wool", 3.0, 4, 12)
    assert len(ref_ids) >= 4
    np.testing.assert_array_equal(ids, ref_ids)
    assert_image_close(out_png, reference_image(env, ids, "lowres"))


@pytest.mark.parity
def test_cli_edit_highres_matches_reference(env, capsys):
    out_png, ids_npy = env["base"] / "edit.png", env["base"] / "edit.npy"
    rc, msg, err = run_cli(capsys, "edit", str(env["img"]), "in the desert", "--out", str(out_png), *GEN,
                           "--llm-guidance", "5", "--top-k", "1", "--min-new-tokens", "4", "--max-new-tokens", "10",
                           "--ids-out", str(ids_npy), "--checkpoint", str(env["out"]), "--no-progress")
    assert rc == 0, err
    img_ids, n = released_tokenizer(env).tokenize(str(env["img"]), add_special=False, mode="sample", seed=SEED)
    prefix = np.asarray(img_ids)[0, : int(n[0])]
    # the release caps the new tokens of a token prompt at the prompt's length (not --max-new-tokens)
    cap = len(prefix) + len(env["text"].encode("in the desert"))
    ref_ids = hf_image_ids(env, prefix, "in the desert", 5.0, 4, cap)
    ids = np.load(ids_npy)[0]
    np.testing.assert_array_equal(ids, ref_ids)
    assert_image_close(out_png, reference_image(env, ids, "highres"))


@pytest.mark.parity
def test_cli_reconstruct_and_python_api(env, capsys):
    out_png, ids_npy = env["base"] / "rec.png", env["base"] / "rec.npy"
    rc, msg, err = run_cli(capsys, "reconstruct", str(env["img"]), "--out", str(out_png), *GEN,
                           "--ids-out", str(ids_npy), "--checkpoint", str(env["out"]), "--no-progress")
    assert rc == 0, err
    img_ids, n = released_tokenizer(env).tokenize(str(env["img"]), add_special=False, mode="sample", seed=SEED)
    ref_ids = np.asarray(img_ids)[0, : int(n[0])]
    ids = np.load(ids_npy)[0]
    np.testing.assert_array_equal(ids, ref_ids)
    assert_image_close(out_png, reference_image(env, ids, "highres"))  # highres is the default decoder
    # the Python API gives the same image
    model = LaVIT.from_pretrained(env["out"])
    image = model.reconstruct(Image.open(env["img"]), steps=STEPS, guidance=GUIDANCE, size=SIZE, seed=SEED)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(out_png).convert("RGB")))
    # ... and so do pre-normalised [3, S, S] pixels (what the release's processor hands its methods)
    pixels = preprocess(Image.open(env["img"]), model.visual_tokenizer.config.image_size)[0].transpose(2, 0, 1)
    image = model.reconstruct(pixels, steps=STEPS, guidance=GUIDANCE, size=SIZE, seed=SEED)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(out_png).convert("RGB")))


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def partial_ckpt(env):
    """A conversion of a source with only visual_tokenizer/ and pixel_decoding/."""
    src = env["base"] / "partial_src"
    src.mkdir()
    for part in ("visual_tokenizer", "pixel_decoding"):
        shutil.copytree(env["rel"].root / part, src / part)
    out = env["base"] / "partial_out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY, "--dtype", "f32"]) == 0
    return out, buf.getvalue()


def test_partial_source_converts_present_parts(partial_ckpt):
    out, log = partial_ckpt
    assert "absent in source, not converted: language_model/" in log
    assert "absent in source, not converted: highres_pixel_decoding/" in log
    assert set(checkpoint.read_manifest(str(out))["parts"]) == {"visual_tokenizer", "pixel_decoding"}


@pytest.mark.parametrize("argv,needle", [
    (["caption", "{img}"], "language_model/"),
    (["vqa", "{img}", "what?"], "language_model/"),
    (["text2image", "a duck", "--out", "{base}/x.png", "--decoder", "highres"], "highres_pixel_decoding/"),
    (["text2image", "a duck", "--out", "{base}/x.png"], "language_model/"),
    (["edit", "{img}", "a duck", "--out", "{base}/x.png", "--decoder", "lowres"], "language_model/"),
    (["reconstruct", "{img}", "--out", "{base}/x.png", "--decoder", "highres"], "highres_pixel_decoding/"),
])
def test_cli_checkpoint_lacking_part(env, partial_ckpt, capsys, argv, needle):
    argv = [a.format(img=env["img"], base=env["base"]) for a in argv]
    rc, out, err = run_cli(capsys, *argv, "--checkpoint", str(partial_ckpt[0]))
    assert rc == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not (env["base"] / "x.png").exists()


def test_api_checkpoint_lacking_part(partial_ckpt):
    model = LaVIT.from_pretrained(partial_ckpt[0])
    with pytest.raises(CheckpointPartError, match="language_model/"):
        model.caption(np.zeros((8, 8, 3), np.uint8))


def test_cli_input_errors(env, capsys, tmp_path):
    ckpt = ["--checkpoint", str(env["out"])]
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    cases = [
        (["caption", str(tmp_path / "missing.jpg"), *ckpt], "missing.jpg"),
        (["caption", str(not_image), *ckpt], "notes.png"),
        (["vqa", str(env["img"]), "  ", *ckpt], "empty question"),
        (["text2image", "a", "--out", str(tmp_path / "a.png"), "--num-beams", "2", *ckpt], "--llm-guidance 1"),
        (["text2image", "a", "--out", str(tmp_path / "a.png"), "--negative-prompt", " ", *ckpt], "--negative-prompt"),
        (["compose", "ids:1,x", "--out", str(tmp_path / "a.png"), *ckpt], "ids:1,2,3"),
        (["reconstruct", str(not_image), "--out", str(tmp_path / "a.png"), *ckpt], "notes.png"),
        (["caption", str(env["img"]), "--checkpoint", str(tmp_path / "nockpt")], "nockpt"),
        (["caption", str(env["img"]), "--checkpoint", str(tmp_path)], "not a converted"),
        (["reconstruct", str(env["img"]), "--out", str(tmp_path / "no" / "a.png"), *ckpt], "output directory"),
    ]
    for argv, needle in cases:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(ValueError, match="empty question"):
        LaVIT.from_pretrained(env["out"]).vqa(str(env["img"]), "   ")


# ------------------------------------------------------------------------------------------ generation controls


@pytest.mark.parity
@pytest.mark.parametrize("case", ["greedy", "negative_prompt", "beam", "unconditional"])
def test_image_token_search_matches_hf(env, case):
    """The release's generate_image_tokenids controls: greedy (use_nucleus_sampling=False), a negative prompt
    (uncond_input_ids -> HF negative_prompt_ids), beam search, and an empty (unconditional) prompt."""
    model = LaVIT.from_pretrained(env["out"])
    text, kw, hf_kw, guidance = "a duck made of wool", {}, {}, 3.0
    if case == "negative_prompt":
        kw["negative_prompt"] = "a horse in the forest"
        hf_kw["negative_prompt_ids"] = torch.tensor([env["text"].encode("a horse in the forest")])
    elif case == "beam":
        guidance = 1.0  # beam search runs without LLM guidance
        kw["num_beams"] = hf_kw["num_beams"] = 3
    elif case == "unconditional":
        text = ""
    ids, n = model.text2image_ids(text, do_sample=False, llm_guidance=guidance, min_new_tokens=4, max_new_tokens=12,
                                  **kw)
    ref = hf_image_ids(env, [], text, guidance, 4, 12, **hf_kw)
    assert len(ref) >= 4
    np.testing.assert_array_equal(np.asarray(ids)[0, : int(n[0])], ref)


@pytest.mark.parity
def test_raw_token_id_prompt_follows_the_release(env):
    """A prompt of raw ids (the release's generate_image(..., is_token_prompt=True); CLI ``compose ids:...``):
    ids as given + [IMG], at most len(ids) new tokens (the release's cap), as HF generate; out-of-vocabulary
    ids are refused before the LLM runs."""
    model = LaVIT.from_pretrained(env["out"])
    prompt = env["text"].encode("a sculpture of a duck made of wool") + [32002 + 5, 32002 + 77]
    ids, n = model.generate_image_ids([prompt], do_sample=False, llm_guidance=5.0, min_new_tokens=4)
    ref = hf_image_ids(env, prompt, "", 5.0, 4, len(prompt))
    np.testing.assert_array_equal(np.asarray(ids)[0, : int(n[0])], ref)
    with pytest.raises(ValueError, match=r"\[0, 32130\)"):
        model.generate_image_ids([[1, LLM_VOCAB]])


def test_max_new_tokens_past_the_decoder_is_capped_with_a_warning(env, capsys):
    model = LaVIT.from_pretrained(env["out"])
    cap = (env["tok_cfg"].image_size // env["tok_cfg"].patch_size) ** 2
    cfg = model._generation_config(llm_guidance=4.0, top_k=50, top_p=1.0, temperature=1.0, min_new_tokens=20,
                                   max_new_tokens=cap + 100, do_sample=True, num_beams=1, length_penalty=1.0,
                                   negative_prompt=None)
    assert cfg.max_new_tokens == cap
    assert f"max_new_tokens={cap + 100}" in capsys.readouterr().err


def test_converter_truncated_shard_names_file(env, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(env["rel"].root / "language_model", src / "language_model")
    shard = src / "language_model" / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:2000])
    out = tmp_path / "out"
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY]) == 2
    assert "pytorch_model-00002-of-00003.bin" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_converter_lists_all_key_problems(env, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(env["rel"].root / "language_model", src / "language_model")
    lm = src / "language_model"
    index = json.loads((lm / "pytorch_model.bin.index.json").read_text())
    name = index["weight_map"]["model.norm.weight"]
    sd = torch.load(lm / name, weights_only=True)
    sd.pop("model.norm.weight")  # missing
    sd["model.layers.0.extra.weight"] = torch.zeros(3)  # unexpected
    first = next(k for k in sd if k.endswith("_proj.weight"))
    sd[first] = torch.zeros(5, 5)  # mis-shaped
    torch.save(sd, lm / name)
    out = tmp_path / "out"
    assert conv.main(["--src", str(src), "--out", str(out), "--config", TINY]) == 2
    err = capsys.readouterr().err
    assert "missing (1): model/norm/weight" in err
    assert "model.layers.0.extra.weight" in err and first in err
    assert not out.exists()


_NO_TORCH = r"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from lavit_jax.inference.lavit import LaVIT
m = LaVIT.from_pretrained(sys.argv[1])
ids, n = m.visual_tokenizer.tokenize(sys.argv[2], add_special=True)
cap = m.caption(sys.argv[2], max_new_tokens=4, min_new_tokens=1)
img = m.text2image("a red square", steps=2, size=16, max_new_tokens=8, min_new_tokens=2)
assert "torch" not in {k for k, v in sys.modules.items() if v is not None}
assert "transformers" not in sys.modules  # the converted text_tokenizer.json is read with tokenizers alone
print("OK", int(n[0]), repr(cap), img.size)
"""


def test_runtime_runs_without_torch(env):
    """Tokenize, caption and text->image on the converted checkpoint with torch unimportable."""
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(env["out"]), str(env["img"])], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK "), proc.stdout
    assert "(16, 16)" in proc.stdout


def test_low_memory_frees_the_llm_and_verbose_times_parts(env, capsys):
    model = LaVIT.from_pretrained(env["out"], low_memory=True, verbose=True)
    image = model.text2image("a red square", steps=2, size=16, max_new_tokens=8, min_new_tokens=2)
    assert image.size == (16, 16)
    assert "llm" not in model._cache and ("detok", "highres") in model._cache
    err = capsys.readouterr().err
    assert "loaded llm in" in err and "loaded detok/highres in" in err


# ------------------------------------------------------------------------------------------ hub loading


@pytest.fixture()
def fake_hub(env, tmp_path, monkeypatch):
    """A Hugging Face cache holding the tiny release as repo ``fake/LaVIT-tiny`` (main -> COMMIT), offline."""
    return offline_hub_repo(env["rel"].root, "fake/LaVIT-tiny", "0123456789abcdef0123456789abcdef01234567",
                            tmp_path, monkeypatch)


def test_hub_repo_id_converts_once_into_the_cache_and_loads(env, fake_hub, capsys):
    from lavit_jax import hub

    model = LaVIT.from_pretrained("fake/LaVIT-tiny", config=TINY, conversion_dtype="float32")
    err = capsys.readouterr().err
    expected = hub.converted_dir("fake/LaVIT-tiny", fake_hub, "float32")
    assert model.ckpt_dir == expected and "converting fake/LaVIT-tiny@0123456789ab" in err
    manifest = json.loads((REPO / expected / "lavit.json").read_text())
    assert sorted(manifest["parts"]) == sorted(checkpoint.read_manifest(str(env["out"]))["parts"])
    stamp = (REPO / expected / "lavit.json").stat().st_mtime_ns
    # the same repo, revision (main or its commit) and dtype: read from the cache, not converted again
    again = LaVIT.from_pretrained("fake/LaVIT-tiny", revision=fake_hub, config=TINY, conversion_dtype="float32")
    assert again.ckpt_dir == expected and "converting" not in capsys.readouterr().err
    assert (REPO / expected / "lavit.json").stat().st_mtime_ns == stamp
    # the converted copy behaves as the locally converted checkpoint
    want = LaVIT.from_pretrained(env["out"]).caption(str(env["img"]), keep="argmax")
    rc, out, err = run_cli(capsys, "caption", str(env["img"]), "--keep", "argmax", "--checkpoint", "fake/LaVIT-tiny",
                           "--revision", fake_hub, "--config", TINY, "--dtype", "float32", "--no-progress")
    assert rc == 0, err
    assert out == want and "converting" not in err


def test_hub_errors_name_the_repo_and_revision(env, fake_hub, capsys, tmp_path):
    with pytest.raises(FileNotFoundError, match="fake/Missing.*not in the Hugging Face cache"):
        LaVIT.from_pretrained("fake/Missing", config=TINY)
    with pytest.raises(FileNotFoundError, match="fake/LaVIT-tiny at revision v9"):
        LaVIT.from_pretrained("fake/LaVIT-tiny", revision="v9", config=TINY)
    with pytest.raises(ValueError, match="conversion_dtype"):
        LaVIT.from_pretrained("fake/LaVIT-tiny", conversion_dtype="int4", config=TINY)
    rc, out, err = run_cli(capsys, "caption", str(env["img"]), "--checkpoint", str(env["out"]), "--revision", "main")
    assert rc == 2 and "--revision applies to a repo id" in err
    rc, out, err = run_cli(capsys, "caption", str(env["img"]), "--checkpoint", "not a/repo id")
    assert rc == 2 and "nor a Hugging Face repo id" in err
