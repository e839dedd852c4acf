"""Stage 1: training the dynamic visual tokenizer (selector, merger, codebook, feature decoder).

Following the paper: the frozen EVA features are the target; the selector's hard Gumbel keep
decisions (straight-through) drive the merger; kept tokens are quantized against an EMA codebook
(straight-through for the encoder side); the token decoder reconstructs all patch features from the
kept codes. Loss = (1 - cos(rec, eva)) + w_ratio * (mean keep - rho)^2 [+ w_commit * commitment].

Shapes: pixels [B,H,W,3] -> loss scalar, metrics dict; codebook EMA state lives in ``ema``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax.core import meta
from flax.training import train_state

from lavit_jax.models import codebook as cb
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer, compact
from lavit_jax.ops.config import freeze


class Stage1Model(nn.Module):
    """DynamicVisualTokenizer + the feature-reconstruction token decoder."""

    config: ml_collections.FrozenConfigDict

    def setup(self):
        c = self.config
        if c.decoder_out_dim != c.eva_width:
            raise ValueError(f"config tokenizer.decoder_out_dim ({c.decoder_out_dim}) must equal tokenizer.eva_width "
                             f"({c.eva_width}): stage 1 reconstructs the encoder features")
        self.tokenizer = DynamicVisualTokenizer(self.config)
        self.decoder = TokenDecoder(self.config, highres=False)

    def __call__(self, pixels, rng):
        t = self.tokenizer
        target = jax.lax.stop_gradient(t.encode(pixels)).astype(jnp.float32)  # frozen encoder
        logprob, keep = t.select(target, "gumbel", rng)
        merged = t.causal_encoder(target, keep)
        z = t.encode_task_layer_2(jnp.tanh(t.encode_task_layer_0(merged)).astype(jnp.float32))
        zn = cb.l2_normalize(z)
        codebook = t.quantize.embedding
        ids = cb.nearest_code(zn, codebook)
        q = cb.lookup(codebook, ids).astype(jnp.float32)
        q_st = zn + jax.lax.stop_gradient(q - zn)
        codes, lengths = compact(q_st, keep)
        rec = self.decoder(codes, lengths, features_only=True).astype(jnp.float32)
        return dict(target=target, rec=rec, keep=keep, logprob=logprob, zn=zn, q=q, ids=ids, lengths=lengths)


def cosine_loss(rec, target):
    """mean(1 - cos(rec, target)) over [B, N, C]."""
    return jnp.mean(1.0 - jnp.sum(cb.l2_normalize(rec) * cb.l2_normalize(target), axis=-1))


class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, tx, opt_state) + the EMA codebook statistics and the step RNG."""

    ema: dict
    rng: jax.Array


def trainable_labels(params):
    """'frozen' for the EVA encoder and the (EMA-updated) codebook, 'train' for the rest."""
    def label(path, _):
        names = [getattr(p, "key", str(p)) for p in path]
        frozen = names[:2] == ["tokenizer", "encoder"] or names[:2] == ["tokenizer", "quantize"]
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(tc: ml_collections.ConfigDict, params):
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1))
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay),
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels(params))


def init_params(config, rng):
    """Boxed (logically partitioned) Stage1Model params."""
    x = jnp.zeros((1, config.tokenizer.image_size, config.tokenizer.image_size, 3), jnp.float32)
    return Stage1Model(freeze(config.tokenizer)).init({"params": rng}, x, jax.random.key(0))["params"]


def init_ema(params):
    emb = params["tokenizer"]["quantize"]["embedding"]
    return {"cluster_size": jnp.zeros(emb.shape[:1], jnp.float32), "embed_sum": emb.astype(jnp.float32)}


def init_state(config, rng, params=None) -> TrainState:
    params = meta.unbox(params if params is not None else init_params(config, rng))
    return TrainState.create(apply_fn=None, params=params, tx=make_optimizer(config.train, params),
                             ema=init_ema(params), rng=jax.random.fold_in(rng, 1))


def train_step(config, state: TrainState, pixels):
    """One optimisation step. Returns (new state, metrics)."""
    tc = config.train
    model = Stage1Model(freeze(config.tokenizer))
    rng, step_rng = jax.random.split(state.rng)

    def loss_fn(params):
        out = model.apply({"params": params}, pixels, step_rng)
        rec_loss = cosine_loss(out["rec"], out["target"])
        keep_ratio = out["keep"].mean(axis=1)
        ratio_loss = jnp.mean(jnp.square(keep_ratio - tc.target_keep_ratio))
        valid = out["keep"] > 0.5
        commit = jnp.sum(jnp.square(out["zn"] - out["q"]).sum(-1) * valid) / jnp.maximum(valid.sum(), 1)
        loss = rec_loss + tc.keep_ratio_weight * ratio_loss + tc.commitment_weight * commit
        return loss, (out, dict(loss=loss, rec_loss=rec_loss, ratio_loss=ratio_loss, commitment=commit,
                                keep_ratio=keep_ratio.mean()))

    (_, (out, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    params = state.params
    zn = jax.lax.stop_gradient(out["zn"]).reshape(-1, out["zn"].shape[-1])
    ema, codebook = cb.ema_update(state.ema, zn, out["ids"].reshape(-1), (out["keep"] > 0.5).reshape(-1),
                                  tc.ema_decay)
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["tokenizer"]["quantize"]["embedding"] = codebook.astype(params["tokenizer"]["quantize"]["embedding"].dtype)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["codes_used"] = jnp.sum(ema["cluster_size"] > 1e-3)
    return state.replace(params=params, ema=ema, rng=rng), metrics
