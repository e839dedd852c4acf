"""Tiny random HF LLaMA models (vocab 32000 + 2 + 64 codes) and their Flax conversion, shared by the LLM tests."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from lavit_jax.convert import llama as CL
from lavit_jax.models import llama

VOCAB = 32002 + 64
EOS = 2


def hf_config(**overrides) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=False,
    )
    kw.update(overrides)
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def make_hf_model(seed=0, eos_boost=True, **overrides) -> transformers.LlamaForCausalLM:
    """Random tiny model; the eos row copies a frequent token's row (plus noise) so eos does get generated."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights -> peakier, more varied distributions
            p.mul_(4.0) if p.ndim == 2 else None
        if eos_boost:
            # Make each eos win in ~20% of contexts: its row points along the mean final hidden state, scaled
            # against the best competing logit (text ids for eos 2, visual ids for [/IMG] 32001,
            # motion ids for [/MOV] 48387).
            head = model.get_output_embeddings().weight
            gen = torch.Generator().manual_seed(seed + 1)
            ids = torch.randint(3, 32000, (8, 12), generator=gen)
            hidden = model(ids, output_hidden_states=True).hidden_states[-1].reshape(-1, head.shape[1])
            direction = hidden.mean(0)
            proj = hidden @ direction
            logits = hidden @ head.T
            stops = [(EOS, 3, 32000), (32001, 32002, VOCAB)]
            if head.shape[0] > 48388:  # a Video-LaVIT vocabulary: [/MOV] against the motion ids
                stops.append((48387, 48388, head.shape[0]))
            for tok_id, lo, hi in stops:
                best = logits[:, lo:hi].max(-1).values
                ratio = (best / proj)[proj > 0]
                head[tok_id] = float(torch.quantile(ratio, 0.2)) * direction
    return model


def save_hf(model, directory, safetensors=True, shard="200KB") -> str:
    """Saves as sharded safetensors (HF) or as sharded torch pickles + pytorch_model.bin.index.json."""
    directory = os.fspath(directory)
    if safetensors:
        model.save_pretrained(directory, max_shard_size=shard)
        return directory
    model.config.save_pretrained(directory)
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    groups = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({k: sd[k] for k in group}, os.path.join(directory, name))
        weight_map.update({k: name for k in group})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def load_flax(directory, dtype=jnp.float32):
    params, cfg = CL.load_hf_llama(directory, dtype=dtype)
    return llama.LlamaForCausalLM(cfg), params


def left_padded_ids(rng: np.random.RandomState, lengths, total, low=3, high=32000, last=None):
    """Random ids [B, total] left-padded with EOS and the mask; ``last`` forces the final token."""
    b = len(lengths)
    ids = np.full((b, total), EOS, np.int64)
    mask = np.zeros((b, total), np.int64)
    for i, n in enumerate(lengths):
        ids[i, total - n:] = rng.randint(low, high, size=n)
        mask[i, total - n:] = 1
        if last is not None:
            ids[i, -1] = last
    return ids, mask


def hf_positions(mask):
    return torch.tensor(np.where(mask > 0, np.cumsum(mask, -1) - 1, 0))


def train_tokenizer(directory, lines, vocab_size: int = 400, *, llama_normalization: bool = False,
                    repeat: int = 20) -> str:
    """A small BPE sentencepiece model at DIRECTORY/tokenizer.model (LLaMA's special ids, byte fallback) trained
    on ``lines`` x ``repeat``; ``llama_normalization``: identity normalisation, whitespace kept, as LLaMA's model.
    Returns the model path."""
    import sentencepiece as spm

    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False) if llama_normalization else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines) * repeat), model_prefix=os.path.join(os.fspath(directory), "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2, **extra)
    return os.path.join(os.fspath(directory), "tokenizer.model")
