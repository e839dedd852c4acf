"""The benchmark protocols of ``eval.py --task``: what ``--data DIR`` holds, the items to predict, and the
metrics of the predictions. No model here: items in, predictions in, numbers out.

``--data DIR`` layout per task (file names fixed; images in ``DIR/images/``, any PIL-readable format):

- ``coco_caption``: ``annotations.json`` (COCO captions: ``images`` [{id, file_name}], ``annotations``
  [{image_id, caption}], e.g. the Karpathy test split) and ``images/FILE_NAME``.
- ``vqav2``, ``okvqa``: ``questions.json`` + ``annotations.json`` (the official pair) and ``images/``, where the
  image of ``image_id`` N is the file whose name without extension ends in N (``COCO_val2014_000000000042.jpg``
  or ``42.png``).
- ``gqa``: ``questions.json`` ({question_id: {imageId, question, answer}}, testdev-balanced style) and
  ``images/IMAGEID.jpg`` (any extension).
- ``vizwiz``: ``annotations.json`` (the VizWiz list [{image, question, answers, answerable, answer_type}]) and
  ``images/IMAGE``.
- ``t2i_clip_score``: ``captions.json`` (COCO captions; each image's first caption is one prompt, in ``images``
  order).
- ``t2i_fid``: ``captions.json`` as above and ``images/``: the reference images (every image in it).

Items are dicts {"id", "image"} (+ "question") or {"id", "prompt"}; ``limit`` keeps the first ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from lavit_jax.eval import captions, vqa
from lavit_jax.eval.fid import fid_from_features
from lavit_jax.eval.vqa import _field, _load_json

TASKS = ("coco_caption", "vqav2", "okvqa", "gqa", "vizwiz", "t2i_clip_score", "t2i_fid")
KIND = {"coco_caption": "caption", "vqav2": "answer", "okvqa": "answer", "gqa": "answer", "vizwiz": "answer",
        "t2i_clip_score": "image", "t2i_fid": "image"}
FILES = {"coco_caption": ("annotations.json", "images"), "vqav2": ("questions.json", "annotations.json", "images"),
         "okvqa": ("questions.json", "annotations.json", "images"), "gqa": ("questions.json", "images"),
         "vizwiz": ("annotations.json", "images"), "t2i_clip_score": ("captions.json",),
         "t2i_fid": ("captions.json", "images")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A task's items (in evaluation order) and what scoring needs (``truth``; ``reference_images`` for FID)."""

    task: str
    items: list
    truth: object
    reference_images: tuple = ()


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of tokenizer, {', '.join(TASKS)}")
    return task


def data_paths(task: str, data_dir) -> dict[str, str]:
    """{name: path} of the files ``task`` reads in ``--data``; an error naming the first one missing."""
    check_task(task)
    if not data_dir:
        raise ValueError(f"--data is required for --task {task} (a folder with {', '.join(FILES[task])})")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data {data_dir}: directory not found")
    out = {}
    for name in FILES[task]:
        path = os.path.join(data_dir, name)
        ok = os.path.isdir(path) if name == "images" else os.path.isfile(path)
        if not ok:
            raise FileNotFoundError(f"--data {data_dir}: no {name}{'/ folder' if name == 'images' else ''} "
                                    f"(--task {task} needs {', '.join(FILES[task])})")
        out[name] = path
    return out


def _images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def _by_stem(folder: str) -> dict[str, str]:
    return {os.path.splitext(os.path.basename(p))[0]: p for p in _images(folder)}


