"""The LLM's text tokenizer (LLaMA sentencepiece ``tokenizer.model``, through ``transformers`` or ``tokenizers``).

``load_text_tokenizer(path)`` takes a directory holding ``tokenizer.model`` (e.g. the checkpoint's
``language_model/``) or the file itself. A converted checkpoint also holds ``text_tokenizer.json``, the
same tokenizer serialised by ``save_fast_tokenizer`` at conversion: it is read with ``tokenizers``
alone (no ``transformers`` import, which costs about a second per process).
``TextTokenizer.encode_batch`` returns left-padded int32 ids and a mask as LaVIT feeds them (no BOS/EOS
added, padding with the pad id = eos id 2);
``decode_batch`` turns generated ids back into strings, skipping special and non-text ids.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np

log = logging.getLogger(__name__)

FAST_FILE = "text_tokenizer.json"  # the converted checkpoint's tokenizers-format copy of tokenizer.model
BOS, EOS = "<s>", "</s>"


class TextTokenizer:
    """A LLaMA tokenizer: a transformers ``LlamaTokenizer`` (``hf``) or its ``tokenizers.Tokenizer``
    (``fast``, read from ``text_tokenizer.json``). pad id = eos id, as the reference sets it."""

    def __init__(self, hf_tokenizer=None, *, fast=None):
        self.hf, self.fast = hf_tokenizer, fast
        if fast is not None:
            self.bos_id, self.eos_id = fast.token_to_id(BOS), fast.token_to_id(EOS)
            if self.bos_id is None or self.eos_id is None:
                raise ValueError(f"the text tokenizer has no {BOS} / {EOS} token")
            self.vocab_size = fast.get_vocab_size(with_added_tokens=True)
        else:
            self.bos_id = int(hf_tokenizer.bos_token_id)
            self.eos_id = int(hf_tokenizer.eos_token_id)
            hf_tokenizer.pad_token = hf_tokenizer.eos_token  # the reference pads with eos ...
            hf_tokenizer.padding_side = "left"  # ... on the left
            self.vocab_size = len(hf_tokenizer)
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""
        if self.fast is not None:
            return list(self.fast.encode(text, add_special_tokens=False).ids)
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids) -> str:
        if self.fast is not None:
            return self.fast.decode(ids, skip_special_tokens=True)
        return self.hf.decode(ids, skip_special_tokens=True)

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
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, t in enumerate(texts):  # left padding, as the reference
            row = self.encode(t)
            if row:
                ids[i, length - len(row):] = row
                mask[i, length - len(row):] = 1
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
            out.append(self._decode(kept))
        if with_dropped:
            return out, dropped
        if any(dropped):
            log.warning("decoding left out %d generated ids that the text tokenizer (%d pieces) has no text for",
                        sum(dropped), self.vocab_size)
        return out


def _hf_llama_tokenizer(path):
    from transformers import LlamaTokenizer  # imported only when there is no text_tokenizer.json

    try:
        return LlamaTokenizer.from_pretrained(path, legacy=True)
    except Exception as e:
        raise ValueError(f"cannot load the text tokenizer from {path}: {type(e).__name__}: {e}") from e


def save_fast_tokenizer(src_dir, out_path) -> None:
    """Writes the ``LlamaTokenizer(legacy=True)`` of ``src_dir/tokenizer.model`` as a ``tokenizers`` JSON file
    (what ``load_text_tokenizer`` reads from a converted checkpoint without importing ``transformers``)."""
    _hf_llama_tokenizer(os.fspath(src_dir))._tokenizer.save(os.fspath(out_path))


def load_text_tokenizer(path) -> TextTokenizer:
    """Loads the LLaMA tokenizer from a directory with ``text_tokenizer.json`` (read with ``tokenizers``) or
    ``tokenizer.model`` (through ``transformers``), or from the ``.model`` file itself."""
    path = os.fspath(path)
    fast = os.path.join(path, FAST_FILE)
    if os.path.isfile(fast):
        from tokenizers import Tokenizer

        try:
            return TextTokenizer(fast=Tokenizer.from_file(fast))
        except Exception as e:
            raise ValueError(f"cannot load the text tokenizer {fast}: {type(e).__name__}: {e}") from e
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
    return TextTokenizer(_hf_llama_tokenizer(path))
