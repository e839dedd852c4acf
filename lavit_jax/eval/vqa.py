"""VQA accuracies: VQAv2 and OK-VQA (the official VQA metric), GQA (exact match), VizWiz (accuracy and
unanswerability).

Answer normalisation is the official VQA evaluation's ``processPunctuation`` + ``processDigitArticle``
(reproduced with its quirks: a period is dropped unless a digit follows, ``re.sub``'s count is the
``re.UNICODE`` value 32 the official code passes by mistake, punctuation is deleted rather than spaced when
the answer has a digit-comma-digit or the mark next to a space).

The VQA accuracy of an answer is min(#humans who gave it / 3, 1), averaged over the 10 subsets of 9 of the
10 human answers (each answer is left out once). Two variants of the official script are in use:

- ``"official"``: the current official script (VQA repository, 2021): answers are normalised only when the
  human answers disagree (both the prediction and the human answers); a unanimous question is compared
  on the raw, stripped strings.
- ``"lavis"``: the earlier official script, as LAVIS ships it: the prediction is always normalised; the
  human answers get only the punctuation step, and only when they disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", so any "." not before a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official script passes re.UNICODE as re.sub's count argument
PROTOCOLS = ("official", "lavis")
UNANSWERABLE = "unanswerable"


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation marks, strip periods."""
    out = text
    has_comma_number = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, drop articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """process_digit_article(process_punctuation(text))."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over i of min(1, #{j != i : answers[j] == prediction} / 3)."""
    total = 0.0
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        total += min(1.0, matches / 3)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], protocol: str = "official") -> float:
    """VQA accuracy (in [0, 1]) of one predicted answer against the human answers of one question."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy: a question needs at least one human answer")
    if protocol == "official":
        answers = [_clean(a) for a in answers]
        prediction = _clean(prediction)
        if len(set(answers)) > 1:
            answers = [normalize_answer(a) for a in answers]
            prediction = normalize_answer(prediction)
    elif protocol == "lavis":
        prediction = normalize_answer(_clean(prediction))
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
    else:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    return _leave_one_out_accuracy(prediction, answers)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VQAQuestion:
    """One annotated question: its human answers and its question/answer types."""

    answers: tuple[str, ...]
    question_type: str | None = None
    answer_type: str | None = None
    answerable: int | None = None  # VizWiz only


def _load_json(path: str | os.PathLike, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e})") from None


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _field(entry, key: str, path, where: str, types=None):
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is {type(entry).__name__}, expected an object with field {key!r}")
    if key not in entry:
        raise ValueError(f"{path}: {where} has no field {key!r}")
    value = entry[key]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool)):
        raise ValueError(f"{path}: {where} field {key!r} is {type(value).__name__}, expected {_type_names(types)}")
    return value


def _answers(entry, path, where: str) -> tuple[str, ...]:
    raw = _field(entry, "answers", path, where, list)
    if not raw:
        raise ValueError(f"{path}: {where} field 'answers' is empty")
    return tuple(_field(a, "answer", path, f"{where} answers[{j}]", str) for j, a in enumerate(raw))


def load_vqa_annotations(annotation_file: str | os.PathLike,
                         question_file: str | os.PathLike) -> dict[Hashable, VQAQuestion]:
    """{question_id: VQAQuestion} from the official VQAv2 / OK-VQA annotation and question files
    ({"annotations": [{"question_id", "answers": [{"answer"}], "question_type", "answer_type"}]} and
    {"questions": [{"question_id", ...}]}); both files must list the same questions."""
    anns = _field(_load_json(annotation_file, "VQA annotation file"), "annotations", annotation_file,
                  "the top level", list)
    ques = _field(_load_json(question_file, "VQA question file"), "questions", question_file, "the top level", list)
    out: dict[Hashable, VQAQuestion] = {}
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        qid = _field(a, "question_id", annotation_file, where, (int, str))
        if qid in out:
            raise ValueError(f"{annotation_file}: {where} repeats question_id {qid!r}")
        out[qid] = VQAQuestion(_answers(a, annotation_file, where),
                               _field(a, "question_type", annotation_file, where, str),
                               _field(a, "answer_type", annotation_file, where, str))
    qids = {_field(q, "question_id", question_file, f"questions[{i}]", (int, str)) for i, q in enumerate(ques)}
    _check_ids(out, qids, f"annotation file {annotation_file}", f"question file {question_file}")
    return out


def load_vqa_results(results_file: str | os.PathLike) -> dict[Hashable, str]:
    """{question_id: answer} from an official VQA results file ([{"question_id", "answer"}])."""
    data = _load_json(results_file, "VQA results file")
    if not isinstance(data, list):
        raise ValueError(f"{results_file}: expected a JSON list of {{'question_id', 'answer'}} objects")
    out: dict[Hashable, str] = {}
    for i, r in enumerate(data):
        qid = _field(r, "question_id", results_file, f"entry {i}", (int, str))
        if qid in out:
            raise ValueError(f"{results_file}: entry {i} repeats question_id {qid!r}")
        out[qid] = _field(r, "answer", results_file, f"entry {i}", str)
    return out


def _check_ids(expected, given, expected_name: str, given_name: str) -> None:
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        raise ValueError(f"{given_name} must cover exactly the questions of {expected_name}: {len(missing)} missing "
                         f"(e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VQAResult:
    """Accuracies in percent (unrounded; the official scripts print them rounded to 2 decimals)."""

    overall: float
    per_question: dict[Hashable, float]
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]


def _summarise(questions: Mapping[Hashable, VQAQuestion], acc: dict[Hashable, float]) -> VQAResult:
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for qid, q in questions.items():
        if q.answer_type is not None:
            by_answer.setdefault(q.answer_type, []).append(acc[qid])
        if q.question_type is not None:
            by_question.setdefault(q.question_type, []).append(acc[qid])
    pct = {k: 100.0 * v for k, v in acc.items()}
    return VQAResult(100.0 * sum(acc.values()) / len(acc), pct,
                     {k: 100.0 * sum(v) / len(v) for k, v in by_answer.items()},
                     {k: 100.0 * sum(v) / len(v) for k, v in by_question.items()})


def evaluate_vqa(questions: Mapping[Hashable, VQAQuestion], predictions: Mapping[Hashable, str],
                 protocol: str = "official") -> VQAResult:
    """VQAv2 accuracy: every annotated question needs a predicted answer (as the official loadRes asserts)."""
    if not questions:
        raise ValueError("evaluate_vqa: no questions")
    _check_ids(questions, predictions, "the annotations", "predictions")
    acc = {qid: vqa_accuracy(predictions[qid], q.answers, protocol) for qid, q in questions.items()}
    return _summarise(questions, acc)


def evaluate_okvqa(questions: Mapping[Hashable, VQAQuestion], predictions: Mapping[Hashable, str],
                   protocol: str = "official") -> VQAResult:
    """OK-VQA accuracy: the VQAv2 metric on the OK-VQA annotation files (same format)."""
    return evaluate_vqa(questions, predictions, protocol)


def evaluate_vqa_files(annotation_file: str | os.PathLike, question_file: str | os.PathLike,
                       results_file: str | os.PathLike, protocol: str = "official") -> VQAResult:
    """evaluate_vqa on the official annotation, question and results files (VQAv2 or OK-VQA)."""
    questions = load_vqa_annotations(annotation_file, question_file)
    predictions = load_vqa_results(results_file)
    _check_ids(questions, predictions, f"annotation file {annotation_file}", f"results file {results_file}")
    return evaluate_vqa(questions, predictions, protocol)


# GQA ------------------------------------------------------------------------------------------------
def load_gqa_answers(question_file: str | os.PathLike) -> dict[str, str]:
    """{question_id: answer} from a GQA questions file ({question_id: {"answer", ...}}), e.g.
    testdev_balanced_questions.json."""
    data = _load_json(question_file, "GQA question file")
    if not isinstance(data, dict):
        raise ValueError(f"{question_file}: expected a JSON object {{question_id: {{'answer', ...}}}}")
    return {str(qid): _field(q, "answer", question_file, f"question {qid!r}", str) for qid, q in data.items()}


def load_gqa_predictions(results_file: str | os.PathLike) -> dict[str, str]:
    """{question_id: answer} from a GQA results file in the official submission format
    ([{"questionId", "prediction"}])."""
    data = _load_json(results_file, "GQA results file")
    if not isinstance(data, list):
        raise ValueError(f"{results_file}: expected a JSON list of {{'questionId', 'prediction'}} objects")
    out: dict[str, str] = {}
    for i, r in enumerate(data):
        qid = str(_field(r, "questionId", results_file, f"entry {i}", (int, str)))
        if qid in out:
            raise ValueError(f"{results_file}: entry {i} repeats questionId {qid!r}")
        out[qid] = _field(r, "prediction", results_file, f"entry {i}", str)
    return out


def gqa_accuracy(answers: Mapping[Hashable, str], predictions: Mapping[Hashable, str]) -> float:
    """GQA accuracy in percent: exact match after normalising both the prediction and the answer, as LAVIS
    does (processPunctuation then processDigitArticle)."""
    if not answers:
        raise ValueError("gqa_accuracy: no questions")
    _check_ids(answers, predictions, "the GQA answers", "predictions")
    hits = sum(normalize_answer(predictions[q]) == normalize_answer(a) for q, a in answers.items())
    return 100.0 * hits / len(answers)


# VizWiz ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VizWizResult:
    """VizWiz accuracy (percent) and the unanswerability scores of the "unanswerable" class (percent)."""

    accuracy: VQAResult
    unanswerable_average_precision: float
    unanswerable_f1: float


def load_vizwiz_annotations(annotation_file: str | os.PathLike) -> dict[str, VQAQuestion]:
    """{image: VQAQuestion} from a VizWiz annotation file ([{"image", "answers": [{"answer"}], "answer_type",
    "answerable"}], e.g. val.json)."""
    data = _load_json(annotation_file, "VizWiz annotation file")
    if not isinstance(data, list):
        raise ValueError(f"{annotation_file}: expected a JSON list of {{'image', 'answers', ...}} objects")
    out: dict[str, VQAQuestion] = {}
    for i, a in enumerate(data):
        where = f"entry {i}"
        image = _field(a, "image", annotation_file, where, str)
        if image in out:
            raise ValueError(f"{annotation_file}: {where} repeats image {image!r}")
        answerable = _field(a, "answerable", annotation_file, where, int)
        if answerable not in (0, 1):
            raise ValueError(f"{annotation_file}: {where} field 'answerable' is {answerable!r}, expected 0 or 1")
        out[image] = VQAQuestion(_answers(a, annotation_file, where), None,
                                 _field(a, "answer_type", annotation_file, where, str), answerable)
    return out


def load_vizwiz_results(results_file: str | os.PathLike) -> dict[str, str]:
    """{image: answer} from a VizWiz results file ([{"image", "answer"}])."""
    data = _load_json(results_file, "VizWiz results file")
    if not isinstance(data, list):
        raise ValueError(f"{results_file}: expected a JSON list of {{'image', 'answer'}} objects")
    out: dict[str, str] = {}
    for i, r in enumerate(data):
        image = _field(r, "image", results_file, f"entry {i}", str)
        if image in out:
            raise ValueError(f"{results_file}: entry {i} repeats image {image!r}")
        out[image] = _field(r, "answer", results_file, f"entry {i}", str)
    return out


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz accuracy (in [0, 1]): the prediction is normalised, the human answers are compared as given."""
    if len(answers) == 0:
        raise ValueError("vizwiz_accuracy: a question needs at least one human answer")
    return _leave_one_out_accuracy(normalize_answer(_clean(prediction)), list(answers))


