"""Evaluation metrics: VQA-style accuracies (hand-worked from the official rules), FID (against an independent
eigenvalue formula) and CLIP score (against torchmetrics)."""

import json

import numpy as np
import pytest
import torch

from lavit_jax.eval import fid, vqa
from tests.conftest import REPO

DATA = REPO / "tests" / "data" / "eval"


@pytest.mark.parametrize("text, expected", [
    ("yes, sir", "yes sir"),  # ", " occurs: every "," is deleted
    ("t-shirt", "t shirt"),  # no "- " nor " -" and no digit,digit: "-" becomes a space
    ("1,000 - 2", "1000  2"),  # digit,digit: all marks deleted (the spaces around "-" stay)
    ("3.5 end.", "3.5 end"),  # a period before a digit stays
    ("mr. smith", "mr smith"),
    ("well...?", "well "),  # "?" is spaced (no "? "/" ?"), then all three periods go
    ("a" + "." * 40, "a" + "." * 8),  # re.sub(..., re.UNICODE): count=32, so only 32 of the 40 periods go
])
def test_process_punctuation(text, expected):
    assert vqa.process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The Three dogs dont", "3 dogs don't"),  # lower, three->3, drop "the", dont->don't
    ("None", "0"),
    ("an apple  a day", "apple day"),
    ("Im here", "im here"),  # the map's "Im" key can never match a lower-cased word
])
def test_process_digit_article(text, expected):
    assert vqa.process_digit_article(text) == expected


def _hand_cases():
    # (prediction, human answers, official accuracy, lavis accuracy), each from
    # acc = mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3).
    return [
        # unanimous "yes": each subset has 9 matches -> 1
        ("yes", ["yes"] * 10, 1.0, 1.0),
        # unanimous: the official script compares raw strings ("Yes" != "yes") -> 0; LAVIS normalises the
        # prediction -> 1
        ("Yes", ["yes"] * 10, 0.0, 1.0),
        # 2 "red", 8 "blue": leaving out a red (2x) leaves 1 match -> 1/3; leaving out a blue (8x) leaves 2 -> 2/3;
        # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6, 0.6),
        # "Two dogs." -> "2 dogs"; 3 "2 dogs" + 7 "two": leaving out a "2 dogs" (3x) -> 2 matches -> 2/3, leaving
        # out a "two" (7x) -> 3 matches -> 1; (3 * 2/3 + 7) / 10 = 0.9 (both protocols match "2 dogs" 3 times)
        ("Two dogs.", ["2 dogs"] * 3 + ["two"] * 7, 0.9, 0.9),
        # official: the answers disagree so they are normalised: "Two" -> "2", all 10 match -> 1.
        # lavis: answers only get processPunctuation ("Two" stays): 2 matches; leaving out a "Two" (8x) -> 2/3,
        # leaving out a "2" (2x) -> 1/3; (8 * 2/3 + 2 * 1/3) / 10 = 0.6
        ("2", ["Two"] * 8 + ["2"] * 2, 1.0, 0.6),
        # 1 match: leaving it out -> 0, otherwise 1/3; 9 * 1/3 / 10 = 0.3
        ("cat", ["cat"] + ["dog"] * 9, 0.3, 0.3),
        # "\n" and "\t" become spaces and both ends are stripped before anything else
        (" yes\t", ["yes"] * 10, 1.0, 1.0),
    ]


@pytest.mark.parametrize("prediction, answers, official, lavis", _hand_cases())
def test_vqa_accuracy_hand_worked(prediction, answers, official, lavis):
    assert vqa.vqa_accuracy(prediction, answers, "official") == pytest.approx(official, abs=1e-15)
    assert vqa.vqa_accuracy(prediction, answers, "lavis") == pytest.approx(lavis, abs=1e-15)


def test_vqa_files_official_and_lavis():
    # The five questions of vqa_*.json are cases 1-5 above: official 1, 0, 0.6, 0.9, 1.0 -> 70%;
    # lavis 1, 1, 0.6, 0.9, 0.6 -> 82%. Answer types: yes/no = q1, q2; other = q3; number = q4, q5.
    args = (DATA / "vqa_annotations.json", DATA / "vqa_questions.json", DATA / "vqa_results.json")
    res = vqa.evaluate_vqa_files(*args, protocol="official")
    assert res.overall == pytest.approx(70.0, abs=1e-12)
    assert res.per_question == pytest.approx({1: 100.0, 2: 0.0, 3: 60.0, 4: 90.0, 5: 100.0}, abs=1e-12)
    assert res.per_answer_type == pytest.approx({"yes/no": 50.0, "other": 60.0, "number": 95.0}, abs=1e-12)
    assert res.per_question_type == pytest.approx({"is the": 50.0, "what color is the": 60.0, "how many": 95.0},
                                                  abs=1e-12)
    res = vqa.evaluate_vqa_files(*args, protocol="lavis")
    assert res.overall == pytest.approx(82.0, abs=1e-12)
    assert res.per_answer_type == pytest.approx({"yes/no": 100.0, "other": 60.0, "number": 75.0}, abs=1e-12)
    # OK-VQA is the same metric on the same file format
    questions = vqa.load_vqa_annotations(*args[:2])
    assert vqa.evaluate_okvqa(questions, vqa.load_vqa_results(args[2])).overall == pytest.approx(70.0, abs=1e-12)