def _by_trailing_number(folder: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for p in _images(folder):
        m = re.search(r"(\d+)$", os.path.splitext(os.path.basename(p))[0])
        if m:
            n = int(m.group(1))
            if n in out:
                raise ValueError(f"{folder}: two images for image_id {n}: {os.path.basename(out[n])} and "
                                 f"{os.path.basename(p)}")
            out[n] = p
    return out


def _need_image(mapping, key, folder, what):
    if key not in mapping:
        raise FileNotFoundError(f"{folder}: no image for {what}")
    return mapping[key]


def _coco_prompts(path) -> list:
    files, refs = captions.load_coco_captions(path)
    return [{"id": iid, "prompt": refs[iid][0]} for iid in files]


def load_dataset(task: str, data_dir, limit: int | None = None) -> Dataset:
    """The items and ground truth of ``task`` in ``data_dir`` (layout: module docstring). Every file is read and
    checked here (errors name the file and the entry), before any model work."""
    p = data_paths(task, data_dir)
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)  # noqa: E731
    if task == "coco_caption":
        files, refs = captions.load_coco_captions(p["annotations.json"])
        items = [{"id": iid, "image": os.path.join(p["images"], name)} for iid, name in files.items()]
        for it in items:
            if not os.path.isfile(it["image"]):
                raise FileNotFoundError(f"{p['images']}: no image {os.path.basename(it['image'])} (image id "
                                        f"{it['id']} of {p['annotations.json']})")
        items = cut(items)
        return Dataset(task, items, {it["id"]: refs[it["id"]] for it in items})
    if task in ("vqav2", "okvqa"):
        truth = vqa.load_vqa_annotations(p["annotations.json"], p["questions.json"])
        qfile = p["questions.json"]
        ques = _field(_load_json(qfile, "VQA question file"), "questions", qfile, "the top level", list)
        imgs = _by_trailing_number(p["images"])
        items = []
        for i, q in enumerate(ques):
            qid = _field(q, "question_id", qfile, f"questions[{i}]", (int, str))
            iid = _field(q, "image_id", qfile, f"questions[{i}]", int)
            items.append({"id": qid, "question": _field(q, "question", qfile, f"questions[{i}]", str),
                          "image": _need_image(imgs, iid, p["images"], f"image_id {iid} (questions[{i}] of {qfile})")})
        items = cut(items)
        return Dataset(task, items, {it["id"]: truth[it["id"]] for it in items})
    if task == "gqa":
        qfile = p["questions.json"]
        answers = vqa.load_gqa_answers(qfile)
        data = _load_json(qfile, "GQA question file")
        imgs = _by_stem(p["images"])
        items = []
        for qid, q in data.items():
            image = _field(q, "imageId", qfile, f"question {qid!r}", (str, int))
            items.append({"id": str(qid), "question": _field(q, "question", qfile, f"question {qid!r}", str),
                          "image": _need_image(imgs, str(image), p["images"], f"imageId {image!r} (question {qid!r})")})
        items = cut(items)
        return Dataset(task, items, {it["id"]: answers[it["id"]] for it in items})
    if task == "vizwiz":
        afile = p["annotations.json"]
        truth = vqa.load_vizwiz_annotations(afile)
        data = _load_json(afile, "VizWiz annotation file")
        items = []
        for i, a in enumerate(data):
            image = a["image"]
            path = os.path.join(p["images"], image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{p['images']}: no image {image} (entry {i} of {afile})")
            items.append({"id": image, "question": _field(a, "question", afile, f"entry {i}", str), "image": path})
        items = cut(items)
        return Dataset(task, items, {it["id"]: truth[it["id"]] for it in items})
    items = cut(_coco_prompts(p["captions.json"]))
    refs = ()
    if task == "t2i_fid":
        refs = tuple(_images(p["images"]))
        if len(refs) < 2:
            raise ValueError(f"{p['images']}: FID needs at least 2 reference images, found {len(refs)}")
        if len(items) < 2:
            raise ValueError(f"{p['captions.json']}: FID needs at least 2 prompts, found {len(items)}")
    return Dataset(task, items, None, refs)


def score(dataset: Dataset, predictions: Mapping, *, reference_features=None, generated_features=None) -> dict:
    """Metrics of ``predictions`` ({item id: caption / answer / CLIP similarity}) on ``dataset``.

    coco_caption: BLEU-1..4, METEOR, ROUGE-L, CIDEr (``captions.caption_scores``, fractions as pycocoevalcap);
    vqav2 / okvqa: VQA accuracy (official normalisation), overall and per answer type, percent; gqa: exact match,
    percent; vizwiz: accuracy and the "unanswerable" class's average precision and F1, percent; t2i_clip_score:
    max(mean(100 cos), 0) over the prompts (the per-item similarities); t2i_fid: FID of the generated images'
    features [N, D] against the reference images' [M, D].
    """
    task = dataset.task
    if task == "coco_caption":
        return captions.caption_scores(dataset.truth, predictions)
    if task in ("vqav2", "okvqa"):
        r = (vqa.evaluate_okvqa if task == "okvqa" else vqa.evaluate_vqa)(dataset.truth, predictions)
        return {"accuracy": r.overall, "per_answer_type": r.per_answer_type}
    if task == "gqa":
        return {"accuracy": vqa.gqa_accuracy(dataset.truth, predictions)}
    if task == "vizwiz":
        r = vqa.evaluate_vizwiz(dataset.truth, predictions)
        return {"accuracy": r.accuracy.overall, "per_answer_type": r.accuracy.per_answer_type,
                "unanswerable_average_precision": r.unanswerable_average_precision,
                "unanswerable_f1": r.unanswerable_f1}
    if task == "t2i_clip_score":
        sims = np.asarray([predictions[it["id"]] for it in dataset.items], np.float64)
        return {"clip_score": max(float(np.mean(sims)), 0.0)}
    return {"fid": fid_from_features(generated_features, reference_features)}
