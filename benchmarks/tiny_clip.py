"""Train the shapes world's tiny CLIP from scratch and print its training time and P@1 among 100.

Command (prints the figures quoted in docs/shapes_world.md)::

    HF_HUB_OFFLINE=1 python benchmarks/tiny_clip.py --threads 2

Options: ``--threads N`` (torch threads; default: torch's own choice; on a machine whose cores other jobs
already use, ``--threads 1`` is faster), ``--eval-scenes 1000``, and any
``train_shapes_clip`` setting, e.g. ``--epochs 8 --n-scenes 6000``. Training goes into a temporary cache, so the
result never comes from an earlier run. Retrieval is measured on scenes of another seed (world seed + 1,
split "test"): each caption's image among 99 random distractors.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from clip_rl_trl.data import ShapesWorld, train_shapes_clip
from clip_rl_trl.evaluation import evaluate_shapes_clip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="world seed for training; evaluation uses seed + 1"
    )
    parser.add_argument("--n-scenes", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--partial-weight", type=float, default=0.5)
    parser.add_argument("--eval-scenes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, "
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        scorer = train_shapes_clip(
            ShapesWorld(args.seed),
            n_scenes=args.n_scenes,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            partial_weight=args.partial_weight,
            cache_dir=cache,
        )
        seconds = time.perf_counter() - start
    print(
        f"training: {seconds:.1f} s ({args.n_scenes} scenes x {args.epochs} epochs, batch {args.batch_size}, "
        f"load average after: {os.getloadavg()[0]:.2f})"
    )
    results = evaluate_shapes_clip(ShapesWorld(args.seed + 1), scorer, n=args.eval_scenes)
    print(f"P@1 among 100 on {args.eval_scenes} held-out scenes (world seed {args.seed + 1}):")
    for level, value in results.items():
        print(f"  {level:<36} {value:.3f}")


if __name__ == "__main__":
    main()