def test_gqa_accuracy():
    # "Yes." -> "yes" == "yes"; "right" != "left"; "man" == "the man" -> "man": 2 of 3
    answers = vqa.load_gqa_answers(DATA / "gqa_questions.json")
    preds = vqa.load_gqa_predictions(DATA / "gqa_results.json")
    assert vqa.gqa_accuracy(answers, preds) == pytest.approx(200.0 / 3, abs=1e-12)


def test_vizwiz_accuracy_and_unanswerability():
    # Accuracy (prediction normalised, human answers as given):
    #   1 "Coffee." -> "coffee" vs 10 "coffee": 1;  2 "unanswerable" vs 10 "unanswerable": 1;
    #   3 "blue" vs 7 "unanswerable" + 3 "blue": (7 * 1 + 3 * 2/3) / 10 = 0.9;  4 "Unanswerable" vs 10 "dog": 0;
    #   5 "Dog" -> "dog" vs 10 raw "Dog": 0.  Overall 2.9 / 5 = 58%; "other" (1, 4, 5): 1/3; "unanswerable": 0.95.
    # Unanswerability: truth (1 - answerable) = [0, 1, 1, 0, 0]; predicted = [0, 1, 0, 1, 0] (4 normalises to
    #   "unanswerable"). AP: at score 1, precision 1/2, recall 1/2; at score 0, precision 2/5, recall 1:
    #   1/2 * 1/2 + (1 - 1/2) * 2/5 = 0.45. F1: tp 1, fp 1, fn 1 -> 2 / 4 = 0.5.
    res = vqa.evaluate_vizwiz_files(DATA / "vizwiz_annotations.json", DATA / "vizwiz_results.json")
    assert res.accuracy.overall == pytest.approx(58.0, abs=1e-12)
    assert res.accuracy.per_answer_type == pytest.approx({"other": 100.0 / 3, "unanswerable": 95.0}, abs=1e-12)
    assert res.unanswerable_average_precision == pytest.approx(45.0, abs=1e-12)
    assert res.unanswerable_f1 == pytest.approx(50.0, abs=1e-12)


def test_average_precision_ties_and_order():
    # scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg); thresholds 0.9: P 1, R 1/2; 0.8: P 2/3, R 1; 0.1: R 1
    # AP = 1/2 * 1 + 1/2 * 2/3 + 0 = 5/6
    assert vqa.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(5 / 6, abs=1e-15)
    assert vqa.average_precision([0, 1, 0, 1], [0.1, 0.8, 0.8, 0.9]) == pytest.approx(5 / 6, abs=1e-15)


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_vqa_loaders_name_file_and_field(tmp_path):
    q = _write(tmp_path, "q.json", {"questions": [{"question_id": 1}]})
    bad = _write(tmp_path, "a.json", {"annotations": [{"question_id": 1, "question_type": "x", "answer_type": "y",
                                                       "answers": [{"answer_id": 1}]}]})
    with pytest.raises(ValueError, match=r"a\.json: annotations\[0\] answers\[0\] has no field 'answer'"):
        vqa.load_vqa_annotations(bad, q)
    with pytest.raises(ValueError, match=r"a\.json: the top level has no field 'annotations'"):
        vqa.load_vqa_annotations(_write(tmp_path, "a.json", {"questions": []}), q)
    good = _write(tmp_path, "a.json", {"annotations": [{"question_id": 2, "question_type": "x", "answer_type": "y",
                                                        "answers": [{"answer": "no"}]}]})
    with pytest.raises(ValueError, match=r"q\.json must cover exactly the questions of annotation file .*a\.json"):
        vqa.load_vqa_annotations(good, q)
    with pytest.raises(ValueError, match=r"r\.json: entry 0 has no field 'answer'"):
        vqa.load_vqa_results(_write(tmp_path, "r.json", [{"question_id": 1, "text": "no"}]))
    with pytest.raises(ValueError, match=r"g\.json: question '7' has no field 'answer'"):
        vqa.load_gqa_answers(_write(tmp_path, "g.json", {"7": {"question": "?"}}))
    with pytest.raises(ValueError, match=r"v\.json: entry 0 has no field 'answerable'"):
        vqa.load_vizwiz_annotations(_write(tmp_path, "v.json", [{"image": "a.jpg", "answers": [{"answer": "x"}],
                                                                   "answer_type": "other"}]))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        vqa.load_vizwiz_results(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"results file .*r2\.json must cover exactly .* 1 missing"):
        vqa.evaluate_vqa_files(DATA / "vqa_annotations.json", DATA / "vqa_questions.json",
                               _write(tmp_path, "r2.json", [{"question_id": i, "answer": "x"} for i in (1, 2, 3, 4)]))
    with pytest.raises(ValueError, match="protocol 'nope'"):
        vqa.vqa_accuracy("a", ["a"], "nope")


