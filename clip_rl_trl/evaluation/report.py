"""The report of a run: ``report.json``, ``captions.jsonl``, ``training.png``, ``judges.png``, ``captions.png`` and
``report.md``.

``write_report`` checks everything, then writes the files; the tables come from
:mod:`clip_rl_trl.evaluation.tables` and the figures from :mod:`clip_rl_trl.evaluation.plots`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_rl_trl.evaluation.plots import (
    TRAINING_KEYS,
    caption_grid,
    check_grid,
    draw_training,
    logged_training_keys,
    oracle_candidates,
    plot_judges,
    training_curves,
)
from clip_rl_trl.evaluation.tables import HEADLINE_METRICS, format_table, markdown_table, md_escape
from clip_rl_trl.evaluation.tables import is_number as _is_number

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["write_report"]

_SAMPLE_PAIRS = 8
_GRID_COLUMNS = 4


def _split_metrics(metrics: Mapping[str, Any], side: str) -> tuple[dict[str, float | int], dict[str, Any]]:
    """The numeric metrics of ``metrics`` and its ``"skipped"`` dict; NaN or a non-number is an error."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{side} must be a mapping of metrics, got {type(metrics).__name__}")
    numbers: dict[str, float | int] = {}
    skipped: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "skipped":
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"{side}['skipped'] is {type(value).__name__}, expected a dict metric -> reason"
                )
            skipped = {str(k): str(v) for k, v in value.items()}
        elif _is_number(value):
            if not math.isfinite(value):
                raise ValueError(f"{side}[{key!r}] is {value}: refusing to write a non-finite metric")
            numbers[str(key)] = int(value) if isinstance(value, Integral) else float(value)
        else:
            raise TypeError(f"{side}[{key!r}] is {type(value).__name__} ({value!r}), expected a number")
    return numbers, skipped


