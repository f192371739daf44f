"""The evaluation suite: CLIP retrieval, Group Embedding Gap, CLIP-S, COCO caption metrics, diversity; reports."""

from clip_rl_trl.evaluation.diversity import distinct_n, novelty, self_bleu, vocab_size
from clip_rl_trl.evaluation.evaluate import evaluate_captions
from clip_rl_trl.evaluation.nlg import coco_caption_metrics
from clip_rl_trl.evaluation.report import (
    DEMO_COLUMNS,
    caption_grid,
    format_table,
    mean_std,
    plot_tradeoff,
    plot_training,
    write_report,
)
from clip_rl_trl.evaluation.retrieval import precision_at_1, recall_at_k

__all__ = [
    "DEMO_COLUMNS",
    "caption_grid",
    "coco_caption_metrics",
    "distinct_n",
    "evaluate_captions",
    "format_table",
    "mean_std",
    "novelty",
    "plot_tradeoff",
    "plot_training",
    "precision_at_1",
    "recall_at_k",
    "self_bleu",
    "vocab_size",
    "write_report",
]
