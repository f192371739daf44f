"""The report room: tables, plots, caption grids and the files of a report, on hand-made values."""

import json
import math

import pytest
from PIL import Image, ImageDraw

from clip_rl_trl.evaluation.plots import (
    TRAINING_KEYS,
    caption_grid,
    oracle_candidates,
    plot_judges,
    plot_tradeoff,
    plot_training,
)
from clip_rl_trl.evaluation.report import write_report
from clip_rl_trl.evaluation.tables import HEADLINE_METRICS, format_table, headline_table, mean_std

BEFORE = {
    "p_at_1_100": 0.05,
    "recall_at_1": 0.02,
    "clip_s": 0.612,
    "vocab_size": 12,
    "self_bleu": 0.9,
    "skipped": {"spice": "Stanford CoreNLP jars not found", "novelty": "no training captions given"},
}
AFTER = {
    "p_at_1_100": 0.41,
    "recall_at_1": 0.2,
    "clip_s": 0.7,
    "vocab_size": 20,
    "self_bleu": 0.6,
    "grammar_valid": 0.97,
    "skipped": {"spice": "Stanford CoreNLP jars not found"},
}


def scene(i: int) -> Image.Image:
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((2 + i % 8, 4, 20 + i % 8, 22), fill=(200, 0, 0))
    return image


def records(n: int) -> list[dict]:
    return [
        {
            "image_id": f"img{i}",
            "before": "a circle",
            "after": f"a large red circle number {i} on a gray background",
        }
        for i in range(n)
    ]


def history() -> list[dict]:
    train = [{"step": s, "reward": s / 100, "loss": 0.5} for s in range(10, 110, 10)]
    evals = [{"step": s, "eval/p_at_1_100": 0.05 + s / 1000} for s in (0, 50, 100)]
    return train + evals


# ---- format_table and mean_std -----------------------------------------------------------------------------


def test_format_table_markdown_exact():
    text = format_table({"before": BEFORE, "after": AFTER}, ["p_at_1_100", "vocab_size", "grammar_valid"])
    # tabulate's "pipe" layout: headers padded by two, the row names' rule marked left-aligned.
    assert text == (
        "|        |   p_at_1_100 |   vocab_size |   grammar_valid |\n"
        "|:-------|-------------:|-------------:|----------------:|\n"
        "| before |        0.050 |           12 |               – |\n"
        "| after  |        0.410 |           20 |           0.970 |"
    )
    assert format_table({"before": BEFORE, "after": AFTER}, ["p_at_1_100"], style="github") == format_table(
        {"before": BEFORE, "after": AFTER}, ["p_at_1_100"]
    )


def test_format_table_plain_exact_and_floatfmt():
    text = format_table({"a": {"x": 0.5, "y": None}, "bb": {"x": 1.25}}, style="plain", floatfmt=".2f")
    assert text == "       x\n--  ----\na   0.50\nbb  1.25"


def test_format_table_default_columns_skip_non_numeric_in_order_of_appearance():
    text = format_table({"before": BEFORE, "after": AFTER})
    header = text.splitlines()[0]
    names = [c.strip() for c in header.strip("|").split("|")][1:]
    assert names == ["p_at_1_100", "recall_at_1", "clip_s", "vocab_size", "self_bleu", "grammar_valid"]
    assert "skipped" not in text


def test_format_table_mean_std_cell_and_escaping():
    mean, std = mean_std([0.5, 0.52, 0.54])
    text = format_table({"run|1": {"p": (mean, std)}, "run2": {}}, ["p"])
    assert text.splitlines()[2] == "| run\\|1 | 0.520 ± 0.020 |"
    assert text.splitlines()[3] == "| run2   |             – |"
    # A pipe is escaped once, a line break folded, in the row names, the headers and the plain text alike.
    text = format_table({"a|b\nc": {"x|y": 1}}, style="markdown")
    assert text.splitlines()[0] == "|        |   x\\|y |"
    assert text.splitlines()[2] == "| a\\|b c |      1 |"
    assert "\\\\|" not in text
    assert format_table({"a|b": {"x": 1}}, style="plain").splitlines()[2] == "a|b    1"


