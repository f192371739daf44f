"""The ClipCap MLE loop (``train_clipcap_mle``) against ``transformers.Trainer``, side by side in one run.

The question: should ``clip_rl_trl.models.clipcap.train_clipcap_mle`` (a hand-written teacher-forced
cross-entropy loop: AdamW, a seeded shuffle per epoch, batches trimmed to their longest caption, no schedule)
be replaced by ``transformers.Trainer``? Both variants train the SAME tiny ClipCap from the SAME initial weights
on the SAME (image embedding, caption) pairs:

* ``ours``: ``train_clipcap_mle(model, embeds, captions, tokenizer, epochs=, batch_size=, lr=, seed=)``;
* ``Trainer``: a torch ``Dataset`` of (row, caption) pairs, a data collator that tokenizes with
  ``tokenize_captions`` (which pads, i.e. trims, to the batch's longest caption) and masks padding out of the
  labels with -100, and ``TrainingArguments(per_device_train_batch_size, learning_rate, num_train_epochs,
  lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", seed, use_cpu=True, report_to=[],
  save_strategy="no", logging_steps=<steps per epoch>, dataloader_num_workers=0, disable_tqdm=True,
  max_grad_norm=0.0, remove_unused_columns=False)``; the model's forward gets ``input_ids``,
  ``attention_mask``, ``image_embeds`` and ``labels``.
  ``max_grad_norm=0.0`` switches off the Trainer's default gradient clipping (1.0), which our loop does not do;
  ``--max-grad-norm 1.0`` measures the Trainer's default instead. ``remove_unused_columns=False`` is needed: by
  default the Trainer wraps the collator and drops every item key that is not a forward argument (``caption``).
  ``ClipCapModel.forward`` takes ``**kwargs``, so the Trainer counts it as accepting loss kwargs and passes it
  ``num_items_in_batch``, which it ignores (the loss stays the batch mean); harmless here, with no gradient
  accumulation, but with ``gradient_accumulation_steps > 1`` the Trainer would then skip dividing the loss by it.

The setting is the shapes world's MLE captioner as ``clip_rl_trl.models.families.mle_clipcap`` builds it for
the demo: GPT-2 with 3 layers, width 128, 4 heads, ``n_positions = prefix 4 + 24 tokens + 8``, the world's word
tokenizer, prefix length 4, batch 128, lr 2e-3, the 5 human-like captions of each ``ShapesWorld(0)`` training
scene. The image embeddings are a fixed random L2-normalised 64-dimensional tensor per scene (the loop is timed,
not the judge: the shapes CLIP is not trained).

The variants run in alternating rounds (ours, Trainer, ours, Trainer, ...) so that load from other jobs on a
shared machine hits both alike; each round starts from a fresh copy of the initial weights. Per variant: seconds
per epoch (the whole training call, Trainer construction included, divided by the epochs; median over rounds),
steps per second, the median step time over every round's steps (from one forward pass to the next: data,
forward, backward, optimiser; a median resists bursts of load better than a total), the set-up time before the
first forward pass, the mean training loss of the last epoch, and
after training the mean teacher-forced loss per caption token on the captions of ``--n-val`` held-out ``"val"``
scenes (model in eval mode, the same code for both).

The two are not bit-identical, by design of each: our loop shuffles with ``torch.randperm`` on its own
generator seeded with ``seed`` and seeds the global RNG (dropout) with ``seed`` inside ``fork_rng``; the Trainer
calls ``set_seed(seed)`` (global RNG: dropout) and shuffles with accelerate's ``SeedableRandomSampler`` (its own
generator, seeded with ``seed + epoch``). Different batch orders mean different dropout masks per example
and a different trajectory; only the statistics (losses) are comparable, not the weights.

Command (figures in benchmarks/RESULTS.md)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/mle_loop.py --threads 1 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, Trainer, TrainingArguments

from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld
from clip_rl_trl.models.clipcap import ClipCapConfig, ClipCapModel, tokenize_captions, train_clipcap_mle

EMBED_DIM = 64  # the shapes CLIP's embed_dim


def flatten(captions: list[list[str]]) -> tuple[list[int], list[str]]:
    rows, texts = [], []
    for row, entry in enumerate(captions):
        for caption in entry:
            rows.append(row)
            texts.append(caption)
    return rows, texts


class PairDataset(torch.utils.data.Dataset):
    """(image embedding, caption) pairs: one item per caption."""

    def __init__(self, embeds: torch.Tensor, captions: list[list[str]]) -> None:
        self.embeds = embeds
        self.rows, self.texts = flatten(captions)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image_embeds": self.embeds[self.rows[i]], "caption": self.texts[i]}


class CaptionCollator:
    """Tokenize a batch's captions (EOS appended, right-padded to the batch's longest caption)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = tokenize_captions(
            [x["caption"] for x in items], self.tokenizer, max_length=self.max_length
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "image_embeds": torch.stack([x["image_embeds"] for x in items]),
            "labels": ids.masked_fill(mask == 0, -100),
        }


