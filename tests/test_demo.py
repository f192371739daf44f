"""The offline demo: its settings are checked up front, and ``--quick`` writes the whole report (slow)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from clip_rl_trl.demo import QUICK, DemoConfig

REPORT_KEYS = {"p_at_1_100", "recall_at_1", "cider", "grammar_valid", "attribute_precision"}


def test_quick_changes_only_demo_fields() -> None:
    config = DemoConfig().replace(**QUICK)
    assert config.steps < DemoConfig().steps and config.n_test >= 100


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_test": 50}, "n_test must be >= 100"),
        ({"n_val": 99}, "n_val must be >= 100"),
        ({"clip_hard_negatives": "yes"}, "clip_hard_negatives must be true or false"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"num_generations": 1.5}, "num_generations must be a positive integer"),
    ],
)
def test_bad_settings_are_named(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**changes)


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match="unknown DemoConfig fields \\['stpes'\\]"):
        DemoConfig().replace(stpes=3)


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path) -> None:
    """README's first command, as a user runs it: ``clip-rl-trl demo --quick`` (the console script's module)."""
    done = subprocess.run(
        [sys.executable, "-m", "clip_rl_trl.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "p_at_1_100" in done.stdout and "report written to" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert REPORT_KEYS <= set(report["before"]) and REPORT_KEYS <= set(report["after"])
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(lines) == QUICK["n_test"]
    first = json.loads(lines[0])
    assert {"image_id", "before", "after"} <= set(first)
    assert "| before |" in (tmp_path / "report.md").read_text()
    for name in ("training.png", "captions.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 200 and image.height > 200
    # The quick run is short, but the recipe moves the captioner: distinctiveness rises.
    assert report["after"]["p_at_1_100"] > report["before"]["p_at_1_100"]