def test_format_table_errors():
    with pytest.raises(ValueError, match="style"):
        format_table({"a": {"x": 1.0}}, style="html")
    with pytest.raises(ValueError, match="non-empty"):
        format_table({})
    with pytest.raises(ValueError, match="no columns"):
        format_table({"a": {"skipped": {}}})
    with pytest.raises(TypeError, match=r"\['a', 'skipped'\]"):
        format_table({"a": BEFORE}, ["skipped"])


def test_headline_metrics_one_list():
    # The metrics the recipe printed and the demo's columns are all headline metrics, in one order.
    for name in ("p_at_1_100", "recall_at_1", "clip_s", "cider", "grammar_valid", "attribute_precision"):
        assert name in HEADLINE_METRICS
    assert len(set(HEADLINE_METRICS)) == len(HEADLINE_METRICS) and HEADLINE_METRICS[0] == "p_at_1_100"
    # The curves plotted: the total reward, then every headline metric as an evaluation logs it.
    assert TRAINING_KEYS == ("reward", *(f"eval/{name}" for name in HEADLINE_METRICS))


def test_headline_table_only_headline_metrics_present_in_order():
    text = headline_table({"before": BEFORE, "after": AFTER})
    header = text.splitlines()[0].split()
    # self_bleu is not a headline metric; grammar_valid, measured after only, is shown with "–" before.
    assert header == [k for k in HEADLINE_METRICS if k in {**BEFORE, **AFTER}]
    assert header == ["p_at_1_100", "recall_at_1", "clip_s", "grammar_valid", "vocab_size"]
    assert text == format_table({"before": BEFORE, "after": AFTER}, header, style="plain")
    assert text.splitlines()[2].split() == ["before", "0.050", "0.020", "0.612", "–", "12"]
    markdown = headline_table({"after": AFTER}, style="markdown", floatfmt=".2f")
    assert [c.strip() for c in markdown.splitlines()[2].split("|")[1:-1]][:2] == ["after", "0.41"]
    assert markdown == format_table({"after": AFTER}, header, style="markdown", floatfmt=".2f")
    # A headline metric that is None in every row gets no column; (mean, std) cells are kept.
    text = headline_table({"a": {"cider": None, "clip_s": (0.7, 0.01)}})
    assert text.splitlines()[0].split() == ["clip_s"] and "0.700 ± 0.010" in text


def test_headline_table_errors():
    with pytest.raises(ValueError, match=r"no row holds any of the headline metrics \['p_at_1_100'"):
        headline_table({"a": {"self_bleu": 0.5, "skipped": {}}})
    with pytest.raises(ValueError, match="non-empty"):
        headline_table({})
    with pytest.raises(ValueError, match="style"):
        headline_table({"a": AFTER}, style="html")
    with pytest.raises(TypeError, match=r"results\['a'\]"):
        headline_table({"a": [0.5]})
    with pytest.raises(TypeError, match=r"\['a', 'clip_s'\]"):
        headline_table({"a": {"clip_s": "0.7"}})


def test_mean_std_known_values():
    mean, std = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert mean == 5.0
    assert std == pytest.approx(math.sqrt(32 / 7))  # sample std (ddof=1): squared deviations sum to 32
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    with pytest.raises(ValueError, match=r"values\[1\]"):
        mean_std([1.0, float("nan")])
    with pytest.raises(TypeError, match=r"values\[0\]"):
        mean_std(["0.5"])


# ---- plots and the caption grid ----------------------------------------------------------------------------


def test_plot_training_writes_png(tmp_path):
    path = plot_training(history(), tmp_path / "sub" / "train.png", title="run")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 300  # two stacked subplots


