"""Search the balance of the demo's regularisers and record the distinctiveness / fluency trade-off.

Each point is one fine-tuning run of ``clip_rl_trl.demo`` (Chaffin et al.'s recipe on the shapes world) with some
``DemoConfig`` fields changed; it reports metrics of the validation scenes before and after (settings are
chosen on them, never on the test scenes; results recorded before 2026-12 used the test scenes). Points run as separate
processes (``--jobs`` at a time, ``--threads`` torch threads each); the MLE captioner and tiny CLIP are prepared
once first, so every point starts from the same cached captioner.

    python benchmarks/demo_search.py --grid grid.json --jobs 8 --threads 2 --output search.jsonl \
        --plot docs/img/demo_tradeoff.png

``grid.json`` is a list of ``{"name": ..., "changes": {DemoConfig field: value}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEYS = ("p_at_1_100", "recall_at_1", "grammar_valid", "attribute_precision", "attribute_recall", "distinct_2",
        "clip_s")


def run_point(name: str, changes: dict, threads: int) -> dict:
    """One fine-tuning run in this process: before/after metrics, the test curve, sample captions, seconds."""
    import torch

    from clip_rl_trl.demo import DemoConfig, evaluate_test, fine_tune, prepare

    torch.set_num_threads(threads)
    config = DemoConfig().replace(**changes)
    start = time.perf_counter()
    prepared = prepare(config, progress=False)
    before, _ = evaluate_test(prepared, prepared.captioner, config, full=False, split="val")
    trainer = fine_tune(prepared, config, Path("/tmp") / f"demo_search_{name}", progress=False)
    after, captions = evaluate_test(prepared, trainer.model, config, full=False, split="val")
    curve = [
        {k: v for k, v in entry.items() if k == "step" or k.startswith("eval/")}
        for entry in trainer.state.log_history
        if "eval/p_at_1_100" in entry
    ]
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
    from clip_rl_trl.demo import DemoConfig, prepare

    prepare(DemoConfig(), progress=True)  # train and cache the shared MLE captioner once

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
        from clip_rl_trl.evaluation.report import plot_tradeoff

        points = [{"name": r["name"], **r["after"]} for r in results]
        points.append({"name": "MLE", **results[0]["before"]})
        plot_tradeoff(points, args.plot, x_target=0.95, y_target=0.5)


if __name__ == "__main__":
    main()
