"""Stage 2 beyond discrete ids: continuous understanding (merger + vit_proj train with the LLM), init from a
Hugging Face LLaMA directory, and precomputed visual ids equal to the on-the-fly ones."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lavit_jax import vocab
from lavit_jax.data import input_pipeline, visual_records
from lavit_jax.inference import llm_tasks
from lavit_jax.models import llama
from lavit_jax.ops import sharding
from lavit_jax.train import lm, trainer
from lavit_jax.train.task import global_batch
from tests.conftest import REPO
from tests.train_configs import small_config
from tools import precompute_visual_tokens as precompute_tool


def _task(c):
    """An LMTask on the config's mesh (no compilation)."""
    shape = trainer.mesh_shape(c.mesh_shape, len(jax.devices()))
    mesh = trainer.build_mesh(shape)
    task = lm.LMTask(c, mesh, sharding.rules_from_config(c.logical_axis_rules))
    task.check()
    return task


def _first_batch(task):
    data = task.dataset(0, 1, task.tc.batch_size)
    task.check_sources()
    return task.prepare(next(iter(data)))


def test_markers_become_rows_with_image_slots():
    text = np.array([5, 6, 7])
    a, wa = lm.understanding_sequence(text, 2, 0, 1.0)  # example 0 keeps 2 tokens
    b, wb = lm.understanding_sequence(text, 3, 1, 1.0)
    t2i = lm.build_sequence(input_pipeline.KIND_TEXT_TO_IMAGE, text, np.array([32002, 32003]))
    assert a.tolist() == [-1, -2, -2, vocab.IMG_END, 5, 6, 7, vocab.EOS_ID]
    assert wa.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # no loss on the image part and [/IMG]
    # a -> row 0; b fits row 0's slots, but row 0 holds its one image already -> row 1; t2i -> row 0
    rows, dropped = lm.pack_rows([a, b, t2i], [wa, wb, np.ones(len(t2i))], 2, 20, items=[1, 1, 0], max_items=1)
    assert dropped == 0 and rows["segment_ids"][0].max() == 2 and rows["segment_ids"][1].max() == 1
    pixels = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    keep = np.array([[1, 0, 1, 0], [1, 1, 1, 0]], np.float32)
    out = lm.place_images(rows, pixels, keep, 1)
    assert out["tokens"][0, :7].tolist() == [vocab.IMG_START, vocab.PAD_ID, vocab.PAD_ID, vocab.IMG_END, 5, 6, 7]
    assert out["tokens"][0, 7:13].tolist() == t2i[:-1].tolist()
    assert out["feature_index"][0, :4].tolist() == [-1, 0, 1, -1] and (out["feature_index"][0, 4:] == -1).all()
    assert out["feature_index"][1, :5].tolist() == [-1, 0, 1, 2, -1]
    assert out["image_inputs"][1, :5].tolist() == [1, 1, 1, 1, 0] and out["image_inputs"][0, 4:].sum() == 0
    np.testing.assert_array_equal(out["pixels"][0, 0], pixels[0])
    np.testing.assert_array_equal(out["pixels"][1, 0], pixels[1])
    np.testing.assert_array_equal(out["keep"][1, 0], keep[1])
    assert (out["targets"] >= 0).all() and (out["tokens"] >= 0).all()
    assert out["loss_weights"][0, :4].tolist() == [0, 0, 0, 1]  # [/IMG] -> first text token is scored
    with pytest.raises(ValueError, match=r"more than max_items=1"):
        lm.pack_rows([a], [wa], 1, 20, items=[2], max_items=1)


def _segment(batch, row, seg):
    return np.nonzero(batch["segment_ids"][row] == seg)[0]


