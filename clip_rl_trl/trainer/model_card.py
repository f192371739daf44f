"""The model card ``CaptionRLTrainer`` writes beside a saved or pushed model: method, rewards, metrics, papers."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

CITATIONS = {
    "cho2022": (
        "Cho et al. 2022, Fine-grained Image Captioning with CLIP Reward",
        "@inproceedings{cho2022fine,\n  title={Fine-grained Image Captioning with {CLIP} Reward},\n"
        "  author={Cho, Jaemin and Yoon, Seunghyun and Kale, Ajinkya and Dernoncourt, Franck and Bui, Trung "
        "and Bansal, Mohit},\n  booktitle={Findings of NAACL},\n  year={2022}\n}",
    ),
    "dessi2023": (
        "Dessì et al. 2023, Cross-Domain Image Captioning with Discriminative Finetuning",
        "@inproceedings{dessi2023cross,\n  title={Cross-Domain Image Captioning with Discriminative Finetuning},\n"
        "  author={Dess{\\`i}, Roberto and Bevilacqua, Michele and Gualdoni, Eleonora and Carraz Rakotonirina, "
        "Nathana{\\\"e}l and Franzon, Francesca and Baroni, Marco},\n  booktitle={CVPR},\n  year={2023}\n}",
    ),
    "zhang2022": (
        "Zhang et al. 2022, Distinctive Image Captioning via CLIP Guided Group Optimization",
        "@inproceedings{zhang2022distinctive,\n  title={Distinctive Image Captioning via {CLIP} Guided Group "
        "Optimization},\n  author={Zhang, Youyuan and Wang, Jiuniu and Wu, Hao and Xu, Wenjia},\n"
        "  booktitle={ECCV Workshops},\n  year={2022}\n}",
    ),
    "chaffin2024": (
        "Chaffin et al. 2024, Distinctive Image Captioning: Leveraging Ground Truth Captions in CLIP Guided "
        "Reinforcement Learning",
        "@inproceedings{chaffin2024distinctive,\n  title={Distinctive Image Captioning: Leveraging Ground Truth "
        "Captions in {CLIP} Guided Reinforcement Learning},\n  author={Chaffin, Antoine and Claveau, Vincent and "
        "Kijak, Ewa},\n  booktitle={WACV},\n  year={2024}\n}",
    ),
    "vedantam2015": (
        "Vedantam et al. 2015, CIDEr: Consensus-based Image Description Evaluation",
        "@inproceedings{vedantam2015cider,\n  title={{CIDEr}: Consensus-based Image Description Evaluation},\n"
        "  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},\n  booktitle={CVPR},\n"
        "  year={2015}\n}",
    ),
    "rennie2017": (
        "Rennie et al. 2017, Self-critical Sequence Training for Image Captioning",
        "@inproceedings{rennie2017self,\n  title={Self-critical Sequence Training for Image Captioning},\n"
        "  author={Rennie, Steven J. and Marcheret, Etienne and Mroueh, Youssef and Ross, Jerret and Goel, "
        "Vaibhava},\n  booktitle={CVPR},\n  year={2017}\n}",
    ),
    "mokady2021": (
        "Mokady et al. 2021, ClipCap: CLIP Prefix for Image Captioning",
        "@article{mokady2021clipcap,\n  title={{ClipCap}: {CLIP} Prefix for Image Captioning},\n"
        "  author={Mokady, Ron and Hertz, Amir and Bermano, Amit H.},\n  journal={arXiv:2111.09734},\n"
        "  year={2021}\n}",
    ),
}

# Which paper each reward (by its TRL name) and each option comes from.
REWARD_PAPERS = {
    "clip_s": "cho2022",
    "grammar": "cho2022",
    "retrieval": "dessi2023",
    "group_gap": "zhang2022",
    "bidirectional": "chaffin2024",
    "discriminator": "chaffin2024",
    "cider": "vedantam2015",
}
BASELINE_PAPERS = {"greedy": "rennie2017", "running_mean": "dessi2023"}


# The CaptionRLConfig fields a model card reports, besides the steps taken and the KL coefficient.
CARD_SETTINGS = ("baseline", "gt_loss_weight", "gt_weighting", "train_decoding", "num_generations", "learning_rate",
                 "loss_type")


def captioner_details(base: Any, trained: Any, prompt: str | None = None) -> dict[str, Any]:
    """Class, base checkpoint, ClipCap's prefix settings, LoRA settings, the caption prompt and parameter counts of
    the captioner ``base`` (``trained``: as trained, e.g. inside PEFT, for the adapter and the trainable count)."""
    details: dict[str, Any] = {"class": type(base).__name__}
    config = getattr(base, "config", None)
    if getattr(config, "_name_or_path", ""):
        details["base model"] = config._name_or_path
    peft = getattr(trained, "peft_config", {}).get("default")
    if peft is not None:
        details["adapter"] = f"LoRA r={peft.r}, alpha={peft.lora_alpha}"
    if prompt:
        details["caption prompt"] = json.dumps(prompt)  # one line, newlines and quotes visible
    for key in ("prefix_dim", "prefix_length", "mapper_type"):
        if hasattr(config, key):
            details[key] = getattr(config, key)
    details["parameters"] = sum(p.numel() for p in base.parameters())
    details["trainable parameters"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return details


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card_text(
    *,
    model_name: str,
    captioner: str,
    captioner_details: Mapping[str, Any],
    rewards: Sequence[tuple[str, float]],
    settings: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    tags: Sequence[str],
    dataset_name: str | None = None,
) -> str:
    """Markdown (with YAML metadata) of a captioner trained by ``CaptionRLTrainer``."""
    papers = [REWARD_PAPERS[name] for name, _ in rewards if name in REWARD_PAPERS]
    papers.append(BASELINE_PAPERS.get(str(settings.get("baseline")), ""))
    if float(settings.get("gt_loss_weight", 0) or 0) > 0:
        papers.append("chaffin2024")
    if captioner == "ClipCapModel":
        papers.append("mokady2021")
    papers = [p for p in dict.fromkeys(papers) if p]

    meta = ["---", "library_name: clip-rl-trl", "pipeline_tag: image-to-text", "tags:"]
    meta += [f"- {tag}" for tag in tags]
    if dataset_name:
        meta += ["datasets:", f"- {dataset_name}"]
    base_model = str(captioner_details.get("base model", ""))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) and not os.path.exists(base_model):  # a Hub id, not a folder
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    parts = [
        "\n".join(meta),
        f"# {model_name}",
        f"An image captioner ({captioner}) fine-tuned with reinforcement learning by "
        "[clip-rl-trl](https://github.com/clip-rl-trl/clip-rl-trl) (`CaptionRLTrainer`, built on TRL's "
        "`GRPOTrainer`) so that its captions single out their image: a frozen CLIP judges them.",
        "## Captioner\n\n" + _table([(k, _fmt(v)) for k, v in captioner_details.items()], ["field", "value"]),
        "## Rewards\n\n"
        + _table(
            [(name, _fmt(w), CITATIONS[REWARD_PAPERS[name]][0] if name in REWARD_PAPERS else "custom")
             for name, w in rewards],
            ["reward", "weight", "paper"],
        ),
        "## Training\n\n" + _table([(k, _fmt(v)) for k, v in settings.items()], ["setting", "value"]),
    ]
    if metrics:
        parts.append(
            "## Evaluation (last evaluation of the run)\n\n"
            + _table([(k, _fmt(v)) for k, v in metrics.items()], ["metric", "value"])
        )
    else:
        parts.append("## Evaluation\n\nNo evaluation was run before this card was written.")
    if captioner == "ClipCapModel":
        parts.append(
            "## Use\n\n```python\nfrom clip_rl_trl import ClipCapModel\n\n"
            f'model = ClipCapModel.from_pretrained("{model_name}")\n'
            "ids = model.generate(image_embeds=clip_image_embeddings, num_beams=3)\n```\n\n"
            "The captioner reads L2-normalised CLIP image embeddings of the CLIP model it was trained with."
        )
    parts.append("## Citations\n\n" + "\n\n".join(f"```bibtex\n{CITATIONS[p][1]}\n```" for p in papers))
    return "\n\n".join(parts) + "\n"
