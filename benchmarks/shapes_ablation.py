"""The shapes-world ablation: each paper's recipe, same budget, three seeds, one table.

Every row fine-tunes the demo's MLE-trained tiny ClipCap (``clip_rl_trl.demo``) for the same number of steps,
images per step and learning rate, and captions the held-out scenes with beam search; the table gives the mean
and sample standard deviation over the seeds (the RL seed: sampling, discriminator initialisation; the world,
its CLIP and the MLE captioner are shared). Rows:

- MLE: the captioner before RL.
- SCST-CIDEr: CIDEr-D, self-critical (greedy) baseline (Rennie et al. 2017, the usual starting point).
- CLIP-S, CLIP-S + grammar: Cho et al. 2022 (grammar head on a fine-tuned text tower; ``CLIP-S + 2 grammar``).
- DiscriTune: Dessì et al. 2023 (retrieval reward, running-mean baseline, greedy training decoding).
- GEG + CIDEr, GEG-sole: Zhang et al. 2022 (``0.1 CIDEr-D + 10 GEG``, K = 5 similar images; greedy baseline).
- full, full w/o GT, full t2i-only: Chaffin et al. 2024 (bidirectional 0.94 + discriminator 0.06 + the
  ground-truth term; without that term; with the text-to-image direction only).

    python benchmarks/shapes_ablation.py --seeds 0 1 2 --output benchmarks/shapes_ablation.json

prints the markdown table (also written next to ``--output`` as ``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clip_rl_trl.demo import DemoConfig, Prepared, chaffin_rewards, evaluate_test, fine_tune, prepare
from clip_rl_trl.evaluation.report import format_table, mean_std
from clip_rl_trl.neighbors import similar_image_groups
from clip_rl_trl.rewards.callables import (
    BidirectionalReward,
    CiderReward,
    ClipSReward,
    GrammarReward,
    GroupGapReward,
    RetrievalReward,
)
from clip_rl_trl.rewards.cider import CiderD
from clip_rl_trl.rewards.grammar import train_grammar_head

COLUMNS = ("p_at_1_100", "recall_at_1", "cider", "grammar_valid", "attribute_precision", "distinct_2")
Rewards = list[tuple[Any, float]]


def _cider(p: Prepared, weight: float = 1.0) -> Rewards:
    return [(CiderReward(CiderD(p.train["captions"])), weight)]


def _geg(p: Prepared, weight: float = 1.0) -> Rewards:
    groups = similar_image_groups(p.cache.embeddings.float(), k=5)
    return [(GroupGapReward(p.scorer, p.cache, groups), weight)]


def _clip_s(p: Prepared, c: DemoConfig, seed: int) -> Rewards:
    return [(ClipSReward(p.scorer, p.cache), 1.0)]


def _clip_s_grammar(p: Prepared, c: DemoConfig, seed: int) -> Rewards:
    emb = p.cache[p.train["image_id"]].float()
    scorer, head = train_grammar_head(p.scorer, emb, p.train["captions"], seed=seed, progress=False)
    return [(ClipSReward(scorer, p.cache), 1.0), (GrammarReward(scorer, head), 2.0)]


def _full(p: Prepared, c: DemoConfig, seed: int) -> Rewards:
    return chaffin_rewards(p, c.replace(seed=seed))


def _full_t2i(p: Prepared, c: DemoConfig, seed: int) -> Rewards:
    _, discriminator = _full(p, c, seed)
    return [(BidirectionalReward(p.scorer, p.cache, directions="t2i"), c.bidirectional_weight), discriminator]


SCST = {"baseline": "greedy", "num_generations": 1}
# name -> (rewards builder (prepared world, config, seed), CaptionRLConfig overrides); None: no RL.
ROWS: dict[str, tuple[Callable[[Prepared, DemoConfig, int], Rewards], dict[str, Any]] | None] = {
    "MLE": None,
    "SCST-CIDEr": (lambda p, c, s: _cider(p), SCST),
    "CLIP-S": (_clip_s, SCST),
    "CLIP-S + grammar": (_clip_s_grammar, SCST),
    "DiscriTune": (
        lambda p, c, s: [(RetrievalReward(p.scorer, p.cache), 1.0)],
        {"baseline": "running_mean", "num_generations": 1, "train_decoding": "greedy"},
    ),
    "GEG + CIDEr": (lambda p, c, s: _cider(p, 0.1) + _geg(p, 10.0), SCST),
    "GEG-sole": (lambda p, c, s: _geg(p), SCST),
    "full": (_full, {}),
    "full w/o GT": (_full, {"gt_loss_weight": 0.0}),
    "full t2i-only": (_full_t2i, {}),
}


def run_row(p: Prepared, config: DemoConfig, name: str, seed: int) -> dict[str, float]:
    spec = ROWS[name]
    if spec is None:
        metrics, _ = evaluate_test(p, p.captioner, config)
        return {k: metrics[k] for k in COLUMNS}
    build, overrides = spec
    settings = {"seed": seed, **overrides}
    generations = settings.pop("num_generations", config.num_generations)
    # Single-sample rows see as many captions per step as the group rows: G times more images.
    images = config.images_per_step * config.num_generations // generations
    # The demo's test-P@1 curve is not part of the table: one greedy evaluation at the last step only.
    row_config = config.replace(images_per_step=images, num_generations=generations, eval_every=config.steps)
    trainer = fine_tune(p, row_config, Path(f"/tmp/shapes_ablation/{name}-{seed}"), progress=False,
                        rewards=build(p, row_config, seed), **settings)
    metrics, _ = evaluate_test(p, trainer.model, config)
    return {k: metrics[k] for k in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="RL steps per row (default: the demo's)")
    parser.add_argument("--output", type=Path, default=Path("shapes_ablation.json"))
    args = parser.parse_args()
    config = DemoConfig()
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    start = time.perf_counter()
    prepared = prepare(config)
    results: dict[str, list[dict[str, float]]] = {}
    bar = tqdm(total=len(args.rows) * len(args.seeds), desc="ablation runs")
    for name in args.rows:
        for seed in args.seeds if ROWS[name] is not None else args.seeds[:1]:
            row = run_row(prepared, config, name, seed)
            results.setdefault(name, []).append(row)
            # One line per finished run, so an interrupted table keeps what it measured.
            with args.output.with_suffix(".runs.jsonl").open("a") as f:
                f.write(json.dumps({"row": name, "seed": seed, **row}) + "\n")
            bar.write(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
            bar.update(1 if ROWS[name] is not None else len(args.seeds))
    bar.close()
    table = {
        name: {k: mean_std([r[k] for r in runs]) if len(runs) > 1 else runs[0][k] for k in COLUMNS}
        for name, runs in results.items()
    }
    text = format_table(table, COLUMNS)
    minutes = (time.perf_counter() - start) / 60
    args.output.write_text(json.dumps({"config": dataclasses.asdict(config), "seeds": args.seeds, "minutes": minutes,
                                       "runs": results}, indent=2, default=str))
    args.output.with_suffix(".md").write_text(text + f"\n\n{len(args.seeds)} seeds, {minutes:.1f} minutes.\n")
    print(text)
    print(f"{minutes:.1f} minutes")


if __name__ == "__main__":
    main()
