"""Step time of ``CaptionRLTrainer`` against a stock ``trl.GRPOTrainer``, side by side in one run.

Mode ``compare`` (default). Both trainers train the identical model: a tiny ``GPT2LMHeadModel`` (2 layers x
64, the shapes world's word vocabulary) built from the same seed, continuing the same text prompt. The stock
``trl.GRPOTrainer`` reads the prompt from the dataset; ``CaptionRLTrainer`` drives the model through
``CausalLMPolicy`` (the same prompt, tokenized as TRL tokenizes it). Everything else is the same too: the
dataset, the reward (a cheap pure-Python function of the completion text, so the trainers' own work dominates),
batch, ``num_generations``, ``max_completion_length``, sampling settings, optimiser, learning rate and every other
``GRPOConfig`` default, with group-mean advantages on both sides (``baseline="group"``; TRL also divides them
by the group's standard deviation, ``scale_rewards="group"``, which costs nothing). Dropout is switched off
(``disable_dropout=True``) on both sides: by default the stock trainer samples from the model in training mode,
dropout active, and ours in evaluation mode, so the two would not run the same forward passes. What differs is
only the trainer: ours generates through the policy adapter, computes advantages with its baseline module,
decodes and logs its own metrics.

The trainers run in alternating rounds (ours, stock, ours, stock, ...) so that load from other jobs on a shared
machine hits both alike; each round builds a fresh trainer and model, and its first ``--warmup`` steps are
dropped; the step time is the median over every round's remaining steps. The two sides sample from different
random streams, so their captions differ; the mean completion length (in words, as the reward sees them) is
printed next to the times.

Mode ``throughput``: ``CaptionRLTrainer`` alone at the scale of the papers: a random ViT-B/32-sized CLIP
(``open_clip`` ``ViT-B-32`` architecture, embed dim 512, no weights downloaded), a ClipCap whose decoder has GPT-2
small's shape (12 layers, width 768) over the shapes world's word vocabulary, prefix length 10, a batch of 100
captions. It prints captions per second and the share of the step spent inside the reward call (timed around
the callable, CLIP text pass included).

Commands (the CPU figures need a quiet machine; the GPU ones are what the goal is about):

    python benchmarks/trainer_step.py                                  # CPU, tiny GPT-2, goal ratio <= 1.10
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
import torch
import torch.nn.functional as F
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
)
from clip_rl_trl.data import ShapesLanguage
from clip_rl_trl.models.policies import CausalLMPolicy

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
    """A reward callable that records the time spent in each call and the completions' mean length in words.

    Both trainers hand rewards the decoded completions as ``completions=`` (TRL keeps the ``__name__``).
    """

    def __init__(self, reward: Callable, device: torch.device) -> None:
        self.reward = reward
        self.device = device
        self.__name__ = reward.__name__
        self.times: list[float] = []
        self.words: list[float] = []  # mean completion length of each call, in words

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        sync(self.device)
        start = time.perf_counter()
        out = self.reward(*args, **kwargs)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        self.words.append(statistics.mean(len(c.split()) for c in kwargs["completions"]))
        return out


def distinct_words(completions: list[str], **kwargs: Any) -> list[float]:
    """A cheap reward (no model): the number of distinct words in the completion."""
    return [float(len(set(c.split()))) for c in completions]


def vit_b_32_judge(device: torch.device) -> ClipScorer:
    """A random CLIP of ViT-B/32's size (no download): a judge's weights do not change its cost."""
    torch.manual_seed(0)
    return ClipScorer.from_open_clip("ViT-B-32", pretrained=None, device=device)


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


def train(trainer, timer: StepTimer, reward: TimedReward, warmup: int) -> dict[str, Any]:
    """Train, and return the step times, reward-call times per step and mean completion length after ``warmup``."""
    trainer.remove_callback(PrinterCallback)  # keep the output to the summary
    trainer.train()
    # Calls per step: one for the samples (two with a greedy baseline); align the reward calls to steps.
    per_step = len(reward.times) // len(timer.times)
    reward_per_step = [sum(reward.times[i * per_step : (i + 1) * per_step]) for i in range(len(timer.times))]
    return {
        "steps": timer.times[warmup:],
        "reward": reward_per_step[warmup:],
        "words": reward.words[warmup * per_step :],
    }


def run_clipcap(opts, scorer, cache, tokenizer, dataset, prefix_length: int, size: str) -> dict[str, Any]:
    """``CaptionRLTrainer`` on a ClipCap whose reward is CLIP-S (the throughput mode)."""
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
        trainer = CaptionRLTrainer(
            model=model,
            reward_funcs=[reward],
            args=CaptionRLConfig(baseline="group", **common_args(opts, tmp)),
            train_dataset=dataset,
            processing_class=tokenizer,
            image_cache=cache,
            scorer=scorer,
            callbacks=[timer],
        )
        return train(trainer, timer, reward, opts.warmup)


def run_text_lm(opts, tokenizer, dataset, ours: bool) -> dict[str, Any]:
    """The tiny GPT-2 under ``CaptionRLTrainer`` (``ours``) or under a stock ``GRPOTrainer``: same seed, model,
    prompt, data, reward and settings."""
    device = torch.device(opts.device)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tokenizer, "tiny"))
    reward = TimedReward(distinct_words, device)
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as tmp:
        if ours:
            trainer = CaptionRLTrainer(
                model=model,
                reward_funcs=[reward],
                args=CaptionRLConfig(baseline="group", disable_dropout=True, **common_args(opts, tmp)),
                train_dataset=dataset,
                processing_class=tokenizer,
                policy=CausalLMPolicy(tokenizer, prompt=opts.prompt),
                callbacks=[timer],
            )
        else:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=[reward],
                args=GRPOConfig(disable_dropout=True, **common_args(opts, tmp)),
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[timer],
            )
        return train(trainer, timer, reward, opts.warmup)


def compare(opts: argparse.Namespace) -> None:
    tokenizer = ShapesLanguage.word_tokenizer()
    # The stock trainer reads "prompt", ours its policy's prompt (the same text) and the image-id column it checks.
    dataset = datasets.Dataset.from_dict(
        {"prompt": [opts.prompt] * opts.images, "image_id": [f"img-{i}" for i in range(opts.images)]}
    )
    results = {name: {"steps": [], "reward": [], "words": []} for name in ("ours", "stock")}
    for _ in range(opts.rounds):
        for name in results:
            out = run_text_lm(opts, tokenizer, dataset, ours=name == "ours")
            for key in results[name]:
                results[name][key] += out[key]
    prompt_tokens = len(tokenizer(opts.prompt)["input_ids"])
    print(
        f"device {opts.device}; batch {opts.batch} completions ({opts.batch // opts.num_generations} prompts x "
        f"{opts.num_generations}); max_completion_length {opts.max_completion_length}; {opts.rounds} rounds x "
        f"{opts.steps} steps, first {opts.warmup} of each round dropped; torch threads {torch.get_num_threads()}"
    )
    print(
        f"both: GPT2LMHeadModel (2 layers x 64, vocabulary {len(tokenizer)}, seed 0), prompt {opts.prompt!r} "
        f"({prompt_tokens} tokens), reward distinct_words, group-mean advantages, no dropout, "
        "GRPOConfig defaults otherwise"
    )
    print("ours: CaptionRLTrainer + CausalLMPolicy; stock: trl.GRPOTrainer")
    print(f"{'':6s} {'median step':>12s} {'p10':>9s} {'p90':>9s} {'reward share':>13s} {'mean words':>11s}")
    medians = {}
    for name, r in results.items():
        steps = sorted(r["steps"])
        medians[name] = statistics.median(steps)
        share = sum(r["reward"]) / sum(r["steps"])
        p10, p90 = steps[len(steps) // 10], steps[(9 * len(steps)) // 10]
        print(
            f"{name:6s} {medians[name] * 1e3:9.1f} ms {p10 * 1e3:6.1f} ms {p90 * 1e3:6.1f} ms "
            f"{share:12.1%} {statistics.mean(r['words']):11.1f}"
        )
    ratio = medians["ours"] / medians["stock"]
    print(f"ratio ours / stock: {ratio:.3f}x (goal <= {GOAL:.2f}x: {'met' if ratio <= GOAL else 'NOT met'})")


def throughput(opts: argparse.Namespace) -> None:
    device = torch.device(opts.device)
    tokenizer = ShapesLanguage.word_tokenizer()
    scorer = vit_b_32_judge(device)
    cache = image_cache(opts.images, scorer.embed_dim)
    dataset = datasets.Dataset.from_dict({"image_id": cache.ids})
    out = run_clipcap(opts, scorer, cache, tokenizer, dataset, prefix_length=10, size="gpt2-small")
    median = statistics.median(out["steps"])
    print(
        f"device {opts.device}; CaptionRLTrainer, ClipCap (MLP mapper, 10 prefix embeddings, GPT-2 small shape: "
        f"12 layers x 768, word vocabulary of {len(tokenizer)}), random ViT-B/32-sized CLIP judge (embed 512)"
    )
    print(
        f"batch {opts.batch} captions ({opts.batch // opts.num_generations} images x {opts.num_generations}), "
        f"max_completion_length {opts.max_completion_length}, mean caption {statistics.mean(out['words']):.1f} words; "
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
    parser.add_argument(
        "--images", type=int, default=512, help="dataset rows (images in the embedding cache)"
    )
    parser.add_argument("--prompt", default="a", help="the text every completion continues (compare mode)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's; 1 is steadier on a busy machine)",
    )
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
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