def _json_line(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{what} cannot be written as JSON: {err}") from err


def write_report(
    output_dir: str | os.PathLike[str],
    *,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    captions: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]] | None = None,
    images: Sequence[Image.Image] | None = None,
    title: str = "clip-rl-trl report",
    extra: Mapping[str, Any] | None = None,
    grid_size: int = 16,
) -> dict[str, Path]:
    """Write the report of a before/after comparison (e.g. an MLE captioner and its RL fine-tune).

    Files written into ``output_dir`` (created):

    - ``report.json``: ``{"before": {...}, "after": {...}, "skipped": {"before": {...}, "after": {...}},
      **extra}``: the numeric metrics of each side, and the ``"skipped"`` dicts of ``evaluate_captions``
      (metric -> reason) under ``"skipped"`` (absent when neither side has one).
    - ``captions.jsonl``: one JSON line per record of ``captions``, as given.
    - ``training.png``: the curves of ``TRAINING_KEYS`` (``"reward"``, ``"eval/<headline metric>"``) that
      ``history`` holds (:func:`~clip_rl_trl.evaluation.plots.plot_training`); only when ``history`` is given.
    - ``judges.png``: CLIP's P@1 beside the exact oracle's on the same trials
      (:func:`~clip_rl_trl.evaluation.plots.plot_judges`), before / after and, when ``history`` logged both
      (``eval/p_at_1_<n>``, ``eval/oracle_p_at_1_<n>``), over training; only when both sides hold
      ``p_at_1_<n>`` and ``oracle_p_at_1_<n>`` (the shapes world).
    - ``captions.png``: the first ``grid_size`` images with their before / after captions
      (:func:`~clip_rl_trl.evaluation.plots.caption_grid`); only when ``images`` is given.
    - ``report.md``: the title, the before / after / change table (``HEADLINE_METRICS`` first, then the other
      metrics), the metrics that were not measured and why, CLIP's and the oracle's P@1 side by side with their
      gap, the plots, the first 8 caption pairs, and
      ``extra`` as a key: value list.

    Everything is checked before the first file is written, so a bad input leaves no half-written report.

    Args:
        output_dir: the folder of the report.
        before, after: metric dicts as returned by ``evaluate_captions``.
        captions: one record per image, each a mapping with at least ``image_id``, ``before`` and ``after``.
        history: ``trainer.state.log_history`` of the run.
        images: the images of the first ``len(images)`` records of ``captions``, in the same order.
        title: the report's title.
        extra: more JSON-serialisable facts (configuration, timings, seeds), added to ``report.json`` and
            listed in ``report.md``; its keys must not be ``before``, ``after`` or ``skipped``.
        grid_size: how many images the caption grid shows.

    Returns:
        ``{"json", "captions", "markdown", "training_plot", "judges_plot", "grid"}`` -> path, for the files
        written.

    Raises:
        ValueError: a metric is NaN or infinite (named), a caption record lacks ``image_id`` / ``before`` /
            ``after``, more images than caption records, ``history`` without the training curves, an ``extra``
            key that clashes, or ``grid_size`` below 1.
        TypeError: a metric is not a number, or a record or an ``extra`` value is not JSON-serialisable.
    """
    before_num, before_skipped = _split_metrics(before, "before")
    after_num, after_skipped = _split_metrics(after, "after")
    extra = dict(extra or {})
    clash = sorted({"before", "after", "skipped"} & set(extra))
    if clash:
        raise ValueError(f"extra must not use the report's own keys {clash}")
    extra_json = {str(k): json.loads(_json_line(v, f"extra[{k!r}]")) for k, v in extra.items()}

    if isinstance(captions, Mapping) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of records (dicts), got {type(captions).__name__}")
    lines = []
    for i, record in enumerate(captions):
        if not isinstance(record, Mapping):
            raise TypeError(f"captions[{i}] is {type(record).__name__}, expected a dict")
        missing = [k for k in ("image_id", "before", "after") if k not in record]
        if missing:
            raise ValueError(f"captions[{i}] has no {missing}; its keys are {list(record)}")
        for side in ("before", "after"):
            if not isinstance(record[side], str):
                raise TypeError(f"captions[{i}][{side!r}] is {type(record[side]).__name__}, expected str")
        lines.append(_json_line(dict(record), f"captions[{i}]"))

    curves = None
    if history is not None:
        if isinstance(history, Mapping) or not isinstance(history, Sequence):
            raise TypeError(f"history must be a list of dicts (log_history), got {type(history).__name__}")
        plot_keys = logged_training_keys(history)
        if not plot_keys:
            logged = {k for entry in history if isinstance(entry, Mapping) for k in entry}
            raise ValueError(
                f"history has none of the training curves {list(TRAINING_KEYS)}; its keys are {sorted(logged)}"
            )
        curves = training_curves(history, plot_keys)
    # CLIP's P@1 beside the exact oracle's (shapes world): the n both sides measured, and whether the history has it.
    both = [n for n in oracle_candidates(before_num) if n in oracle_candidates(after_num)]
    judges = None
    if both:
        logged = {k for entry in history or () if isinstance(entry, Mapping) for k in entry}
        judges = (both[0], history if both[0] in oracle_candidates(dict.fromkeys(logged), "eval/") else None)
    grid_captions = None
    if images is not None:
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
        if not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
        if len(images) > len(captions):
            raise ValueError(
                f"got {len(images)} images but {len(captions)} caption records: images[i] is the image of "
                "captions[i]"
            )
        images = list(images[:grid_size])
        records = captions[: len(images)]
        grid_captions = {side: [r[side] for r in records] for side in ("before", "after")}
        check_grid(images, grid_captions, _GRID_COLUMNS, 4)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every file is written into a scratch folder, then renamed into place, report.json last: a crash (or a full
    # disk) never leaves a half-written report under its final name, nor a report.json without its companions.
    scratch = out / f".report-{os.getpid()}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        written = _write_files(scratch, report_json(before_num, after_num, before_skipped, after_skipped,
                                                    extra_json), lines, curves, images, grid_captions, title,
                               captions, extra_json, judges)
        for key in sorted(written, key=lambda k: k == "json"):
            os.replace(written[key], out / written[key].name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {key: out / written[key].name
            for key in ("json", "captions", "markdown", "training_plot", "judges_plot", "grid") if key in written}


def report_json(before_num: dict, after_num: dict, before_skipped: dict, after_skipped: dict,
                extra_json: dict) -> dict[str, Any]:
    """The content of report.json."""
    report: dict[str, Any] = {"before": before_num, "after": after_num}
    if before_skipped or after_skipped:
        report["skipped"] = {"before": before_skipped, "after": after_skipped}
    report.update(extra_json)
    return report


def _write_files(out: Path, report: dict[str, Any], lines: list[str], curves: Any, images: Any,
                 grid_captions: Any, title: str, captions: Sequence[Mapping[str, Any]],
                 extra_json: Mapping[str, Any], judges: tuple[int, Any] | None = None) -> dict[str, Path]:
    before_num, after_num = report["before"], report["after"]
    before_skipped = report.get("skipped", {}).get("before", {})
    after_skipped = report.get("skipped", {}).get("after", {})
    paths: dict[str, Path] = {}
    paths["json"] = out / "report.json"
    paths["json"].write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", "utf-8"
    )

    paths["captions"] = out / "captions.jsonl"
    paths["captions"].write_text("".join(line + "\n" for line in lines), "utf-8")

    if curves is not None:
        paths["training_plot"] = draw_training(curves, out / "training.png", title)
    if judges is not None:
        paths["judges_plot"] = plot_judges(out / "judges.png", before=before_num, after=after_num,
                                           history=judges[1], candidates=judges[0], title=title)
    if images is not None and grid_captions is not None:
        paths["grid"] = caption_grid(
            images, grid_captions, out / "captions.png", ncols=_GRID_COLUMNS, title=title
        )

    # The table: the headline metrics first, then everything else either side measured.
    union = list(dict.fromkeys([*before_num, *after_num]))
    columns = [c for c in HEADLINE_METRICS if c in union] + [c for c in union if c not in HEADLINE_METRICS]
    change = {c: after_num[c] - before_num[c] for c in columns if c in before_num and c in after_num}
    md = [f"# {title}", ""]
    if columns:
        md += [format_table({"before": before_num, "after": after_num, "change": change}, columns), ""]
        md += ["`change` is after minus before.", ""]
    else:
        md += ["No numeric metrics were given.", ""]
    not_measured = list(dict.fromkeys([*before_skipped, *after_skipped]))
    if not_measured:
        md += ["Not measured:", ""]
        for key in not_measured:
            sides = [
                side for side, skip in (("before", before_skipped), ("after", after_skipped)) if key in skip
            ]
            reasons = list(
                dict.fromkeys(skip[key] for skip in (before_skipped, after_skipped) if key in skip)
            )
            md.append(f"- `{key}` ({', '.join(sides)}): {md_escape('; '.join(reasons))}")
        md.append("")
    if judges is not None:
        n = judges[0]
        clip_key, oracle_key = f"p_at_1_{n}", f"oracle_p_at_1_{n}"
        rows = {side: {f"CLIP P@1/{n}": m[clip_key], f"oracle P@1/{n}": m[oracle_key],
                       "CLIP - oracle": m[clip_key] - m[oracle_key]}
                for side, m in (("before", before_num), ("after", after_num))}
        md += ["## CLIP vs the exact oracle", "",
               f"The same {n}-candidate trials judged by CLIP (the reward's judge) and by the exact oracle (a caption "
               "counts when everything it says is true of its scene and of no distractor; `evaluation/oracle.py`). "
               "The gap is what CLIP believes and is not true.", "",
               format_table(rows), "", "![CLIP vs the exact oracle](judges.png)", ""]
    if "training_plot" in paths:
        md += ["## Training", "", "![training curves](training.png)", ""]
    if "grid" in paths:
        md += ["## Captions", "", "![captions before and after](captions.png)", ""]
    if captions:
        md += [f"## Sample captions (first {min(_SAMPLE_PAIRS, len(captions))} of {len(captions)})", ""]
        samples = [(str(r["image_id"]), r["before"], r["after"]) for r in captions[:_SAMPLE_PAIRS]]
        md.append(markdown_table(["image", "before", "after"], samples))
        md += ["", "All captions: [captions.jsonl](captions.jsonl).", ""]
    if extra_json:
        md += ["## Details", ""]
        for key, value in extra_json.items():
            shown_value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            md.append(f"- {key}: {md_escape(shown_value)}")
        md.append("")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md), "utf-8")
    return paths
