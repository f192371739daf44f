"""Long-training study: does regularised RL stay fluent, faithful and distinctive? Curves over 200+ steps.

Every recipe is the packaged ``shapes_demo`` recipe (``clip_rl_trl/recipes/shapes_demo.yaml``: the MLE-trained
tiny ClipCap of ``clip-rl-trl demo``, its batch of 128 sampled captions per step, learning rate and baseline) with
some fields overridden, as ``clip-rl-trl train --config shapes_demo --field value ...`` would; each is trained by
``pipeline.build_trainer`` and evaluated every ``--eval-every`` steps with greedy captions of two held-out splits
of the shapes world:

- ``val`` (200 scenes, the recipe's evaluation split): where checkpoints and settings are selected;
- ``test`` (200 scenes, the demo's): what is reported.

The trainer's own periodic evaluation, checkpointing and best-model loading are switched off (``STUDY``): the
curve callback evaluates instead, and the last step is the result.

Metrics per evaluation (``evaluate_captions``' names): ``p_at_1_100``, ``recall_at_1``, ``grammar_valid``,
``attribute_precision``, ``attribute_recall``, ``distinct_2``, plus ``mean_length`` (words), ``cider_d``
(CIDEr-D against the split's references, document frequencies from that split, as pycocoevalcap does) and
``cider_btw`` (Wang et al.'s CIDErBtw: CIDEr-D against the references of each scene's 5 most similar scenes by
image cosine, the groups the oracle's ``oracle_p_at_1_similar`` uses; same document frequencies; lower is more
distinctive). The exact oracle's ``oracle_p_at_1_100`` (on CLIP's own P@1 trials), ``oracle_recall_at_1`` and
``oracle_p_at_1_similar`` are recorded since issue 14; earlier records have none, and the report says so.

Rows (Chaffin et al.'s weights 0.94 / 0.06; Cho et al.'s CLIP-S + 2 grammar; Zhang et al.'s 0.1 CIDEr-D + 10
GEG over K = 5 Eq. 2 groups of *training* scenes; DiscriTune's retrieval reward with running-mean baseline and
greedy training decoding). ``GT`` is Chaffin et al.'s ground-truth term with the weighting in brackets; rows
marked ``sweep`` run the first seed only. The seed of a run is the RL seed (sampling, the discriminator's and the
grammar head's initialisation); the world, the judge and the MLE captioner are shared, prepared once per process.

Each evaluation is appended to ``--output`` (JSON lines) as soon as it is made: ``{"recipe", "seed", "step",
"run", <test metrics>, "val": {<val metrics>}, "seconds"}``. A rerun skips every (recipe, seed) whose last step
is recorded and restarts the others (records of an unfinished attempt are ignored by the report), so the study
can be run in parts and in parallel (``--shard 0/2`` and ``--shard 1/2`` in two processes, one torch thread
each)::

    python benchmarks/long_training.py run --seeds 0 1 2 --shard 0/2
    python benchmarks/long_training.py report      # figures + table from the JSON lines

``report`` writes ``long_training.md`` next to the output (steps to degeneration, best val-selected and final P@1
at grammar >= 0.95, final oracle P@1 ("not recorded" for runs that predate it), per recipe, and a table of the last
step's judges for the runs that recorded the oracle), ``long_training_curves.png`` and ``long_training_tradeoff.png``
into ``--figures`` (default ``docs/img``), and ``benchmarks/long_training_oracle.png`` (CLIP vs oracle P@1 over
training) when some run recorded the oracle.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = Path(__file__).with_name("long_training.jsonl")
METRICS = ("p_at_1_100", "recall_at_1", "grammar_valid", "attribute_precision", "attribute_recall", "distinct_2",
           # the exact oracle (evaluation/oracle.py) on CLIP's own P@1 trials, against every other scene, and against
           # each scene's 5 most similar scenes (image cosine here: the study's evaluation passes no references)
           "oracle_p_at_1_100", "oracle_recall_at_1", "oracle_p_at_1_similar",
           "unique_share", "vocab_size")
FLUENT = 0.95  # grammar validity a checkpoint needs to be selected ("best fluent checkpoint")
DEGENERATE = 0.9  # grammar validity below which a run counts as degenerated

BASE_RECIPE = "shapes_demo"
# What every run changes in the packaged recipe: the curve callback evaluates (greedy), the trainer neither
# evaluates, saves checkpoints nor reloads the best one (the last step is the result), and trains in float32 on a
# GPU too.
STUDY: dict[str, Any] = {
    "eval_strategy": "no",
    "save_strategy": "no",
    "load_best_model_at_end": False,
    "eval_num_beams": 1,
    "bf16": False,
}


def recipe_args(fields: Mapping[str, Any]) -> list[str]:
    """``{field: value}`` -> ``["--field", "value", ...]``, the command-line overrides of a recipe."""
    argv: list[str] = []
    for key, value in fields.items():
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv += [str(v) for v in value]
        elif isinstance(value, Mapping):
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append(str(value).lower())
        else:
            argv.append(str(value))
    return argv


@dataclasses.dataclass(frozen=True)
class Row:
    rewards: dict[str, float]  # registry name -> weight, in the order the rewards are summed and logged
    overrides: dict[str, Any]  # CaptionRLConfig fields (recorded with every evaluation)
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # reward_kwargs, by reward name
    sweep: bool = False  # one seed only

    def reward_kwargs(self, seed: int) -> dict[str, dict[str, Any]]:
        """The rewards' options for ``seed``: the recipe's bidirectional temperature, the discriminator's lr and
        the grammar head's training seeded by the run's seed, and the row's own options."""
        defaults = {"bidirectional": {"temperature": 0.01}, "discriminator": {"lr": 1e-3, "seed": seed},
                    "grammar": {"seed": seed}}
        return {name: {**defaults.get(name, {}), **self.options.get(name, {})} for name in self.rewards
                if name in defaults or name in self.options}

    def recipe(self, seed: int) -> dict[str, Any]:
        """This row's fields of the recipe for ``seed`` (besides the study's and the run's)."""
        return {"reward_funcs": list(self.rewards), "reward_weights": list(self.rewards.values()),
                "reward_kwargs": self.reward_kwargs(seed), **self.overrides}