def test_continuous_batch_equals_the_inference_assembly(tmp_path):
    """The packed continuous image->text sequence: the features the trained tokenizer gives at the slots, and
    the LLM's logits there equal the inference path's ([IMG] feats [/IMG] text, llm_tasks.understanding_inputs)."""
    c = small_config("lm", tmp_path / "w", mix=(1.0, 0.0, 0.0))
    task = _task(c)
    batch = _first_batch(task)
    rng = jax.random.key(0)
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
        params = task.load_init(jax.jit(lambda: nn.meta.unbox(task.init_params(rng)))())
        arrays, _ = global_batch(batch, task.mesh, task.rules)
        emb = jax.jit(task.input_embeddings)(params, arrays)
        h, _ = jax.jit(lambda p, x: task.model.apply(
            {"params": p["llm"]}, inputs_embeds=x, positions=arrays["positions"], segment_ids=arrays["segment_ids"],
            method=llama.LlamaForCausalLM.hidden_states))(params, emb)
        logits = task.model.apply({"params": params["llm"]}, h, method=llama.LlamaForCausalLM.logits)
    emb, logits = np.asarray(emb), np.asarray(logits)
    vis = jax.device_get(params["visual_tokenizer"])
    n_patches = batch["keep"].shape[-1]
    row, at = next((r, int(np.argmax(f >= 0))) for r, f in enumerate(batch["feature_index"]) if (f >= 0).any())
    k = int(batch["feature_index"][row, at]) // n_patches  # the row's image of this sequence
    idx = np.nonzero(batch["segment_ids"][row] == batch["segment_ids"][row, at])[0]
    tokens = batch["tokens"][row, idx]
    assert tokens[0] == vocab.IMG_START and batch["image_inputs"][row, idx[0]] == 1
    n = int((batch["feature_index"][row, idx] >= 0).sum())
    assert n == int(batch["keep"][row, k].sum()) and tokens[n + 1] == vocab.IMG_END
    assert batch["positions"][row, idx].tolist() == list(range(len(idx)))
    # the trained tokenizer copy on this image alone, with the same keep decisions
    feats = task.und_model.apply({"params": vis}, batch["pixels"][row, k:k + 1], batch["keep"][row, k:k + 1],
                                 method=lm._frozen_encoder_features)
    np.testing.assert_allclose(emb[row, idx[1:n + 1]], np.asarray(feats[0, :n]), rtol=0, atol=1e-5)
    text = tokens[n + 2:]
    seq_embeds, mask = llm_tasks.understanding_inputs(task.model, params["llm"], feats, np.array([n]),
                                                      jnp.asarray(text[None]), jnp.ones((1, len(text)), jnp.int32))
    ref = task.model.apply({"params": params["llm"]}, inputs_embeds=seq_embeds, attention_mask=mask)[0]
    ref = np.asarray(ref)[0, -len(idx):]
    np.testing.assert_allclose(logits[row, idx], ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


def test_continuous_understanding_trains_merger_and_vit_proj_only(tmp_path):
    c = small_config("lm", tmp_path / "w")  # the program of test_loss_falls_on_synthetic_set (compiled once)
    prog = trainer.program(c)
    init = jax.device_get(prog.init_state().params)
    state, hist = trainer.train(c, max_steps=3)
    assert np.isfinite([h["loss"] for h in hist]).all()
    got = jax.device_get(state.params)
    vis0, vis1 = init["visual_tokenizer"], got["visual_tokenizer"]

    def moved(a, b):
        return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]

    for part in ("causal_encoder", "vit_proj"):
        assert all(moved(vis0[part], vis1[part])), part  # gradients reached every merger / projector param
    for part in ("encoder", "quantize", "token_predictor", "encode_task_layer_0", "encode_task_layer_2"):
        assert not any(moved(vis0[part], vis1[part])), part  # frozen: the EVA encoder, the codebook, ...
    assert all(moved(init["llm"], got["llm"]))
    labels = prog.labels["visual_tokenizer"]
    assert set(jax.tree.leaves(labels["encoder"])) == {"frozen"} and set(jax.tree.leaves(labels["vit_proj"])) == {
        "train"}


def test_discrete_understanding_trains_the_llm_alone(tmp_path):
    c = small_config("lm", tmp_path / "w", understanding="discrete")
    state, hist = trainer.train(c, max_steps=3)
    assert np.isfinite([h["loss"] for h in hist]).all() and hist[-1]["loss"] < hist[0]["loss"]
    assert "visual_tokenizer" not in state.params and "embed_tokens" in state.params


def test_understanding_setting_is_checked(tmp_path):
    c = small_config("lm", tmp_path / "w", understanding="pixels")
    with pytest.raises(ValueError, match=r"config train\.understanding='pixels': expected one of continuous, "):
        trainer.train(c)


# ------------------------------------------------------------------------------------------ HF LLaMA init


