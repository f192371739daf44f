"""Dessì et al. 2023, "Cross-Domain Image Captioning with Discriminative Finetuning" (CVPR): DiscriTune.

The captioner is fine-tuned so that a frozen CLIP retrieves the caption's image among the batch's images:

- reward ``R(c, i, D) = log softmax_j(logit_scale * cos(c, I_j))[i]`` over the target and the other images of
  the batch (99 distractors with a batch of 100; docs/rewards/retrieval.md);
- REINFORCE with the running mean of past rewards as the baseline, greedy decoding in training, beam search in
  evaluation, Adam at lr 1e-7 with a constant schedule (docs/trainer.md).

The recipe (data, CLIP judge, captioner, reward, CaptionRLConfig) is examples/configs/discritune_coco.yaml.

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml \\
        examples/discritune_coco.py --config examples/configs/discritune_coco.yaml [--output_dir DIR]
    python examples/discritune_coco.py --config examples/configs/discritune_coco.yaml --toy

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl and training.png into the output folder (default outputs/discritune_coco[-toy]).
"""

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    main()