CHAFFIN = {"bidirectional": 0.94, "discriminator": 0.06}
# Zhang et al.'s similar-image groups: K = 5 training scenes by their Eq. 2 (through the references).
GEG = {"group_gap": {"k": 5, "similarity": "captions"}}
# Only Chaffin et al.'s rows train on the references: every other row switches the demo's ground-truth term off.
NO_GT = {"gt_loss_weight": 0.0}
SCST = {"baseline": "greedy", "num_generations": 1, **NO_GT}
# The rows that decide the defaults come first, so a partial study already answers the main question.
ROWS: dict[str, Row] = {
    "full": Row(CHAFFIN, {}),
    "bidirectional alone": Row({"bidirectional": 1.0}, NO_GT),
    "bidirectional + discriminator": Row(CHAFFIN, NO_GT),
    "bidirectional + GT (reward)": Row({"bidirectional": 1.0}, {"gt_weighting": "reward"}),
    "CLIP-S": Row({"clip_s": 1.0}, SCST),
    "CLIP-S + grammar": Row({"clip_s": 1.0, "grammar": 2.0}, SCST),
    "GEG-sole": Row({"group_gap": 1.0}, SCST, GEG),
    "GEG + CIDEr": Row({"cider": 0.1, "group_gap": 10.0}, SCST, GEG),
    "SCST-CIDEr": Row({"cider": 1.0}, SCST),
    "DiscriTune": Row({"retrieval": 1.0}, {"baseline": "running_mean", "num_generations": 1,
                                           "train_decoding": "greedy", **NO_GT}),
    "full i2t-only": Row(CHAFFIN, {}, {"bidirectional": {"directions": "i2t"}}),
    "full t2i-only": Row(CHAFFIN, {}, {"bidirectional": {"directions": "t2i"}}),
    "full + KL": Row(CHAFFIN, {"beta": 0.05}),
    **{
        f"bidirectional + GT ({w})": Row({"bidirectional": 1.0}, {"gt_weighting": w}, sweep=True)
        for w in ("signed_reward", "advantage", "positive_advantage", "softmax", "uniform")
    },
}


# ---------------------------------------------------------------------------------------------------- running


def base_args(args: argparse.Namespace) -> list[str]:
    """The recipe every run shares: ``shapes_demo`` with the study's settings and ``--demo``'s changes."""
    return ["--config", BASE_RECIPE, *recipe_args({**STUDY, "max_eval_images": args.n_val, **args.demo})]


