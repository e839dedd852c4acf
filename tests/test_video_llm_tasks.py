"""Video-LaVIT's LLM tasks against the release's sequence building and transformers' ``generate``.

The references rebuild the release's inputs the way its code does (``tokenizer_image_token`` on the
Vicuna-v1 prompt with the slow ``LlamaTokenizer``, ``prepare_inputs_labels_for_multimodal``'s per-clip
[IMG] feats [/IMG] [MOV] motion [/MOV] splice with left padding, ``generate_image_tokenids`` /
``generate_motion_tokenids``' prompts and settings) and run HF ``generate`` on the same tiny LLaMA.
"""

import types

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

from lavit_jax.data.text_tokenizer import load_text_tokenizer, save_fast_tokenizer
from lavit_jax.inference import video_llm_tasks as vt
from lavit_jax.vocab import MOTION_OFFSET
from tests import llm_fixtures as fx

VOCAB = MOTION_OFFSET + 64  # the tiny motion tokenizer's 64 codes
LINES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: what is the man doing in this video? ASSISTANT: he is riding a horse",
    "a dog runs across the field", "waves crash against a lone lighthouse", "the quick brown fox jumps",
]
VIDEO_TOKEN_INDEX = -201  # the release's placeholder id


class SlowLlama:
    """The slow legacy ``LlamaTokenizer`` as the release calls it: ``tok(text).input_ids`` = BOS + the
    sentencepiece pieces of ``text``; ``decode(ids, skip_special_tokens=True)``."""

    bos_token_id = 1

    def __init__(self, sp):
        self.sp = sp

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=[self.bos_token_id] + self.sp.encode(text))

    def decode(self, ids, skip_special_tokens=True):
        return self.sp.decode([int(i) for i in ids if int(i) > 2 and int(i) < self.sp.get_piece_size()])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("vtok")
    fx.train_tokenizer(d, LINES, 300, llama_normalization=True)
    # The release's LlamaTokenizer(use_fast=False) (legacy): BOS + sentencepiece's own encoding of each chunk.
    slow = SlowLlama(spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")))
    fast_dir = tmp_path_factory.mktemp("vtok_fast")
    save_fast_tokenizer(d, fast_dir / "text_tokenizer.json")
    ours = load_text_tokenizer(fast_dir)  # what a converted checkpoint reads (tokenizers alone)
    hf_tok = transformers.LlamaTokenizer.from_pretrained(str(d), legacy=True)  # the release's batch_decode
    hf = fx.make_hf_model(seed=5, hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                          max_position_embeddings=2048)
    with torch.no_grad():
        hf.get_output_embeddings().weight[259:300] *= 3.0  # favour whole-word pieces (3..258 are bytes)
    model, params = fx.load_flax(fx.save_hf(hf, tmp_path_factory.mktemp("vllm")))
    return dict(slow=slow, hf_tok=hf_tok, ours=ours, hf=hf, model=model, params=params)


def release_input_ids(slow, question):
    """``tokenizer_image_token`` on ``default_conversation``'s prompt (the release's understanding runner)."""
    prompt = (f"{vt.VICUNA_V1_SYSTEM} USER: <video>\n{question} ASSISTANT:")  # conv.get_prompt(), SeparatorStyle.TWO
    chunks = [slow(c).input_ids for c in prompt.split("<video>")]
    ids = [chunks[0][0]] if chunks[0] and chunks[0][0] == slow.bos_token_id else []
    offset = len(ids)
    seps = [VIDEO_TOKEN_INDEX] * (offset + 1)
    parts = [e for pair in zip(chunks, [seps] * len(chunks)) for e in pair][:-1]
    for x in parts:
        ids.extend(x[offset:])
    return ids


QUESTIONS = ["What is the man doing in this video?", "Describe this video in detail.", "dog?  two  spaces",
             "line one\nline two"]


@pytest.mark.parity
def test_chat_ids_equal_the_release_tokenization(env):
    for q in QUESTIONS:
        ref = release_input_ids(env["slow"], q)
        cut = ref.index(VIDEO_TOKEN_INDEX)
        before, bmask, after, amask = vt.chat_ids(env["ours"], [q])
        assert list(before[0][bmask[0] == 1]) == ref[:cut], q
        assert list(after[0][amask[0] == 1]) == ref[cut + 1:], q
    with pytest.raises(ValueError, match="<video>"):
        vt.chat_ids(env["ours"], ["what is in <video>?"])


def release_video_embeds(hf, slow, questions, feats, feat_lengths, n_clips, codes):
    """``prepare_inputs_labels_for_multimodal`` with ``encode_visual_features``' per-clip sequences, left padded."""
    emb = hf.get_input_embeddings()
    rows = []
    for b, q in enumerate(questions):
        ids = torch.tensor(release_input_ids(slow, q))
        cut = int(torch.where(ids == VIDEO_TOKEN_INDEX)[0])
        pieces = [emb(ids[:cut])]
        for c in range(n_clips[b]):
            motion = torch.tensor(codes[b, c] + MOTION_OFFSET)
            pieces += [emb(torch.tensor([32000])), torch.tensor(feats[b, c, :feat_lengths[b, c]]),
                       emb(torch.tensor([32001])),
                       emb(torch.cat([torch.tensor([48386]), motion, torch.tensor([48387])]))]
        pieces.append(emb(ids[cut + 1:]))
        rows.append(torch.cat(pieces))
    width = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        embeds[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return embeds, mask


@pytest.mark.parity
def test_video_answer_matches_hf_generate(env):
    """Two videos (2 clips and 1 clip, keyframes of different kept-token counts): greedy answers equal HF
    ``generate`` on the release's spliced embeddings with its understanding settings."""
    rng = np.random.RandomState(0)
    d = env["hf"].config.hidden_size
    feats = rng.normal(size=(2, 2, 7, d)).astype(np.float32)
    feat_lengths = np.array([[7, 4], [5, 0]])
    clip_mask = np.array([[1, 1], [1, 0]])
    codes = rng.randint(0, 64, size=(2, 2, vt.MOTION_TOKENS))
    questions = ["What is the man doing in this video?", "dog?"]
    cfg = vt.video_chat_config(env["ours"], VOCAB, max_new_tokens=12)
    answers, out = vt.answer_video(env["model"], env["params"], env["ours"], questions, feats, feat_lengths,
                                   clip_mask, codes, config=cfg)
    embeds, mask = release_video_embeds(env["hf"], env["slow"], questions, feats, feat_lengths, [2, 1], codes)
    with torch.no_grad():
        ref = env["hf"].generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                 min_new_tokens=8, suppress_tokens=list(range(32000, VOCAB)), eos_token_id=2,
                                 pad_token_id=2, bos_token_id=1).numpy()
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i in range(2):
        ref_i = ref[i][: int(lengths[i])]
        np.testing.assert_array_equal(tokens[i, : int(lengths[i])], ref_i)
        text = env["hf_tok"].decode(ref_i, skip_special_tokens=True).split("\\n")[0].strip()  # batch_decode
        assert answers[i] == text
    assert int(lengths.min()) >= 8


def hf_generate_after(hf, rows, start, **kw):
    """The release's token-prompt path: rows left-padded with 2 + ``start``; output rows with pad ids dropped."""
    width = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) - 1:] = torch.tensor(list(r) + [start])
        mask[i, width - len(r) - 1:] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=2, **kw)
    return [o[o != 2].numpy() for o in out], [o[width:][o[width:] != 2].numpy() for o in out]


