"""Detokenizer stage: diffusion training of the UNet conditioned on the token decoder's outputs.

Per image: the frozen visual tokenizer gives its codes (argmax keep decisions, on the fly), the token
decoder turns them into the UNet condition (low-res SD-1.5: [B, 256, D]; high-res SDXL: prompt
embeddings + pooled embedding + time ids), the frozen VAE encodes the image to latents x0
(a sample of the posterior, times the scaling factor); a uniform timestep t and noise give
x_t = add_noise(x0, noise, t) and the UNet regresses ``schedulers.training_target`` (epsilon, v or
x0, by ``train.prediction_type`` or the scheduler config's) with a mean squared error. With
probability ``train.cond_dropout`` an image's condition is replaced by the sampler's negative (low-res:
the stored uncond embeddings, masked; high-res: zeros) so classifier-free guidance works. EMA weights
of the trained parts (``train.ema_decay``) live in ``TrainState.ema`` for sampling.

Trained: the UNet and (``train.train_token_decoder``) the token decoder. Frozen: the tokenizer, the
codebook, the VAE and the uncond embeddings. Everything starts from ``train.init_from`` (a converted
checkpoint with the visual tokenizer and the decoder's diffusion folder) or, without it, from a seeded
random init of ``config.detokenizer`` (tests, smoke runs).

Logged: loss, cond_dropped (fraction of the batch), t_mean.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from lavit_jax import checkpoint, vocab
from lavit_jax.data import input_pipeline
from lavit_jax.inference import schedulers
from lavit_jax.inference.detokenizer import token_condition
from lavit_jax.inference.sampling import sdxl_time_ids
from lavit_jax.models import unet as unet_lib
from lavit_jax.models import vae as vae_lib
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer
from lavit_jax.ops.config import freeze
from lavit_jax.train.task import Task

TRAINED = ("unet", "decoder")


class DetokenizerTask(Task):
    """The detokenizer stage (see the module docstring)."""

    stage = "detokenizer"
    train_keys = frozenset({"cond_dropout", "ema_decay", "prediction_type", "train_token_decoder"})

    def __init__(self, config, mesh, rules):
        super().__init__(config, mesh, rules)
        tc, dc = self.tc, config.get("detokenizer")
        if dc is None:
            raise ValueError("config detokenizer: missing (the UNet / VAE / scheduler section of the detokenizer "
                             "stage; see configs/lavit_7b.py:detokenizer)")
        self.decoder = dc.decoder
        if self.decoder not in checkpoint.DECODER_FOLDERS:
            raise ValueError(f"config detokenizer.decoder={self.decoder!r}: expected one of "
                             f"{tuple(checkpoint.DECODER_FOLDERS)}")
        self.highres = self.decoder == "highres"
        dtype = tc.get("compute_dtype", None) or "float32"
        src = tc.init_from
        folder = os.path.join(src, checkpoint.DECODER_FOLDERS[self.decoder]) if src else ""
        if src and os.path.isfile(os.path.join(src, checkpoint.MANIFEST)) and os.path.isdir(folder):
            tok = checkpoint.tokenizer_config(src)
            self.unet_config = checkpoint.read_unet_config(os.path.join(folder, "unet_config.json"))
            self.vae_config = checkpoint.read_vae_config(os.path.join(folder, "vae_config.json"))
            sched = checkpoint.read_scheduler_config(os.path.join(folder, "scheduler_config.json"), kind="ddpm")
        else:
            tok = config.tokenizer
            self.unet_config = unet_lib.unet_config(dc.unet.to_dict())
            self.vae_config = vae_lib.vae_config(dc.vae.to_dict())
            sched = schedulers.scheduler_config(dict(dc.scheduler.to_dict()), kind="ddpm")
        prediction = tc.get("prediction_type", "")
        self.sched = freeze(sched, prediction_type=prediction or None)
        self.alphas = np.asarray(schedulers.alphas_cumprod(self.sched), np.float32)
        self.tok_config = freeze(tok, dtype=dtype, param_dtype="float32")
        self.tokenizer = DynamicVisualTokenizer(self.tok_config)
        self.token_decoder = TokenDecoder(self.tok_config, self.highres)
        self.unet = unet_lib.UNet2DConditionModel(self.unet_config, dtype=jnp.dtype(dtype), param_dtype=jnp.float32,
                                                  attention_impl=self.tok_config.attention_impl)
        self.vae = vae_lib.AutoencoderKL(self.vae_config)  # float32, frozen
        self.factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        self.resolution = int(dc.resolution)

    def check(self):
        tc = self.tc
        if not 0.0 <= tc.cond_dropout < 1.0:
            raise ValueError(f"config train.cond_dropout={tc.cond_dropout}: must be in [0, 1)")
        if self.resolution % self.factor:
            raise ValueError(f"config detokenizer.resolution={self.resolution} is not a multiple of the VAE factor "
                             f"{self.factor}")
        if self.sched.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"config train.prediction_type={self.sched.prediction_type!r}: expected epsilon, "
                             "v_prediction or sample")
        width = sum(self.tok_config.unet_dims_highres) if self.highres else self.tok_config.unet_dim_lowres
        if set(self._context_widths()) != {width}:
            raise ValueError(f"config detokenizer.unet.cross_attention_dim={self._context_widths()[0]} does not "
                             f"match the token decoder's output width {width} (config tokenizer.*)")

    def _context_widths(self):
        d = self.unet_config.cross_attention_dim
        return tuple(d) if isinstance(d, tuple | list) else (d,)

    def check_sources(self):
        src = self.tc.init_from
        if src and not os.path.isfile(os.path.join(src, checkpoint.MANIFEST)):
            raise FileNotFoundError(f"config train.init_from={src!r} is not a converted checkpoint (no "
                                    f"{checkpoint.MANIFEST})")

    # ----------------------------------------------------------------- host side
    def dataset(self, process_index, process_count, local_batch):
        return input_pipeline.diffusion_batches(
            self.tc.data_dir, self.tok_config.image_size, self.resolution, local_batch, self.tc.seed,
            process_index=process_index, process_count=process_count, workers=self.tc.get("data_workers", 0))

    def load_init(self, params):
        src = self.tc.init_from
        if not src:
            return params
        vt = checkpoint.load_visual_tokenizer(src, scan_layers=self.tok_config.scan_layers)
        if self.decoder not in vt.decoder_params:
            raise checkpoint.CheckpointPartError(f"config train.init_from={src}: no {self.decoder} token decoder")
        pipe = checkpoint.load_pipeline(src, self.decoder, dtype="float32")
        loaded = {"tokenizer": {k: v for k, v in vt.params.items() if k in params["tokenizer"]},
                  "decoder": vt.decoder_params[self.decoder], "unet": pipe.unet_params, "vae": pipe.vae_params}
        if not self.highres:
            loaded["uncond"] = np.load(os.path.join(src, checkpoint.DECODER_FOLDERS["lowres"],
                                                    "uncond_embeddings.npy")).reshape(-1, params["uncond"].shape[-1])
        out = dict(params)
        for part, tree in loaded.items():
            try:
                out[part] = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype).reshape(old.shape), tree,
                                         params[part]) if part != "uncond" else jnp.asarray(tree, jnp.float32)
            except (ValueError, TypeError) as e:
                raise ValueError(f"config train.init_from={src}: its {part} does not match the config "
                                 f"({str(e).splitlines()[0][:200]})") from None
        return out

    def flops_per_step(self, batch_size, counts):
        """Not modelled: 6N does not count convolutions (their FLOPs scale with the feature-map sizes), so the
        stage reports no MFU."""
        return 0.0

    # ----------------------------------------------------------------- traced
    def init_params(self, rng):
        k_tok, k_dec, k_unet, k_vae = jax.random.split(rng, 4)
        s, r, f = self.tok_config.image_size, self.resolution, self.factor
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        pixels = jnp.zeros((dp, s, s, 3))
        tok = self.tokenizer.init(k_tok, pixels, with_llm_features=False)["params"]
        n = (s // self.tok_config.patch_size) ** 2
        dec = self.token_decoder.init(k_dec, jnp.zeros((dp, n, self.tok_config.code_dim)),
                                      jnp.full((dp,), n, jnp.int32))["params"]
        lat = jnp.zeros((dp, r // f, r // f, self.unet_config.in_channels))
        width = self._context_widths()[0]
        extra = {}
        if self.highres:
            extra = dict(text_embeds=jnp.zeros((dp, self.tok_config.pooled_dim)), time_ids=jnp.zeros((dp, 6)))
        unet = self.unet.init(k_unet, lat, jnp.zeros((dp,), jnp.int32), jnp.zeros((dp, n, width)), **extra)["params"]
        vae = self.vae.init(k_vae, jnp.zeros((dp, r, r, 3)))["params"]
        params = {"tokenizer": tok, "decoder": dec, "unet": unet, "vae": vae}
        if not self.highres:
            params["uncond"] = jnp.zeros((1, width), jnp.float32)  # the stored negative replaces it (init_from)
        return params

    def labels(self, params):
        train = set(TRAINED) if self.tc.get("train_token_decoder", True) else {"unet"}
        return {k: jax.tree.map(lambda _, k=k: "train" if k in train else "frozen", v) for k, v in params.items()}

    def init_ema(self, params):
        return {k: jax.tree.map(lambda x: x.astype(jnp.float32), params[k]) for k in TRAINED}

    def ema_shardings(self, ema_abstract, param_shardings, replicated):
        return {k: param_shardings[k] for k in TRAINED}

    def loss(self, params, ema, batch, rng, step):
        tc = self.tc
        k_drop, k_lat, k_noise, k_t = jax.random.split(rng, 4)
        frozen = jax.lax.stop_gradient({k: params[k] for k in ("tokenizer", "vae")})
        codes, lengths = self.tokenizer.apply({"params": frozen["tokenizer"]}, batch["pixels"], mode="argmax",
                                              method="tokenize")
        codebook = frozen["tokenizer"]["quantize"]["embedding"]
        cond = token_condition(self.token_decoder, params["decoder"], codebook, codes + vocab.VISUAL_OFFSET, lengths)
        b = codes.shape[0]
        drop = jax.random.bernoulli(k_drop, tc.cond_dropout, (b,))
        extra, mask = {}, None
        if self.highres:
            prompt, pooled = cond
            context = jnp.where(drop[:, None, None], 0.0, prompt)
            r = self.resolution
            extra = dict(text_embeds=jnp.where(drop[:, None], 0.0, pooled), time_ids=sdxl_time_ids(b, r, r))
        else:
            s = cond.shape[1]
            u = jax.lax.stop_gradient(params["uncond"]).astype(cond.dtype)
            neg = jnp.zeros_like(cond).at[:, : u.shape[0]].set(u)
            context = jnp.where(drop[:, None, None], neg, cond)
            mask = jnp.where(drop[:, None], jnp.arange(s)[None, :] < u.shape[0], True)
        mean, logvar = self.vae.apply({"params": frozen["vae"]}, batch["images"], method=vae_lib.AutoencoderKL.encode)
        x0 = jax.lax.stop_gradient(vae_lib.vae_to_latents(vae_lib.sample_latent(mean, logvar, k_lat), self.vae_config))
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        t = schedulers.sample_training_timesteps(k_t, b, self.sched.num_train_timesteps)
        xt = schedulers.add_noise(self.alphas, x0, noise, t)
        pred = self.unet.apply({"params": params["unet"]}, xt, t, context, encoder_attention_mask=mask, **extra)
        target = schedulers.training_target(self.sched, x0, noise, t)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        return loss, dict(loss=loss, cond_dropped=drop.mean(), t_mean=t.mean()), {}

    def update(self, params, ema, stats, rng, step):
        d = self.tc.ema_decay
        new = {k: jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(jnp.float32), ema[k], params[k])
               for k in TRAINED}
        return params, new, {}
