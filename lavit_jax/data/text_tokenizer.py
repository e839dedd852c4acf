"""The LLM's text tokenizer (LLaMA sentencepiece ``tokenizer.model`` through ``transformers``).

``load_text_tokenizer(path)`` takes a directory holding ``tokenizer.model`` (e.g. the checkpoint's
``language_model/``) or the file itself. ``TextTokenizer.encode_batch`` returns left-padded int32 ids
and a mask as LaVIT feeds them (no BOS/EOS added, padding with the pad id = eos id 2);
``decode_batch`` turns generated ids back into strings, skipping special and non-text ids.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
from transformers import LlamaTokenizer

log = logging.getLogger(__name__)


class TextTokenizer:
    """Wraps a transformers LLaMA tokenizer. pad id = eos id, as the reference sets it."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.bos_id = int(hf_tokenizer.bos_token_id)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.pad_id = self.eos_id
        hf_tokenizer.pad_token = hf_tokenizer.eos_token  # the reference pads with eos ...
        hf_tokenizer.padding_side = "left"  # ... on the left
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids [B, L] int32 and mask [B, L] int32; L = longest (at least 1), or ``length``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        longest = max((len(self.encode(t)) for t in texts), default=0)
        if length is None:
            length = max(longest, 1)
        if longest > length:
            raise ValueError(f"a text has {longest} tokens, more than length={length}")
        enc = self.hf(texts, add_special_tokens=False, padding="max_length", max_length=length,
                      return_attention_mask=True)
        ids = np.asarray(enc["input_ids"], np.int32).reshape(len(texts), length)
        mask = np.asarray(enc["attention_mask"], np.int32).reshape(len(texts), length)
        return ids, mask

    def decode_batch(self, tokens, lengths=None, *, with_dropped: bool = False):
        """Strings from generated ids [N, M] (first ``lengths[i]`` of row i), skipping special ids.

        Ids the sentencepiece model has no piece for (``>= vocab_size``: a tokenizer smaller than the
        LLM's text vocabulary, or non-text ids) cannot become text; they are left out and counted, never
        silently: with ``with_dropped`` the result is (strings, dropped count per row), otherwise a
        warning names the count.
        """
        out, dropped = [], []
        for i, row in enumerate(tokens):
            if lengths is not None:
                row = row[: int(lengths[i])]
            ids = [int(t) for t in row]
            kept = [t for t in ids if 0 <= t < self.vocab_size]
            dropped.append(len(ids) - len(kept))
            out.append(self.hf.decode(kept, skip_special_tokens=True))
        if with_dropped:
            return out, dropped
        if any(dropped):
            log.warning("decoding left out %d generated ids that the text tokenizer (%d pieces) has no text for",
                        sum(dropped), self.vocab_size)
        return out


def load_text_tokenizer(path) -> TextTokenizer:
    """Loads the LLaMA tokenizer from a directory with ``tokenizer.model`` (or the file itself)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".model"):
            raise ValueError(f"text tokenizer file {path}: expected a sentencepiece .model file")
        tmp = tempfile.mkdtemp(prefix="lavit_tok_")
        shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
        path = tmp
    if not os.path.isfile(os.path.join(path, "tokenizer.model")) and not os.path.isfile(
        os.path.join(path, "tokenizer.json")
    ):
        raise FileNotFoundError(f"no tokenizer.model in {path}")
    try:
        tok = LlamaTokenizer.from_pretrained(path, legacy=True)
    except Exception as e:
        raise ValueError(f"cannot load the text tokenizer from {path}: {type(e).__name__}: {e}") from e
    return TextTokenizer(tok)