@pytest.mark.parity
def test_text_to_video_ids_match_hf_generate(env):
    """Keyframe ids (guidance 4) then motion ids (greedy, guidance 7) after the keyframe, as the release's
    ``generate_video`` chains ``generate_image_tokenids`` and ``generate_motion_tokenids``; motion ids cut
    or padded to 135 as ``video_decoding`` does."""
    texts = ["a dog runs across the field", "waves"]
    rows = [env["ours"].encode(t) for t in texts]
    kcfg = vt.keyframe_generation_config(do_sample=False, max_new_tokens=10, min_new_tokens=4)
    codes_k, cont = vt.keyframe_ids(env["model"], env["params"], rows, None, kcfg)
    ref_out, ref_new = hf_generate_after(
        env["hf"], rows, 32000, do_sample=False, max_new_tokens=10, min_new_tokens=4, guidance_scale=4.0,
        suppress_tokens=list(range(3, 32000)) + list(range(48386, 48386 + 1026)), eos_token_id=32001,
        bos_token_id=32000)
    for i in range(2):
        np.testing.assert_array_equal(cont[i], ref_out[i])
        np.testing.assert_array_equal(codes_k[i], ref_new[i][ref_new[i] >= 32002] - 32002)
    mcfg = vt.motion_generation_config(max_new_tokens=140)
    codes_m, counts, cont_m = vt.motion_ids(env["model"], env["params"], cont, None, mcfg)
    ref_out_m, ref_new_m = hf_generate_after(
        env["hf"], [list(r) for r in ref_out], 48386, do_sample=False, max_new_tokens=140, min_new_tokens=20,
        guidance_scale=7.0, suppress_tokens=list(range(3, 48386)), eos_token_id=48387, bos_token_id=48386)
    for i in range(2):
        np.testing.assert_array_equal(cont_m[i], ref_out_m[i])
        motion = ref_new_m[i][ref_new_m[i] > 48387]
        motion = np.concatenate([motion, np.full(max(0, 135 - len(motion)), 48388)])[:135] - 48388
        np.testing.assert_array_equal(codes_m[i], motion)
        assert counts[i] == int((ref_new_m[i] > 48387).sum())


def test_motion_codes_are_cut_and_padded_as_the_release():
    ids = [np.array([48388 + 5, 48387]), np.arange(48388, 48388 + 140), np.array([2, 48386, 48389])]
    codes, counts = vt.motion_codes_from_ids(ids)
    assert counts == [1, 140, 1]
    np.testing.assert_array_equal(codes[0], [5] + [0] * 134)
    np.testing.assert_array_equal(codes[1], np.arange(135))
    np.testing.assert_array_equal(codes[2], [1] + [0] * 134)


def test_sampled_motion_ids_follow_the_seed(env):
    """Image -> video samples its motion ids: the same key gives the same ids, another key other ids."""
    rows = [env["ours"].encode("a dog") + [32000, 32002 + 7, 32002 + 9, 32001]]
    cfg = vt.motion_generation_config(do_sample=True, max_new_tokens=30)
    a = vt.motion_ids(env["model"], env["params"], rows, jax.random.key(1), cfg)[0]
    b = vt.motion_ids(env["model"], env["params"], rows, jax.random.key(1), cfg)[0]
    c = vt.motion_ids(env["model"], env["params"], rows, jax.random.key(2), cfg)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
