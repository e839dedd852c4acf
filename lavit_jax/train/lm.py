"""Stage 2: the LLM on packed image->text, text->image and text-only sequences.

Sequences (code k of the frozen visual tokenizer is id ``vocab.VISUAL_OFFSET + k``):

- image -> text: ``[IMG] visual [/IMG] text [EOS]``, where ``visual`` is, by ``train.understanding``:
  ``"continuous"`` (default, as the reference): the tokenizer's continuous features (EVA -> merger ->
  ``vit_proj``, the inference understanding path) of the kept tokens, as input embeddings; no loss on
  [IMG], the features or [/IMG] (the loss is on the text). ``"discrete"``: the visual ids (argmax
  keep decisions), with the visual loss weight on them.
- text -> image: ``text [IMG] visual ids [/IMG]`` (no BOS, as the reference's generation prompts),
  visual ids from the frozen tokenizer with argmax keep decisions.
- text only: ``[BOS] text [EOS]``

Continuous understanding. The merger (``causal_encoder``) and ``vit_proj`` train with the LLM: they
live in the train state (``params['visual_tokenizer']``, beside ``params['llm']``), the features are
computed inside the traced loss and spliced into the input embeddings; the EVA encoder (under
stop_gradient), the token selector, ``encode_task_layer`` and the codebook are frozen
(``Task.labels``). The ids of text->image targets come from a separate frozen copy of the original
tokenizer (the reference lays its stage-2 merger + projector over the tokenizer for understanding
only). Keep decisions: the reference draws a hard Gumbel sample at inference and its training code is
not released, so each image->text example draws a hard Gumbel sample (key from ``train.seed`` and the
example's position in the stream: reproducible, independent of the process count). The selector is
frozen, so the decisions are drawn on the host (``prepare``) with the frozen tokenizer and passed in
the batch: each image takes exactly its kept-token count of slots in its packed row (no padding slots
in the LLM sequence). Its pixels travel with the row: ``pixels [B, K, S, S, 3]`` and ``keep
[B, K, N]`` for at most ``K = train.images_per_row`` image->text images per row (packing skips rows
that hold K; unused slots are zero and cost one encoder pass each), ``feature_index [B, T]`` (k*N + j
at the slot of kept feature j of the row's image k, -1 elsewhere) and ``image_inputs [B, T]`` (1 at
[IMG] and the feature slots). The encoder runs twice on these images (host decisions, traced
features).

Precomputed visual ids (``train.visual_ids_from``, an ArrayRecord file of
``tools/precompute_visual_tokens.py`` made from the same ``train.data_dir``): text->image targets and
discrete image->text ids come from the file, so those images are not decoded nor tokenized; with
continuous understanding the image->text images still need their pixels (and the host draws their
keep decisions), so the file covers text->image and discrete understanding only.

``train.examples_per_batch`` examples are drawn per step (kinds by ``train.mix``) and packed
first-fit into ``train.batch_size`` rows of ``train.seq_len`` tokens (``data/packing.py``), in
``train.pack_groups`` independent groups (0: one per process; fix it to reproduce a run exactly on
another number of processes): segment
ids keep attention within each sequence and positions restart per sequence; examples that do not
fit are dropped and counted (``dropped_sequences``). The loss is the next-token cross entropy with
weight ``train.text_loss_weight`` on text targets and ``train.visual_loss_weight`` on visual ids
and [IMG]/[/IMG], computed vocabulary-parallel over a vocabulary sharded on ``'tensor'``
(``ops.collectives.vocab_parallel_cross_entropy``; the full-vocabulary logits never exist on one
device). The LLM starts from ``train.init_from`` (a converted checkpoint, or a Hugging Face LLaMA
directory: config.json + safetensors / pytorch_model*.bin, read by ``convert/llama.py``; a smaller
text-only vocabulary fills the first ids, the others keep their random init) or a random init; the
visual tokenizer from ``train.tokenizer_from`` (a converted checkpoint) or a seeded random init, and
the trained merger + projector from ``train.init_from``'s ``visual_weight`` when it has one.

Logged: loss (weighted), text_loss, visual_loss (unweighted means; the continuous image part
excluded), tokens (filled slots per step), packing (fraction of the rows' slots holding tokens),
dropped_sequences.
"""

