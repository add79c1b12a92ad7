"""Evaluation: the paper's few-shot linear evaluation and top-1 accuracy (`vitscale eval`); names
are imported on first use, so `vitscale.evaluation.config` loads without torch."""

import importlib

_LAZY = {"PAPER_SHOTS": "vitscale.evaluation.fewshot", "FewShotEvaluator": "vitscale.evaluation.fewshot",
         "extract_representations": "vitscale.evaluation.fewshot",
         "fewshot_accuracy": "vitscale.evaluation.fewshot",
         "linear_fewshot_accuracy": "vitscale.evaluation.fewshot",
         "evaluate_top1": "vitscale.evaluation.top1"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vitscale.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