# --------------------------------------------------------------------------------------------------
# PTB tokenizer
# --------------------------------------------------------------------------------------------------
def _fid_reference(x1, x2):
    """FID with statistics from sums and Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric eigensolver)."""
    def stats(x):
        mu = x.sum(0) / len(x)
        c = x - mu
        return mu, c.T @ c / (len(x) - 1)

    m1, s1 = stats(x1)
    m2, s2 = stats(x2)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


@pytest.mark.parity
@pytest.mark.parametrize("n, d", [(64, 8), (300, 32)])
def test_fid_matches_eigenvalue_formula(n, d):
    rng = np.random.default_rng(n)
    x1 = rng.normal(size=(n, d))
    x2 = rng.normal(size=(n + 7, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    got, want = fid.fid_from_features(x1, x2), _fid_reference(x1, x2)
    assert abs(got - want) <= 1e-12 * abs(want), (got, want)
    mu, sigma = fid.feature_statistics(x1)
    np.testing.assert_allclose(mu, x1.sum(0) / n, rtol=0, atol=1e-15)
    assert abs(fid.fid_from_features(x1, x1.copy())) < 1e-12  # identical statistics


@pytest.mark.parity
def test_fid_rank_deficient_covariances():
    # 16 samples in 32 dimensions: both covariances have rank <= 15 and the product has >= 17 zero eigenvalues.
    # The square root of such a matrix is ill-conditioned: rounding (eps * ||S1 S2||) on a zero eigenvalue moves
    # its root by sqrt(eps * ||S1 S2||); the bound below is 2 (the FID factor) * 32 eigenvalues * that.
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(16, 32)), rng.normal(size=(16, 32)) + 0.5
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    bound = 2 * 32 * np.sqrt(np.finfo(np.float64).eps * np.linalg.norm(s1 @ s2, 2))
    got, want = fid.fid_from_features(x1, x2), _fid_reference(x1, x2)
    assert abs(got - want) <= bound, (got, want, bound)


def test_frechet_distance_rejects_imaginary_root():
    # sqrtm(diag(1, -1)) = diag(1, i): a diagonal imaginary part of 1 > 1e-3 is an error, as in pytorch-fid
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma1"):
        fid.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


class _FeatureProcessor:
    """CLIP processor stand-in: images are the feature vectors themselves, texts are row indices."""

    def __call__(self, text=None, images=None, return_tensors=None, padding=None):
        if images is not None:
            return {"pixel_values": torch.stack([i.reshape(-1) for i in images])}
        ids = torch.tensor([[int(t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _FeatureModel:
    config = object()

    def __init__(self, text_features):
        self.text_features = text_features

    def to(self, device):
        return self

    def get_image_features(self, pixel_values):
        return pixel_values

    def get_text_features(self, input_ids, attention_mask):
        return self.text_features[input_ids[:, 0]]


def _torchmetrics_clip_score(img, txt):
    from torchmetrics.functional.multimodal import clip_score

    images = [torch.tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in img]
    model = _FeatureModel(torch.tensor(txt, dtype=torch.float64))
    return float(clip_score(images, [str(i) for i in range(len(txt))], lambda: (model, _FeatureProcessor())))


@pytest.mark.parity
def test_clip_score_matches_torchmetrics():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 16))
    txt = img + 0.8 * rng.normal(size=(6, 16))  # positively correlated pairs
    want = _torchmetrics_clip_score(img, txt)
    assert want > 10
    assert abs(fid.clip_score(img, txt) - want) <= 1e-12
    # cosines +0.6 and -0.8: mean 100 * (-0.1) = -10, clamped to 0 (the clamp follows the mean, so this is not
    # the mean of per-pair clamped scores, 30)
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.6, 0.8], [-0.8, 0.6]])
    np.testing.assert_allclose(fid.clip_similarities(a, b), [60.0, -80.0], rtol=0, atol=1e-12)
    assert fid.clip_score(a, b) == 0.0 == _torchmetrics_clip_score(a, b)