from __future__ import annotations

import functools
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
from lavit_jax.data import input_pipeline, visual_records
from lavit_jax.data.packing import pack_sequences
from lavit_jax.data.text_tokenizer import load_text_tokenizer
from lavit_jax.models import llama
from lavit_jax.models.tokenizer import DynamicVisualTokenizer, compact, keep_decisions
from lavit_jax.ops.collectives import BATCH_AXES, vocab_parallel_cross_entropy
from lavit_jax.ops.config import freeze
from lavit_jax.train.task import Task, count_params, global_batch

_MASKED_LOGIT = -1e30
UNDERSTANDING = ("continuous", "discrete")
# Host-side markers in the continuous image->text sequences before packing: [IMG], and the feature
# slots of example e (-(2 + e)); replaced by real ids once the rows are laid out.
_IMG_MARK = -1
# Trained parts of the visual tokenizer in continuous understanding (the rest is frozen).
TRAINED_VISUAL = ("causal_encoder", "vit_proj")


def llm_config(config):
    """config.llm (HF field names) with the training numerics: compute dtype, float32 master weights."""
    dtype = config.train.get("compute_dtype", None) or "float32"
    return llama.llama_config(dict(config.llm), "config llm", dtype=dtype, param_dtype="float32")


def tokenizer_config(config):
    """The frozen visual tokenizer's config: train.tokenizer_from's (a converted checkpoint) or config.tokenizer,
    computing in train.compute_dtype."""
    src = config.train.get("tokenizer_from", "")
    base = checkpoint.tokenizer_config(src) if src and os.path.isfile(os.path.join(src, checkpoint.MANIFEST)) \
        else config.tokenizer
    return freeze(base, dtype=config.train.get("compute_dtype", None) or base.dtype)


def tokenizer_params(config, model: DynamicVisualTokenizer):
    """Params of the frozen tokenizer: train.tokenizer_from's, or a random init seeded by train.seed (tests)."""
    src = config.train.get("tokenizer_from", "")
    if src:
        return checkpoint.load_visual_tokenizer(src, scan_layers=model.config.scan_layers).params
    return _random_tokenizer(model, jax.random.fold_in(jax.random.key(config.train.seed), 3))


@functools.partial(jax.jit, static_argnames=("model",))
def _random_tokenizer(model: DynamicVisualTokenizer, key):
    """Random tokenizer params (no vit_proj); module-level so that every task of one config compiles it once."""
    s = model.config.image_size
    return meta.unbox(model.init(key, jnp.zeros((1, s, s, 3)), with_llm_features=False)["params"])


def init_kind(src: str, field: str = "train.init_from") -> str:
    """'converted' (lavit.json) or 'hf' (config.json + LLaMA weights) for a checkpoint directory; else an error."""
    if os.path.isfile(os.path.join(src, checkpoint.MANIFEST)):
        return "converted"
    if os.path.isfile(os.path.join(src, "config.json")):
        names = os.listdir(src)
        if any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
            return "hf"
        raise ValueError(f"config {field}={src!r} has a config.json but no LLaMA weights (*.safetensors or "
                         "pytorch_model*.bin)")
    if not os.path.exists(src):
        raise FileNotFoundError(f"config {field}={src!r} is not a converted checkpoint (no {checkpoint.MANIFEST}) "
                                "nor a Hugging Face LLaMA directory: not found")
    raise ValueError(f"config {field}={src!r} is not a converted checkpoint (no {checkpoint.MANIFEST}) nor a "
                     "Hugging Face LLaMA directory (config.json + *.safetensors or pytorch_model*.bin)")


