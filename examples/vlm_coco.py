"""A decoder-only vision-language model (SmolVLM-256M-Instruct; Qwen2-VL / Qwen2.5-VL, Idefics3, LLaVA alike)
fine-tuned with LoRA for distinctive captions, with Chaffin et al. 2024's method (WACV): the bidirectional
contrastive reward regularised by an online discriminator, plus the RL term on ground-truth captions
(docs/rewards/bidirectional.md, docs/trainer.md).

The processor is the trainer's ``processing_class``: it writes the caption instruction (``caption_prompt``)
through the model's chat template and expands the image placeholder; captions continue the assistant's turn,
and no image or chat token can be sampled (docs/policies.md). LoRA sits on the language model's attention
projections and trains under TRL's default gradient checkpointing.

The recipe is examples/configs/vlm_coco.yaml.

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml \\
        examples/vlm_coco.py --config examples/configs/vlm_coco.yaml [--model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct]
    python examples/vlm_coco.py --config examples/configs/vlm_coco.yaml --toy  # tiny random VLM, shapes world, CPU

Writes the LoRA adapter, the processor, its model card (README.md), report.json / report.md (before and after),
captions.jsonl and training.png into the output folder (default outputs/vlm_coco[-toy]).
"""

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    main()