def average_precision(labels, scores) -> float:
    """Average precision of binary ``labels`` ranked by ``scores`` (ties form one threshold):
    sum over thresholds of (recall_k - recall_{k-1}) * precision_k, as scikit-learn defines it. NaN when
    there is no positive label."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    positives = labels.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tp = np.cumsum(labels)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(labels, predicted) -> float:
    labels, predicted = np.asarray(labels, bool), np.asarray(predicted, bool)
    tp = np.sum(labels & predicted)
    denom = 2 * tp + np.sum(~labels & predicted) + np.sum(labels & ~predicted)
    return float(2 * tp / denom) if denom else 0.0


def evaluate_vizwiz(questions: Mapping[str, VQAQuestion], predictions: Mapping[str, str]) -> VizWizResult:
    """VizWiz accuracy plus unanswerability: a prediction says "unanswerable" when its normalised answer is
    exactly "unanswerable"; average precision and F1 of that class against the annotations' ``answerable``."""
    if not questions:
        raise ValueError("evaluate_vizwiz: no questions")
    _check_ids(questions, predictions, "the VizWiz annotations", "predictions")
    acc = {img: vizwiz_accuracy(predictions[img], q.answers) for img, q in questions.items()}
    missing = [img for img, q in questions.items() if q.answerable is None]
    if missing:
        raise ValueError(f"evaluate_vizwiz: questions without 'answerable' (e.g. {missing[:5]})")
    gt_unanswerable = [1 - q.answerable for q in questions.values()]
    pred_unanswerable = [float(normalize_answer(_clean(predictions[img])) == UNANSWERABLE) for img in questions]
    return VizWizResult(_summarise(questions, acc), 100.0 * average_precision(gt_unanswerable, pred_unanswerable),
                        100.0 * _f1(gt_unanswerable, np.asarray(pred_unanswerable) > 0.5))


def evaluate_vizwiz_files(annotation_file: str | os.PathLike, results_file: str | os.PathLike) -> VizWizResult:
    """evaluate_vizwiz on a VizWiz annotation file and a results file."""
    questions = load_vizwiz_annotations(annotation_file)
    predictions = load_vizwiz_results(results_file)
    _check_ids(questions, predictions, f"annotation file {annotation_file}", f"results file {results_file}")
    return evaluate_vizwiz(questions, predictions)
