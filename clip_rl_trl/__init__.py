"""clip-rl-trl: distinctive image captioning with CLIP-guided reinforcement learning on top of TRL."""

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.configs import (
    CaptionerConfig,
    ConfigError,
    DataConfig,
    JudgeConfig,
    Recipe,
    RecipeParser,
    RewardConfig,
    parse_recipe,
)
from clip_rl_trl.data import load_hub_captions, load_karpathy
from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld, train_shapes_clip
from clip_rl_trl.data.sources import SOURCES, DataSource, load_split, register_source
from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.evaluation import evaluate_captions, format_table, mean_std, write_report
from clip_rl_trl.models import ClipCapConfig, ClipCapModel
from clip_rl_trl.models.families import FAMILIES, CaptionerFamily, register_family
from clip_rl_trl.models.policies import (
    BlipPolicy,
    CaptionPolicy,
    CausalLMPolicy,
    ClipCapPolicy,
)
from clip_rl_trl.models.toy_vlm import TOY_VLM_KINDS, build_toy_vlm
from clip_rl_trl.models.vlm import CausalVLMPolicy, vlm_prompt
from clip_rl_trl.neighbors import groups_within_split, similar_image_groups
from clip_rl_trl.pipeline import build_trainer, evaluate_saved, prepare, train
from clip_rl_trl.rewards import functional
from clip_rl_trl.rewards.callables import (
    BidirectionalReward,
    CiderReward,
    ClipReward,
    ClipSReward,
    DiscriminatorReward,
    GrammarReward,
    GroupGapReward,
    RetrievalReward,
)
from clip_rl_trl.rewards.cider import CiderD
from clip_rl_trl.rewards.discriminator import Discriminator
from clip_rl_trl.rewards.grammar import GrammarHead, make_grammar_negatives, train_grammar_head
from clip_rl_trl.rewards.registry import REWARDS, RewardEnv, register_reward
from clip_rl_trl.trainer import CaptionRLConfig, CaptionRLTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "SOURCES",
    "DataSource",
    "load_split",
    "register_source",
    "train_shapes_clip",
    "FAMILIES",
    "REWARDS",
    "CaptionerFamily",
    "ClipReward",
    "RewardEnv",
    "build_trainer",
    "evaluate_saved",
    "prepare",
    "register_family",
    "register_reward",
    "train",
    "BidirectionalReward",
    "BlipPolicy",
    "CaptionPolicy",
    "CaptionRLConfig",
    "CaptionRLTrainer",
    "CausalLMPolicy",
    "CausalVLMPolicy",
    "TOY_VLM_KINDS",
    "build_toy_vlm",
    "vlm_prompt",
    "CiderD",
    "CiderReward",
    "ClipCapConfig",
    "ClipCapModel",
    "ClipCapPolicy",
    "ClipScorer",
    "ClipSReward",
    "CaptionerConfig",
    "ConfigError",
    "DataConfig",
    "JudgeConfig",
    "Recipe",
    "RecipeParser",
    "RewardConfig",
    "parse_recipe",
    "ShapesLanguage",
    "Discriminator",
    "DiscriminatorReward",
    "evaluate_captions",
    "format_table",
    "functional",
    "GrammarHead",
    "groups_within_split",
    "GrammarReward",
    "GroupGapReward",
    "ImageEmbeddingCache",
    "load_hub_captions",
    "load_karpathy",
    "make_grammar_negatives",
    "mean_std",
    "RetrievalReward",
    "ShapesWorld",
    "similar_image_groups",
    "train_grammar_head",
    "write_report",
    "__version__",
]
