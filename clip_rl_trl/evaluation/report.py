"""The report: metric tables, training and trade-off plots, caption grids, and the report files of a run.

Everything here is a pure function of its arguments. matplotlib is imported inside the plotting functions (so
that ``import clip_rl_trl`` stays fast) and only its object-oriented API is used: a ``Figure`` rendered by the
Agg canvas, never ``pyplot``, so no window opens and no global figure state is touched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "DEMO_COLUMNS",
    "caption_grid",
    "format_table",
    "mean_std",
    "plot_tradeoff",
    "plot_training",
    "write_report",
]

# The metrics the demo's before/after table leads with: distinctiveness, agreement, fluency, faithfulness,
# diversity. Each is a key of ``evaluate_captions``' result.
DEMO_COLUMNS: tuple[str, ...] = (
    "p_at_1_100",
    "recall_at_1",
    "cider",
    "clip_s",
    "grammar_valid",
    "attribute_precision",
    "attribute_recall",
    "distinct_2",
    "vocab_size",
)

# The training curves ``write_report`` plots, when the history has them (TRL logs the mean total reward as
# "reward"; evaluations log P@1 among 100 and, in the shapes world, grammar validity under "eval/": a run that
# turns distinctive by losing its grammar shows it here).
TRAINING_KEYS: tuple[str, ...] = ("reward", "eval/p_at_1_100", "eval/grammar_valid")

_MISSING = "–"
_STYLES = ("markdown", "plain")
_SAMPLE_PAIRS = 8
_GRID_COLUMNS = 4


def _is_number(value: object) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` in Python, but never a metric)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_mean_std(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value)


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
        if not _is_number(v):
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
        return _MISSING
    if _is_mean_std(value):
        mean, std = value
        return f"{format(float(mean), floatfmt)} ± {format(float(std), floatfmt)}"
    if isinstance(value, Integral) and not isinstance(value, bool):
        return str(int(value))  # counts such as vocab_size: no decimals
    if _is_number(value):
        return format(float(value), floatfmt)
    raise TypeError(
        f"table cell [{row!r}, {column!r}] is {type(value).__name__} ({value!r}): expected a number, "
        "a (mean, std) tuple or None"
    )


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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
        style: ``"markdown"`` (a GitHub table, numbers right-aligned) or ``"plain"`` (space-aligned text for a
            terminal).

    Raises:
        ValueError: no rows, no columns, or an unknown ``style``.
        TypeError: a cell of a requested column is neither a number, a ``(mean, std)`` tuple nor None.
    """
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("format_table needs a non-empty mapping of row name -> metrics")
    for name, metrics in rows.items():
        if not isinstance(metrics, Mapping):
            raise TypeError(f"rows[{name!r}] is {type(metrics).__name__}, expected a mapping of metrics")
    if columns is None:
        columns = list(
            dict.fromkeys(
                key
                for metrics in rows.values()
                for key, value in metrics.items()
                if _is_number(value) or _is_mean_std(value)
            )
        )
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
    if style == "markdown":
        header = [_md_escape(cell) for cell in header]
        body = [[_md_escape(cell) for cell in line] for line in body]
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]

    def render(line: list[str]) -> str:
        # First column (the row names) left-aligned, numbers right-aligned.
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(cells) + " |" if style == "markdown" else "  ".join(cells).rstrip()

    if style == "markdown":
        rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created) through the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def _training_curves(
    history: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """Check ``history`` and ``keys`` (see :func:`plot_training`); key -> (steps, values)."""
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise TypeError(
            f"history must be a list of dicts (trainer.state.log_history), got {type(history).__name__}"
        )
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if isinstance(keys, str):
        raise TypeError(f"keys must be a sequence of metric names, not a single string ({keys!r})")
    keys = list(keys)
    if not keys:
        raise ValueError("keys is empty: name at least one metric to plot")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(f"history[{i}] is {type(entry).__name__}, expected a dict")
    present = list(dict.fromkeys(k for entry in history for k in entry if k != "step"))
    for key in keys:
        if not any(key in entry for entry in history):
            raise ValueError(f"no history entry has {key!r}; the keys logged are {present}")

    curves: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        steps: list[float] = []
        values: list[float] = []
        for i, entry in enumerate(history):
            if key not in entry:
                continue
            if "step" not in entry:
                raise ValueError(f"history[{i}] has {key!r} but no 'step'")
            for name, v in (("step", entry["step"]), (key, entry[key])):
                if not _is_number(v):
                    raise TypeError(
                        f"history[{i}][{name!r}] is {type(v).__name__} ({v!r}), expected a number"
                    )
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
        curves[key] = (steps, values)

    return curves


def _draw_training(
    curves: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike[str], title: str | None
) -> Path:
    from matplotlib.figure import Figure

    keys = list(curves)
    fig = Figure(figsize=(6.4, 2.4 * len(keys) + (0.4 if title else 0.0)))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        steps, values = curves[key]
        # Markers make a curve with few points (evaluations every few hundred steps) readable.
        ax.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3, linewidth=1.5)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_training(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot training curves, one subplot per metric in ``keys`` against the training step; write a PNG.

    Args:
        history: a ``trainer.state.log_history``-like list of dicts, each with ``"step"`` and some metrics;
            a curve uses only the entries that have its key (training and evaluation entries interleave).
        path: the PNG to write (parent folders are created).
        keys: the metrics to plot, one subplot each, stacked and sharing the step axis (default: those of
            ``TRAINING_KEYS`` that ``history`` holds).
        title: a title over the figure.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``history`` or ``keys`` is empty, a key appears in no entry (the message lists the keys
            that do), or an entry with a plotted key has no ``"step"``.
        TypeError: a plotted value or a step is not a number.
    """
    if keys is None:
        keys = _logged_training_keys(history) or TRAINING_KEYS
    return _draw_training(_training_curves(history, keys), path, title)


def _logged_training_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of ``TRAINING_KEYS`` that some entry of ``history`` holds, in that order."""
    logged = {k for entry in history if isinstance(entry, Mapping) for k in entry}
    return [k for k in TRAINING_KEYS if k in logged]


def plot_tradeoff(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    x: str = "grammar_valid",
    y: str = "p_at_1_100",
    label: str = "name",
    x_target: float | None = None,
    y_target: float | None = None,
    title: str | None = None,
) -> Path:
    """Scatter configurations on two metrics, each point annotated with its label; write a PNG.

    Made for the regulariser search: distinctiveness (P@1 among 100) against fluency (grammar validity), with
    the targets drawn as dashed lines so that the configurations meeting both sit in one corner.

    Args:
        points: one mapping per configuration holding ``x``, ``y`` (numbers) and ``label`` (any value,
            rendered with ``str``).
        path: the PNG to write (parent folders are created).
        x, y, label: the keys of the horizontal value, the vertical value and the annotation.
        x_target, y_target: a dashed vertical / horizontal line at this value (None: no line).
        title: a title over the plot.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: no points, or a point lacks ``x``, ``y`` or ``label``.
        TypeError: a coordinate or a target is not a number.
    """
    from matplotlib.figure import Figure

    if isinstance(points, Mapping) or not isinstance(points, Sequence):
        raise TypeError(f"points must be a list of dicts, got {type(points).__name__}")
    if not points:
        raise ValueError("points is empty: nothing to plot")
    for name, target in (("x_target", x_target), ("y_target", y_target)):
        if target is not None and not _is_number(target):
            raise TypeError(f"{name} must be a number or None, got {type(target).__name__}")
    xs: list[float] = []
    ys: list[float] = []
    labels: list[str] = []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise TypeError(f"points[{i}] is {type(point).__name__}, expected a dict")
        missing = [k for k in (x, y, label) if k not in point]
        if missing:
            raise ValueError(f"points[{i}] has no {missing}; its keys are {list(point)}")
        for key in (x, y):
            if not _is_number(point[key]):
                raise TypeError(
                    f"points[{i}][{key!r}] is {type(point[key]).__name__} ({point[key]!r}), expected a number"
                )
        xs.append(float(point[x]))
        ys.append(float(point[y]))
        labels.append(str(point[label]))

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    ax.scatter(xs, ys, zorder=3)
    for px, py, text in zip(xs, ys, labels, strict=True):
        ax.annotate(text, (px, py), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if x_target is not None:
        ax.axvline(
            float(x_target), linestyle="--", color="gray", linewidth=1, label=f"{x} target {x_target:g}"
        )
    if y_target is not None:
        ax.axhline(
            float(y_target), linestyle="--", color="gray", linewidth=1, label=f"{y} target {y_target:g}"
        )
    if x_target is not None or y_target is not None:
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans, which ships with matplotlib (a dependency), so the grid looks the same everywhere."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels; a word wider than a line is broken by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        # A single over-long word (e.g. a degenerate "andandand"): cut it at the widest prefix that fits.
        while font.getlength(word) > width and len(word) > 1:
            cut = max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


def _check_grid(
    images: Sequence[Image.Image], captions: Mapping[str, Sequence[str]], ncols: int, scale: int
) -> None:
    """Check the arguments of :func:`caption_grid` (its Raises section)."""
    from PIL import Image

    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not isinstance(images, Sequence) or not images:
        raise ValueError("caption_grid needs at least one image, got none")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is {type(image).__name__}, expected a PIL.Image.Image")
    if not isinstance(captions, Mapping) or not captions:
        raise ValueError("captions must map at least one source name to its captions, e.g. {'after': [...]}")
    for source, texts in captions.items():
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"captions[{source!r}] must be a list of strings, got {type(texts).__name__}")
        if len(texts) != len(images):
            raise ValueError(
                f"captions[{source!r}] has {len(texts)} captions but there are {len(images)} images"
            )
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"captions[{source!r}][{i}] is {type(text).__name__}, expected str")