def _hf_llama(path, c, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    l = c.llm
    kw = dict(vocab_size=l.vocab_size, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
              num_hidden_layers=l.num_hidden_layers, num_attention_heads=l.num_attention_heads,
              num_key_value_heads=l.num_key_value_heads, max_position_embeddings=l.max_position_embeddings,
              rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from lavit_jax import checkpoint
from lavit_jax.convert import llama as convert_llama
cfg = checkpoint.read_llama_config(sys.argv[1])
params = convert_llama.llama_params(sys.argv[1], cfg, "float32")
print("loaded", params["embed_tokens"]["embedding"].shape)
"""


def test_init_from_hugging_face_llama_directory(tmp_path):
    import torch

    from lavit_jax.convert import llama as convert_llama

    hf_dir = tmp_path / "hf"
    c = small_config("lm", tmp_path / "w", init_from=str(hf_dir))
    ref_model = _hf_llama(hf_dir, c)
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(hf_dir)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]  # safetensors without torch

    _, hist = trainer.train(c, max_steps=1)
    prog = trainer.program(c)
    task = prog.task
    params = jax.device_get(prog.init_state().params)
    converted = jax.device_get(convert_llama.load_hf_llama(hf_dir, dtype=jnp.float32)[0])
    for a, b in zip(jax.tree.leaves(params["llm"]), jax.tree.leaves(converted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.random.default_rng(0).integers(3, c.llm.vocab_size, (1, 12))
    logits = task.model.apply({"params": params["llm"]}, input_ids=jnp.asarray(ids))[0]
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)
    # The first step's loss is the loss of the converted weights on the first batch.
    batch = _first_batch(task)
    with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
        arrays, _ = global_batch(batch, task.mesh, task.rules)
        p = dict(params, llm=converted)
        loss = jax.jit(lambda p, b: task.loss(p, {}, b, jax.random.key(0), 0)[0])(p, arrays)
    np.testing.assert_allclose(hist[0]["loss"], float(loss), rtol=1e-5)


def test_text_only_hugging_face_vocabulary_is_extended(tmp_path):
    hf_dir = tmp_path / "hf"
    c = small_config("lm", tmp_path / "w", init_from=str(hf_dir), understanding="discrete")
    _hf_llama(hf_dir, c, vocab_size=vocab.TEXT_VOCAB)
    task = _task(c)
    task.check_sources()
    fresh = jax.jit(lambda: llama.init_params(task.llm_config, jax.random.key(0)))()
    loaded = jax.device_get(task.load_init(fresh))
    from lavit_jax.convert import llama as convert_llama

    hf, _ = convert_llama.load_hf_llama(hf_dir, dtype=jnp.float32)
    v = vocab.TEXT_VOCAB
    np.testing.assert_array_equal(loaded["embed_tokens"]["embedding"][:v], hf["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(loaded["embed_tokens"]["embedding"][v:], fresh["embed_tokens"]["embedding"][v:])
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"][:, :v], hf["lm_head"]["kernel"])
    np.testing.assert_array_equal(loaded["norm"]["weight"], hf["norm"]["weight"])


@pytest.mark.parametrize("case,match", [
    ("hidden", r"config train\.init_from='.*hf': its LLaMA has hidden_size=64, config llm\.hidden_size=128$"),
    ("no_weights", r"config train\.init_from='.*hf' has a config.json but no LLaMA weights"),
    ("not_a_checkpoint", r"config train\.init_from='.*hf' is not a converted checkpoint \(no lavit\.json\) nor a "
                         r"Hugging Face LLaMA directory"),
])
def test_bad_init_from_is_a_one_line_error_naming_it(tmp_path, case, match):
    hf_dir = tmp_path / "hf"
    c = small_config("lm", tmp_path / "w", init_from=str(hf_dir))
    if case == "hidden":
        _hf_llama(hf_dir, c, hidden_size=64, intermediate_size=128)
    else:
        hf_dir.mkdir()
        if case == "no_weights":
            (hf_dir / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=match) as e:
        trainer.train(c)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()  # before any model work


# ------------------------------------------------------------------------------------------ precomputed ids


@pytest.mark.parametrize("understanding", ["discrete", "continuous"])
def test_batches_from_precomputed_visual_ids_equal_on_the_fly(tmp_path, understanding):
    out = tmp_path / "ids.array_record"
    c = small_config("lm", tmp_path / "w", understanding=understanding)
    n = precompute_tool.precompute(c, c.train.data_dir, str(out), batch_size=5)
    assert n == 16 and sorted(os.listdir(tmp_path)) == ["ids.array_record"]  # no temporary file left
    rec = visual_records.decode_record(visual_records.open_records(str(out))[3])
    assert rec["image"] == 3 and rec["visual_ids"].min() >= vocab.VISUAL_OFFSET

    on_the_fly = _first_batch(_task(c))
    c.train.visual_ids_from = str(out)
    task = _task(c)
    from_file = _first_batch(task)
    assert sorted(from_file) == sorted(on_the_fly)
    for k in on_the_fly:
        np.testing.assert_array_equal(from_file[k], on_the_fly[k], err_msg=k)
    assert (from_file["targets"] >= vocab.VISUAL_OFFSET).any()
    if understanding == "discrete":
        assert task.tokenized == 0  # every visual id came from the file: the tokenizer never ran


def test_precompute_refuses_to_overwrite_and_checks_alignment(tmp_path, capsys):
    out = tmp_path / "ids.array_record"
    out.write_bytes(b"old")
    rc = precompute_tool.main(["--config", f"{REPO}/configs/tiny.py:lm", "--data", "synthetic:4", "--out", str(out)])
    assert rc == 2 and out.read_bytes() == b"old"
    assert capsys.readouterr().err.strip() == f"error: --out {out} exists (pass --overwrite to replace it)"
    c = small_config("lm", tmp_path / "w")
    precompute_tool.precompute(c, "synthetic:4", str(out), overwrite=True)
    c.train.visual_ids_from = str(out)
    with pytest.raises(ValueError, match=r"config train\.visual_ids_from='.*ids\.array_record' has 4 records, "
                                         r"train\.data_dir='synthetic:16' has 16"):
        _task(c).dataset(0, 1, 8)
