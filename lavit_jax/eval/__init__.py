"""Benchmark metrics of the LaVIT evaluation protocols: VQA-style accuracies (VQAv2, OK-VQA, GQA, VizWiz),
FID and CLIP score. Models are not evaluated here: these take answers, captions or
features."""

from lavit_jax.eval.fid import clip_score, clip_similarities, feature_statistics, fid_from_features, frechet_distance
from lavit_jax.eval.vqa import (
    VizWizResult,
    VQAQuestion,
    VQAResult,
    evaluate_okvqa,
    evaluate_vizwiz,
    evaluate_vizwiz_files,
    evaluate_vqa,
    evaluate_vqa_files,
    gqa_accuracy,
    load_gqa_answers,
    load_gqa_predictions,
    load_vizwiz_annotations,
    load_vizwiz_results,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    vizwiz_accuracy,
    vqa_accuracy,
)

__all__ = [
    "VQAQuestion", "VQAResult", "VizWizResult", "clip_score", "clip_similarities",
    "evaluate_okvqa", "evaluate_vizwiz", "evaluate_vizwiz_files", "evaluate_vqa",
    "evaluate_vqa_files", "feature_statistics", "fid_from_features", "frechet_distance", "gqa_accuracy",
    "load_gqa_answers", "load_gqa_predictions",
    "load_vizwiz_annotations", "load_vizwiz_results", "load_vqa_annotations", "load_vqa_results",
    "normalize_answer", "vizwiz_accuracy", "vqa_accuracy",
]