class Evaluator:
    """Greedy captions of the val and test scenes (``pipeline.evaluate`` with the study's ``eval_num_beams=1``),
    plus CIDEr-D and caption length."""

    def __init__(self, run: Any) -> None:
        import torch.nn.functional as F

        from clip_rl_trl.evaluation.captioning import GEG_K
        from clip_rl_trl.neighbors import groups_within_split
        from clip_rl_trl.rewards.cider import CiderD

        self.run = run
        # Only the columns the recorded metrics read (the images come from the embedding cache); CIDEr-D is
        # computed here against the split's references, so the evaluation itself needs none.
        self.splits = {name: split.select_columns(["image_id", "scene"])
                       for name, split in (("val", run.eval), ("test", run.test))}
        self.refs = {"val": run.eval["captions"], "test": run.test["captions"]}
        self.cider = {name: CiderD(refs) for name, refs in self.refs.items()}
        # The similar-image groups evaluate_policy builds without references (image cosine), for CIDErBtw.
        self.groups = {name: groups_within_split(F.normalize(run.cache[split["image_id"]].float(), dim=-1), GEG_K,
                                                 similarity="image")
                       for name, split in self.splits.items()}

    def __call__(self, model: Any) -> dict[str, dict[str, float]]:
        from clip_rl_trl.evaluation.distinctiveness import cider_btw
        from clip_rl_trl.pipeline import evaluate

        out = {}
        for name, split in self.splits.items():
            m, captions, _ = evaluate(self.run, model, split, coco_metrics=False)
            metrics = {k: float(m[k]) for k in METRICS if k in m}
            metrics["mean_length"] = sum(len(c.split()) for c in captions) / len(captions)
            metrics["cider_d"] = float(self.cider[name].score(captions, self.refs[name]).mean())
            metrics["cider_btw"] = cider_btw(captions, self.refs[name], self.groups[name], self.cider[name])
            metrics["example"] = captions[0]
            out[name] = metrics
        return out


def done_runs(path: Path, steps: int) -> set[tuple[str, int]]:
    """(recipe, seed) pairs whose step ``steps`` is recorded."""
    return {(r["recipe"], r["seed"]) for r in read_records(path) if r["step"] >= steps}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the finished attempts (the latest attempt per recipe and seed), in file order."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last_step: dict[str, int] = {}
    for r in records:
        last_step[r["run"]] = max(last_step.get(r["run"], -1), r["step"])
    finished: dict[tuple[str, int], str] = {}
    for r in records:  # the latest finished attempt wins
        if last_step[r["run"]] == r["steps"]:
            finished[(r["recipe"], r["seed"])] = r["run"]
    return [r for r in records if finished.get((r["recipe"], r["seed"])) == r["run"]]


def run_recipe(args: argparse.Namespace, name: str, seed: int, output_dir: Path) -> Any:
    """The recipe of row ``name`` at ``seed``: ``shapes_demo`` + the study's settings + the row's overrides."""
    from clip_rl_trl.configs import parse_recipe

    row = ROWS[name]
    run_fields = {"seed": seed, "max_steps": args.steps, "output_dir": str(output_dir)}
    return parse_recipe(base_args(args) + recipe_args({**row.recipe(seed), **run_fields}))