def build_sequence(kind: int, text: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """One training sequence (see the module docstring). text: text ids, visual: visual ids (offset)."""
    text, visual = np.asarray(text, np.int64), np.asarray(visual, np.int64)
    img = np.concatenate([[vocab.IMG_START], visual, [vocab.IMG_END]])
    if kind == input_pipeline.KIND_IMAGE_TO_TEXT:
        return np.concatenate([img, text, [vocab.EOS_ID]])
    if kind == input_pipeline.KIND_TEXT_TO_IMAGE:
        return np.concatenate([text, img])
    return np.concatenate([[vocab.BOS_ID], text, [vocab.EOS_ID]])


def understanding_sequence(text: np.ndarray, n: int, example: int, text_weight: float):
    """A continuous image->text sequence with host markers: ([IMG] f*n [/IMG] text [EOS], weights).

    The n feature slots hold the marker -(2 + example), [IMG] the marker -1; weights are 0 on the
    image part and [/IMG], ``text_weight`` on the text and EOS.
    """
    text = np.asarray(text, np.int64)
    seq = np.concatenate([[_IMG_MARK], np.full(n, -(2 + example)), [vocab.IMG_END], text, [vocab.EOS_ID]])
    w = np.zeros(len(seq), np.float32)
    w[n + 2:] = text_weight
    return seq, w


def pack_rows(sequences, weights, rows: int, length: int, items=None, max_items=None):
    """pack_sequences into exactly ``rows`` rows: -> (packed dict, number of sequences dropped for lack of room)."""
    packed = pack_sequences(sequences, length, loss_weights=weights, pad_id=vocab.PAD_ID, items=items,
                            max_items=max_items)
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


def place_images(rows: dict, pixels, keep, slots: int) -> dict:
    """Lays out the continuous image->text images of packed rows with host markers (``understanding_sequence``).

    rows: packed arrays [R, T]; pixels [E, S, S, 3] and keep [E, N] of the examples the markers name;
    slots: K images per row. Returns the rows with real ids and pixels [R, K, S, S, 3], keep [R, K, N],
    feature_index [R, T] (k*N + j at kept feature j of the row's image k, -1 elsewhere), image_inputs
    [R, T] (1 at [IMG] and the feature slots).
    """
    tok, n = rows["tokens"], keep.shape[1]
    r_, c_ = np.nonzero(tok <= -2)  # feature slots, row-major
    ex = -tok[r_, c_] - 2
    start = np.ones(len(r_), bool)
    start[1:] = (r_[1:] != r_[:-1]) | (ex[1:] != ex[:-1])  # a run = one image's slots
    run = np.cumsum(start) - 1
    run_first = np.nonzero(start)[0]
    run_rows = r_[run_first]
    k_run = np.arange(len(run_first)) - np.searchsorted(run_rows, run_rows)  # image index within its row
    if len(k_run) and k_run.max() >= slots:
        raise ValueError(f"config train.images_per_row={slots}: a packed row holds more image->text images")
    j = np.arange(len(r_)) - run_first[run]
    k = k_run[run]
    out = dict(rows)
    out["feature_index"] = np.full(tok.shape, -1, np.int32)
    out["feature_index"][r_, c_] = (k * n + j).astype(np.int32)
    out["image_inputs"] = (tok < 0).astype(np.int32)
    out["pixels"] = np.zeros((tok.shape[0], slots) + pixels.shape[1:], np.float32)
    out["keep"] = np.zeros((tok.shape[0], slots, n), np.float32)
    ex_run = ex[run_first]
    out["pixels"][run_rows, k_run] = pixels[ex_run]
    out["keep"][run_rows, k_run] = keep[ex_run]
    out["tokens"] = np.where(tok == _IMG_MARK, vocab.IMG_START, np.where(tok < 0, vocab.PAD_ID, tok)).astype(np.int32)
    out["targets"] = np.where(rows["targets"] < 0, vocab.PAD_ID, rows["targets"]).astype(np.int32)
    return out


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


def _frozen_encoder_features(m: DynamicVisualTokenizer, pixels, keep):
    """pixels [M,H,W,3], keep [M,N] -> kept merger -> vit_proj features [M,N,llm_embed_dim] (compacted; the
    EVA encoder under stop_gradient)."""
    features = jax.lax.stop_gradient(m.encode(pixels))
    return compact(m.vit_proj(m.causal_encoder(features, keep)), keep)[0]


def _host_tokenize(m: DynamicVisualTokenizer, pixels, keys):
    """pixels [E,H,W,3], keys [E] -> (codes [E,N] argmax, lengths [E], hard Gumbel keep decisions [E,N])."""
    out = m(pixels, mode="argmax", with_llm_features=False)
    sampled = jax.vmap(lambda lp, k: keep_decisions(lp[None], "gumbel", k)[0])(out["selector_logprob"], keys)
    return out["codes"], out["lengths"], jax.lax.stop_gradient(sampled)


@functools.partial(jax.jit, static_argnames=("model",))
def frozen_tokenize(model: DynamicVisualTokenizer, params, pixels, index, key):
    """The frozen tokenizer on the host's examples: pixels [E,H,W,3], stream positions index [E] ->
    (codes [E,N] (argmax keep decisions), lengths [E], hard Gumbel keep decisions [E,N] drawn with
    fold_in(key, index))."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    return model.apply({"params": params}, pixels, keys, method=_host_tokenize)


class LMTask(Task):
    """Stage 2 (see the module docstring)."""

    stage = "lm"
    unit = "tokens"
    train_keys = frozenset({
        "seq_len", "examples_per_batch", "mix", "text_loss_weight", "visual_loss_weight", "tokenizer_from",
        "text_tokenizer", "max_text_tokens", "pack_groups", "understanding", "images_per_row", "visual_ids_from",
    })
    host_only_keys = ("init_from", "text_tokenizer", "visual_ids_from")  # read by load_init / dataset only

    def __init__(self, config, mesh, rules):
        super().__init__(config, mesh, rules)
        self.llm_config = llm_config(config)
        self.model = llama.LlamaForCausalLM(self.llm_config)
        self.tok_config = tokenizer_config(config)
        self.tok_model = DynamicVisualTokenizer(self.tok_config)
        self.understanding = self.tc.get("understanding", "continuous")
        self.continuous = self.understanding == "continuous"
        # The trained copy (continuous understanding): float32 master weights.
        self.und_model = DynamicVisualTokenizer(freeze(self.tok_config, param_dtype="float32"))
        self.n_patches = (self.tok_config.image_size // self.tok_config.patch_size) ** 2
        self._tok_params = None
        self.tokenized = 0  # examples the host tokenizer ran on (the precomputed path skips it)
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
        if self.understanding not in UNDERSTANDING:
            raise ValueError(f"config train.understanding={self.understanding!r}: expected one of "
                             f"{', '.join(UNDERSTANDING)}")
        if self.continuous:
            if int(tc.get("images_per_row", 4)) < 1:
                raise ValueError(f"config train.images_per_row={tc.images_per_row}: must be >= 1 with "
                                 "train.understanding='continuous'")
            if self.tok_config.llm_embed_dim != lc.hidden_size:
                raise ValueError(f"config tokenizer.llm_embed_dim={self.tok_config.llm_embed_dim} != llm.hidden_size="
                                 f"{lc.hidden_size}: continuous understanding features are LLM input embeddings")

    def check_sources(self):
        tc = self.tc
        src = tc.get("tokenizer_from", "")
        if src:
            if os.path.isfile(os.path.join(src, "config.json")) and not os.path.isfile(
                    os.path.join(src, checkpoint.MANIFEST)):
                raise ValueError(f"config train.tokenizer_from={src!r} looks like a Hugging Face / released "
                                 "directory; convert it first with tools/convert_torch_weights.py and point here "
                                 "at the output")
            if not os.path.isfile(os.path.join(src, checkpoint.MANIFEST)):
                raise FileNotFoundError(f"config train.tokenizer_from={src!r} is not a converted checkpoint (no "
                                        f"{checkpoint.MANIFEST})")
        if tc.init_from and init_kind(tc.init_from) == "hf":
            self._check_hf_config(tc.init_from)
        if tc.get("text_tokenizer", "") and not os.path.exists(tc.text_tokenizer):
            raise FileNotFoundError(f"config train.text_tokenizer={tc.text_tokenizer!r} not found")

    def _check_hf_config(self, src):
        """The HF config's shapes against config.llm.* (a smaller vocabulary is extended), before any weight is read."""
        try:
            hf = checkpoint.read_llama_config(src)
        except (OSError, ValueError) as e:
            raise ValueError(f"config train.init_from={src!r}: {str(e).splitlines()[0][:300]}") from None
        lc = self.llm_config
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings"):
            if hf[k] != lc[k]:
                raise ValueError(f"config train.init_from={src!r}: its LLaMA has {k}={hf[k]}, config llm.{k}={lc[k]}")
        if hf.vocab_size > lc.vocab_size:
            raise ValueError(f"config train.init_from={src!r}: its LLaMA has vocab_size={hf.vocab_size}, more than "
                             f"config llm.vocab_size={lc.vocab_size}")

    # ----------------------------------------------------------------- host side
    def dataset(self, process_index, process_count, local_batch):
        tc = self.tc
        text_tok = None
        if not tc.data_dir.startswith("synthetic:"):
            path = tc.get("text_tokenizer", "")
            if not path and tc.init_from:
                hf = not os.path.isfile(os.path.join(tc.init_from, checkpoint.MANIFEST))
                path = tc.init_from if hf else os.path.join(tc.init_from, "language_model")
            text_tok = load_text_tokenizer(path) if path else None
        ids_from = tc.get("visual_ids_from", "")
        records = visual_records.open_records(ids_from) if ids_from else None
        pixels_for = (input_pipeline.KIND_IMAGE_TO_TEXT, input_pipeline.KIND_TEXT_TO_IMAGE)
        if records is not None:
            pixels_for = (input_pipeline.KIND_IMAGE_TO_TEXT,) if self.continuous else ()
        return input_pipeline.lm_examples(
            tc.data_dir, self.tok_config.image_size, tc.seed, tc.examples_per_batch // process_count,
            mix=tuple(tc.mix), text_tokenizer=text_tok, max_text_tokens=tc.get("max_text_tokens", 512),
            process_index=process_index, process_count=process_count, workers=tc.get("data_workers", 0),
            visual_ids=records, visual_ids_name=ids_from, pixels_for=pixels_for)

    def frozen_tokenizer(self):
        """Params of the frozen visual tokenizer (``tokenizer_params``), replicated on the mesh.

        The host's examples are split over the data-parallel axes (only the 'batch' rule applies):
        the results of ``frozen_tokenize`` do not depend on the mesh.
        """
        if self._tok_params is None:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules((("batch", BATCH_AXES),)):
                params = tokenizer_params(self.config, self.tok_model)
                self._tok_params = jax.device_put(params, NamedSharding(self.mesh, P()))
        return self._tok_params

    def _tokenize_examples(self, examples):
        """(codes [E,N], lengths [E], sampled keep [E,N]) of this process's examples (numpy)."""
        params = self.frozen_tokenizer()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules((("batch", BATCH_AXES),)):
            host = {"pixels": np.stack([e["pixels"] for e in examples]),
                    "index": np.asarray([e["index"] for e in examples], np.int32)}
            arrays, _ = global_batch(host, self.mesh, self.rules)
            key = jax.random.fold_in(jax.random.key(self.tc.seed), 5)
            out = frozen_tokenize(self.tok_model, params, arrays["pixels"], arrays["index"], key)
        self.tokenized += len(examples)
        if jax.process_count() > 1:
            out = multihost_utils.global_array_to_host_local_array(
                out, self.mesh, (P(BATCH_AXES, None), P(BATCH_AXES), P(BATCH_AXES, None)))
        return tuple(np.asarray(x) for x in out)

    def prepare(self, examples):
        tc = self.tc
        i2t, t2i = input_pipeline.KIND_IMAGE_TO_TEXT, input_pipeline.KIND_TEXT_TO_IMAGE
        need = any((e["kind"] == i2t and self.continuous) or (e["kind"] != input_pipeline.KIND_TEXT and
                                                                "visual_ids" not in e) for e in examples)
        codes = lengths = sampled = None
        if need:
            codes, lengths, sampled = self._tokenize_examples(examples)
        seqs, weights, items = [], [], []
        for i, e in enumerate(examples):
            if e["kind"] == i2t and self.continuous:
                n = int(sampled[i].sum())
                seq, w = understanding_sequence(e["text"], n, i, tc.text_loss_weight)
                items.append(int(n > 0))
            else:
                vis = np.zeros((0,), np.int64)
                if e["kind"] in (i2t, t2i) and "visual_ids" in e:
                    vis = e["visual_ids"]
                    if len(vis) and (vis.min() < vocab.VISUAL_OFFSET or vis.max() >= vocab.VISUAL_OFFSET +
                                     self.tok_config.n_code):
                        raise ValueError(f"config train.visual_ids_from={tc.visual_ids_from!r}: visual ids outside "
                                         f"the tokenizer's {self.tok_config.n_code} codes (another tokenizer?)")
                elif e["kind"] in (i2t, t2i):
                    vis = codes[i, :lengths[i]] + vocab.VISUAL_OFFSET
                seq = build_sequence(e["kind"], e["text"], vis)
                w = np.where(seq < vocab.TEXT_VOCAB, tc.text_loss_weight, tc.visual_loss_weight)
                items.append(0)
            seqs.append(seq)
            weights.append(w)
        pc = jax.process_count()
        groups = max(tc.get("pack_groups", 0) // pc, 1)  # packing groups of this process
        n_rows, n_ex = tc.batch_size // pc // groups, len(seqs) // groups
        slots = int(tc.get("images_per_row", 4)) if self.continuous else None
        if self.continuous:
            pixels = np.stack([e["pixels"] for e in examples])
            keep = sampled if sampled is not None else np.zeros((len(examples), self.n_patches), np.float32)
        parts = []
        for g in range(groups):
            part = slice(g * n_ex, (g + 1) * n_ex)
            rows, dropped = pack_rows(seqs[part], weights[part], n_rows, tc.seq_len, items=items[part],
                                      max_items=slots)
            self._dropped += dropped
            if self.continuous:
                rows = place_images(rows, pixels, keep, slots)
            parts.append(rows)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def host_metrics(self):
        out = dict(super().host_metrics(), dropped_sequences=self._dropped)
        self._dropped = 0
        return out

    def load_init(self, params):
        if not self.continuous:
            return self._load_llm(params)
        out = dict(params)
        out["llm"] = self._load_llm(params["llm"])
        out["visual_tokenizer"] = self._load_visual(params["visual_tokenizer"])
        return out

    def _load_llm(self, params):
        src = self.tc.init_from
        if not src:
            return params
        if init_kind(src) == "hf":
            from lavit_jax.convert import llama as convert_llama  # reads HF files; torch only for a .bin

            try:
                hf_config = checkpoint.read_llama_config(src, scan_layers=self.llm_config.scan_layers)
                loaded = convert_llama.llama_params(src, hf_config, "float32")
            except ValueError as e:
                raise ValueError(f"config train.init_from={src}: {str(e).splitlines()[0][:300]}") from None
        else:
            _, loaded, _ = checkpoint.load_language_model(src, dtype="float32",
                                                          scan_layers=self.llm_config.scan_layers)

        def put(path, new, old):
            new_shape = tuple(new.shape)
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            axis = {"embed_tokens/embedding": 0, "lm_head/kernel": 1}.get(name)
            if axis is not None and new_shape != old.shape and new_shape[axis] < old.shape[axis] and \
                    new_shape[1 - axis] == old.shape[1 - axis]:  # a smaller (text-only) vocabulary: extend
                full = np.array(old, np.float32)
                index = (slice(None),) * axis + (slice(0, new_shape[axis]),)
                full[index] = np.asarray(new, np.float32)
                return jnp.asarray(full, old.dtype)
            if new_shape != old.shape:
                raise ValueError(f"config train.init_from={src}: language-model param {name} has shape {new_shape}, "
                                 f"config llm.* gives {old.shape}")
            return jnp.asarray(new, old.dtype)

        try:
            return jax.tree_util.tree_map_with_path(put, loaded, params)
        except (TypeError, ValueError) as e:
            if "init_from" in str(e):
                raise
            raise ValueError(f"config train.init_from={src}: its language model does not match config llm.* "
                             f"({str(e).splitlines()[0][:200]})") from None

    def _load_visual(self, params):
        """The trained tokenizer copy: the frozen tokenizer's params, then train.init_from's visual_weight if any."""
        frozen = self.frozen_tokenizer()
        missing = sorted(set(params) - set(frozen) - {"vit_proj"})
        if missing:
            raise ValueError(f"config train.tokenizer_from: the visual tokenizer has no {', '.join(missing)} params")
        params = _overlay(params, frozen, "train.tokenizer_from")
        src = self.tc.init_from
        if src and init_kind(src) == "converted":
            over = checkpoint.load_understanding_weights(src, scan_layers=self.tok_config.scan_layers)
            if over is not None:
                params = _overlay(params, over, "train.init_from")
        return params

    def flops_per_step(self, batch_size, counts):
        lc, t = self.llm_config, self.tc.seq_len
        n = count_params(llama.param_specs(self.llm_config))["train"]
        n -= lc.vocab_size * lc.hidden_size  # the embedding lookup is no matmul
        attention = 12 * lc.num_hidden_layers * lc.num_attention_heads * lc.head_dim * t
        flops = float((6 * n + attention) * t * batch_size)
        if self.continuous:  # every image slot: encoder forward, merger + projector forward and backward
            s = self.tok_config.image_size
            vis = jax.eval_shape(lambda: self.und_model.init(jax.random.key(0), jnp.zeros((1, s, s, 3))))["params"]
            trained = sum(count_params(vis[k])["train"] for k in TRAINED_VISUAL)
            per_image = 2 * count_params(vis["encoder"])["train"] * (self.n_patches + 1) + 6 * trained * self.n_patches
            flops += float(per_image * batch_size * int(self.tc.get("images_per_row", 4)))
        return flops

    def units_per_step(self, batch_size):
        return batch_size * self.tc.seq_len

    # ----------------------------------------------------------------- traced
    def init_params(self, rng):
        llm = self.model.init(rng, input_ids=jnp.zeros((1, 2), jnp.int32))["params"]
        if not self.continuous:
            return llm
        return {"llm": llm, "visual_tokenizer": self._init_visual(jax.random.fold_in(rng, 1))}

    def _init_visual(self, rng):
        """Boxed params of the trained tokenizer copy: a random ``vit_proj``, zeros elsewhere (``load_init`` lays
        the frozen tokenizer's params over them; the tokenizer's forward is not compiled twice)."""
        s, width = self.tok_config.image_size, self.tok_config.width
        shapes = jax.eval_shape(lambda: self.und_model.init(rng, jnp.zeros((1, s, s, 3))))["params"]
        is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
        zeros = jax.tree.map(lambda b: b.replace_boxed(jnp.zeros(b.value.shape, b.value.dtype)) if is_box(b)
                             else jnp.zeros(b.shape, b.dtype), shapes, is_leaf=is_box)
        proj = self.und_model.init(rng, jnp.zeros((1, 1, width)), method=lambda m, f: m.vit_proj(f))["params"]
        return dict(zeros, vit_proj=proj["vit_proj"])

    def labels(self, params):
        """Continuous understanding: the merger and vit_proj train, the rest of the visual tokenizer is frozen."""
        def label(path, _):
            names = [str(getattr(p, "key", p)) for p in path]
            if self.continuous and names[0] == "visual_tokenizer" and names[1] not in TRAINED_VISUAL:
                return "frozen"
            return "train"

        return jax.tree_util.tree_map_with_path(label, params)

    def input_embeddings(self, params, batch):
        """Token embeddings [B,T,C] with the continuous understanding features at their slots (see the docstring)."""
        llm = params["llm"] if self.continuous else params
        x = self.model.apply({"params": llm}, batch["tokens"], method=llama.LlamaForCausalLM.embed)
        if not self.continuous:
            return x
        pixels, keep = batch["pixels"], batch["keep"]
        b, k, n = keep.shape
        images = pixels.reshape((b * k,) + pixels.shape[2:])
        feats = self.und_model.apply({"params": params["visual_tokenizer"]}, images, keep.reshape(b * k, n),
                                     method=_frozen_encoder_features)
        feats = feats.reshape(b, k * n, feats.shape[-1])
        idx = batch["feature_index"]
        picked = jnp.take_along_axis(feats, jnp.maximum(idx, 0)[..., None], axis=1)
        return jnp.where((idx >= 0)[..., None], picked.astype(x.dtype), x)

    def loss(self, params, ema, batch, rng, step):
        llm = params["llm"] if self.continuous else params
        x = self.input_embeddings(params, batch)
        h, _ = self.model.apply({"params": llm}, inputs_embeds=x, positions=batch["positions"],
                                segment_ids=batch["segment_ids"], method=llama.LlamaForCausalLM.hidden_states)
        if self.llm_config.tie_word_embeddings:
            kernel = llm["embed_tokens"]["embedding"].T
        else:
            kernel = llm["lm_head"]["kernel"]
        h, kernel = pad_vocab(h, kernel.astype(h.dtype), self.mesh.shape["tensor"])
        w = batch["loss_weights"]
        _, per_token = vocab_parallel_cross_entropy(h, kernel, batch["targets"], w, self.mesh)
        loss = jnp.sum(w * per_token) / jnp.maximum(jnp.sum(w), 1e-6)
        valid = batch["segment_ids"] > 0
        scored = valid & (batch["image_inputs"] == 0) if "image_inputs" in batch else valid
        text = scored & (batch["targets"] < vocab.TEXT_VOCAB)
        visual = scored & ~text

        def mean(mask):
            return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1)

        metrics = dict(loss=loss, text_loss=mean(text), visual_loss=mean(visual), tokens=valid.sum(),
                       packing=valid.mean())
        return loss, metrics, {}


def _overlay(params, over, field: str):
    """``params`` with the leaves ``over`` has (a partial tree) replaced, cast to their dtype; shapes checked."""
    if not isinstance(over, dict):
        old = params
        if tuple(over.shape) != tuple(old.shape):
            raise ValueError(f"config {field}: a visual tokenizer param has shape {tuple(over.shape)}, the model "
                             f"(config tokenizer.*) gives {tuple(old.shape)}")
        return jnp.asarray(over, old.dtype)
    out = dict(params)
    for k, v in over.items():
        if k not in params:
            raise ValueError(f"config {field}: visual tokenizer param {k!r} is not in the model (config tokenizer.*)")
        out[k] = _overlay(params[k], v, field)
    return out
