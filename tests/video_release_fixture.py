"""Builds a tiny checkpoint directory in the Video-LaVIT release layout, for conversion and end-to-end tests.

    visual_tokenizer/          the image_tokenizer_tiny fixture files (LLM width 128)
    language_model/            random HF LLaMA (hidden 128, vocab 48388 + 64 motion codes), sharded torch pickles,
                               a sentencepiece tokenizer.model (identity normalisation, as LLaMA's)
    language_model_sft/        another random HF LLaMA whose shards also hold model.visual_tokenizer.* (the tiny
                               tokenizer, merger and projector perturbed) and model.motion_tokenizer.* (the
                               fixture's motion tokenizer), as the release's VideoLaVITLlamaForCausalLM saves them
    motion_tokenizer.bin, video_3d_unet.bin, video_detokenizer/   the shared/fixtures/video/<set> checkpoint
    image_detokenizer/         SDXL-style diffusers unet/vae (the tiny LaVIT release's highres decoder)
The converter's config for it: ``configs/video_tiny.py``. Returns the torch modules tests use as references.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import EulerDiscreteScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from tests import llm_fixtures as fx
from tests.released_fixture import TEXT_LINES, VT
from tests.test_diffusion import SCHED, UNET_HIGHRES, VAE_TINY, perturbed

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
VIDEO_SET = SHARED / "video" / "tiny"
MOTION_CODES = 64  # the tiny motion tokenizer's codebook
LLM_VOCAB = 48388 + MOTION_CODES
VIDEO_LINES = TEXT_LINES + [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is the man doing in this video? ASSISTANT: he is riding a horse",
    "a white swan moving on the lake", "waves crashing against a lone lighthouse",
]


@dataclass
class VideoReleased:
    root: pathlib.Path
    llm: object  # transformers.LlamaForCausalLM (language_model/)
    llm_sft: object  # transformers.LlamaForCausalLM (language_model_sft/, its LLaMA part)
    unet_keyframe: object
    vae_keyframe: object


def _llm(seed: int):
    hf = fx.make_hf_model(seed=seed, hidden_size=128, intermediate_size=256, vocab_size=LLM_VOCAB,
                          max_position_embeddings=2048)
    with torch.no_grad():  # favour whole-word pieces of the small text vocabulary (3..258 are bytes)
        hf.get_output_embeddings().weight[259:400] *= 3.0
    return hf


def _save_sft_shards(hf, directory: pathlib.Path, extra: dict) -> None:
    """HF's sharded torch pickles + index, with ``extra`` keys (the release's tokenizers) in the last shard."""
    fx.save_hf(hf, directory, safetensors=False)
    index_path = directory / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    shard = torch.load(directory / last, map_location="cpu", weights_only=True)
    shard.update(extra)
    torch.save(shard, directory / last)
    index["weight_map"].update({k: last for k in extra})
    index_path.write_text(json.dumps(index))


def _tokenizer_model(directory: pathlib.Path) -> None:
    fx.train_tokenizer(directory, VIDEO_LINES, llama_normalization=True)
    (directory / "tokenizer.vocab").unlink()


def video_set_dirs() -> list[pathlib.Path]:
    extra = [pathlib.Path(p) for p in os.environ.get("LAVIT_VIDEO_FIXTURES", "").split(":") if p]
    return sorted(p for p in (SHARED / "video").glob("*") if p.is_dir()) + extra


def build_video_release(root: pathlib.Path, video_set: pathlib.Path = VIDEO_SET) -> VideoReleased:
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(VT, root / "visual_tokenizer")
    ckpt = video_set / "checkpoint"
    for name in ("motion_tokenizer.bin", "video_3d_unet.bin"):
        shutil.copyfile(ckpt / name, root / name)
    shutil.copytree(ckpt / "video_detokenizer", root / "video_detokenizer")
    lm = root / "language_model"
    lm.mkdir()
    hf = _llm(seed=3)
    fx.save_hf(hf, lm, safetensors=False)
    _tokenizer_model(lm)
    sft = root / "language_model_sft"
    sft.mkdir()
    hf_sft = _llm(seed=4)
    enc = torch.load(VT / "tokenizer_encoder.bin", map_location="cpu", weights_only=True)
    eva = torch.load(VT / "eva_vitg_psz14.bin", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(12)
    visual = {f"model.visual_tokenizer.{k}": (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype)
              if k.startswith(("causal_encoder.", "vit_proj.", "token_predictor.")) else v for k, v in enc.items()}
    visual.update({f"model.visual_tokenizer.encoder.{k}": v for k, v in eva.items()
                   if not k.startswith(("norm.", "head."))})
    motion = torch.load(ckpt / "motion_tokenizer.bin", map_location="cpu", weights_only=True)
    visual.update({f"model.motion_tokenizer.{k}": v for k, v in motion.items()})
    _save_sft_shards(hf_sft, sft, visual)
    shutil.copyfile(lm / "tokenizer.model", sft / "tokenizer.model")
    hd = root / "image_detokenizer"
    unet = perturbed(TorchUNet(**UNET_HIGHRES), 2)
    vae = perturbed(TorchVAE(**{**VAE_TINY, "scaling_factor": 0.13025}), 3)
    unet.save_pretrained(hd / "unet")
    vae.save_pretrained(hd / "vae")
    EulerDiscreteScheduler(**{k: v for k, v in SCHED.items() if k != "set_alpha_to_one"},
                           timestep_spacing="leading").save_pretrained(hd / "scheduler")
    return VideoReleased(root, hf, hf_sft, unet, vae)