def test_plot_training_unknown_key_names_it_and_the_logged_keys(tmp_path):
    with pytest.raises(ValueError, match=r"'kl'.*\['reward', 'loss', 'eval/p_at_1_100'\]"):
        plot_training(history(), tmp_path / "t.png", keys=("reward", "kl"))
    with pytest.raises(ValueError, match="no 'step'"):
        plot_training([{"reward": 1.0}], tmp_path / "t.png", keys=("reward",))
    with pytest.raises(ValueError, match="empty"):
        plot_training([], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_plot_training_many_curves_in_two_columns(tmp_path):
    steps = (0, 50, 100)
    log = [{"step": s, "reward": s / 100} for s in steps]
    log += [{"step": s, **{f"eval/{k}": 0.1 + s / 1000 for k in HEADLINE_METRICS[:4]}} for s in steps]
    with Image.open(plot_training(log, tmp_path / "few.png", keys=TRAINING_KEYS[:3])) as three:
        narrow = three.size
    with Image.open(plot_training(log, tmp_path / "many.png")) as five:  # default: the TRAINING_KEYS logged
        assert five.width > 1.7 * narrow[0]  # two columns
        assert narrow[1] * 0.9 < five.height < narrow[1] * 1.1  # of three rows


def test_plot_tradeoff_writes_png_and_checks_points(tmp_path):
    points = [
        {"name": "disc 0.06", "grammar_valid": 0.95, "p_at_1_100": 0.16},
        {"name": "gt + kl", "grammar_valid": 0.90, "p_at_1_100": 0.22},
    ]
    path = plot_tradeoff(points, tmp_path / "trade.png", x_target=0.9, y_target=0.2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
    with pytest.raises(ValueError, match=r"points\[0\] has no \['p_at_1_100'\]"):
        plot_tradeoff([{"name": "a", "grammar_valid": 0.9}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plot_tradeoff([], tmp_path / "bad.png")


def test_caption_grid_size(tmp_path):
    images = [scene(i) for i in range(6)]
    captions = {"before": ["a circle"] * 6, "after": [r["after"] for r in records(6)]}
    path = caption_grid(images, captions, tmp_path / "grid.png", ncols=4, scale=4, title="grid")
    with Image.open(path) as grid:
        # 4 columns of cells at least 200 px wide (a 128 px image centred in each), two rows of image + text.
        assert grid.width == 10 + 4 * (200 + 10)
        assert grid.height > 2 * 128 + 2 * 3 * 17
        assert grid.getpixel((grid.width - 5, grid.height - 5)) == (255, 255, 255)


def test_caption_grid_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one image"):
        caption_grid([], {"after": []}, tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"captions\['after'\] has 1 captions but there are 2 images"):
        caption_grid([scene(0), scene(1)], {"before": ["a", "b"], "after": ["a"]}, tmp_path / "g.png")
    with pytest.raises(TypeError, match=r"images\[1\]"):
        caption_grid([scene(0), "x.png"], {"after": ["a", "b"]}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="scale"):
        caption_grid([scene(0)], {"after": ["a"]}, tmp_path / "g.png", scale=0)


# ---- write_report ------------------------------------------------------------------------------------------


def test_write_report_files(tmp_path):
    out = tmp_path / "report"
    paths = write_report(
        out,
        before=BEFORE,
        after=AFTER,
        captions=records(20),
        history=history(),
        images=[scene(i) for i in range(20)],
        title="shapes demo",
        extra={"seed": 3, "config": {"learning_rate": 1e-5}},
    )
    assert set(paths) == {"json", "captions", "markdown", "training_plot", "grid"}
    assert all(p.parent == out and p.exists() for p in paths.values())

    report = json.loads(paths["json"].read_text())
    assert report["before"] == {k: v for k, v in BEFORE.items() if k != "skipped"}
    assert report["after"]["grammar_valid"] == 0.97
    assert report["skipped"] == {"before": BEFORE["skipped"], "after": AFTER["skipped"]}
    assert report["seed"] == 3 and report["config"] == {"learning_rate": 1e-5}

    lines = paths["captions"].read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[7]) == records(20)[7]

    with Image.open(paths["grid"]) as grid:  # grid_size 16: four rows of four
        assert grid.width == 10 + 4 * 210 and grid.height > 4 * 128
    with Image.open(paths["training_plot"]) as plot:
        assert plot.format == "PNG"

    md = paths["markdown"].read_text()
    assert md.startswith("# shapes demo\n")
    table = [line for line in md.splitlines() if line.startswith("| before") or line.startswith("| after")]
    table += [line for line in md.splitlines() if line.startswith("| change")]
    # HEADLINE_METRICS first (p_at_1_100, recall_at_1, clip_s, grammar_valid, vocab_size), then self_bleu.
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "before",
        "0.050",
        "0.020",
        "0.612",
        "–",
        "12",
        "0.900",
    ]
    assert [c.strip() for c in table[1].strip("|").split("|")] == [
        "after",
        "0.410",
        "0.200",
        "0.700",
        "0.970",
        "20",
        "0.600",
    ]
    assert [c.strip() for c in table[2].strip("|").split("|")] == [
        "change",
        "0.360",
        "0.180",
        "0.088",
        "–",
        "8",
        "-0.300",
    ]
    assert "- `spice` (before, after): Stanford CoreNLP jars not found" in md
    assert "- `novelty` (before): no training captions given" in md
    assert "](training.png)" in md and "](captions.png)" in md
    samples = [line for line in md.splitlines() if line.startswith("| img")]
    assert len(samples) == 8  # 8 sample pairs
    assert [c.strip() for c in samples[7].strip("|").split("|")] == [
        "img7",
        "a circle",
        records(20)[7]["after"],
    ]
    assert "- seed: 3" in md


def test_write_report_minimal(tmp_path):
    paths = write_report(tmp_path, before={"p_at_1_100": 0.1}, after={"p_at_1_100": 0.2}, captions=records(3))
    assert set(paths) == {"json", "captions", "markdown"}
    assert "skipped" not in json.loads(paths["json"].read_text())
    assert not (tmp_path / "training.png").exists() and not (tmp_path / "captions.png").exists()


def test_write_report_errors_write_nothing(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"after\['clip_s'\] is nan"):
        write_report(out, before=BEFORE, after={**AFTER, "clip_s": float("nan")}, captions=records(2))
    with pytest.raises(ValueError, match=r"captions\[1\] has no \['after'\]"):
        write_report(
            out, before=BEFORE, after=AFTER, captions=[records(2)[0], {"image_id": 1, "before": "a"}]
        )
    with pytest.raises(ValueError, match="none of the training curves"):
        write_report(out, before=BEFORE, after=AFTER, captions=records(2), history=[{"step": 1, "loss": 0.3}])
    with pytest.raises(ValueError, match="3 images but 2 caption records"):
        write_report(out, before=BEFORE, after=AFTER, captions=records(2), images=[scene(0)] * 3)
    with pytest.raises(ValueError, match=r"extra must not use .*'before'"):
        write_report(out, before=BEFORE, after=AFTER, captions=records(2), extra={"before": 1})
    with pytest.raises(ValueError, match=r"extra\['loss'\]"):
        write_report(out, before=BEFORE, after=AFTER, captions=records(2), extra={"loss": math.inf})
    with pytest.raises(TypeError, match=r"before\['recall_at_1'\]"):
        write_report(out, before={"recall_at_1": "0.2"}, after=AFTER, captions=records(2))
    assert not out.exists()


def test_a_failed_report_leaves_no_half_written_files(tmp_path, monkeypatch) -> None:
    """The files are renamed into place only once all are written, report.json last."""
    import clip_rl_trl.evaluation.report as report

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "markdown_table", broken)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, before={"clip_s": 1.0}, after={"clip_s": 2.0},
                     captions=[{"image_id": 1, "before": "a", "after": "b"}])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    files = write_report(tmp_path, before={"clip_s": 1.0}, after={"clip_s": 2.0},
                         captions=[{"image_id": 1, "before": "a", "after": "b"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "report.json", "report.md"]
    assert files["json"] == tmp_path / "report.json"


# ---- CLIP beside the exact oracle ------------------------------------------------------------------------------


def oracle_history() -> list[dict]:
    train = [{"step": s, "reward": s / 100} for s in range(10, 110, 10)]
    evals = [{"step": s, "eval/p_at_1_100": 0.5 + s / 250, "eval/oracle_p_at_1_100": 0.3 + s / 300}
             for s in (0, 50, 100)]
    return train + evals


def test_oracle_candidates():
    assert oracle_candidates({"p_at_1_100": 1, "oracle_p_at_1_100": 1, "oracle_p_at_1_10": 1}) == [100]
    assert oracle_candidates({"eval/p_at_1_100": 1, "eval/oracle_p_at_1_100": 1}, "eval/") == [100]
    assert oracle_candidates({"p_at_1_100": 1, "oracle_recall_at_1": 1}) == []


def test_plot_judges_panels_and_errors(tmp_path):
    before = {"p_at_1_100": 0.485, "oracle_p_at_1_100": 0.29}
    after = {"p_at_1_100": 0.975, "oracle_p_at_1_100": 0.6325}
    with Image.open(plot_judges(tmp_path / "bars.png", before=before, after=after)) as bars:
        one = bars.size
    with Image.open(plot_judges(tmp_path / "both.png", before=before, after=after, history=oracle_history())) as both:
        assert both.width > 1.7 * one[0] and both.format == "PNG"  # two panels side by side
    with Image.open(plot_judges(tmp_path / "curves.png", history=oracle_history())) as curves:
        assert curves.width > 300
    with pytest.raises(ValueError, match="before and after go together"):
        plot_judges(tmp_path / "x.png", before=before)
    with pytest.raises(ValueError, match="needs before and after, or a history"):
        plot_judges(tmp_path / "x.png")
    with pytest.raises(ValueError, match="after has no 'oracle_p_at_1_100'"):
        plot_judges(tmp_path / "x.png", before=before, after={"p_at_1_100": 0.9})
    with pytest.raises(TypeError, match="finite number"):
        plot_judges(tmp_path / "x.png", before=before, after={**after, "oracle_p_at_1_100": float("nan")})
    with pytest.raises(ValueError, match="no history entry has 'eval/oracle_p_at_1_100'"):
        plot_judges(tmp_path / "x.png", history=history())
    assert not (tmp_path / "x.png").exists()


def test_write_report_puts_the_oracle_beside_clip(tmp_path):
    before = {**BEFORE, "oracle_p_at_1_100": 0.02, "oracle_recall_at_1": 0.01}
    after = {**AFTER, "oracle_p_at_1_100": 0.25, "oracle_recall_at_1": 0.2}
    paths = write_report(tmp_path, before=before, after=after, captions=records(4), history=oracle_history())
    assert set(paths) == {"json", "captions", "markdown", "training_plot", "judges_plot"}
    with Image.open(paths["judges_plot"]) as image:
        assert image.format == "PNG"
    md = paths["markdown"].read_text()
    assert "## CLIP vs the exact oracle" in md and "](judges.png)" in md
    header = next(line for line in md.splitlines() if "CLIP P@1/100" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["", "CLIP P@1/100", "oracle P@1/100",
                                                                 "CLIP - oracle"]
    rows = [line for line in md.splitlines() if line.startswith("| before") or line.startswith("| after")]
    # The main table lists the oracle right after CLIP's P@1 (HEADLINE_METRICS order) ...
    assert [c.strip() for c in rows[0].strip("|").split("|")][:3] == ["before", "0.050", "0.020"]
    assert [c.strip() for c in rows[1].strip("|").split("|")][:3] == ["after", "0.410", "0.250"]
    # ... and the judges' table gives both and the gap.
    assert [c.strip() for c in rows[2].strip("|").split("|")] == ["before", "0.050", "0.020", "0.030"]
    assert [c.strip() for c in rows[3].strip("|").split("|")] == ["after", "0.410", "0.250", "0.160"]
    # Without oracle metrics on both sides there is no judges figure.
    plain = write_report(tmp_path / "plain", before=before, after=AFTER, captions=records(2))
    assert "judges_plot" not in plain and "CLIP vs the exact oracle" not in plain["markdown"].read_text()
