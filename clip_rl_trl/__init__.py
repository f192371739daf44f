"""clip-rl-trl: distinctive image captioning with CLIP-guided reinforcement learning on top of TRL."""

from clip_rl_trl.clip import ClipScorer

__version__ = "0.1.0.dev0"

__all__ = ["ClipScorer", "__version__"]
