"""Stage 1: training the dynamic visual tokenizer (selector, merger, codebook, feature decoder).

Following the paper: the frozen EVA features are the target; the selector's hard Gumbel keep
decisions (straight-through) drive the merger; kept tokens are quantized against an EMA codebook
(straight-through for the encoder side); the token decoder reconstructs all patch features from the
kept codes. Loss = (1 - cos(rec, eva)) + w_ratio * (mean keep - rho)^2 [+ w_commit * commitment].

Two phases (``train.quantize_start_step``): before it the selector and merger train without
quantization (the decoder reads the continuous normalised features); from it on, the codes. At the
start of the quantized phase the codebook is initialised by spherical k-means over the kept
features of the first ``train.kmeans_batches`` batches (``train.kmeans_init``); every
``train.dead_code_every`` steps the codes whose EMA count fell below ``train.dead_code_threshold``
restart at random kept features of the batch. The nearest-code search runs over a codebook sharded
on ``'tensor'`` (``ops.collectives.sharded_nearest_code``).

Logged: loss, rec_loss, rec_cosine, ratio_loss, commitment, keep_ratio, codebook_usage (fraction
of codes used in the batch), perplexity (of the batch's code distribution), codes_used (EMA count
above 1e-3), dead_codes.

Shapes: pixels [B,H,W,3] -> loss scalar; the codebook EMA state lives in ``TrainState.ema``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from lavit_jax import checkpoint
from lavit_jax.data import input_pipeline
from lavit_jax.models import codebook as cb
from lavit_jax.models.token_decoder import TokenDecoder
from lavit_jax.models.tokenizer import DynamicVisualTokenizer, compact
from lavit_jax.ops.collectives import sharded_nearest_code
from lavit_jax.ops.config import freeze
from lavit_jax.train.task import Task, global_batch

EMA_EPS = 1e-5


def feature_decoder_config(tokenizer_config) -> ml_collections.FrozenConfigDict:
    """The stage-1 feature decoder's config: the tokenizer's, with ``decoder_out_dim = eva_width``.

    Stage 1 reconstructs the encoder features, so its decoder outputs ``eva_width`` channels
    (``decoder_out_dim`` sizes the released decoders' last layer; 1408 = eva_width in the release).
    """
    return freeze(tokenizer_config, decoder_out_dim=tokenizer_config.eva_width)


class Stage1Model(nn.Module):
    """DynamicVisualTokenizer + the feature-reconstruction token decoder."""

    config: ml_collections.FrozenConfigDict

    def setup(self):
        self.tokenizer = DynamicVisualTokenizer(self.config)
        self.decoder = TokenDecoder(feature_decoder_config(self.config), highres=False)

    def features(self, pixels, rng, mode: str = "gumbel"):
        """pixels [B,H,W,3] -> dict(target [B,N,C] frozen encoder features (float32), logprob [B,N,2],
        keep [B,N], zn [B,N,d] l2-normalised pre-quantizer features)."""
        t = self.tokenizer
        target = jax.lax.stop_gradient(t.encode(pixels)).astype(jnp.float32)  # frozen encoder
        logprob, keep = t.select(target, mode, rng)
        merged = t.causal_encoder(target, keep)
        z = t.encode_task_layer_2(jnp.tanh(t.encode_task_layer_0(merged)).astype(jnp.float32))
        return dict(target=target, logprob=logprob, keep=keep, zn=cb.l2_normalize(z))

    def reconstruct(self, codes, keep):
        """codes [B,N,d] (per patch; the kept ones are used), keep [B,N] -> reconstructed features [B,N,C]."""
        compacted, lengths = compact(codes, keep)
        return self.decoder(compacted, lengths, features_only=True).astype(jnp.float32)

    def __call__(self, pixels, rng):
        out = self.features(pixels, rng)
        out["rec"] = self.reconstruct(out["zn"], out["keep"])
        out["codebook"] = self.tokenizer.quantize.embedding
        return out


def cosine_loss(rec, target):
    """mean(1 - cos(rec, target)) over [B, N, C]."""
    return jnp.mean(1.0 - jnp.sum(cb.l2_normalize(rec) * cb.l2_normalize(target), axis=-1))


def trainable_labels(params):
    """'frozen' for the EVA encoder and the (EMA-updated) codebook, 'train' for the rest."""
    def label(path, _):
        names = [getattr(p, "key", str(p)) for p in path]
        frozen = names[:2] == ["tokenizer", "encoder"] or names[:2] == ["tokenizer", "quantize"]
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def model_config(config) -> ml_collections.FrozenConfigDict:
    """The tokenizer config with the training numerics: compute dtype from train.compute_dtype, float32 masters."""
    return freeze(config.tokenizer, dtype=config.train.get("compute_dtype", None) or config.tokenizer.dtype,
                  param_dtype="float32")


def init_params(config, rng):
    """Boxed (logically partitioned) Stage1Model params."""
    x = jnp.zeros((1, config.tokenizer.image_size, config.tokenizer.image_size, 3), jnp.float32)
    return Stage1Model(model_config(config)).init({"params": rng}, x, jax.random.key(0))["params"]


def init_ema(params):
    emb = params["tokenizer"]["quantize"]["embedding"]
    return {"cluster_size": jnp.zeros(emb.shape[:1], jnp.float32), "embed_sum": emb.astype(jnp.float32)}


def ema_codebook(ema, decay, eps: float = EMA_EPS):
    """The l2-normalised codebook [K,d] of EMA statistics (Laplace-smoothed counts, as ``codebook.ema_update``)."""
    cs = ema["cluster_size"]
    n = cs.sum()
    smoothed = (cs + eps) / (n + cs.shape[0] * eps) * n
    return cb.l2_normalize(ema["embed_sum"] / smoothed[:, None])


def code_stats(z, ids, valid, k: int):
    """Per-code counts [K] and feature sums [K,d] of the valid rows of z [M,d] (scatter-adds, no [M,K] one-hot)."""
    v = valid.astype(jnp.float32)
    counts = jax.ops.segment_sum(v, ids, num_segments=k)
    sums = jax.ops.segment_sum(z.astype(jnp.float32) * v[:, None], ids, num_segments=k)
    return counts, sums


def _nearest_chunked(z, codebook, chunk: int = 4096):
    """nearest_code over [M,d] rows in chunks (bounded [chunk, K] distance blocks)."""
    m = z.shape[0]
    pad = (-m) % chunk if m > chunk else 0
    if m <= chunk:
        return cb.nearest_code(z, codebook)
    zp = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, chunk, z.shape[1])
    return jax.lax.map(lambda c: cb.nearest_code(c, codebook), zp).reshape(-1)[:m]


def kmeans_plus_plus(z, key, k: int):
    """k-means++ seeds: K rows of z [M,d], each drawn with probability proportional to its squared
    distance to the nearest seed so far (the first uniformly). -> [K,d]."""
    m = z.shape[0]
    keys = jax.random.split(key, k)
    first = z[jax.random.randint(keys[0], (), 0, m)]
    seeds = jnp.zeros((k, z.shape[1]), z.dtype).at[0].set(first)
    d2 = jnp.sum(jnp.square(z - first), axis=-1)

    def body(i, carry):
        seeds, d2 = carry
        logits = jnp.where(d2 > 0, jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        logits = jnp.where(jnp.isfinite(logits).any(), logits, 0.0)  # fewer distinct rows than K
        row = z[jax.random.categorical(keys[i], logits)]
        return seeds.at[i].set(row), jnp.minimum(d2, jnp.sum(jnp.square(z - row), axis=-1))

    seeds, _ = jax.lax.fori_loop(1, k, body, (seeds, d2))
    return seeds


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def spherical_kmeans(z, key, k: int, iters: int):
    """Spherical k-means of l2-normalised rows z [M,d]: -> (centroids [K,d] normalised, counts [K]).

    k-means++ seeds, then ``iters`` Lloyd steps (nearest by squared distance, centroid = normalised mean);
    an empty cluster keeps its centroid.
    """
    m = z.shape[0]
    c = kmeans_plus_plus(z, key, k)

    def body(c, _):
        counts, sums = code_stats(z, _nearest_chunked(z, c), jnp.ones((m,), bool), k)
        return jnp.where(counts[:, None] > 0, cb.l2_normalize(sums), c), None

    c, _ = jax.lax.scan(body, c, None, length=iters)
    counts, _ = code_stats(z, _nearest_chunked(z, c), jnp.ones((m,), bool), k)
    return c, counts


def _set_codebook(params, codebook):
    params = dict(params)
    tok = dict(params["tokenizer"])
    quant = dict(tok["quantize"])
    quant["embedding"] = codebook.astype(quant["embedding"].dtype)
    tok["quantize"] = quant
    params["tokenizer"] = tok
    return params


class TokenizerTask(Task):
    """Stage 1 (see the module docstring)."""

    stage = "tokenizer"
    train_keys = frozenset({
        "target_keep_ratio", "keep_ratio_weight", "commitment_weight", "ema_decay", "quantize_start_step",
        "kmeans_init", "kmeans_batches", "kmeans_iters", "dead_code_every", "dead_code_threshold",
    })

    def __init__(self, config, mesh, rules):
        super().__init__(config, mesh, rules)
        self.model_config = model_config(config)
        self.model = Stage1Model(self.model_config)
        self._dataset = None
        self._features = None

    def check(self):
        tc, t = self.tc, self.config.tokenizer
        n_tensor = self.mesh.shape["tensor"]
        if t.n_code % n_tensor:
            raise ValueError(f"config tokenizer.n_code={t.n_code} does not split over the mesh's tensor axis "
                             f"({n_tensor}); the nearest-code search shards the codebook on it")
        if tc.get("kmeans_init", False) and tc.get("kmeans_batches", 1) < 1:
            raise ValueError(f"config train.kmeans_batches={tc.kmeans_batches}: must be >= 1")

    def check_sources(self):
        tc = self.tc
        if tc.init_from and not os.path.isfile(os.path.join(tc.init_from, checkpoint.MANIFEST)):
            raise FileNotFoundError(f"config train.init_from={tc.init_from!r} is not a converted checkpoint (no "
                                    f"{checkpoint.MANIFEST}); convert the released weights with "
                                    "tools/convert_torch_weights.py")

    # ----------------------------------------------------------------- host side
    def dataset(self, process_index, process_count, local_batch):
        self._dataset = input_pipeline.image_batches(
            self.tc.data_dir, self.config.tokenizer.image_size, local_batch, self.tc.seed,
            process_index=process_index, process_count=process_count, workers=self.tc.get("data_workers", 0))
        return self._dataset

    def prepare(self, host_batch):
        return {"pixels": host_batch}

    def load_init(self, params):
        """Overwrites the tokenizer part of ``params`` with a converted checkpoint (train.init_from)."""
        src = self.tc.init_from
        if not src:
            return params
        loaded = checkpoint.load_visual_tokenizer(src, scan_layers=self.model_config.scan_layers).params
        params = dict(params)
        # vit_proj (the understanding projector) is not part of stage 1.
        loaded = {k: v for k, v in loaded.items() if k in params["tokenizer"]}
        try:
            params["tokenizer"] = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype).reshape(old.shape),
                                               loaded, params["tokenizer"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"config train.init_from={src}: its tokenizer does not match config tokenizer.* "
                             f"({str(e).splitlines()[0][:200]})") from None
        return params

    def before_step(self, state, step, shardings):
        tc = self.tc
        if not tc.get("kmeans_init", False) or step != tc.get("quantize_start_step", 0):
            return state
        z = self._kmeans_features(state.params)
        k = self.config.tokenizer.n_code
        key = jax.random.fold_in(jax.random.key(tc.seed), 7)
        codebook, counts = spherical_kmeans(jnp.asarray(z), key, k, int(tc.get("kmeans_iters", 10)))
        per_batch = counts / tc.kmeans_batches
        ema = {"cluster_size": per_batch, "embed_sum": codebook * per_batch[:, None]}
        print(f"k-means: codebook of {k} codes initialised from {z.shape[0]} kept features of "
              f"{tc.kmeans_batches} batch(es)", flush=True)
        state = state.replace(params=_set_codebook(state.params, codebook), ema=ema)
        return jax.device_put(state, shardings)

    def _kmeans_features(self, params) -> np.ndarray:
        """Kept pre-quantizer features [M, d] of the first train.kmeans_batches batches (keep decisions
        sampled as in training), on the host; all features if the selector keeps none."""
        if self._features is None:
            def feats(p, x, rng):
                out = self.model.apply({"params": p}, x, rng, "gumbel", method=Stage1Model.features)
                return out["zn"], out["keep"]

            self._features = jax.jit(feats)
        it = iter(self._dataset)
        rows, every = [], []
        key = jax.random.fold_in(jax.random.key(self.tc.seed), 11)
        for i in range(self.tc.kmeans_batches):
            batch, _ = global_batch({"pixels": next(it)}, self.mesh, self.rules)
            zn, keep = self._features(params, batch["pixels"], jax.random.fold_in(key, i))
            if jax.process_count() > 1:
                zn, keep = multihost_utils.process_allgather((zn, keep), tiled=True)
            zn, keep = np.asarray(zn), np.asarray(keep)
            rows.append(zn[keep > 0.5])
            every.append(zn.reshape(-1, zn.shape[-1]))
        kept = np.concatenate(rows, 0)
        return kept if len(kept) else np.concatenate(every, 0)

    def flops_per_step(self, batch_size, counts):
        t = self.config.tokenizer
        n = (t.image_size // t.patch_size) ** 2
        per_image = (2 * counts["frozen"] * (n + 1) + 6 * counts["train"] * n
                     + 4 * t.eva_depth * t.eva_width * (n + 1) ** 2  # frozen encoder attention, forward only
                     + 12 * t.width * n * n * (2 * t.merger_depth + 2 * t.decoder_depth))  # merger + decoder
        return float(per_image * batch_size)

    # ----------------------------------------------------------------- traced
    def init_params(self, rng):
        return init_params(self.config, rng)

    def labels(self, params):
        return trainable_labels(params)

    def init_ema(self, params):
        return init_ema(params)

    def loss(self, params, ema, batch, rng, step):
        tc = self.tc
        sel_rng, cand_rng = jax.random.split(rng)
        out = self.model.apply({"params": params}, batch["pixels"], sel_rng, method=Stage1Model.features)
        zn, keep = out["zn"], out["keep"]
        b, n, d = zn.shape
        codebook = jax.lax.stop_gradient(params["tokenizer"]["quantize"]["embedding"]).astype(jnp.float32)
        flat = jax.lax.stop_gradient(zn).reshape(-1, d)
        ids = sharded_nearest_code(flat, codebook, self.mesh).reshape(b, n)
        q = cb.lookup(codebook, ids)
        quantize = step >= tc.get("quantize_start_step", 0)
        decoder_in = jnp.where(quantize, zn + jax.lax.stop_gradient(q - zn), zn)
        rec = self.model.apply({"params": params}, decoder_in, keep, method=Stage1Model.reconstruct)
        rec_loss = cosine_loss(rec, out["target"])
        keep_ratio = keep.mean(axis=1)
        ratio_loss = jnp.mean(jnp.square(keep_ratio - tc.target_keep_ratio))
        valid = keep > 0.5
        commit = jnp.sum(jnp.square(zn - q).sum(-1) * valid) / jnp.maximum(valid.sum(), 1)
        commit = jnp.where(quantize, commit, 0.0)
        loss = rec_loss + tc.keep_ratio_weight * ratio_loss + tc.commitment_weight * commit
        k = codebook.shape[0]
        vflat = valid.reshape(-1)
        counts, sums = code_stats(flat, ids.reshape(-1), vflat, k)
        # Restart candidates for dead codes: K random kept features (uniform draws, kept rows first).
        rows = jax.random.randint(cand_rng, (k,), 0, flat.shape[0])
        kept_rows = jnp.argsort(~vflat, stable=True)[rows % jnp.maximum(vflat.sum(), 1)]
        candidates = flat[kept_rows]
        metrics = dict(loss=loss, rec_loss=rec_loss, rec_cosine=1.0 - rec_loss, ratio_loss=ratio_loss,
                       commitment=commit, keep_ratio=keep_ratio.mean())
        return loss, metrics, dict(counts=counts, sums=sums, candidates=candidates)

    def combine_stats(self, a, b):
        return dict(counts=a["counts"] + b["counts"], sums=a["sums"] + b["sums"], candidates=b["candidates"])

    def update(self, params, ema, stats, rng, step):
        tc = self.tc
        decay = tc.ema_decay
        quantize = step >= tc.get("quantize_start_step", 0)
        cs = decay * ema["cluster_size"] + (1 - decay) * stats["counts"]
        es = decay * ema["embed_sum"] + (1 - decay) * stats["sums"]
        codebook = ema_codebook({"cluster_size": cs, "embed_sum": es}, decay)
        threshold = tc.get("dead_code_threshold", 1e-3)
        dead = cs < threshold
        every = int(tc.get("dead_code_every", 0))
        if every > 0:
            restart = dead & ((step + 1) % every == 0)
            cand = stats["candidates"]
            codebook = jnp.where(restart[:, None], cand, codebook)
            es = jnp.where(restart[:, None], cand, es)
            cs = jnp.where(restart, 1.0, cs)
        old = params["tokenizer"]["quantize"]["embedding"]
        codebook = jnp.where(quantize, codebook, old.astype(jnp.float32))
        new_ema = jax.tree.map(lambda a, b: jnp.where(quantize, a, b), {"cluster_size": cs, "embed_sum": es}, ema)
        counts = stats["counts"]
        prob = counts / jnp.maximum(counts.sum(), 1.0)
        perplexity = jnp.exp(-jnp.sum(jnp.where(prob > 0, prob * jnp.log(jnp.where(prob > 0, prob, 1.0)), 0.0)))
        metrics = dict(codebook_usage=jnp.mean(counts > 0), perplexity=perplexity,
                       codes_used=jnp.sum(new_ema["cluster_size"] > 1e-3), dead_codes=jnp.sum(dead) * quantize)
        return _set_codebook(params, codebook), new_ema, metrics
