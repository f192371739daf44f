"""Plots: training curves, the trade-off scatter of a regulariser search, and a grid of images with captions.

Everything here is a pure function of its arguments. matplotlib is imported inside the plotting functions (so
that ``import clip_rl_trl`` stays fast) and only its object-oriented API is used: a ``Figure`` rendered by the
Agg canvas, never ``pyplot``, so no window opens and no global figure state is touched.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clip_rl_trl.evaluation.tables import HEADLINE_METRICS
from clip_rl_trl.evaluation.tables import is_number as _is_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["TRAINING_KEYS", "caption_grid", "oracle_candidates", "plot_judges", "plot_tradeoff", "plot_training"]

# The training curves plotted by default (``plot_training``, ``write_report``), those the history holds: TRL's
# mean total reward, then each headline metric as the trainer's evaluations log it ("eval/<name>"; a run that
# turns distinctive by losing its grammar shows it here). "reward" stays apart from HEADLINE_METRICS because it
# is the training objective, logged every step by TRL, not a metric of the captions that a summary table shows.
TRAINING_KEYS: tuple[str, ...] = ("reward", *(f"eval/{name}" for name in HEADLINE_METRICS))


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created) through the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def training_curves(
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


def draw_training(
    curves: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike[str], title: str | None
) -> Path:
    """Draw the checked ``curves`` of :func:`training_curves` as :func:`plot_training` does; write a PNG."""
    from matplotlib.figure import Figure

    keys = list(curves)
    # Up to three curves stacked; more (a run logging every headline metric) in two columns, row by row.
    ncols = 1 if len(keys) <= 3 else 2
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 2.4 * nrows + (0.4 if title else 0.0)))
    grid = fig.subplots(nrows, ncols, sharex=True, squeeze=False)
    axes = list(grid.flat)
    for ax, key in zip(axes, keys, strict=False):
        steps, values = curves[key]
        # Markers make a curve with few points (evaluations every few hundred steps) readable.
        ax.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3, linewidth=1.5)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:  # the empty cell of an odd count in two columns
        ax.set_visible(False)
    for c in range(ncols):
        # The step axis under the lowest curve of each column (the bottom cell may be the empty one).
        column = [ax for ax in grid[:, c] if ax.get_visible()]
        column[-1].set_xlabel("step")
        column[-1].tick_params(labelbottom=True)
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
        keys: the metrics to plot, one subplot each, sharing the step axis: stacked, or in two columns beyond
            three (default: those of ``TRAINING_KEYS`` that ``history`` holds).
        title: a title over the figure.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``history`` or ``keys`` is empty, a key appears in no entry (the message lists the keys
            that do), or an entry with a plotted key has no ``"step"``.
        TypeError: a plotted value or a step is not a number.
    """
    if keys is None:
        keys = logged_training_keys(history) or TRAINING_KEYS
    return draw_training(training_curves(history, keys), path, title)


def logged_training_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of ``TRAINING_KEYS`` that some entry of ``history`` holds, in that order."""
    logged = {k for entry in history if isinstance(entry, Mapping) for k in entry}
    return [k for k in TRAINING_KEYS if k in logged]


_ORACLE_P_AT_1 = re.compile(r"oracle_p_at_1_(\d+)")


def oracle_candidates(metrics: Mapping[str, Any], prefix: str = "") -> list[int]:
    """The n for which ``metrics`` holds both ``<prefix>p_at_1_<n>`` (CLIP) and ``<prefix>oracle_p_at_1_<n>``
    (the exact oracle on the same trials), in order of appearance; ``prefix="eval/"`` reads a trainer's log."""
    found = []
    for key in metrics:
        match = _ORACLE_P_AT_1.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if match and f"{prefix}p_at_1_{match.group(1)}" in metrics:
            found.append(int(match.group(1)))
    return list(dict.fromkeys(found))


