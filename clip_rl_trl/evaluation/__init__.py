"""The evaluation suite: CLIP retrieval, Group Embedding Gap, CIDErBtw, CLIP-S, COCO caption metrics, diversity
(Self-CIDEr among it), the shapes world's exact oracle; reports; and the shapes judge's own retrieval check,
``evaluate_shapes_clip``."""

from clip_rl_trl.evaluation.captioning import evaluate_policy
from clip_rl_trl.evaluation.distinctiveness import cider_btw, cider_btw_scores, self_cider, self_cider_scores
from clip_rl_trl.evaluation.diversity import distinct_n, novelty, self_bleu, unique_share, vocab_size
from clip_rl_trl.evaluation.evaluate import evaluate_captions
from clip_rl_trl.evaluation.judge import evaluate_shapes_clip
from clip_rl_trl.evaluation.nlg import coco_caption_metrics
from clip_rl_trl.evaluation.oracle import oracle_at_1, oracle_metrics
from clip_rl_trl.evaluation.plots import (
    TRAINING_KEYS,
    caption_grid,
    plot_judges,
    plot_tradeoff,
    plot_training,
)
from clip_rl_trl.evaluation.report import write_report
from clip_rl_trl.evaluation.retrieval import distractor_indices, precision_at_1, recall_at_k
from clip_rl_trl.evaluation.tables import HEADLINE_METRICS, format_table, headline_table, mean_std

__all__ = [
    "HEADLINE_METRICS",
    "TRAINING_KEYS",
    "caption_grid",
    "cider_btw",
    "cider_btw_scores",
    "coco_caption_metrics",
    "distinct_n",
    "distractor_indices",
    "evaluate_captions",
    "evaluate_policy",
    "evaluate_shapes_clip",
    "format_table",
    "headline_table",
    "mean_std",
    "novelty",
    "oracle_at_1",
    "oracle_metrics",
    "plot_judges",
    "plot_tradeoff",
    "plot_training",
    "precision_at_1",
    "recall_at_k",
    "self_bleu",
    "self_cider",
    "self_cider_scores",
    "unique_share",
    "vocab_size",
    "write_report",
]
