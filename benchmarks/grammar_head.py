"""Grammar head on the shapes world: does it tell held-out grammatical captions from their negatives?

Trains the head of Cho et al. 2022 with the world's tiny CLIP (text tower fine-tuned, image tower frozen) on the
human-like captions of the ``train`` split, then classifies the captions of the unseen ``test`` split and one
corrupted copy of each. Prints the command, the settings and the figures measured in this run:

- ``accuracy``: Cho et al.'s protocol, every corruption counted as ungrammatical;
- ``accuracy (true negatives)``: negatives the world's grammar parser rejects (a corruption such as removing
  "red" from "a red circle" can yield a grammatical caption; those are left out of this figure);
- the accuracy per corruption kind, and on test captions never seen verbatim in training.

    python benchmarks/grammar_head.py                  # about 8 minutes on 2 busy CPU cores (CLIP cached)

Measured (seed 0, 1000 train / 300 test images, 80 epochs, text lr 3e-4, head lr 1e-2; 2 shared CPU cores,
training 418 s): held-out accuracy 0.970 (grammatical 0.987, negatives 0.954; per kind: insert 0.990,
remove 0.857, repeat 0.993, shuffle 1.000, swap 0.949), 0.986 on true negatives (3.7% of the corruptions
parse), 0.947 on the 299 test captions never seen verbatim; text-to-image R@1 of full test captions 0.913
before the fine-tuning, 0.840 after. With 30 epochs and text lr 1e-4 the accuracy was 0.836.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld, train_shapes_clip
from clip_rl_trl.rewards.grammar import GrammarNegativeSampler, evaluate_grammar_head, train_grammar_head


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train the head and measure it; returns the figures (also printed)."""
    world = ShapesWorld(seed=args.seed)
    scorer = train_shapes_clip(world, progress=args.progress, device=args.device)
    train = world.to_dataset(args.n_train, "train")
    test = world.to_dataset(args.n_test, "test")
    image_emb = scorer.encode_images(train["image"])

    start = time.perf_counter()
    tuned, head = train_grammar_head(
        scorer,
        image_emb,
        train["captions"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        seed=args.seed,
        progress=args.progress,
    )
    train_seconds = time.perf_counter() - start

    is_grammatical = lambda text: ShapesLanguage.parse(text) is not None  # noqa: E731
    captions = [c for group in test["captions"] for c in group]
    seen = {c for group in train["captions"] for c in group}
    unseen = [c for c in captions if c not in seen]
    eval_seed = args.seed + 1  # negatives of the test captions: not the ones drawn in training
    figures = {"train_seconds": train_seconds, "n_test_captions": float(len(captions))}
    figures.update(evaluate_grammar_head(tuned, head, captions, seed=eval_seed))
    true_neg = evaluate_grammar_head(
        tuned, head, captions, negatives=GrammarNegativeSampler(eval_seed, avoid=is_grammatical)
    )
    figures["accuracy_true_negatives"] = true_neg["accuracy"]
    figures["accuracy_negative_true_negatives"] = true_neg["accuracy_negative"]
    sampler = GrammarNegativeSampler(eval_seed)
    figures["share_negatives_grammatical"] = sum(
        is_grammatical(sampler.sample(c)[0]) for c in captions
    ) / len(captions)
    figures["n_unseen_test_captions"] = float(len(unseen))
    if unseen:
        figures["accuracy_unseen_captions"] = evaluate_grammar_head(tuned, head, unseen, seed=eval_seed)[
            "accuracy"
        ]
    # The same head on the frozen, not fine-tuned CLIP text embeddings would be another model; instead report
    # what the fine-tuning costs retrieval: text-to-image R@1 on the test split's full captions, before / after.
    test_img = scorer.encode_images(test["image"])
    for name, s in (("before", scorer), ("after", tuned)):
        sims = s.encode_texts(test["full_caption"]) @ test_img.T
        target = torch.arange(len(test_img), device=sims.device)
        figures[f"r_at_1_full_captions_{name}"] = (sims.argmax(dim=1) == target).float().mean().item()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000, help="train-split images (5 captions each)")
    parser.add_argument("--n-test", type=int, default=300, help="held-out test-split images")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4, help="text tower")
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threshold", type=float, default=0.9, help="exit 1 when accuracy is below")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    print(
        "command: python benchmarks/grammar_head.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device or 'cpu'}")
    print(f"settings: {vars(args)}")
    figures = run(args)
    for key, value in figures.items():
        print(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")
    ok = figures["accuracy"] >= args.threshold
    print(f"held-out accuracy {figures['accuracy']:.4f} {'>=' if ok else '<'} {args.threshold}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
