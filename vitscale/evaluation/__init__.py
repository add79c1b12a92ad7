"""Evaluation: the paper's few-shot linear evaluation and top-1 accuracy (`vitscale eval`); names
are imported on first use, so `vitscale.evaluation.config` loads without torch."""

from vitscale.lazy import lazy_attributes

_LAZY = {"PAPER_SHOTS": "vitscale.evaluation.fewshot", "FewShotEvaluator": "vitscale.evaluation.fewshot",
         "extract_representations": "vitscale.evaluation.fewshot",
         "fewshot_accuracy": "vitscale.evaluation.fewshot",
         "linear_fewshot_accuracy": "vitscale.evaluation.fewshot",
         "evaluate_top1": "vitscale.evaluation.top1"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