def run_one(base: Any, evaluator: Evaluator, name: str, seed: int, args: argparse.Namespace,
            before: dict[str, dict[str, float]]) -> None:
    from transformers import TrainerCallback

    from clip_rl_trl.pipeline import build_trainer

    row = ROWS[name]
    attempt = uuid.uuid4().hex[:12]
    start = time.perf_counter()
    where = f"{platform.node()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()

    def record(step: int, metrics: dict[str, dict[str, float]]) -> None:
        entry = {"recipe": name, "seed": seed, "step": step, "steps": args.steps, "run": attempt, "demo": args.demo,
                 "overrides": row.overrides,
                 **metrics["test"], "val": metrics["val"], "seconds": round(time.perf_counter() - start, 1),
                 "device": where}
        with args.output.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        t, v = metrics["test"], metrics["val"]
        print(f"{name} seed {seed} step {step}: test P@1 {t['p_at_1_100']:.3f} grammar {t['grammar_valid']:.3f} "
              f"precision {t.get('attribute_precision', float('nan')):.3f} | val P@1 {v['p_at_1_100']:.3f} "
              f"grammar {v['grammar_valid']:.3f} | {t['example']!r} ({entry['seconds']:.0f} s)", flush=True)

    class Curve(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                record(state.global_step, evaluator(kwargs["model"]))

    record(0, before)
    # The run's scratch folder, emptied first: a grammar head saved there by an earlier attempt would be loaded
    # instead of trained with this run's seed.
    output_dir = Path("/tmp/long_training") / f"{name}-{seed}"
    shutil.rmtree(output_dir, ignore_errors=True)
    recipe = run_recipe(args, name, seed, output_dir)
    # Every run trains its own copy of the shared MLE captioner (build_trainer trains run.model in place).
    run = dataclasses.replace(base, recipe=recipe, model=copy.deepcopy(base.model))
    trainer, _ = build_trainer(recipe, progress=False, run=run)
    trainer.add_callback(Curve())
    trainer.train()


def cmd_run(args: argparse.Namespace) -> None:
    from clip_rl_trl.configs import parse_recipe
    from clip_rl_trl.pipeline import prepare

    torch.set_num_threads(args.threads)
    runs = [(name, seed) for name in args.rows for seed in (args.seeds[:1] if ROWS[name].sweep else args.seeds)]
    index, count = (int(x) for x in args.shard.split("/"))
    runs = runs[index::count]
    done = done_runs(args.output, args.steps)
    todo = [run for run in runs if run not in done]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already recorded; {len(todo)} to go", flush=True)
    if not todo:
        return
    # The world, judge, embedding cache and MLE captioner, once per process; the evaluations use the base
    # recipe's seed (P@1's distractors) whatever the run's seed.
    base = prepare(parse_recipe(base_args(args)), progress=False)
    evaluator = Evaluator(base)
    before = evaluator(base.model)
    for name, seed in todo:
        run_one(base, evaluator, name, seed, args, before)


# ---------------------------------------------------------------------------------------------------- report


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe: steps to degeneration, val-selected best fluent P@1, final P@1, each as mean ± sd over seeds."""
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        by_run.setdefault((r["recipe"], r["seed"]), []).append(r)
    table: dict[str, dict[str, Any]] = {}
    for (recipe, seed), rs in sorted(by_run.items(), key=lambda kv: (list(ROWS).index(kv[0][0])
                                                                     if kv[0][0] in ROWS else 99, kv[0][1])):
        rs.sort(key=lambda r: r["step"])
        last = rs[-1]
        degenerate = next((r["step"] for r in rs if r["grammar_valid"] < DEGENERATE), None)
        fluent = [r for r in rs if r["step"] > 0 and r["val"]["grammar_valid"] >= FLUENT]
        best = max(fluent, key=lambda r: (r["val"]["p_at_1_100"], -r["step"])) if fluent else None
        entry = table.setdefault(recipe, {"seeds": [], "degenerate": [], "steps": last["steps"], "best": [],
                                          "best_step": [], "final": [], "final_grammar": [], "final_precision": [],
                                          "final_cider": [], "final_length": [], "lowest_grammar": [],
                                          **{key: [] for key in JUDGE_COLUMNS}})
        entry["seeds"].append(seed)
        entry["degenerate"].append(degenerate)
        entry["best"].append(best["p_at_1_100"] if best else None)
        entry["best_step"].append(best["step"] if best else None)
        entry["final"].append(last["p_at_1_100"])
        entry["final_grammar"].append(last["grammar_valid"])
        entry["final_precision"].append(last.get("attribute_precision"))
        entry["final_cider"].append(last["cider_d"])
        entry["final_length"].append(last["mean_length"])
        for key in JUDGE_COLUMNS:  # None where the record predates the metric (never filled in after the fact)
            entry[key].append(last.get(key))
        entry["lowest_grammar"].append(min(r["grammar_valid"] for r in rs))
    return table


def _fmt(values: list[float | None], digits: int = 3) -> str:
    defined = [v for v in values if v is not None]
    if not defined:
        return "–"
    mean, sd = _mean_sd(defined)
    text = f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(defined) > 1 else "")
    return text + (f" ({len(defined)}/{len(values)})" if len(defined) < len(values) else "")


# The last step's judges: CLIP (p_at_1_100), the exact oracle on the same trials and on two harder candidate
# sets, the literature's n-gram distinctiveness (CIDErBtw, lower is more distinctive) and the unique-caption share.
JUDGE_COLUMNS = ("oracle_p_at_1_100", "oracle_recall_at_1", "oracle_p_at_1_similar", "cider_btw", "unique_share")
NOT_RECORDED = "not recorded"


def _judged(values: list[float | None], digits: int = 3) -> str:
    return NOT_RECORDED if all(v is None for v in values) else _fmt(values, digits)


def judges_markdown(table: dict[str, dict[str, Any]]) -> str:
    """CLIP's P@1 beside the oracle's at the last step, for the recipes whose runs recorded the oracle."""
    lines = [
        "| recipe | seeds | final CLIP P@1 | final oracle P@1 (same trials) | CLIP - oracle | oracle R@1 "
        "(all other scenes) | oracle vs 5 most similar | CIDErBtw (lower: more distinctive) | unique captions |",
        "|---|---:|---|---|---|---|---|---|---|",
    ]
    for recipe, e in table.items():
        if all(v is None for v in e["oracle_p_at_1_100"]):
            continue
        gap = [c - o if o is not None else None for c, o in zip(e["final"], e["oracle_p_at_1_100"], strict=True)]
        lines.append(f"| {recipe} | {len(e['seeds'])} | {_fmt(e['final'])} | {_judged(e['oracle_p_at_1_100'])} | "
                     f"{_judged(gap)} | {_judged(e['oracle_recall_at_1'])} | {_judged(e['oracle_p_at_1_similar'])} | "
                     f"{_judged(e['cider_btw'])} | {_judged(e['unique_share'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(table: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| recipe | seeds | steps to degeneration (grammar < 0.9) | best fluent P@1 (val-selected step) | "
        "final P@1 | final oracle P@1 | final grammar (lowest) | final attribute precision | final CIDEr-D | "
        "final length |",
        "|---|---:|---|---|---|---|---|---|---|---|",
    ]
    for recipe, e in table.items():
        degen = ", ".join(str(d) if d is not None else f"> {e['steps']}" for d in e["degenerate"])
        steps = ", ".join(str(s) if s is not None else "–" for s in e["best_step"])
        lines.append(f"| {recipe} | {len(e['seeds'])} | {degen} | {_fmt(e['best'])} (steps {steps}) | "
                     f"{_fmt(e['final'])} | {_judged(e['oracle_p_at_1_100'])} | "
                     f"{_fmt(e['final_grammar'])} ({min(e['lowest_grammar']):.3f}) | "
                     f"{_fmt(e['final_precision'])} | {_fmt(e['final_cider'])} | {_fmt(e['final_length'], 1)} |")
    return "\n".join(lines)


def plots(records: list[dict[str, Any]], output: Path, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [name for name in ROWS if any(r["recipe"] == name for r in records)]
    keys = (("p_at_1_100", "P@1 among 100"), ("grammar_valid", "grammar validity"),
            ("attribute_precision", "attribute precision"))
    cols = 4
    rows_ = math.ceil(len(recipes) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False, sharey=True)
    for ax, recipe in zip(axes.flat, recipes, strict=False):
        rs = [r for r in records if r["recipe"] == recipe]
        for (key, label), colour in zip(keys, ("C0", "C2", "C3"), strict=True):
            steps = sorted({r["step"] for r in rs})
            values = [[r[key] for r in rs if r["step"] == s and key in r] for s in steps]
            mean = [sum(v) / len(v) for v in values]
            low = [min(v) for v in values]
            high = [max(v) for v in values]
            ax.plot(steps, mean, color=colour, label=label)
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
        seeds = len({r["seed"] for r in rs})
        ax.set_title(f"{recipe} ({seeds} seed{'s' if seeds > 1 else ''})", fontsize=9)
        ax.axhline(DEGENERATE, color="gray", lw=0.5, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("RL step")
    for ax in list(axes.flat)[len(recipes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Held-out test scenes, greedy captions: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the suptitle its own row
    folder.mkdir(parents=True, exist_ok=True)
    curves = folder / f"{output.stem}_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, recipe in enumerate(recipes):
        rs = [r for r in records if r["recipe"] == recipe]
        steps = sorted({r["step"] for r in rs})
        x = [sum(r["grammar_valid"] for r in rs if r["step"] == s) / sum(r["step"] == s for r in rs) for s in steps]
        y = [sum(r["p_at_1_100"] for r in rs if r["step"] == s) / sum(r["step"] == s for r in rs) for s in steps]
        colour = f"C{i % 10}"
        ls = "-" if i < 10 else "--"
        ax.plot(x, y, ls, color=colour, marker=".", ms=3, lw=1, label=recipe)
        ax.plot(x[-1], y[-1], "o", color=colour, ms=6)
    ax.set_xlabel("grammar validity (test)")
    ax.set_ylabel("P@1 among 100 (test)")
    ax.set_title("Trade-off over training (mean over seeds; dot = last step)", fontsize=10)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    tradeoff = folder / f"{output.stem}_tradeoff.png"
    fig.savefig(tradeoff, dpi=110)
    plt.close(fig)
    return [curves, tradeoff]


def oracle_plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """CLIP's P@1 and the exact oracle's on the same trials over training, one panel per recipe that recorded the
    oracle (mean over seeds, band = min..max); None when no record has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [name for name in ROWS if any(r["recipe"] == name and "oracle_p_at_1_100" in r for r in records)]
    if not recipes:
        return None
    cols = min(4, len(recipes))
    rows_ = math.ceil(len(recipes) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.3 * rows_), squeeze=False, sharey=True)
    keys = (("p_at_1_100", "CLIP P@1/100", "C0"), ("oracle_p_at_1_100", "oracle P@1/100 (same trials)", "C3"),
            ("grammar_valid", "grammar validity", "C2"))
    for ax, recipe in zip(axes.flat, recipes, strict=False):
        rs = [r for r in records if r["recipe"] == recipe and "oracle_p_at_1_100" in r]
        steps = sorted({r["step"] for r in rs})
        for key, label, colour in keys:
            values = [[r[key] for r in rs if r["step"] == s] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], color=colour, label=label,
                    ls=":" if key == "grammar_valid" else "-")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
        seeds = len({r["seed"] for r in rs})
        ax.set_title(f"{recipe} ({seeds} seed{'s' if seeds > 1 else ''})", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("RL step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(recipes):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("held-out test scenes")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("CLIP vs the exact oracle (test scenes, greedy): mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args: argparse.Namespace) -> None:
    records = read_records(args.output)
    if not records:
        raise SystemExit(f"{args.output} holds no finished run")
    table = summarise(records)
    text = markdown(table)
    judges = judges_markdown(table)
    if judges:
        text += ("\n\nThe last step's judges, for the runs that recorded the exact oracle (issue 14): CLIP's P@1 "
                 "and the oracle's on the same 99 distractors, the oracle against every other scene and against each "
                 "scene's 5 most similar (image cosine), CIDErBtw against those 5 scenes' references, and the share "
                 "of distinct captions.\n\n" + judges)
    devices = sorted({r.get("device", "?") for r in records})
    text += f"\n\nFrom {args.output.name}; measured on: {', '.join(devices)}.\n"
    args.output.with_suffix(".md").write_text(text)
    files = plots(records, args.output, args.figures)
    oracle = oracle_plot(records, args.oracle_figure)
    if oracle is not None:
        files.append(oracle)
    print(text)
    print("wrote", args.output.with_suffix(".md"), *files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate the recipes, appending to --output")
    run.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--eval-every", type=int, default=20)
    run.add_argument("--n-val", type=int, default=200, help="validation scenes (>= 100 for P@1 among 100)")
    run.add_argument("--shard", default="0/1", help="K/N: run every N-th of the runs, starting at the K-th")
    run.add_argument("--threads", type=int, default=1, help="torch threads (one per process on a shared CPU)")
    run.add_argument("--demo", type=json.loads, default={},
                     help=f'JSON of {BASE_RECIPE} recipe fields to change for every run, e.g. '
                     '\'{"clip_hard_negatives": false}\'')
    run.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="table and figures from --output")
    report.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    report.add_argument("--figures", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img",
                        help="folder of the two PNGs (default: docs/img, where docs/benchmarks.md shows them)")
    report.add_argument("--oracle-figure", type=Path, default=Path(__file__).with_name("long_training_oracle.png"),
                        help="CLIP vs the exact oracle over training, written when some record holds the oracle")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
