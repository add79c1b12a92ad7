"""Evaluation: the paper's few-shot linear evaluation and top-1 accuracy (`vitscale eval`)."""

from vitscale.evaluation.fewshot import (PAPER_SHOTS, FewShotEvaluator, extract_representations, fewshot_accuracy,
                                         linear_fewshot_accuracy)
from vitscale.evaluation.top1 import evaluate_top1

__all__ = ["PAPER_SHOTS", "FewShotEvaluator", "evaluate_top1", "extract_representations", "fewshot_accuracy",
           "linear_fewshot_accuracy"]