def caption_grid(
    images: Sequence[Image.Image],
    captions: Mapping[str, Sequence[str]],
    path: str | os.PathLike[str],
    *,
    ncols: int = 4,
    scale: int = 4,
    title: str | None = None,
) -> Path:
    """Draw images in a grid, each with the captions of every source under it; write a PNG.

    Each cell holds the image enlarged ``scale`` times with nearest-neighbour resampling (the shapes world's
    32x32 scenes stay sharp), then one paragraph per caption source, ``"<source>: <caption>"``, word-wrapped to
    the cell width (at least 200 pixels, so a long caption stays readable under a small image). Sources are
    told apart by colour.

    Args:
        images: the images (Pillow), any mode and size.
        captions: source name -> one caption per image, e.g. ``{"before": [...], "after": [...]}``.
        path: the PNG to write (parent folders are created).
        ncols: images per row.
        scale: integer enlargement factor.
        title: a title over the grid.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: no images, no caption source, a source with a different number of captions than there are
            images, or ``ncols`` / ``scale`` below 1.
        TypeError: an image is not a Pillow image or a caption is not a string.
    """
    from PIL import Image, ImageDraw

    _check_grid(images, captions, ncols, scale)
    font, bold = _font(13), _font(13, bold=True)
    title_font = _font(18, bold=True)
    line_h = 17
    pad = 10
    colours = [(20, 20, 20), (0, 100, 0), (30, 60, 160), (150, 60, 0), (120, 0, 120)]
    big = [
        image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
        for image in images
    ]
    cell_w = max(200, max(b.width for b in big))
    img_h = max(b.height for b in big)

    # Lay out every cell's text first: a row is as tall as its longest caption block.
    blocks = []
    for i in range(len(images)):
        block = []
        for s, (source, texts) in enumerate(captions.items()):
            label = f"{source}:"
            # The label is drawn in bold, wider than the regular face the text is wrapped in: reserve the gap.
            slack = math.ceil(bold.getlength(label) - font.getlength(label))
            lines = _wrap(f"{label} {texts[i]}", font, cell_w - slack)
            block.append((colours[s % len(colours)], label, lines))
        blocks.append(block)
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    row_h = []
    for r in range(nrows):
        cells = blocks[r * ncols : (r + 1) * ncols]
        text_lines = max(sum(len(lines) for _, _, lines in block) for block in cells)
        row_h.append(img_h + 6 + text_lines * line_h + 4 * len(captions))
    top = pad + (title_font.size + pad if title else 0)
    width = pad + ncols * (cell_w + pad)
    height = top + sum(row_h) + pad * nrows
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=title_font)

    y0 = top
    for r in range(nrows):
        for c in range(ncols):
            i = r * ncols + c
            if i >= len(images):
                break
            x0 = pad + c * (cell_w + pad)
            canvas.paste(big[i], (x0 + (cell_w - big[i].width) // 2, y0 + (img_h - big[i].height) // 2))
            y = y0 + img_h + 6
            for colour, label, lines in blocks[i]:
                for k, line in enumerate(lines):
                    if k == 0 and line.startswith(label):
                        # The source name in bold, the caption in the regular face, same colour.
                        draw.text((x0, y), label, fill=colour, font=bold)
                        draw.text((x0 + bold.getlength(label), y), line[len(label) :], fill=colour, font=font)
                    else:
                        draw.text((x0, y), line, fill=colour, font=font)
                    y += line_h
                y += 4
        y0 += row_h[r] + pad

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


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
    - ``training.png``: the curves among ``"reward"`` and ``"eval/p_at_1_100"`` that ``history`` holds
      (:func:`plot_training`); only when ``history`` is given.
    - ``captions.png``: the first ``grid_size`` images with their before / after captions
      (:func:`caption_grid`); only when ``images`` is given.
    - ``report.md``: the title, the before / after / change table (``DEMO_COLUMNS`` first, then the other
      metrics), the metrics that were not measured and why, the plots, the first 8 caption pairs, and
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
        ``{"json", "captions", "markdown", "training_plot", "grid"}`` -> path, for the files written.

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
        plot_keys = _logged_training_keys(history)
        if not plot_keys:
            logged = {k for entry in history if isinstance(entry, Mapping) for k in entry}
            raise ValueError(
                f"history has none of the training curves {list(TRAINING_KEYS)}; its keys are {sorted(logged)}"
            )
        curves = _training_curves(history, plot_keys)
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
        _check_grid(images, grid_captions, _GRID_COLUMNS, 4)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    report: dict[str, Any] = {"before": before_num, "after": after_num}
    if before_skipped or after_skipped:
        report["skipped"] = {"before": before_skipped, "after": after_skipped}
    report.update(extra_json)
    paths["json"] = out / "report.json"
    paths["json"].write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", "utf-8"
    )

    paths["captions"] = out / "captions.jsonl"
    paths["captions"].write_text("".join(line + "\n" for line in lines), "utf-8")

    if curves is not None:
        paths["training_plot"] = _draw_training(curves, out / "training.png", title)
    if images is not None and grid_captions is not None:
        paths["grid"] = caption_grid(
            images, grid_captions, out / "captions.png", ncols=_GRID_COLUMNS, title=title
        )

    # The table: the demo's headline metrics first, then everything else either side measured.
    union = list(dict.fromkeys([*before_num, *after_num]))
    columns = [c for c in DEMO_COLUMNS if c in union] + [c for c in union if c not in DEMO_COLUMNS]
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
            md.append(f"- `{key}` ({', '.join(sides)}): {_md_escape('; '.join(reasons))}")
        md.append("")
    if "training_plot" in paths:
        md += ["## Training", "", "![training curves](training.png)", ""]
    if "grid" in paths:
        md += ["## Captions", "", "![captions before and after](captions.png)", ""]
    if captions:
        md += [f"## Sample captions (first {min(_SAMPLE_PAIRS, len(captions))} of {len(captions)})", ""]
        md += ["| image | before | after |", "|---|---|---|"]
        for record in captions[:_SAMPLE_PAIRS]:
            cells = (str(record["image_id"]), record["before"], record["after"])
            md.append("| " + " | ".join(_md_escape(cell) for cell in cells) + " |")
        md += ["", "All captions: [captions.jsonl](captions.jsonl).", ""]
    if extra_json:
        md += ["## Details", ""]
        for key, value in extra_json.items():
            shown_value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            md.append(f"- {key}: {_md_escape(shown_value)}")
        md.append("")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md), "utf-8")
    return {
        key: paths[key] for key in ("json", "captions", "markdown", "training_plot", "grid") if key in paths
    }
