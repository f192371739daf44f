"""Run by tests/test_checkpoints.py: a small CaptionRLTrainer run that resumes from its newest complete checkpoint.

``python fault_run.py OUTPUT_DIR``: 10 steps, a checkpoint every 2 steps (``save_total_limit=1``), running-mean
baseline, online discriminator, ground-truth term. When it finishes it writes ``OUTPUT_DIR/final.safetensors``
(policy, discriminator, baseline state). The test kills it (``CLIP_RL_TRL_FAULT_AT`` or SIGKILL from outside)
and runs it again until that file exists.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared tiny models
from conftest import make_tiny_clipcap, make_tiny_scorer, tiny_rl_args  # noqa: E402

from clip_rl_trl import (  # noqa: E402
    BidirectionalReward,
    CaptionRLTrainer,
    Discriminator,
    DiscriminatorReward,
    ImageEmbeddingCache,
    ShapesLanguage,
    ShapesWorld,
)
from clip_rl_trl.trainer.checkpoints import check_complete  # noqa: E402


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    data = ShapesWorld(seed=0).to_dataset(16, "train")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    tokenizer = ShapesLanguage.word_tokenizer()
    disc = Discriminator(64, lr=1e-2, seed=0)
    rewards = [BidirectionalReward(scorer, cache), DiscriminatorReward(disc, scorer, cache)]
    args = tiny_rl_args(output_dir, baseline="running_mean", gt_loss_weight=0.5, max_steps=10, save_strategy="steps",
                        save_steps=2, save_total_limit=1, max_completion_length=10)
    trainer = CaptionRLTrainer(model=make_tiny_clipcap(tokenizer, seed=1), reward_funcs=rewards, args=args,
                               train_dataset=data.remove_columns("image"), processing_class=tokenizer)
    # Resume when a complete checkpoint exists (a kill during the first checkpoint leaves none: start over).
    resume = any(check_complete(p) is None for p in Path(output_dir).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    state = {f"policy.{k}": v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    state |= {f"disc.{k}": v.detach().clone().contiguous() for k, v in disc.state_dict().items()}
    state |= {f"baseline.{k}": torch.tensor(float(v)) for k, v in trainer.baseline.state_dict().items()}
    save_file(state, os.path.join(output_dir, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
