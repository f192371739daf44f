"""Metric tables: the headline metrics, ``mean ± std`` cells, and tables rendered by ``tabulate``.

Our code decides what a cell says (``format_table``'s cell formatting: floats with ``floatfmt``, counts without
decimals, ``(mean, std)`` tuples as ``"0.512 ± 0.031"``, ``"–"`` for a missing value) and escapes it for
Markdown; ``tabulate`` only lays the strings out (``disable_numparse=True``, so it never re-reads a formatted
cell as a number).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

__all__ = [
    "HEADLINE_METRICS",
    "format_table",
    "headline_table",
    "markdown_table",
    "mean_std",
]

# The headline metrics: the ones summary tables (the report's before/after table, the demo's and the recipe's
# printed tables) show, and lead with, in this order: distinctiveness, agreement with the references,
# faithfulness, fluency, diversity. Each is a key of ``evaluate_captions``' result; a table shows those present.
HEADLINE_METRICS: tuple[str, ...] = (
    "p_at_1_100",
    "oracle_p_at_1_100",  # the shapes world's exact judge on CLIP's P@1 trials (evaluation/oracle.py)
    "recall_at_1",
    # The literature's n-gram distinctiveness (Wang et al. 2020; lower is more distinctive): a judge that is neither
    # CLIP nor the shapes world, so it is there on COCO too (needs references and the similar-image groups).
    "cider_btw",
    "cider",
    "clip_s",
    "grammar_valid",
    "attribute_precision",
    "attribute_recall",
    "distinct_2",
    "vocab_size",
    "unique_share",  # the collapse signal: 1/N when every image gets the same caption
)

MISSING = "–"
# Our style names -> tabulate's formats. "markdown" (alias "github") is tabulate's "pipe": a GitHub table whose
# rule carries the alignment colons, so numbers stay right-aligned when rendered (tabulate's own "github" format
# drops them). "plain" is tabulate's "simple": space-aligned columns under a dashed rule, for a terminal.
_FORMATS = {"markdown": "pipe", "github": "pipe", "plain": "simple"}
STYLES = tuple(_FORMATS)


def is_number(value: object) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` in Python, but never a metric)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_mean_std(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(is_number(v) for v in value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    r"""Mean and sample standard deviation of ``values``, e.g. one metric over the seeds of an ablation.

    The standard deviation is the sample one (Bessel's correction, ``ddof=1``),
    :math:`s = \sqrt{\frac{1}{n-1}\sum_i (x_i - \bar x)^2}`, because the values are a few runs drawn from the
    distribution of outcomes, not the whole of it; a single value has no spread and gives 0.0.

    Raises:
        ValueError: ``values`` is empty or holds a NaN or infinity.
        TypeError: a value is not a real number.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"values must be a sequence of numbers, got {type(values).__name__}")
    if not values:
        raise ValueError("mean_std needs at least one value, got an empty sequence")
    for i, v in enumerate(values):
        if not is_number(v):
            raise TypeError(f"values[{i}] is {type(v).__name__}, expected a number")
        if not math.isfinite(v):
            raise ValueError(f"values[{i}] is {v}: mean and std of non-finite values are meaningless")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return float(mean), 0.0
    return float(mean), math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _format_cell(value: object, floatfmt: str, row: str, column: str) -> str:
    if value is None:
        return MISSING
    if _is_mean_std(value):
        mean, std = value
        return f"{format(float(mean), floatfmt)} ± {format(float(std), floatfmt)}"
    if isinstance(value, Integral) and not isinstance(value, bool):
        return str(int(value))  # counts such as vocab_size: no decimals
    if is_number(value):
        return format(float(value), floatfmt)
    raise TypeError(
        f"table cell [{row!r}, {column!r}] is {type(value).__name__} ({value!r}): expected a number, "
        "a (mean, std) tuple or None"
    )


