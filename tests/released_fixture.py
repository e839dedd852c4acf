"""Builds a tiny checkpoint directory in the released LaVIT layout (DESIGN.md), for conversion and e2e tests.

    visual_tokenizer/        the image_tokenizer_tiny fixture files (widths: LLM 128, low-res 48, high-res 48+80)
    language_model/          random HF LLaMA (hidden 128, vocab 32002 + 128) as sharded torch pickles + index,
                             a sentencepiece tokenizer.model, visual_weight.bin (perturbed merger + projector)
    pixel_decoding/          SD-1.5-style diffusers unet/vae (cross dim 48), PNDM scheduler, uncond_embeddings.bin
    highres_pixel_decoding/  SDXL-style diffusers unet/vae (cross dim 128, text_time), Euler scheduler
Returns the torch modules so tests can compose the PyTorch reference pipeline.
"""

from __future__ import annotations

import pathlib
import shutil
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import EulerDiscreteScheduler, PNDMScheduler
from diffusers import UNet2DConditionModel as TorchUNet

from lavit_jax.convert import torch_io as weights
from tests import llm_fixtures as fx
from tests.test_diffusion import SCHED, UNET_HIGHRES, UNET_LOWRES, VAE_TINY, perturbed

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "image_tokenizer_tiny"
VT = FIXTURE / "checkpoint" / "visual_tokenizer"
LLM_VOCAB = 32002 + 128
TEXT_LINES = [
    "A photo of an astronaut riding a horse in the forest.", "Question: what is in the image? Answer: a dog",
    "a sculpture of a duck made of wool", "A small cactus wearing a straw hat and neon sunglasses in the desert.",
    "Cute adorable little goat, unreal engine, cozy interior lighting", "the quick brown fox jumps over the lazy dog",
]


@dataclass
class Released:
    root: pathlib.Path
    llm: object  # transformers.LlamaForCausalLM
    unet_lowres: object
    vae_lowres: object
    unet_highres: object
    vae_highres: object
    uncond: torch.Tensor  # [1, L, 48]


def build_released(root: pathlib.Path) -> Released:
    root = pathlib.Path(root)
    shutil.copytree(VT, root / "visual_tokenizer")
    # language model: sharded .bin + index, sentencepiece tokenizer, visual_weight.bin
    lm = root / "language_model"
    lm.mkdir(parents=True)
    hf = fx.make_hf_model(seed=3, hidden_size=128, intermediate_size=256, vocab_size=LLM_VOCAB)
    with torch.no_grad():  # favour ids of the small text vocabulary so captions decode to real words
        hf.get_output_embeddings().weight[259:400] *= 3.0  # whole-word pieces (3..258 are byte pieces)
    fx.save_hf(hf, lm, safetensors=False)
    fx.train_tokenizer(lm, TEXT_LINES)
    (lm / "tokenizer.vocab").unlink()
    enc = torch.load(VT / "tokenizer_encoder.bin", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(11)
    visual = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype)
              for k, v in enc.items() if k.startswith(("causal_encoder.", "vit_proj."))}
    torch.save(visual, lm / "visual_weight.bin")
    # pixel decoding (SD-1.5 style)
    pd = root / "pixel_decoding"
    unet_lo = perturbed(TorchUNet(**UNET_LOWRES), 0)
    vae_lo = perturbed(TorchVAE(**VAE_TINY), 1)
    unet_lo.save_pretrained(pd / "unet", safe_serialization=False)
    vae_lo.save_pretrained(pd / "vae", safe_serialization=False)
    PNDMScheduler(**SCHED, skip_prk_steps=True).save_pretrained(pd / "scheduler")
    uncond = torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(5))
    torch.save(uncond, pd / "uncond_embeddings.bin")
    # high-res pixel decoding (SDXL style)
    hd = root / "highres_pixel_decoding"
    unet_hi = perturbed(TorchUNet(**UNET_HIGHRES), 2)
    vae_hi = perturbed(TorchVAE(**{**VAE_TINY, "scaling_factor": 0.13025}), 3)
    unet_hi.save_pretrained(hd / "unet")  # safetensors, as the SDXL release
    vae_hi.save_pretrained(hd / "vae")
    EulerDiscreteScheduler(**{k: v for k, v in SCHED.items() if k != "set_alpha_to_one"},
                           timestep_spacing="leading").save_pretrained(hd / "scheduler")
    return Released(root, hf, unet_lo, vae_lo, unet_hi, vae_hi, uncond)


def load_state_dict(path) -> dict:
    return weights.load_torch_file(path)


def offline_hub_repo(release_root, repo_id: str, commit: str, tmp_path, monkeypatch) -> str:
    """A Hugging Face cache under ``tmp_path`` holding ``release_root`` as ``repo_id`` (main -> ``commit``), used
    offline, with the lavit-jax cache there too. Returns ``commit``."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(release_root, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("LAVIT_CACHE", str(tmp_path / "lavit-cache"))
    return commit
