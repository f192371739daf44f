"""Step time of ``CaptionRLTrainer`` against a stock ``trl.GRPOTrainer``, side by side in one run.

Mode ``compare`` (default). Both trainers train a policy of the same size with the same reward callable
(``ClipSReward(prompt="")`` on a random tiny CLIP: a judge's weights do not change its cost), the same batch,
``num_generations``, ``max_completion_length``, optimiser and learning rate, with TRL's group-mean advantages
(``baseline="group"``). The library has no decoder-only policy adapter, so the two sides are:

  - ours: ``ClipCapModel`` (MLP mapper -> ``prefix_length`` prefix embeddings -> GPT-2) under ``CaptionRLTrainer``;
  - stock: a ``GPT2LMHeadModel`` of exactly ClipCap's GPT-2 config under ``GRPOTrainer``, prompted with
    ``prefix_length`` tokens, so both decoders attend over the same number of positions.

ClipCap's extra work (the mapper, the image-embedding look-up, the in-batch P@1 metric) is part of what is
measured. The trainers run in alternating rounds (ours, stock, ours, stock, ...) so that load from other jobs on
a shared machine hits both alike; the step time is the median over every round's steps after ``--warmup``.
Completion lengths differ between the two random policies; their mean is printed next to the times.

Mode ``throughput``: ``CaptionRLTrainer`` alone at the scale of the papers: a random ViT-B/32-sized CLIP
(``open_clip`` ``ViT-B-32`` architecture, embed dim 512, no weights downloaded), a ClipCap whose decoder has GPT-2
small's shape (12 layers, width 768) over the shapes world's word vocabulary, prefix length 10, a batch of 100
captions. It prints captions per second and the share of the step spent inside the reward call (timed around
the callable, CLIP text pass included).

Commands (the CPU figures need a quiet machine; the GPU ones are what the goal is about):

    python benchmarks/trainer_step.py                                  # CPU, tiny models, goal ratio <= 1.10
    python benchmarks/trainer_step.py --device cuda --batch 64         # the same on a GPU
    python benchmarks/trainer_step.py --mode throughput --device cuda  # ViT-B/32-sized judge, batch 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import image_transform
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from clip_rl_trl import (
    CaptionRLConfig,
    CaptionRLTrainer,
    ClipCapConfig,
    ClipCapModel,
    ClipScorer,
    ClipSReward,
    ImageEmbeddingCache,
    ShapesWorld,
)
from clip_rl_trl.data.shapes import DEFAULT_CLIP_CONFIG

GOAL = 1.10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of every optimiser step (generation, rewards, loss, backward and update)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


class TimedReward:
    """A reward callable that records the time spent in each call (TRL keeps the ``__name__``)."""

    def __init__(self, reward: Callable, device: torch.device) -> None:
        self.reward = reward
        self.device = device
        self.__name__ = reward.__name__
        self.times: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        sync(self.device)
        start = time.perf_counter()
        out = self.reward(*args, **kwargs)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        return out


def judge(kind: str, device: torch.device) -> ClipScorer:
    """A random CLIP of the shapes world's tiny size or of ViT-B/32's size (no download)."""
    torch.manual_seed(0)
    if kind == "tiny":
        cfg = DEFAULT_CLIP_CONFIG
        model = open_clip.CLIP(**{k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()})
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        preprocess = image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    else:
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        preprocess = image_transform(224, is_train=False)
    return ClipScorer(model, tokenizer, preprocess, device=device)


def image_cache(n: int, dim: int) -> ImageEmbeddingCache:
    """Random unit embeddings: the trainers only look them up (the image tower runs once, before training)."""
    generator = torch.Generator().manual_seed(0)
    return ImageEmbeddingCache(
        [f"img-{i}" for i in range(n)], F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    )


def gpt2_config(tokenizer: Any, size: str) -> GPT2Config:
    shape = (
        dict(n_embd=64, n_layer=2, n_head=2) if size == "tiny" else dict(n_embd=768, n_layer=12, n_head=12)
    )
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def common_args(opts: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch,
        num_generations=opts.num_generations,
        max_completion_length=opts.max_completion_length,
        max_steps=opts.steps,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=opts.device == "cpu",
        bf16=False,
        seed=0,
        disable_tqdm=True,
        log_completions=False,
    )


def run_ours(opts, scorer, cache, tokenizer, dataset, prefix_length: int, size: str) -> dict[str, Any]:
    device = torch.device(opts.device)
    torch.manual_seed(0)
    model = ClipCapModel(
        ClipCapConfig(
            prefix_dim=scorer.embed_dim,
            prefix_length=prefix_length,
            gpt2_config=gpt2_config(tokenizer, size).to_dict(),
        )
    )
    # The timing wrapper hides the reward's cache and scorer, which the trainer would otherwise find itself.
    reward = TimedReward(ClipSReward(scorer, cache, prompt=""), device)
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as tmp:
        args = CaptionRLConfig(baseline="group", log_sample_captions=0, **common_args(opts, tmp))
        trainer = CaptionRLTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            image_cache=cache,
            scorer=scorer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # keep the output to the summary
        trainer.train()
    return summary(trainer, timer, reward, opts.warmup)


def run_stock(opts, scorer, cache, tokenizer, dataset, prefix_length: int, size: str) -> dict[str, Any]:
    device = torch.device(opts.device)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tokenizer, size))
    reward = TimedReward(ClipSReward(scorer, cache, prompt=""), device)
    timer = StepTimer(device)
    # prefix_length prompt tokens stand in for ClipCap's prefix embeddings.
    prompt = " ".join(["a"] * prefix_length)
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(**common_args(opts, tmp))
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset.map(lambda _: {"prompt": prompt}),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # keep the output to the summary
        trainer.train()
    return summary(trainer, timer, reward, opts.warmup)


def summary(trainer, timer: StepTimer, reward: TimedReward, warmup: int) -> dict[str, Any]:
    lengths = [
        e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e
    ]
    # Calls per step: one for the samples (two with a greedy baseline); align the reward calls to steps.
    per_step = len(reward.times) // len(timer.times)
    reward_per_step = [sum(reward.times[i * per_step : (i + 1) * per_step]) for i in range(len(timer.times))]
    return {
        "steps": timer.times[warmup:],
        "reward": reward_per_step[warmup:],
        "length": statistics.mean(lengths[warmup:]) if len(lengths) > warmup else float("nan"),
    }


def compare(opts: argparse.Namespace) -> None:
    device = torch.device(opts.device)
    world = ShapesWorld(seed=0)
    tokenizer = world.word_tokenizer()
    scorer = judge("tiny", device)
    cache = image_cache(opts.images, scorer.embed_dim)
    dataset = datasets.Dataset.from_dict({"image_id": cache.ids})
    prefix_length = 4
    results: dict[str, dict[str, list[float]]] = {
        "ours": {"steps": [], "reward": [], "length": []},
        "stock": {"steps": [], "reward": [], "length": []},
    }
    for _ in range(opts.rounds):
        for name, fn in (("ours", run_ours), ("stock", run_stock)):
            out = fn(opts, scorer, cache, tokenizer, dataset, prefix_length, "tiny")
            results[name]["steps"] += out["steps"]
            results[name]["reward"] += out["reward"]
            results[name]["length"].append(out["length"])
    print(
        f"device {opts.device}; batch {opts.batch} captions ({opts.batch // opts.num_generations} images x "
        f"{opts.num_generations}); max_completion_length {opts.max_completion_length}; {opts.rounds} rounds x "
        f"{opts.steps} steps, first {opts.warmup} of each round dropped; torch threads {torch.get_num_threads()}"
    )
    print("ours: ClipCap (MLP mapper, 4 prefix embeddings, GPT-2 2 layers x 64) under CaptionRLTrainer")
    print(
        "stock: GPT2LMHeadModel (same GPT-2 config, 4 prompt tokens) under trl.GRPOTrainer "
        "(the library has no decoder-only policy adapter)"
    )
    print(f"{'':6s} {'median step':>12s} {'p10':>9s} {'p90':>9s} {'reward share':>13s} {'mean words':>11s}")
    medians = {}
    for name, r in results.items():
        steps = sorted(r["steps"])
        medians[name] = statistics.median(steps)
        share = sum(r["reward"]) / sum(r["steps"])
        p10, p90 = steps[len(steps) // 10], steps[(9 * len(steps)) // 10]
        print(
            f"{name:6s} {medians[name] * 1e3:9.1f} ms {p10 * 1e3:6.1f} ms {p90 * 1e3:6.1f} ms "
            f"{share:12.1%} {statistics.mean(r['length']):11.1f}"
        )
    ratio = medians["ours"] / medians["stock"]
    print(f"ratio ours / stock: {ratio:.3f}x (goal <= {GOAL:.2f}x: {'met' if ratio <= GOAL else 'NOT met'})")


def throughput(opts: argparse.Namespace) -> None:
    device = torch.device(opts.device)
    tokenizer = ShapesWorld(seed=0).word_tokenizer()
    scorer = judge("vit-b-32", device)
    cache = image_cache(opts.images, scorer.embed_dim)
    dataset = datasets.Dataset.from_dict({"image_id": cache.ids})
    out = run_ours(opts, scorer, cache, tokenizer, dataset, prefix_length=10, size="gpt2-small")
    median = statistics.median(out["steps"])
    print(
        f"device {opts.device}; CaptionRLTrainer, ClipCap (MLP mapper, 10 prefix embeddings, GPT-2 small shape: "
        f"12 layers x 768, word vocabulary of {len(tokenizer)}), random ViT-B/32-sized CLIP judge (embed 512)"
    )
    print(
        f"batch {opts.batch} captions ({opts.batch // opts.num_generations} images x {opts.num_generations}), "
        f"max_completion_length {opts.max_completion_length}, mean caption {out['length']:.1f} words; "
        f"{opts.steps} steps, first {opts.warmup} dropped"
    )
    print(
        f"median step {median * 1e3:.1f} ms -> {opts.batch / median:.1f} captions/s; "
        f"reward share of the step {sum(out['reward']) / sum(out['steps']):.1%} "
        f"(median reward call {statistics.median(out['reward']) * 1e3:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("compare", "throughput"), default="compare")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--batch", type=int, default=None, help="captions per step (default 16, throughput 100)"
    )
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=12)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 12, throughput 15)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per trainer (compare mode)")
    parser.add_argument("--images", type=int, default=512, help="images in the embedding cache")
    opts = parser.parse_args()
    opts.batch = opts.batch or (100 if opts.mode == "throughput" else 16)
    opts.steps = opts.steps or (15 if opts.mode == "throughput" else 12)
    if opts.batch % opts.num_generations:
        parser.error(f"--batch {opts.batch} must be a multiple of --num-generations {opts.num_generations}")
    if opts.steps <= opts.warmup:
        parser.error(f"--steps {opts.steps} must exceed --warmup {opts.warmup}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    (compare if opts.mode == "compare" else throughput)(opts)


if __name__ == "__main__":
    main()