class StepRecorder:
    """The start time and the loss of every training forward pass, read the same way in both variants: a
    forward pre-hook and a forward hook on the model (no change to either loop)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.starts: list[float] = []
        self.losses: list[torch.Tensor] = []
        self.handles = [model.register_forward_pre_hook(self.pre), model.register_forward_hook(self.post)]

    def pre(self, module, args) -> None:
        self.starts.append(time.perf_counter())

    def post(self, module, args, output) -> None:
        self.losses.append(output.loss.detach())

    def remove(self) -> dict[str, Any]:
        for h in self.handles:
            h.remove()
        return {"starts": self.starts, "losses": [float(x) for x in self.losses]}


def fresh_model(config: ClipCapConfig, state: dict[str, torch.Tensor]) -> ClipCapModel:
    model = ClipCapModel(config)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def val_loss(model: ClipCapModel, embeds: torch.Tensor, captions: list[list[str]], tokenizer: Any) -> float:
    """Mean teacher-forced cross-entropy per caption token (EOS included), model in eval mode."""
    rows, texts = flatten(captions)
    limit = model.config.gpt2_config.n_positions - model.config.prefix_length
    ids, mask = tokenize_captions(texts, tokenizer, max_length=limit)
    rows_t = torch.tensor(rows)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), 250):
        b_ids, b_mask = ids[start : start + 250], mask[start : start + 250]
        logits = model(b_ids, b_mask, image_embeds=embeds[rows_t[start : start + 250]]).logits.float()
        labels = b_ids.masked_fill(b_mask == 0, -100)
        total += float(
            F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        )
        count += int(b_mask.sum())
    model.train(was_training)
    return total / count


def summarise(recorder: StepRecorder, start: float, end: float, epochs: int) -> dict[str, Any]:
    rec = recorder.remove()
    losses = rec["losses"]
    per_epoch = len(losses) // epochs
    return {
        "seconds": end - start,
        "setup": rec["starts"][0] - start,
        "steps": len(losses),
        # one step = from one forward pass to the next: data, forward, backward, optimiser, loop overhead
        "step_ms": [1000 * (b - a) for a, b in zip(rec["starts"], rec["starts"][1:], strict=False)],
        "last_epoch_loss": statistics.fmean(losses[-per_epoch:]),
    }


def run_ours(model, args, embeds, captions, tokenizer) -> dict[str, Any]:
    recorder = StepRecorder(model)
    start = time.perf_counter()
    train_clipcap_mle(
        model,
        embeds,
        captions,
        tokenizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=False,
    )
    end = time.perf_counter()
    return summarise(recorder, start, end, args.epochs)


def run_trainer(model, args, embeds, captions, tokenizer, steps_per_epoch: int) -> dict[str, Any]:
    limit = model.config.gpt2_config.n_positions - model.config.prefix_length
    recorder = StepRecorder(model)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=steps_per_epoch,  # one log line per epoch
            dataloader_num_workers=0,
            disable_tqdm=True,
            # Else the Trainer drops "caption" (not a forward argument) before the collator sees it.
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=PairDataset(embeds, captions),
            data_collator=CaptionCollator(tokenizer, limit),
        )
        trainer.train()
        end = time.perf_counter()
    return summarise(recorder, start, end, args.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=2000, help="training scenes (5 captions each)")
    parser.add_argument(
        "--n-val", type=int, default=200, help="held-out 'val' scenes for the loss after training"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations ours, Trainer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=24, help="the demo's max_completion_length")
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=0.0,
        help="Trainer's gradient clipping; 0 = off, as in our loop (the Trainer's default is 1.0)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"cpus: {os.cpu_count()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    world = ShapesWorld(seed=0)
    train_caps = [list(c) for c in world.to_dataset(args.n_train, "train")["captions"]]
    val_caps = [list(c) for c in world.to_dataset(args.n_val, "val")["captions"]]
    gen = torch.Generator().manual_seed(1234)
    train_embeds = F.normalize(torch.randn(args.n_train, EMBED_DIM, generator=gen), dim=-1)
    val_embeds = F.normalize(torch.randn(args.n_val, EMBED_DIM, generator=gen), dim=-1)
    tokenizer = ShapesLanguage.word_tokenizer()

    prefix_length = 4
    gpt = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=prefix_length + args.max_tokens + 8,
        n_embd=128,
        n_layer=3,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = ClipCapConfig(prefix_dim=EMBED_DIM, prefix_length=prefix_length, gpt2_config=gpt.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        init_state = {k: v.clone() for k, v in ClipCapModel(config).state_dict().items()}
    n_captions = sum(len(c) for c in train_caps)
    steps_per_epoch = -(-n_captions // args.batch_size)
    init_val = val_loss(fresh_model(config, init_state), val_embeds, val_caps, tokenizer)
    print(
        f"{args.n_train} scenes, {n_captions} captions, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr}; {sum(v.numel() for v in init_state.values()):,} parameters; "
        f"val loss at init {init_val:.4f} ({args.n_val} scenes, {sum(len(c) for c in val_caps)} captions)"
    )

    results: dict[str, list[dict[str, Any]]] = {"ours": [], "Trainer": []}
    for r in range(args.rounds):
        for name in ("ours", "Trainer"):
            model = fresh_model(config, init_state)
            if name == "ours":
                res = run_ours(model, args, train_embeds, train_caps, tokenizer)
            else:
                res = run_trainer(model, args, train_embeds, train_caps, tokenizer, steps_per_epoch)
            res["val_loss"] = val_loss(model, val_embeds, val_caps, tokenizer)
            assert res["steps"] == steps_per_epoch * args.epochs, res
            results[name].append(res)
            print(
                f"round {r} {name:7s}: {res['seconds']:.2f} s ({res['seconds'] / args.epochs:.2f} s/epoch, "
                f"setup {res['setup']:.2f} s, {res['steps'] / res['seconds']:.2f} steps/s, median step "
                f"{statistics.median(res['step_ms']):.0f} ms), last-epoch loss "
                f"{res['last_epoch_loss']:.4f}, val loss {res['val_loss']:.4f}",
                flush=True,
            )

    print(
        f"\n| variant | s/epoch (median of {args.rounds}) | steps/s | median step ms (all rounds) | setup s "
        "| last-epoch train loss | val loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for name, runs in results.items():
        spe = statistics.median(x["seconds"] / args.epochs for x in runs)
        sps = statistics.median(x["steps"] / x["seconds"] for x in runs)
        setup = statistics.median(x["setup"] for x in runs)
        train_l = statistics.median(x["last_epoch_loss"] for x in runs)
        val_l = statistics.median(x["val_loss"] for x in runs)
        step = statistics.median(ms for x in runs for ms in x["step_ms"])
        summary[name] = (spe, train_l, val_l, step)
        print(f"| {name} | {spe:.2f} | {sps:.2f} | {step:.0f} | {setup:.2f} | {train_l:.4f} | {val_l:.4f} |")
    paired = [t["seconds"] / o["seconds"] for o, t in zip(results["ours"], results["Trainer"], strict=True)]
    print(
        f"\nTrainer / ours time ratio: {summary['Trainer'][0] / summary['ours'][0]:.3f} (s/epoch medians); "
        f"{summary['Trainer'][3] / summary['ours'][3]:.3f} (median step times); per round: "
        + ", ".join(f"{x:.2f}" for x in paired)
    )
    print(
        f"loss difference Trainer - ours: last-epoch train {summary['Trainer'][1] - summary['ours'][1]:+.4f}, "
        f"val {summary['Trainer'][2] - summary['ours'][2]:+.4f}"
    )
    for name, runs in results.items():
        same = len({round(x["val_loss"], 6) for x in runs}) == 1
        print(f"{name}: val loss identical across rounds: {same}")


if __name__ == "__main__":
    main()
