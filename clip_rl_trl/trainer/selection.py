"""Checkpoint selection: the score that ranks evaluations, and the check that it can be computed at all.

``eval/selection_score`` is ``selection_metric``, minus 1 when ``fluency_metric`` is below ``fluency_threshold``,
so every fluent checkpoint ranks above every degenerate one (see ``CaptionRLConfig``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clip_rl_trl.evaluation.nlg import NLG_KEYS

__all__ = ["WORLD_METRICS", "check_selection", "selection_score"]

WORLD_METRICS = ("grammar_valid", "attribute_precision", "attribute_recall")


def _selecting(args: Any) -> bool:
    return (args.metric_for_best_model or "").removeprefix("eval_") == "selection_score"


def check_selection(args: Any, has_world: bool) -> None:
    """A selection metric the evaluations cannot compute fails when the trainer is built, not at the first
    evaluation."""
    for key in [args.fluency_metric] + ([args.selection_metric] if _selecting(args) else []):
        if key in WORLD_METRICS and not has_world:
            raise ValueError(
                f"checkpoint selection reads {key!r}, which only a world's language computes: pass "
                "world=ShapesLanguage() or choose another metric"
            )
        if key in NLG_KEYS and not args.eval_coco_metrics:
            raise ValueError(f"checkpoint selection reads {key!r}: set eval_coco_metrics=True")


def selection_score(args: Any, metrics: Mapping[str, float]) -> float | None:
    """``selection_metric``, minus 1 when ``fluency_metric`` is below ``fluency_threshold``.

    None when this evaluation lacks ``selection_metric`` and nothing selects by it; a missing metric that
    selection needs is an error naming it.
    """
    needed = [args.fluency_metric] if args.fluency_metric is not None else []
    if _selecting(args) or args.selection_metric in metrics:
        needed.append(args.selection_metric)
    missing = [key for key in needed if key not in metrics]
    if missing:
        raise ValueError(
            f"checkpoint selection needs the evaluation metric(s) {missing}, which this evaluation did not "
            f"compute (a world and a 'scene' column give grammar_valid); it has {sorted(metrics)}"
        )
    if args.selection_metric not in metrics:
        return None
    score = metrics[args.selection_metric]
    if args.fluency_metric is not None and metrics[args.fluency_metric] < args.fluency_threshold:
        score -= 1.0
    return score
