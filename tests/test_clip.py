"""Flax CLIP and the SD safety checker against transformers' CLIPModel and diffusers' StableDiffusionSafetyChecker."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as TorchSafetyChecker
from safetensors.torch import save_file
from transformers import CLIPConfig
from transformers import CLIPModel as TorchCLIP
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lavit_jax.convert import clip as C
from lavit_jax.convert.torch_io import WeightMismatchError
from lavit_jax.inference import safety_checker as S
from lavit_jax.models.clip import clip_config_from_hf

pytestmark = pytest.mark.parity

IMAGE_SIZE = 32


def tiny_config(hidden_act="quick_gelu", eos_token_id=2):
    """A tiny CLIPConfig dict: different vision and text widths, 2 layers each."""
    return dict(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                         bos_token_id=0, pad_token_id=1, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act=hidden_act),
        projection_dim=16, logit_scale_init_value=2.0,
    )


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def perturb(module, seed=0):
    """Random offsets on every parameter (LayerNorm scales/biases and logit_scale included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def save_bin(folder, state_dict, config_json):
    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder


def save_safetensors(folder, state_dict, config_json):
    folder.mkdir()
    (folder / "config.json").write_text(config_json)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    return folder


# --------------------------------------------------------------------------------------------------
# CLIPModel
# --------------------------------------------------------------------------------------------------


def text_inputs(eos_token_id):
    """input_ids [2, 8] whose pooled token sits at 4 (row 0, a second eos at 6) and 6 (row 1); row 0 is padded
    on the right (which the causal mask already hides from the eos), row 1 on the left (which it does not)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 90, size=(2, 8))
    eos = 98 if eos_token_id == 2 else eos_token_id  # legacy configs pool at argmax(input_ids)
    ids[0, 4] = ids[1, 6] = eos
    if eos_token_id != 2:
        ids[0, 6] = eos  # transformers pools at the first eos
        ids[1, 2] = 98  # the largest id is not the eos here
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    ids[0, 5:][ids[0, 5:] != eos] = 1
    mask[1, :2] = 0
    ids[1, :2] = 1
    return ids, mask


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", 97)], ids=["quick_gelu-legacy_eos", "gelu-eos"])
def clip_case(request, tmp_path_factory):
    act, eos = request.param
    cfg = tiny_config(act, eos)
    tm = TorchCLIP(CLIPConfig(**cfg)).eval()
    perturb(tm)
    sd = tm.state_dict()
    tmp = tmp_path_factory.mktemp(f"clip_{act}")
    tm.save_pretrained(tmp / "st")
    assert (tmp / "st" / "model.safetensors").is_file()
    config_json = (tmp / "st" / "config.json").read_text()
    # an old-style .bin: with the position_ids buffers older transformers saved
    legacy = dict(sd)
    legacy["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    legacy["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_bin(tmp / "bin", legacy, config_json)
    return tm, sd, config_json, tmp, eos


def test_clip_config_matches_transformers():
    d = tiny_config("gelu", 97)
    d["vision_config_dict"] = dict(hidden_size=48, num_attention_heads=6, patch_size=16)  # legacy field wins
    hf = CLIPConfig(**d)
    cfg = clip_config_from_hf(d)
    for tower, hf_tower in (("vision", hf.vision_config), ("text", hf.text_config)):
        for field, value in cfg[tower].items():
            assert value == getattr(hf_tower, field), (tower, field)
    assert cfg.projection_dim == hf.projection_dim
    assert cfg.logit_scale_init_value == hf.logit_scale_init_value
    assert cfg.vision.hidden_size == 48 and cfg.vision.intermediate_size == 3072  # defaults under *_config_dict


@pytest.mark.parametrize("fmt,scan_layers", [("st", True), ("bin", False)])
def test_clip_features_and_logits(clip_case, fmt, scan_layers):
    tm, _, _, tmp, eos = clip_case
    model, params = C.load_clip(tmp / fmt, attention_impl="xla", scan_layers=scan_layers)
    assert ("layers" in params["vision_model"]) == scan_layers and ("layers_1" in params["text_model"]) != scan_layers
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    ids, mask = text_inputs(eos)
    with torch.no_grad():
        pt_pix = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
        pt_ids, pt_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        ref_img = tm.get_image_features(pixel_values=pt_pix).pooler_output.numpy()
        ref_txt = tm.get_text_features(input_ids=pt_ids, attention_mask=pt_mask).pooler_output.numpy()
        ref = tm(input_ids=pt_ids, pixel_values=pt_pix, attention_mask=pt_mask)
    v = {"params": params}
    img = model.apply(v, jnp.asarray(pixels), method="get_image_features")
    txt = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    out = model.apply(v, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert img.shape == (3, 16) and txt.shape == (2, 16)
    assert rel_err(img, ref_img) < 1e-5
    assert rel_err(txt, ref_txt) < 1e-5
    assert rel_err(out["logits_per_image"], ref.logits_per_image.numpy()) < 1e-5
    assert rel_err(out["logits_per_text"], ref.logits_per_text.numpy()) < 1e-5
    assert rel_err(out["image_embeds"], ref.image_embeds.numpy()) < 1e-5
    assert rel_err(out["text_embeds"], ref.text_embeds.numpy()) < 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_clip_missing_key_names_file_and_key(clip_case, fmt):
    _, sd, config_json, tmp, _ = clip_case
    bad = {k: v for k, v in sd.items() if k != "text_model.final_layer_norm.weight"}
    save = save_safetensors if fmt == "safetensors" else save_bin
    folder = save(tmp / f"missing_{fmt}", bad, config_json)
    with pytest.raises(WeightMismatchError) as e:
        C.load_clip(folder)
    msg = str(e.value)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert str(folder / name) in msg
    assert "missing (1): text_model/final_layer_norm/scale" in msg


def test_clip_misshaped_and_unexpected_keys_name_file_and_key(clip_case):
    _, sd, config_json, tmp, _ = clip_case
    bad = dict(sd)
    bad["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(40, 25)
    bad["text_projection.weight"] = torch.zeros(16, 31)
    bad["text_model.extra.weight"] = torch.zeros(3)
    folder = save_safetensors(tmp / "misshaped", bad, config_json)
    with pytest.raises(WeightMismatchError) as e:
        C.load_clip(folder)
    msg = str(e.value)
    assert str(folder / "model.safetensors") in msg
    assert "vision_model.encoder.layers.1.mlp.fc1.weight: shape [40, 25]" in msg
    assert "text_projection.weight: shape [16, 31]" in msg
    assert "unexpected (1): text_model.extra.weight" in msg
    assert "missing" not in msg  # a mis-shaped key is reported once, not also as missing


def test_clip_bad_config_names_file_and_field(clip_case, tmp_path):
    _, _, config_json, _, _ = clip_case
    d = json.loads(config_json)
    d["vision_config"]["hidden_act"] = "relu6"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        C.load_clip_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert "vision_config.hidden_act='relu6'" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Safety checker
# --------------------------------------------------------------------------------------------------

# Per image: margin of its own concept's cosine over the threshold, and whether it gets special care.
# Image 1 is below its threshold by 0.005 but gets special care, so only the +0.01 adjustment flags it.
CONCEPT_MARGINS = (0.02, -0.005, -0.005, -0.05)
SPECIAL_CARE_IMAGE, SPECIAL_MARGIN = 1, 0.02
EXPECTED_NSFW = [True, True, False, False]


def residuals(e):
    """Per row of e [B, P]: its component orthogonal to the other rows (cosine 0 with them)."""
    out = []
    for b in range(len(e)):
        others = np.delete(e, b, axis=0).T  # [P, B-1]
        coef, *_ = np.linalg.lstsq(others, e[b], rcond=None)
        out.append(e[b] - others @ coef)
    return np.stack(out)


@pytest.fixture(scope="module")
def safety_case(tmp_path_factory):
    cfg = tiny_config()
    tm = TorchSafetyChecker(CLIPConfig(**cfg)).eval()
    perturb(tm, seed=3)
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(4, 40, 52, 3)).astype(np.float32)  # non-square: resize + crop
    images[2] = images[2] * 0.5 + 0.25
    size = {"shortest_edge": IMAGE_SIZE}
    fe = CLIPImageProcessorPil(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    clip_input = fe(VaeImageProcessor.numpy_to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        e = tm.visual_projection(tm.vision_model(clip_input)[1]).double().numpy()
    r = residuals(e)
    own_cos = np.linalg.norm(r, axis=1) / np.linalg.norm(e, axis=1)  # cosine of image b with residual b
    assert own_cos.min() > 0.1, own_cos  # thresholds well above the 0.01 adjustment for the other images
    p = cfg["projection_dim"]
    concept = rng.standard_normal((17, p))
    concept_w = np.full(17, 1.5)  # unreachable: cosines are <= 1
    concept[:4] = r
    concept_w[:4] = own_cos - np.array(CONCEPT_MARGINS)
    special = rng.standard_normal((3, p))
    special_w = np.full(3, 1.5)
    special[1] = r[SPECIAL_CARE_IMAGE]  # not the first special concept
    special_w[1] = own_cos[SPECIAL_CARE_IMAGE] - SPECIAL_MARGIN
    with torch.no_grad():
        tm.concept_embeds.copy_(torch.from_numpy(concept))
        tm.concept_embeds_weights.copy_(torch.from_numpy(concept_w))
        tm.special_care_embeds.copy_(torch.from_numpy(special))
        tm.special_care_embeds_weights.copy_(torch.from_numpy(special_w))
        ref_images, ref_nsfw = tm(clip_input=clip_input, images=images.copy())
    tmp = tmp_path_factory.mktemp("safety")
    tm.save_pretrained(tmp / "st")
    config_json = (tmp / "st" / "config.json").read_text()
    # the released checkpoint's layout: vision_model.vision_model.* keys and position_ids buffers
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tm.state_dict().items()}
    legacy["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_bin(tmp / "bin", legacy, config_json)
    return dict(tm=tm, images=images, clip_input=clip_input.numpy(), ref_images=ref_images, ref_nsfw=ref_nsfw,
                tmp=tmp, config_json=config_json)


def test_clip_preprocess_matches_transformers(safety_case):
    ours = S.clip_preprocess(safety_case["images"], IMAGE_SIZE)
    ref = safety_case["clip_input"].transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(ours, ref)  # same PIL resize, same float ops


@pytest.mark.parametrize("fmt,scan_layers", [("st", True), ("bin", False)])
def test_safety_checker_matches_diffusers(safety_case, fmt, scan_layers):
    assert list(safety_case["ref_nsfw"]) == EXPECTED_NSFW  # the designed case: flagged and clean images
    checker = S.SafetyChecker.from_pretrained(safety_case["tmp"] / fmt, attention_impl="xla", scan_layers=scan_layers)
    images, has_nsfw = checker(safety_case["images"])
    assert has_nsfw.dtype == bool and has_nsfw.shape == (4,)
    assert has_nsfw.tolist() == list(safety_case["ref_nsfw"])
    np.testing.assert_array_equal(images, safety_case["ref_images"])
    assert images.dtype == np.float32
    assert not np.any(images[:2]) and np.array_equal(images[2:], safety_case["images"][2:])


def test_safety_checker_scores(safety_case):
    """Concept scores against diffusers' formula evaluated on the torch cosines (one adjusted image)."""
    tm = safety_case["tm"]
    checker = S.SafetyChecker.from_pretrained(safety_case["tmp"] / "st", attention_impl="xla")
    scores = checker.scores(safety_case["images"])
    with torch.no_grad():
        e = tm.visual_projection(tm.vision_model(torch.from_numpy(safety_case["clip_input"]))[1])
        norm = torch.nn.functional.normalize
        cos = (norm(e) @ norm(tm.concept_embeds).T).numpy()
    adjustment = np.where(np.arange(4) == SPECIAL_CARE_IMAGE, 0.01, 0.0)[:, None]
    expected = cos - tm.concept_embeds_weights.numpy() + adjustment
    np.testing.assert_allclose(scores["concept_scores"], expected, rtol=0, atol=5e-4 + 1e-6)
    assert scores["special_scores"][SPECIAL_CARE_IMAGE, 1] == pytest.approx(SPECIAL_MARGIN, abs=5e-4 + 1e-6)


def test_safety_checker_missing_key_names_file(safety_case):
    sd = {k: v for k, v in safety_case["tm"].state_dict().items() if k != "concept_embeds_weights"}
    folder = save_safetensors(safety_case["tmp"] / "missing", sd, safety_case["config_json"])
    with pytest.raises(WeightMismatchError) as e:
        S.SafetyChecker.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(e.value)
    assert "missing (1): concept_embeds_weights" in str(e.value)
