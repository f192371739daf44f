"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Trains CaptionRLTrainer two steps on two processes, recording every step's global batch (captions, image ids)
and the rewards the trainer computed; process 0 then recomputes those rewards as one process would on the same
global batch, and as each process would on its own slice, and writes all of them to the JSON file argv[1].
argv[2]: ``gather`` or ``local`` (the tiny ClipCap, rewards gathered or not), or ``vlm`` (a tiny random Qwen2-VL
with its processor as processing_class, LoRA and gradient checkpointing, rewards gathered: its pixel tensors are
flattened patches that the trainer must keep with their rows across processes).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from accelerate.utils import gather_object

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared tiny CLIP
from conftest import make_tiny_clipcap, make_tiny_scorer, tiny_rl_args  # noqa: E402

from clip_rl_trl import (
    BidirectionalReward,
    CaptionRLTrainer,
    ImageEmbeddingCache,
    RetrievalReward,
    ShapesWorld,
)
from clip_rl_trl.data import ShapesLanguage


def main(out_path: str, mode: str) -> None:
    torch.manual_seed(0)
    world = ShapesWorld(seed=0)
    data = world.to_dataset(16, "train")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    rewards = [BidirectionalReward(scorer, cache), RetrievalReward(scorer, cache)]
    args = tiny_rl_args(
        os.path.join(os.path.dirname(out_path), "run"), per_device_train_batch_size=4, num_generations=2,
        logging_steps=500, gather_rewards_across_processes=mode != "local", gradient_checkpointing=mode == "vlm",
    )
    if mode == "vlm":
        from peft import LoraConfig

        from clip_rl_trl.models.families import family
        from clip_rl_trl.models.toy_vlm import build_shapes_toy_vlm

        model, processor = build_shapes_toy_vlm("qwen2_vl", world=world)
        trainer = CaptionRLTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data,
                                   processing_class=processor,
                                   peft_config=LoraConfig(r=4, target_modules=family("vlm").lora_targets))
    else:
        tokenizer = ShapesLanguage.word_tokenizer()
        model = make_tiny_clipcap(tokenizer, seed=None)  # word tokenizer: <pad> 0, <bos> 1, <eos> 2
        trainer = CaptionRLTrainer(model=model, reward_funcs=rewards, args=args,
                                   train_dataset=data.remove_columns("image"), processing_class=tokenizer)
    records = []
    score = trainer._score

    def recording_score(texts, rows):
        result = score(texts, rows)
        records.append({
            "texts": gather_object(list(texts)),
            "ids": gather_object([r["image_id"] for r in rows]),
            "local_texts": [list(texts)],
            "local_ids": [[r["image_id"] for r in rows]],
            "rewards": result.tolist(),
        })
        return result

    trainer._score = recording_score
    trainer.train()
    # Per-process batches, to recompute the non-gathered rewards process by process.
    for rec in records:
        rec["local_texts"] = gather_object(rec["local_texts"])
        rec["local_ids"] = gather_object(rec["local_ids"])
    if trainer.accelerator.is_main_process:
        fresh = [BidirectionalReward(scorer, cache), RetrievalReward(scorer, cache)]
        for rec in records:
            global_funcs = [f(prompts=None, completions=rec["texts"], completion_ids=None, image_id=rec["ids"])
                            for f in fresh]
            local_funcs = [
                [v for texts, ids in zip(rec["local_texts"], rec["local_ids"], strict=True)
                 for v in f(prompts=None, completions=texts, completion_ids=None, image_id=ids)]
                for f in fresh
            ]
            rec["global_expected"] = [list(row) for row in zip(*global_funcs, strict=True)]
            rec["local_expected"] = [list(row) for row in zip(*local_funcs, strict=True)]
        with open(out_path, "w") as f:
            json.dump({"num_processes": trainer.accelerator.num_processes, "records": records}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