def _check_side(name: str, metrics: Any, keys: tuple[str, str]) -> tuple[float, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{name} must be a mapping of metrics, got {type(metrics).__name__}")
    values = []
    for key in keys:
        if key not in metrics:
            raise ValueError(f"{name} has no {key!r}; its keys are {sorted(metrics)}")
        v = metrics[key]
        if not _is_number(v) or not math.isfinite(v):
            raise TypeError(f"{name}[{key!r}] is {v!r}, expected a finite number")
        values.append(float(v))
    return values[0], values[1]


def plot_judges(
    path: str | os.PathLike[str],
    *,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    candidates: int = 100,
    title: str | None = None,
) -> Path:
    """CLIP's P@1 beside the exact oracle's on the same trials: what the judge believes and what is true; a PNG.

    Two panels, each drawn when its data is given: **before / after** (``before`` and ``after``, metric dicts of
    ``evaluate_captions`` holding ``p_at_1_<candidates>`` and ``oracle_p_at_1_<candidates>``), a bar per judge and
    side with its value written on it; **over training** (``history``, a ``trainer.state.log_history`` whose
    evaluations logged ``eval/p_at_1_<candidates>`` and ``eval/oracle_p_at_1_<candidates>``), both curves on one
    axis with the gap between them shaded. The oracle (``evaluation/oracle.py``) scores a caption on CLIP's own
    trials by checking everything it says against the scenes, so the shaded gap is CLIP's credit for captions a
    perfect reader would reject or find ambiguous.

    Raises:
        ValueError: neither panel has its data (``before`` without ``after``, a history without both curves), a
            side lacks a key, or ``candidates`` is not a positive int.
        TypeError: a value is not a finite number.
    """
    from matplotlib.figure import Figure

    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"candidates must be an int >= 2, got {candidates!r}")
    keys = (f"p_at_1_{candidates}", f"oracle_p_at_1_{candidates}")
    if (before is None) != (after is None):
        raise ValueError("before and after go together: pass both metric dicts or neither")
    bars = None
    if before is not None:
        bars = (_check_side("before", before, keys), _check_side("after", after, keys))
    curves = None
    if history is not None:
        curves = training_curves(history, [f"eval/{k}" for k in keys])
    if bars is None and curves is None:
        raise ValueError("plot_judges needs before and after, or a history, to draw")

    panels = [p for p in ("bars", "curves") if (bars if p == "bars" else curves) is not None]
    fig = Figure(figsize=(5.2 * len(panels) + (1.4 if "curves" in panels else 0.0), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = {"CLIP": "C0", "oracle": "C3"}
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "bars":
            width = 0.38
            for s, (clip_v, oracle_v) in enumerate(bars):
                for j, (judge, value) in enumerate((("CLIP", clip_v), ("oracle", oracle_v))):
                    x = s + (j - 0.5) * width
                    ax.bar(x, value, width, color=colours[judge], label=judge if s == 0 else None)
                    ax.annotate(f"{value:.3f}", (x, value), xytext=(0, 2), textcoords="offset points",
                                ha="center", fontsize=8)
            ax.set_xticks([0, 1], ["before", "after"])
            ax.set_ylabel(f"P@1 among {candidates}")
            ax.set_ylim(0, 1.08)
            ax.set_title("CLIP vs the exact oracle, same trials", fontsize=10)
        else:
            (steps_c, clip_v), (steps_o, oracle_v) = (curves[f"eval/{k}"] for k in keys)
            ax.plot(steps_c, clip_v, marker="o", markersize=3, color=colours["CLIP"], label=f"CLIP ({keys[0]})")
            ax.plot(steps_o, oracle_v, marker="o", markersize=3, color=colours["oracle"],
                    label=f"oracle ({keys[1]})")
            if steps_c == steps_o:
                ax.fill_between(steps_c, oracle_v, clip_v, color="gray", alpha=0.2, label="CLIP - oracle")
            ax.set_xlabel("step")
            ax.set_ylabel(f"P@1 among {candidates}")
            ax.set_ylim(0, 1.02)
            ax.set_title("over training (the trainer's evaluations)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if panel == "curves" else "upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


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


def check_grid(
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

    check_grid(images, captions, ncols, scale)
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
