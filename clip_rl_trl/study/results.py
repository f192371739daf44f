"""``study results``: what the answers say, per system, with intervals and tests; a markdown report and a plot.

- accuracy per system on the discrimination trials, with a 95% Wilson interval (:func:`.stats.wilson_interval`);
- paired accuracy differences between systems: the exact McNemar test, i.e. the sign test on the (annotator,
  image) pairs where exactly one of the two systems' captions was answered right (:func:`.stats.binomial_test`);
- pairwise trials: each pair's win rate (Wilson interval) and the exact two-sided sign test of "no preference";
- agreement between annotators: Fleiss' kappa over the trials answered by two or more people, and the mean of
  pairwise Cohen's kappas over the annotators' shared trials (Light 1971), per trial kind;
- where the study recorded CLIP's choices: how often an annotator's answer coincides with CLIP's, and CLIP's
  own accuracy on the answered trials; where it recorded the exact oracle (shapes world): the oracle@1 of the
  answered trials;
- fluency: mean rating per system with a normal-approximation interval.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clip_rl_trl.study.design import Study
from clip_rl_trl.study.simulate import oracle_score
from clip_rl_trl.study.stats import (
    binomial_test,
    category_counts,
    cohen_kappa,
    fleiss_kappa,
    mean_interval,
    wilson_interval,
)

__all__ = ["escape_markdown", "format_results", "plot_results", "study_results"]


def _proportion(successes: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, n)
    return {"n": n, "successes": successes, "rate": successes / n if n else math.nan, "low": low, "high": high}


def study_results(study: Study, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every statistic of the module docstring, as a JSON-ready dict (``nan`` where undefined)."""
    trial = study.by_id
    annotators: dict[str, int] = defaultdict(int)
    for r in records:
        annotators[r["annotator"]] += 1
    disc = [r for r in records if trial[r["trial"]]["kind"] == "discrimination"]
    systems: dict[str, Any] = {}
    for name in study.systems:
        mine = [r for r in disc if trial[r["trial"]]["system"] == name]
        row: dict[str, Any] = {"accuracy": _proportion(sum(_correct(trial[r["trial"]], r) for r in mine), len(mine))}
        with_clip = [r for r in mine if "clip_choice" in trial[r["trial"]]]
        if with_clip:
            row["clip_agreement"] = _proportion(
                sum(r["choice"] == trial[r["trial"]]["clip_choice"] for r in with_clip), len(with_clip))
            row["clip_accuracy"] = sum(trial[r["trial"]]["clip_choice"] == trial[r["trial"]]["target"]
                                       for r in with_clip) / len(with_clip)
        if mine and study.settings.get("oracle"):
            row["oracle_accuracy"] = sum(oracle_score(trial[r["trial"]]) for r in mine) / len(mine)
        ratings = [r["choice"] for r in records
                   if trial[r["trial"]]["kind"] == "fluency" and trial[r["trial"]]["system"] == name]
        if ratings:
            mean, low, high = mean_interval(ratings)
            row["fluency"] = {"n": len(ratings), "mean": mean, "low": low, "high": high}
        systems[name] = row
    ks = sorted({len(t["candidates"]) for t in study.trials if t["kind"] == "discrimination"})
    return {
        "study": study.study_id,
        "answers": len(records),
        "annotators": dict(sorted(annotators.items())),
        "chance": 1 / ks[0] if len(ks) == 1 else None,
        "systems": systems,
        "accuracy_differences": _accuracy_differences(study, disc),
        "pairwise": _pairwise(study, records),
        "agreement": {kind: _agreement(study, records, kind) for kind in ("discrimination", "pairwise")
                      if any(t["kind"] == kind for t in study.trials)},
        "clip_pairwise_agreement": _clip_pairwise(study, records),
    }


def _correct(trial: dict[str, Any], record: dict[str, Any]) -> bool:
    return record["choice"] == trial["target"]


