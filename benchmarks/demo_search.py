"""Search the balance of the demo's regularisers and record the distinctiveness / fluency trade-off.

Each point is one fine-tuning run of the packaged ``shapes_demo`` recipe (``clip-rl-trl demo``: Chaffin et al.'s
recipe on the shapes world) with some recipe fields changed, as ``clip-rl-trl train --config shapes_demo --field
value`` would; it reports metrics of the validation scenes before and after (beam search, ``eval_num_beams``;
settings are chosen on them, never on the test scenes; results recorded before 2026-12 used the test scenes).
As in the long-training study the trainer neither evaluates, saves checkpoints nor reloads the best one: "after"
is the last step, and the curve is greedy P@1, grammar validity and attribute precision of the test scenes every
``eval_steps`` steps. Points run as separate processes (``--jobs`` at a time, ``--threads`` torch threads
each); the MLE captioner and tiny CLIP are prepared once first, so every point starts from the same cached
captioner.

    python benchmarks/demo_search.py --grid grid.json --jobs 8 --threads 2 --output search.jsonl \
        --plot docs/img/demo_tradeoff.png

``grid.json`` is a list of ``{"name": ..., "changes": {recipe field: value}}``, e.g. ``{"name": "lr1e-4-s60",
"changes": {"learning_rate": 1e-4, "max_steps": 60}}``. Results recorded before the recipes (the first four
lines of ``demo_search_results.jsonl``) name ``DemoConfig`` fields: ``steps`` is now ``max_steps``,
``eval_every`` ``eval_steps``, ``bidirectional_weight`` / ``discriminator_weight`` the two ``reward_weights``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from long_training import recipe_args  # benchmarks/: one way to write a recipe's overrides as flags

KEYS = ("p_at_1_100", "recall_at_1", "grammar_valid", "attribute_precision", "attribute_recall", "distinct_2",
        "clip_s")
CURVE_KEYS = ("p_at_1_100", "grammar_valid", "attribute_precision")
BASE_RECIPE = "shapes_demo"
# What every point changes in the packaged recipe (as the long-training study does): no trainer evaluations,
# checkpoints or best-model loading, float32 on a GPU too.
STUDY: dict[str, Any] = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "bf16": False}
# DemoConfig fields (before the recipes) -> the recipe field that replaced them.
RENAMED = {
    "steps": "max_steps", "eval_every": "eval_steps", "n_train": "max_train_images", "n_val": "max_eval_images",
    "n_test": "max_test_images", "max_tokens": "max_completion_length", "gpt_layers": "mle_layers",
    "gpt_width": "mle_width", "gpt_heads": "mle_heads", "prefix_length": "mle_prefix_length",
    "mle_lr": "mle_learning_rate", "images_per_step": "per_device_train_batch_size (images x num_generations)",
    "bidirectional_weight": "reward_weights", "discriminator_weight": "reward_weights",
    "discriminator_lr": "reward_kwargs (discriminator: {lr: ...})",
}


def point_recipe(name: str, changes: dict, **extra: Any) -> Any:
    from clip_rl_trl.configs import parse_recipe

    fields = {**STUDY, "output_dir": str(Path("/tmp") / f"demo_search_{name}"), **changes, **extra}
    return parse_recipe(["--config", BASE_RECIPE, *recipe_args(fields)])


def run_point(name: str, changes: dict, threads: int) -> dict:
    """One fine-tuning run in this process: before/after metrics, the test curve, sample captions, seconds."""
    import torch
    from transformers import TrainerCallback

    from clip_rl_trl.pipeline import build_trainer, evaluate, prepare

    torch.set_num_threads(threads)
    recipe = point_recipe(name, changes)
    start = time.perf_counter()
    run = prepare(recipe, progress=False)
    before, _, _ = evaluate(run, run.model, run.eval, coco_metrics=False)
    # The curve's greedy captions: the same run, evaluated with one beam.
    greedy = point_recipe(name, changes, eval_num_beams=1)
    greedy_run = dataclasses.replace(run, recipe=greedy)
    every, steps = recipe.training.eval_steps, recipe.training.max_steps
    curve: list[dict[str, Any]] = []

    class TestCurve(TrainerCallback):
        """Greedy captions of the test scenes every ``eval_steps`` steps: the P@1 curve."""

        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0 or state.global_step == steps:
                metrics, _, _ = evaluate(greedy_run, kwargs["model"], coco_metrics=False)
                curve.append({**{f"eval/{k}": metrics[k] for k in CURVE_KEYS}, "step": state.global_step})

    trainer, run = build_trainer(recipe, progress=False, run=run)
    trainer.add_callback(TestCurve())
    trainer.train()
    after, captions, _ = evaluate(run, trainer.model, run.eval, coco_metrics=False)
    return {
        "name": name,
        "changes": changes,
        "before": {k: before[k] for k in KEYS},
        "after": {k: after[k] for k in KEYS},
        "curve": curve,
        "captions": captions[:5],
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, help="JSON list of {name, changes}")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("demo_search.jsonl"))
    parser.add_argument("--plot", type=Path, default=None, help="write the P@1-vs-grammar scatter here")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print its JSON
    args = parser.parse_args()
    if args.point:
        point = json.loads(args.point)
        print("RESULT " + json.dumps(run_point(point["name"], point["changes"], args.threads)), flush=True)
        return
    if args.grid is None:
        parser.error("--grid is required")
    grid = json.loads(args.grid.read_text())
    old = sorted({key for point in grid for key in point["changes"] if key in RENAMED})
    if old:
        parser.error("--grid changes DemoConfig fields, now recipe fields: "
                     + "; ".join(f"{key} -> {RENAMED[key]}" for key in old))
    from clip_rl_trl.configs import parse_recipe
    from clip_rl_trl.pipeline import prepare

    prepare(parse_recipe(["--config", BASE_RECIPE]), progress=True)  # train and cache the shared MLE captioner once

    def launch(point: dict) -> dict | None:
        proc = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--point", json.dumps(point)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{point['name']}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        result = json.loads(lines[-1][len("RESULT "):])
        after = result["after"]
        print(f"{result['name']:>24}: P@1 {after['p_at_1_100']:.3f} grammar {after['grammar_valid']:.3f} "
              f"attr-prec {after['attribute_precision']:.3f} ({result['seconds']:.0f} s) {result['captions'][:2]}",
              flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(launch, grid) if r is not None]
    with args.output.open("a") as f:
        for result in results:
            f.write(json.dumps(result) + "\n")
    if args.plot is not None and results:
        from clip_rl_trl.evaluation import plot_tradeoff

        points = [{"name": r["name"], **r["after"]} for r in results]
        points.append({"name": "MLE", **results[0]["before"]})
        plot_tradeoff(points, args.plot, x_target=0.95, y_target=0.5)


if __name__ == "__main__":
    main()
