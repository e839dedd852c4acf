"""Stage 2: the LLM on packed image->text, text->image and text-only sequences.

Sequences (visual ids from the frozen visual tokenizer, argmax keep decisions, computed on the fly
for each batch; code k is id ``vocab.VISUAL_OFFSET + k``):

- image -> text: ``[IMG] visual [/IMG] text [EOS]``
- text -> image: ``text [IMG] visual [/IMG]`` (no BOS, as the reference's generation prompts)
- text only: ``[BOS] text [EOS]``

``train.examples_per_batch`` examples are drawn per step (kinds by ``train.mix``) and packed
first-fit into ``train.batch_size`` rows of ``train.seq_len`` tokens (``data/packing.py``), in
``train.pack_groups`` independent groups (0: one per process; fix it to reproduce a run exactly on
another number of processes): segment
ids keep attention within each sequence and positions restart per sequence; examples that do not
fit are dropped and counted (``dropped_sequences``). The loss is the next-token cross entropy with
weight ``train.text_loss_weight`` on text targets and ``train.visual_loss_weight`` on visual ids
and [IMG]/[/IMG], computed vocabulary-parallel over a vocabulary sharded on ``'tensor'``
(``ops.collectives.vocab_parallel_cross_entropy``; the full-vocabulary logits never exist on one
device). The LLM starts from ``train.init_from`` (a converted checkpoint) or a random init; the
visual tokenizer from ``train.tokenizer_from`` (a converted checkpoint) or a seeded random init.

Logged: loss (weighted), text_loss, visual_loss (unweighted means), tokens (real targets per step),
packing (fraction of the rows' slots holding tokens), dropped_sequences.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lavit_jax import checkpoint, vocab
from lavit_jax.data import input_pipeline
from lavit_jax.data.packing import pack_sequences
from lavit_jax.data.text_tokenizer import load_text_tokenizer
from lavit_jax.models import llama
from lavit_jax.models.tokenizer import DynamicVisualTokenizer
from lavit_jax.ops.collectives import BATCH_AXES, vocab_parallel_cross_entropy
from lavit_jax.ops.config import freeze
from lavit_jax.train.task import Task, global_batch

_MASKED_LOGIT = -1e30


def llm_config(config):
    """config.llm (HF field names) with the training numerics: compute dtype, float32 master weights."""
    dtype = config.train.get("compute_dtype", None) or "float32"
    return llama.llama_config(dict(config.llm), "config llm", dtype=dtype, param_dtype="float32")


def build_sequence(kind: int, text: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """One training sequence (see the module docstring). text: text ids, visual: visual ids (offset)."""
    text, visual = np.asarray(text, np.int64), np.asarray(visual, np.int64)
    img = np.concatenate([[vocab.IMG_START], visual, [vocab.IMG_END]])
    if kind == input_pipeline.KIND_IMAGE_TO_TEXT:
        return np.concatenate([img, text, [vocab.EOS_ID]])
    if kind == input_pipeline.KIND_TEXT_TO_IMAGE:
        return np.concatenate([text, img])
    return np.concatenate([[vocab.BOS_ID], text, [vocab.EOS_ID]])


def pack_rows(sequences, weights, rows: int, length: int):
    """pack_sequences into exactly ``rows`` rows: -> (packed dict, number of sequences dropped for lack of room)."""
    packed = pack_sequences(sequences, length, loss_weights=weights, pad_id=vocab.PAD_ID)
    n = packed["tokens"].shape[0]
    dropped = int((packed["segment_ids"][rows:].max(axis=1)).sum()) if n > rows else 0
    out = {}
    for k, v in packed.items():
        v = v[:rows]
        if n < rows:
            fill = vocab.PAD_ID if k in ("tokens", "targets") else 0
            v = np.concatenate([v, np.full((rows - n, length), fill, v.dtype)], 0)
        out[k] = v
    return out, dropped


def pad_vocab(hidden, kernel, multiple: int):
    """Pads the LM head's vocabulary to a multiple of ``multiple`` with columns whose logit is -1e30.

    hidden [B,T,C], kernel [C,V] -> hidden [B,T,C+1] (a constant 1 appended), kernel [C+1, V'] (the
    extra row is 0 for real columns and -1e30 for padding ones): the same softmax over the real ids.
    """
    c, v = kernel.shape
    pad = (-v) % multiple
    if not pad:
        return hidden, kernel
    hidden = jnp.concatenate([hidden, jnp.ones(hidden.shape[:-1] + (1,), hidden.dtype)], -1)
    top = jnp.concatenate([kernel, jnp.zeros((c, pad), kernel.dtype)], 1)
    bottom = jnp.concatenate([jnp.zeros((1, v), kernel.dtype), jnp.full((1, pad), _MASKED_LOGIT, kernel.dtype)], 1)
    return hidden, jnp.concatenate([top, bottom], 0)


class LMTask(Task):
    """Stage 2 (see the module docstring)."""

    stage = "lm"
    unit = "tokens"
    train_keys = frozenset({
        "seq_len", "examples_per_batch", "mix", "text_loss_weight", "visual_loss_weight", "tokenizer_from",
        "text_tokenizer", "max_text_tokens", "pack_groups",
    })

    def __init__(self, config, mesh, rules):
        super().__init__(config, mesh, rules)
        self.llm_config = llm_config(config)
        self.model = llama.LlamaForCausalLM(self.llm_config)
        src = self.tc.get("tokenizer_from", "")
        base = checkpoint.tokenizer_config(src) if src and os.path.isfile(os.path.join(src, checkpoint.MANIFEST)) \
            else config.tokenizer
        self.tok_config = freeze(base, dtype=self.tc.get("compute_dtype", None) or base.dtype)
        self.tok_model = DynamicVisualTokenizer(self.tok_config)
        self._tok_params = None
        self._tokenize = None
        self._dropped = 0

    def check(self):
        tc, lc = self.tc, self.llm_config
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if tc.seq_len < 2:
            raise ValueError(f"config train.seq_len={tc.seq_len}: must be >= 2")
        if tc.seq_len > lc.max_position_embeddings:
            raise ValueError(f"config train.seq_len={tc.seq_len} exceeds llm.max_position_embeddings="
                             f"{lc.max_position_embeddings}")
        if tc.examples_per_batch < 1 or tc.examples_per_batch % (dp * jax.process_count()):
            raise ValueError(f"config train.examples_per_batch={tc.examples_per_batch} is not divisible by the "
                             f"data-parallel size {dp} x {jax.process_count()} process(es)")
        groups, pc = tc.get("pack_groups", 0), jax.process_count()
        if groups and (groups % pc or tc.batch_size % groups or tc.examples_per_batch % groups):
            raise ValueError(f"config train.pack_groups={groups} must be a multiple of the {pc} process(es) and "
                             f"divide train.batch_size={tc.batch_size} and train.examples_per_batch="
                             f"{tc.examples_per_batch}")
        need = vocab.VISUAL_OFFSET + self.tok_config.n_code
        if lc.vocab_size < need:
            raise ValueError(f"config llm.vocab_size={lc.vocab_size} is smaller than {need} = "
                             f"{vocab.VISUAL_OFFSET} text/special ids + tokenizer n_code={self.tok_config.n_code}")

    def check_sources(self):
        tc = self.tc
        for field in ("init_from", "tokenizer_from"):
            src = tc.get(field, "")
            if not src:
                continue
            if os.path.isfile(os.path.join(src, "config.json")) and not os.path.isfile(
                    os.path.join(src, checkpoint.MANIFEST)):
                raise ValueError(f"config train.{field}={src!r} looks like a Hugging Face / released directory; "
                                 "convert it first with tools/convert_torch_weights.py and point here at the output")
            if not os.path.isfile(os.path.join(src, checkpoint.MANIFEST)):
                raise FileNotFoundError(f"config train.{field}={src!r} is not a converted checkpoint (no "
                                        f"{checkpoint.MANIFEST})")
        if tc.get("text_tokenizer", "") and not os.path.exists(tc.text_tokenizer):
            raise FileNotFoundError(f"config train.text_tokenizer={tc.text_tokenizer!r} not found")

    # ----------------------------------------------------------------- host side
    def dataset(self, process_index, process_count, local_batch):
        tc = self.tc
        text_tok = None
        if not tc.data_dir.startswith("synthetic:"):
            path = tc.get("text_tokenizer", "") or (os.path.join(tc.init_from, "language_model") if tc.init_from
                                                     else "")
            text_tok = load_text_tokenizer(path) if path else None
        return input_pipeline.lm_examples(
            tc.data_dir, self.tok_config.image_size, tc.seed, tc.examples_per_batch // process_count,
            mix=tuple(tc.mix), text_tokenizer=text_tok, max_text_tokens=tc.get("max_text_tokens", 512),
            process_index=process_index, process_count=process_count, workers=tc.get("data_workers", 0))

    def _tokenizer(self):
        """(jitted pixels -> (codes, lengths), replicated params) of the frozen visual tokenizer.

        Replicated params, the batch split over the data-parallel axes (only the 'batch' rule applies):
        the codes do not depend on the mesh.
        """
        if self._tokenize is None:
            src = self.tc.get("tokenizer_from", "")
            if src:
                params = checkpoint.load_visual_tokenizer(src, scan_layers=self.tok_config.scan_layers).params
            else:  # a seeded random tokenizer (tests, smoke runs)
                s, dp = self.tok_config.image_size, self.mesh.shape["data"] * self.mesh.shape["fsdp"]
                x = jnp.zeros((dp, s, s, 3))  # the batch splits over the data-parallel axes
                init = jax.jit(lambda k: meta.unbox(self.tok_model.init(k, x, with_llm_features=False)["params"]))
                params = init(jax.random.fold_in(jax.random.key(self.tc.seed), 3))
            self._tok_params = jax.device_put(params, NamedSharding(self.mesh, P()))

            def tokenize(p, x):
                return self.tok_model.apply({"params": p}, x, mode="argmax", method="tokenize")

            self._tokenize = jax.jit(tokenize)
        return self._tokenize, self._tok_params

    def prepare(self, examples):
        tc = self.tc
        with jax.set_mesh(self.mesh), nn.logical_axis_rules((("batch", BATCH_AXES),)):
            fn, params = self._tokenizer()
            pixels, _ = global_batch({"pixels": np.stack([e["pixels"] for e in examples])}, self.mesh, self.rules)
            codes, lengths = fn(params, pixels["pixels"])
        if jax.process_count() > 1:
            spec = P(BATCH_AXES)
            codes, lengths = multihost_utils.global_array_to_host_local_array((codes, lengths), self.mesh,
                                                                              (P(BATCH_AXES, None), spec))
        codes, lengths = np.asarray(codes), np.asarray(lengths)
        seqs, weights = [], []
        for e, c, n in zip(examples, codes, lengths, strict=True):
            seq = build_sequence(e["kind"], e["text"], c[:n] + vocab.VISUAL_OFFSET)
            seqs.append(seq)
            weights.append(np.where(seq < vocab.TEXT_VOCAB, tc.text_loss_weight, tc.visual_loss_weight))
        pc = jax.process_count()
        groups = max(tc.get("pack_groups", 0) // pc, 1)  # packing groups of this process
        n_rows, n_ex = tc.batch_size // pc // groups, len(seqs) // groups
        parts = []
        for g in range(groups):
            rows, dropped = pack_rows(seqs[g * n_ex:(g + 1) * n_ex], weights[g * n_ex:(g + 1) * n_ex], n_rows,
                                      tc.seq_len)
            self._dropped += dropped
            parts.append(rows)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def host_metrics(self):
        out = {"dropped_sequences": self._dropped}
        self._dropped = 0
        return out

    def load_init(self, params):
        src = self.tc.init_from
        if not src:
            return params
        _, loaded, _ = checkpoint.load_language_model(src, dtype="float32",
                                                      scan_layers=self.llm_config.scan_layers)

        def put(new, old):
            if new.shape != old.shape:
                raise ValueError(f"config train.init_from={src}: a language-model param has shape {new.shape}, "
                                 f"config llm.* gives {old.shape}")
            return jnp.asarray(new, old.dtype)

        try:
            return jax.tree.map(put, loaded, params)
        except (TypeError, ValueError) as e:
            if "init_from" in str(e):
                raise
            raise ValueError(f"config train.init_from={src}: its language model does not match config llm.* "
                             f"({str(e).splitlines()[0][:200]})") from None

    def flops_per_step(self, batch_size, counts):
        lc, t = self.llm_config, self.tc.seq_len
        n = counts["train"] - lc.vocab_size * lc.hidden_size  # the embedding lookup is no matmul
        attention = 12 * lc.num_hidden_layers * lc.num_attention_heads * lc.head_dim * t
        return float((6 * n + attention) * t * batch_size)

    def units_per_step(self, batch_size):
        return batch_size * self.tc.seq_len

    # ----------------------------------------------------------------- traced
    def init_params(self, rng):
        return self.model.init(rng, input_ids=jnp.zeros((1, 2), jnp.int32))["params"]

    def loss(self, params, ema, batch, rng, step):
        h, _ = self.model.apply({"params": params}, input_ids=batch["tokens"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], method=llama.LlamaForCausalLM.hidden_states)
        if self.llm_config.tie_word_embeddings:
            kernel = params["embed_tokens"]["embedding"].T
        else:
            kernel = params["lm_head"]["kernel"]
        h, kernel = pad_vocab(h, kernel.astype(h.dtype), self.mesh.shape["tensor"])
        w = batch["loss_weights"]
        _, per_token = vocab_parallel_cross_entropy(h, kernel, batch["targets"], w, self.mesh)
        loss = jnp.sum(w * per_token) / jnp.maximum(jnp.sum(w), 1e-6)
        valid = batch["segment_ids"] > 0
        text = valid & (batch["targets"] < vocab.TEXT_VOCAB)
        visual = valid & ~text

        def mean(mask):
            return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1)

        metrics = dict(loss=loss, text_loss=mean(text), visual_loss=mean(visual), tokens=valid.sum(),
                       packing=valid.mean())
        return loss, metrics, {}