def md_escape(text: str) -> str:
    """``text`` as the content of one Markdown table cell: ``|`` escaped, line breaks folded into spaces.

    tabulate escapes nothing in its "pipe" format, so every Markdown cell goes through this first.
    """
    return text.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _render(header: list[str], body: list[list[str]], colalign: Sequence[str], style: str) -> str:
    from tabulate import tabulate  # imported here, like matplotlib, so that ``import clip_rl_trl`` stays fast

    if style in ("markdown", "github"):
        header = [md_escape(cell) for cell in header]
        body = [[md_escape(cell) for cell in line] for line in body]
    return tabulate(body, header, tablefmt=_FORMATS[style], colalign=list(colalign), disable_numparse=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A left-aligned Markdown (GitHub) table of text cells, each escaped (``|``, line breaks)."""
    return _render(list(header), [list(row) for row in rows], ["left"] * len(header), "markdown")


def format_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    floatfmt: str = ".3f",
    style: str = "markdown",
) -> str:
    """Render metric dicts as a table: one row per entry of ``rows``, one column per metric.

    Args:
        rows: row name -> metrics, e.g. ``{"before": metrics, "after": metrics}`` with the dicts of
            ``evaluate_captions``. A cell is a number, a ``(mean, std)`` tuple (rendered ``"0.512 ± 0.031"``,
            see :func:`mean_std`) or None; a missing or None cell is rendered ``"–"``. Integers (``vocab_size``)
            are rendered without decimals.
        columns: the metrics to show, in order. Default: every key whose value is a number or a
            ``(mean, std)`` tuple in some row, in order of first appearance; non-numeric entries such as
            ``"skipped"`` are left out.
        floatfmt: the format spec of floats (``format(x, floatfmt)``).
        style: ``"markdown"`` or its alias ``"github"`` (a GitHub table, numbers right-aligned, ``|`` in a cell
            escaped) or ``"plain"`` (space-aligned text under a dashed rule, for a terminal).

    Raises:
        ValueError: no rows, no columns, or an unknown ``style``.
        TypeError: a cell of a requested column is neither a number, a ``(mean, std)`` tuple nor None.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("format_table needs a non-empty mapping of row name -> metrics")
    for name, metrics in rows.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"rows[{name!r}] is {type(metrics).__name__}, expected a mapping of metrics")
    if columns is None:
        columns = _numeric_keys(rows)
    elif isinstance(columns, str):
        raise TypeError("columns must be a sequence of metric names, not a single string")
    columns = list(columns)
    if not columns:
        raise ValueError("format_table has no columns: no row holds a numeric metric")

    header = ["", *columns]
    body = [
        [str(name), *(_format_cell(metrics.get(col), floatfmt, str(name), col) for col in columns)]
        for name, metrics in rows.items()
    ]
    # The row names left-aligned, the numbers right-aligned.
    return _render(header, body, ["left"] + ["right"] * len(columns), style)


def _numeric_keys(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The keys holding a number or a ``(mean, std)`` tuple in some row, in order of first appearance."""
    return list(
        dict.fromkeys(
            key
            for metrics in rows.values()
            for key, value in metrics.items()
            if is_number(value) or _is_mean_std(value)
        )
    )


def headline_table(
    results: Mapping[str, Mapping[str, Any]], style: str = "plain", *, floatfmt: str = ".3f"
) -> str:
    """:func:`format_table` of the :data:`HEADLINE_METRICS` that some row holds, in that order.

    Made for printing a run's summary, e.g. ``print(headline_table({"before": before, "after": after}))``
    with the dicts of ``evaluate_captions``: a metric no row measured (``grammar_valid`` outside the shapes
    world, ``cider`` with COCO metrics switched off) gets no column; one that a single row lacks shows ``"–"``.

    Args:
        results: row name -> metrics.
        style: ``"plain"`` (default, for a terminal), ``"markdown"`` or ``"github"``.
        floatfmt: the format spec of floats.

    Raises:
        ValueError: ``results`` is empty or holds none of the headline metrics (the message lists them), or an
            unknown ``style``.
        TypeError: a row is not a mapping, or a headline cell is neither a number, a ``(mean, std)`` tuple nor
            None.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("headline_table needs a non-empty mapping of row name -> metrics")
    for name, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"results[{name!r}] is {type(metrics).__name__}, expected a mapping of metrics")
    present = {key for metrics in results.values() for key, value in metrics.items() if value is not None}
    columns = [key for key in HEADLINE_METRICS if key in present]
    if not columns:
        raise ValueError(f"no row holds any of the headline metrics {list(HEADLINE_METRICS)}")
    return format_table(results, columns, floatfmt=floatfmt, style=style)
