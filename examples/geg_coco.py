"""Zhang et al. 2022, "Distinctive Image Captioning via CLIP Guided Group Optimization" (ECCV Workshops).

The captioner is fine-tuned to describe its image better than the K = 5 most similar training images:

- reward ``0.1 * CIDEr-D(c, references) + 10 * GEG-Avg(c)`` with
  ``GEG-Avg(c) = cos(c, I) - mean_{I' in S(I)} cos(c, I')`` (Eq. 3 and 7; docs/rewards/group_embedding_gap.md,
  docs/rewards/cider.md); ``S(I)`` ranks images by their references' similarity to ``I`` (Eq. 2);
- self-critical baseline: the reward of the greedy caption of the same image (Eq. 5-6).

Start from a CIDEr-SCST captioner, as the paper does. The recipe is examples/configs/geg_coco.yaml.

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml \\
        examples/geg_coco.py --config examples/configs/geg_coco.yaml [--output_dir DIR] [--FIELD VALUE]
    python examples/geg_coco.py --config examples/configs/geg_coco.yaml --toy  # shapes world, CPU

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl and training.png into the output folder (default outputs/geg_coco[-toy]).
"""

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    main()