def _accuracy_differences(study: Study, disc: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact McNemar test (McNemar 1947; exact form: the sign test on the discordant pairs) for each pair of
    systems, over the (annotator, image) pairs that answered both systems' captions of the image."""
    right: dict[tuple[str, str, str], bool] = {}
    for r in disc:
        t = study.by_id[r["trial"]]
        right[(r["annotator"], t["image_id"], t["system"])] = _correct(t, r)
    out = []
    for a, b in itertools.combinations(study.systems, 2):
        only_a = only_b = pairs = 0
        for (annotator, image_id, system), hit in right.items():
            if system != a or (annotator, image_id, b) not in right:
                continue
            pairs += 1
            other = right[(annotator, image_id, b)]
            only_a += hit and not other
            only_b += other and not hit
        out.append({"a": a, "b": b, "pairs": pairs, "only_a_right": only_a, "only_b_right": only_b,
                    "p_value": binomial_test(only_a, only_a + only_b)})
    return out


def _pairwise(study: Study, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Win rate of ``a`` over ``b`` on the pairwise trials (Wilson interval) and the exact sign test."""
    wins: dict[tuple[str, str], list[int]] = {}
    order = {name: n for n, name in enumerate(study.systems)}
    for r in records:
        t = study.by_id[r["trial"]]
        if t["kind"] != "pairwise":
            continue
        a, b = sorted(t["systems"], key=order.__getitem__)
        tally = wins.setdefault((a, b), [0, 0])
        tally[0 if t["systems"][r["choice"]] == a else 1] += 1
    out = []
    for (a, b), (wa, wb) in sorted(wins.items(), key=lambda item: (order[item[0][0]], order[item[0][1]])):
        out.append({"a": a, "b": b, "a_wins": wa, "b_wins": wb, "win_rate_a": _proportion(wa, wa + wb),
                    "p_value": binomial_test(wa, wa + wb)})
    return out


def _agreement(study: Study, records: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Fleiss' kappa over the ``kind`` trials with two or more answers, and the mean pairwise Cohen's kappa."""
    by_trial: dict[str, dict[str, int]] = defaultdict(dict)
    for r in records:
        if study.by_id[r["trial"]]["kind"] == kind:
            by_trial[r["trial"]][r["annotator"]] = r["choice"]
    raters = sorted({a for answers in by_trial.values() for a in answers})
    if len(raters) < 2:
        return {"annotators": len(raters), "note": "agreement needs at least two annotators"}
    categories = max(len(study.choice_range(study.by_id[t])) for t in by_trial)
    counts = category_counts({t: list(a.values()) for t, a in by_trial.items()}, categories)
    result: dict[str, Any] = {"annotators": len(raters), "shared_trials": len(counts)}
    if not counts:
        result["note"] = "no trial was answered by two annotators"
        return result
    result["fleiss_kappa"] = fleiss_kappa(counts)
    kappas = []
    for x, y in itertools.combinations(raters, 2):
        shared = [t for t, answers in by_trial.items() if x in answers and y in answers]
        if shared:
            kappas.append(cohen_kappa([by_trial[t][x] for t in shared], [by_trial[t][y] for t in shared]))
    defined = [k for k in kappas if not math.isnan(k)]
    result["mean_cohen_kappa"] = sum(defined) / len(defined) if defined else math.nan
    result["annotator_pairs"] = len(kappas)
    return result


def _clip_pairwise(study: Study, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How often a pairwise answer picks the caption CLIP scores higher for the image."""
    mine = [r for r in records if study.by_id[r["trial"]]["kind"] == "pairwise"
            and "clip_choice" in study.by_id[r["trial"]]]
    if not mine:
        return None
    return _proportion(sum(r["choice"] == study.by_id[r["trial"]]["clip_choice"] for r in mine), len(mine))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "n/a (no answers)"
    return f"{p['rate']:.3f} [{p['low']:.3f}, {p['high']:.3f}] ({p['successes']}/{p['n']})"


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|~])")


def escape_markdown(text: str) -> str:
    """Annotator text made inert in markdown and HTML: entities for ``<>&"'``, backslashes before markdown's
    punctuation (a name like ``[x](javascript:...)`` or ``a|b`` stays a plain cell)."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=True))


def format_results(results: dict[str, Any]) -> str:
    """The results as a markdown report: tables and one line per test, each stating its method."""
    lines = [f"# Study {results['study']}: results", "",
             f"{results['answers']} answers from {len(results['annotators'])} annotator(s).", ""]
    systems = results["systems"]
    has_clip = any("clip_accuracy" in row for row in systems.values())
    has_oracle = any("oracle_accuracy" in row for row in systems.values())
    has_fluency = any("fluency" in row for row in systems.values())
    header = ["system", "human accuracy [95% Wilson]"]
    header += ["exact oracle@1"] * has_oracle + ["CLIP accuracy", "CLIP = human [95% Wilson]"] * has_clip
    header += ["fluency (1-5) [95%]"] * has_fluency
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in systems.items():
        cells = [escape_markdown(name), _interval(row["accuracy"])]
        if has_oracle:
            cells.append(_fmt(row.get("oracle_accuracy")))
        if has_clip:
            cells += [_fmt(row.get("clip_accuracy")),
                      _interval(row["clip_agreement"]) if "clip_agreement" in row else "n/a"]
        if has_fluency:
            f = row.get("fluency")
            cells.append(f"{f['mean']:.2f} [{f['low']:.2f}, {f['high']:.2f}] (n={f['n']})" if f else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if results["chance"] is not None:
        lines += ["", f"Chance accuracy: {results['chance']:.3f} (one of k candidates)."]
    if has_oracle:
        lines += ["", "Exact oracle@1: a perfect reader of the shapes grammar on the same trials (a tie among t + 1 "
                  "fitting candidates scores 1/(t + 1); a caption false of its image scores 0, where a person can "
                  "still guess right)."]
    if has_clip:
        lines += ["", "CLIP accuracy: CLIP's own choice on the answered trials; CLIP = human: the share of "
                  "answers that pick the image CLIP picks."]
    if results["accuracy_differences"]:
        lines += ["", "Paired accuracy differences (exact McNemar test: two-sided sign test on the (annotator, "
                  "image) pairs where only one system's caption was answered right):", ""]
        for d in results["accuracy_differences"]:
            lines.append(f"- {escape_markdown(d['a'])} vs {escape_markdown(d['b'])}: only {escape_markdown(d['a'])} "
                         f"right {d['only_a_right']}, only {escape_markdown(d['b'])} right {d['only_b_right']} "
                         f"of {d['pairs']} pairs, p = {_fmt(d['p_value'], 4)}")
    if results["pairwise"]:
        lines += ["", "Pairwise preferences (win rate with 95% Wilson interval; exact two-sided sign test of no "
                  "preference):", "", "| a | b | a wins | b wins | a's win rate [95%] | p |", "|---|---|---|---|---|---|"]
        for p in results["pairwise"]:
            lines.append(f"| {escape_markdown(p['a'])} | {escape_markdown(p['b'])} | {p['a_wins']} | {p['b_wins']} | "
                         f"{_interval(p['win_rate_a'])} | {_fmt(p['p_value'], 4)} |")
    if results.get("clip_pairwise_agreement"):
        lines += ["", f"Pairwise answers that pick the caption CLIP scores higher: "
                  f"{_interval(results['clip_pairwise_agreement'])}."]
    lines += ["", "Agreement between annotators (Fleiss' kappa over the trials with two or more answers; mean "
              "pairwise Cohen's kappa over shared trials):", ""]
    for kind, a in results["agreement"].items():
        if "note" in a:
            lines.append(f"- {kind}: {a['note']} ({a['annotators']} annotator(s))")
        else:
            lines.append(f"- {kind}: Fleiss' kappa {_fmt(a['fleiss_kappa'])} over {a['shared_trials']} trials, "
                         f"mean Cohen's kappa {_fmt(a['mean_cohen_kappa'])} over {a['annotator_pairs']} pairs")
    lines += ["", "| annotator | answers |", "|---|---|"]
    lines += [f"| {escape_markdown(name)} | {n} |" for name, n in results["annotators"].items()]
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Human accuracy per system with its 95% Wilson interval as error bars; the exact oracle and CLIP's
    accuracy on the same trials as markers where known; chance as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["systems"])
    rows = [results["systems"][n] for n in names]
    x = list(range(len(names)))
    rate = [r["accuracy"]["rate"] if r["accuracy"]["n"] else math.nan for r in rows]
    low = [max(0.0, v - r["accuracy"]["low"]) if r["accuracy"]["n"] else 0.0 for v, r in zip(rate, rows, strict=True)]
    high = [max(0.0, r["accuracy"]["high"] - v) if r["accuracy"]["n"] else 0.0 for v, r in zip(rate, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 3.4), 3.6))
    ax.bar(x, rate, width=0.55, yerr=[low, high], capsize=6, color="#4c72b0", alpha=0.85, label="humans (95% Wilson)")
    for key, marker, colour, label in (("oracle_accuracy", "D", "#2ca02c", "exact oracle"),
                                       ("clip_accuracy", "o", "#dd8452", "CLIP")):
        values = [r.get(key, math.nan) for r in rows]
        if any(not math.isnan(v) for v in values):
            ax.scatter(x, values, marker=marker, color=colour, zorder=3, label=label)
    if results["chance"] is not None:
        ax.axhline(results["chance"], color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (target picked)")
    ax.set_title("Human discrimination accuracy per system")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
