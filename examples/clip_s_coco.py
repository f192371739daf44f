"""Cho et al. 2022, "Fine-grained Image Captioning with CLIP Reward" (Findings of NAACL).

The captioner is fine-tuned to raise its CLIP-S, with self-critical sequence training:

- reward ``CLIP-S(c, I) = w * max(cos(e_T("A photo depicts " + c), e_I(I)), 0)``, w = 2.5 
  (docs/rewards/clip_s.md);
- optionally ``+ P(grammatical | c)`` from a grammar head trained with a fine-tuned CLIP text tower on the
  training captions and their corrupted copies (docs/rewards/grammar.md): uncomment the ``grammar`` entry
  of the recipe;
- advantage ``r(sample) - r(greedy caption of the same image)`` (Rennie et al. 2017), 5 samples per image.

The recipe (data, CLIP judge, captioner, rewards, CaptionRLConfig: a flat TrlParser config) is examples/configs/clip_s_coco.yaml.

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml \\
        examples/clip_s_coco.py --config examples/configs/clip_s_coco.yaml [--output_dir DIR] [--FIELD VALUE]
    python examples/clip_s_coco.py --config examples/configs/clip_s_coco.yaml --toy  # shapes world, CPU

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl and training.png into the output folder (default outputs/clip_s_coco[-toy]).
"""

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    main()
