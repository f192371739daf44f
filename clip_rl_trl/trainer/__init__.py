"""The trainer pair: ``CaptionRLConfig`` (a ``GRPOConfig``) and ``CaptionRLTrainer`` (a ``GRPOTrainer``)."""

from clip_rl_trl.trainer.config import CaptionRLConfig
from clip_rl_trl.trainer.trainer import CaptionRLTrainer

__all__ = ["CaptionRLConfig", "CaptionRLTrainer"]
