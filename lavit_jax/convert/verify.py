"""``convert_torch_weights.py --verify``: run each converted part against its PyTorch original on random inputs.

- language_model: ``transformers.LlamaForCausalLM`` loaded from SRC/language_model vs the converted Flax
  LLaMA, logits on random ids;
- pixel_decoding / highres_pixel_decoding: ``diffusers`` UNet (noise prediction on random latents, context,
  timestep and, for SDXL, pooled embeds + time ids) and VAE (decode of random latents);
- visual_tokenizer: converted params vs a direct load of the released files (no PyTorch module exists
  outside the reference repository);
- Video-LaVIT: language_model_sft as language_model; video_detokenizer: the 3D UNet against diffusers'
  ``UNetSpatioTemporalConditionModel`` (plain conditioning, same weights), the temporal VAE against
  ``AutoencoderKLTemporalDecoder``, the motion tokenizer and condition encoder params against a direct load.

Both sides run in float32. Prints ``verify <part>/<module>: max abs diff A, rel R (tol T) ok|FAIL`` and
returns False when any relative difference (max |a - b| / max |b|) exceeds the tolerance: 1e-4 for a
float32 conversion, 2e-2 for bfloat16 storage.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint
from lavit_jax.convert import tokenizer as convert_tokenizer
from lavit_jax.models import llama
from lavit_jax.models.unet import UNet2DConditionModel
from lavit_jax.models.vae import AutoencoderKL, decode_to_images

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _report(name, ours, ref, tol, log) -> bool:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        log(f"verify {name}: shape {ours.shape} != reference {ref.shape} FAIL")
        return False
    diff = float(np.abs(ours - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-12)
    ok = bool(np.isfinite(rel) and rel <= tol)
    log(f"verify {name}: max abs diff {diff:.3e}, rel {rel:.3e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
    return ok


def verify_language_model(src, out, tol, log, rng, folder: str = "language_model") -> bool:
    import torch
    import transformers

    cfg = checkpoint.read_llama_config(os.path.join(out, folder, "config.json"))
    params = _f32(checkpoint.load_tree(os.path.join(out, folder, "params")))
    ids = rng.integers(0, cfg.vocab_size, size=(2, 12))
    logits, _ = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    del params
    # (Video-LaVIT's SFT shards also hold its tokenizers: transformers skips those keys, as the release's class
    # reads them into its own submodules)
    ref_model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(src, folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    del ref_model
    return _report(folder, logits, ref, tol, log)


def verify_video_detokenizer(src, out, tol, log, rng) -> bool:
    """The converted 3D UNet (in diffusers' plain SVD conditioning, which shares its weights) against diffusers'
    ``UNetSpatioTemporalConditionModel`` loaded strictly from ``video_3d_unet.bin``'s ``unet.*``, the temporal VAE's
    decode against diffusers' ``AutoencoderKLTemporalDecoder``, and the motion tokenizer / condition encoder
    params against a direct load of the release files (their PyTorch modules live only in the reference repo)."""
    import json

    import torch
    from diffusers import AutoencoderKLTemporalDecoder as TorchVAE
    from diffusers import UNetSpatioTemporalConditionModel as TorchUNet

    from lavit_jax.convert import torch_io
    from lavit_jax.convert import video_detokenizer as convert_video
    from lavit_jax.inference import video_sampling
    from lavit_jax.models import video_unet

    root = os.path.join(out, checkpoint.VIDEO_DETOKENIZER)
    with open(os.path.join(root, "unet_config.json")) as f:
        ucfg_dict = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    ucfg = video_unet.video_unet_config(ucfg_dict, motion_conditioning=False)
    params = _f32(checkpoint.load_tree(os.path.join(root, "unet")))
    f, hw = 3, 2 ** (len(ucfg.block_out_channels) - 1) * 2
    x = rng.standard_normal((1, f, hw, hw, ucfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, 1, ucfg.cross_attention_dim[0])).astype(np.float32)
    ids = np.array([[6.0, 127.0, 0.02]], np.float32)
    t = np.float32(0.25 * np.log(20.0))
    ours = video_unet.UNetSpatioTemporalConditionModel(ucfg, attention_impl="xla").apply(
        {"params": params}, jnp.asarray(x), t, jnp.asarray(ctx), jnp.asarray(ids))
    del params
    sd = torch_io.strip_prefix(torch_io.load_torch_file(os.path.join(src, convert_video.VIDEO_3D_UNET_FILE)),
                               convert_video.UNET_PREFIX)
    ref_unet = TorchUNet(**ucfg_dict).eval()
    ref_unet.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        ref = ref_unet(torch.tensor(np.moveaxis(x, -1, 2)), torch.tensor(t), encoder_hidden_states=torch.tensor(ctx),
                       added_time_ids=torch.tensor(ids)).sample.numpy()
    del ref_unet, sd
    ok = _report("video_detokenizer/unet", ours, np.moveaxis(ref, 2, -1), tol, log)
    det = checkpoint.load_video_detokenizer(out, unet_dtype=jnp.float32)
    z = rng.standard_normal((f, 4, 4, det.vae.config.latent_channels)).astype(np.float32)
    frames, _ = video_sampling.jit_decode(det, jnp.asarray(z[None]), decode_chunk=f)
    ref_vae = TorchVAE.from_pretrained(os.path.join(src, convert_video.DETOKENIZER_DIR, "vae"),
                                       torch_dtype=torch.float32).eval()
    with torch.no_grad():
        img = ref_vae.decode(torch.tensor(z.transpose(0, 3, 1, 2)) / ref_vae.config.scaling_factor,
                             num_frames=f).sample.numpy().transpose(0, 2, 3, 1)
    ok &= _report("video_detokenizer/vae", np.asarray(frames)[0], img, TOLERANCE["float32"], log)
    mt = convert_video.load_motion_tokenizer(src, det.motion_tokenizer.config)
    _, me = convert_video.load_video_3d_unet(src, video_unet.video_unet_config(ucfg_dict), det.motion_encoder.config)
    for name, ours_p, ref_p in (("motion_tokenizer (params)", det.motion_tokenizer_params, mt),
                                ("video_detokenizer/motion_encoder (params)", det.motion_encoder_params, me)):
        a = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(ours_p)])
        b = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(ref_p)])
        ok &= _report(name, a, b, TOLERANCE["float32"], log)
    return ok


def verify_pixel_decoding(src, out, tol, log, rng, folder, source=None) -> bool:
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    root = os.path.join(out, folder)
    ok = True
    # UNet
    cfg = checkpoint.read_unet_config(os.path.join(root, "unet_config.json"))
    hw = 2 ** (len(cfg.block_out_channels) - 1) * 2
    x = rng.standard_normal((1, hw, hw, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, 7, cfg.cross_attention_dim[0])).astype(np.float32)
    t = np.array([int(rng.integers(1, 1000))])
    text_embeds = time_ids = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text_embeds = rng.standard_normal((1, pooled)).astype(np.float32)
        time_ids = np.array([[hw * 8, hw * 8, 0, 0, hw * 8, hw * 8]], np.float32)
    params = _f32(checkpoint.load_tree(os.path.join(root, "unet")))
    ours = UNet2DConditionModel(cfg, attention_impl="xla").apply({"params": params}, x, t, ctx, None, text_embeds,
                                                                  time_ids)
    del params
    ref_unet = TorchUNet.from_pretrained(os.path.join(src, source or folder, "unet"), torch_dtype=torch.float32).eval()
    kw = {}
    if text_embeds is not None:
        kw["added_cond_kwargs"] = {"text_embeds": torch.tensor(text_embeds), "time_ids": torch.tensor(time_ids)}
    with torch.no_grad():
        ref = ref_unet(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), encoder_hidden_states=torch.tensor(ctx),
                       **kw).sample.numpy().transpose(0, 2, 3, 1)
    del ref_unet
    ok &= _report(f"{folder}/unet", ours, ref, tol, log)
    # VAE (stored in float32 whatever --dtype)
    vcfg = checkpoint.read_vae_config(os.path.join(root, "vae_config.json"))
    z = rng.standard_normal((1, 4, 4, vcfg.latent_channels)).astype(np.float32)
    vparams = _f32(checkpoint.load_tree(os.path.join(root, "vae")))
    ours = decode_to_images(AutoencoderKL(vcfg), vparams, jnp.asarray(z))
    ref_vae = TorchVAE.from_pretrained(os.path.join(src, source or folder, "vae"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        img = ref_vae.decode(torch.tensor(z.transpose(0, 3, 1, 2)) / ref_vae.config.scaling_factor).sample
    ref = (img / 2 + 0.5).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
    ok &= _report(f"{folder}/vae", ours, ref, TOLERANCE["float32"], log)
    return ok


def verify_visual_tokenizer(src, out, tol, log, rng) -> bool:
    vt = checkpoint.load_visual_tokenizer(out)
    direct = convert_tokenizer.load_visual_tokenizer(src, vt.config)
    ours = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(vt.params)])
    ref = np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(direct)])
    return _report("visual_tokenizer (params)", ours, ref, tol, log)


def verify_safety_checker(src, out, tol, log, rng) -> bool:
    """The converted checker's image embeddings (CLIP vision tower + projection, float32) and NSFW flags against
    diffusers' StableDiffusionSafetyChecker on random CLIP inputs."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as TorchChecker

    from lavit_jax.convert.converter import SAFETY_SOURCE

    checker = checkpoint.load_safety_checker(out)
    v = checker.model.config.vision
    x = rng.standard_normal((2, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    res, state = checker.model.apply({"params": checker.params}, jnp.asarray(x),
                                     capture_intermediates=lambda mdl, _: mdl.name == "visual_projection")
    ours = state["intermediates"]["visual_projection"]["__call__"][0]
    ref_model = TorchChecker.from_pretrained(os.path.join(src, SAFETY_SOURCE), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        xt = torch.tensor(x.transpose(0, 3, 1, 2))
        ref = ref_model.visual_projection(ref_model.vision_model(xt)[1]).numpy()
        _, ref_nsfw = ref_model(clip_input=xt, images=np.zeros((2, 4, 4, 3), np.float32))
    ok = _report("safety_checker (image embeds)", ours, ref, TOLERANCE["float32"], log)
    same = [bool(a) == bool(b) for a, b in zip(np.asarray(res["has_nsfw"]), ref_nsfw)]
    log(f"verify safety_checker (nsfw flags): {'ok' if all(same) else 'FAIL'}")
    return ok and all(same)


def verify(src: str, out: str, manifest: dict, *, tolerance: float | None = None, log=print, seed: int = 0) -> bool:
    """Compares every converted part in ``manifest`` with its PyTorch original; True when all are within tolerance."""
    tol = tolerance if tolerance is not None else TOLERANCE.get(manifest.get("dtype", "float32"), 2e-2)
    rng = np.random.default_rng(seed)
    ok = True
    for part in manifest.get("parts", {}):
        if part in ("language_model", checkpoint.SFT_LANGUAGE_MODEL):
            ok &= verify_language_model(src, out, tol, log, rng, part)
        elif part == checkpoint.VIDEO_DETOKENIZER:
            ok &= verify_video_detokenizer(src, out, tol, log, rng)
        elif part in ("pixel_decoding", "highres_pixel_decoding"):
            video = manifest.get("model") == "video_lavit" and part == "highres_pixel_decoding"
            ok &= verify_pixel_decoding(src, out, tol, log, rng, part, "image_detokenizer" if video else None)
        elif part == "visual_tokenizer":
            ok &= verify_visual_tokenizer(src, out, tol, log, rng)
        elif part == checkpoint.SAFETY_CHECKER:
            ok &= verify_safety_checker(src, out, tol, log, rng)
    if not ok:
        print("verify: some converted parts differ from their PyTorch originals beyond tolerance", file=sys.stderr)
    return bool(ok)
