"""Chaffin et al. 2024, "Distinctive Image Captioning: Leveraging Ground Truth Captions in CLIP Guided
Reinforcement Learning" (WACV), the full method:

- reward ``0.94 * r_bidirectional + 0.06 * P_disc(human | image, caption)``: the decoupled contrastive reward
  in both retrieval directions (each caption against the batch's other images, each image against the batch's
  other captions; temperature 0.01), regularised by an MLP discriminator on CLIP embeddings trained online to
  tell references from generated captions (docs/rewards/bidirectional.md, docs/rewards/discriminator.md);
- the RL term on ground-truth captions, each reference weighted by its reward kept non-negative,
  ``-max(r(gt), 0) * log p(gt | image)``, added with weight ``gt_loss_weight`` (docs/trainer.md).

The recipe (data, CLIP judge, captioner, rewards, CaptionRLConfig: a flat TrlParser config) is examples/configs/bidir_coco.yaml.

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml \\
        examples/bidir_coco.py --config examples/configs/bidir_coco.yaml [--output_dir DIR] [--FIELD VALUE]
    python examples/bidir_coco.py --config examples/configs/bidir_coco.yaml --toy  # shapes world, CPU

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl and training.png into the output folder (default outputs/bidir_coco[-toy]).
"""

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    main()
