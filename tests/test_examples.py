"""Every example runs offline with ``--toy`` (shapes world, CPU) and writes its report, captions and card.

Slow: each run prepares the shapes world (its tiny CLIP and MLE captioner are cached under
``CLIP_RL_TRL_CACHE`` and shared by all the examples) and fine-tunes for a few steps. CI runs them with
``pytest -m slow``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("bidir_coco", "discritune_coco", "clip_s_coco", "geg_coco", "vlm_coco", "shapes_demo")
REPORT_KEYS = {
    "p_at_1_100",
    "recall_at_1",
    "clip_s",
    "cider",
    "grammar_valid",
    "attribute_precision",
    "geg_avg",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_toy_run_writes_the_report(name: str, tmp_path) -> None:
    config = [] if name == "shapes_demo" else ["--config", str(ROOT / "examples" / "configs" / f"{name}.yaml")]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), *config, "--toy", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for side in ("before", "after"):
        assert REPORT_KEYS <= set(report[side]), sorted(report[side])
    assert report["recipe"]["data"]["dataset_name"] == "shapes" and report["steps"] > 0
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == report["recipe"]["data"]["max_test_images"]
    assert all({"image_id", "before", "after"} <= set(line) for line in lines)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: clip-rl-trl" in card and "p_at_1_100" in card
    for reward in report["recipe"]["rewards"]["reward_funcs"]:
        assert reward in card
    weights = "adapter_config.json" if report["recipe"]["captioner"]["use_peft"] else "config.json"
    assert (tmp_path / weights).is_file() and (tmp_path / "training.png").is_file()


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path) -> None:
    """README's first command, as a user runs it: ``clip-rl-trl demo --quick`` (the console script's module)."""
    from PIL import Image

    done = subprocess.run(
        [sys.executable, "-m", "clip_rl_trl.cli", "demo", "--quick", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "p_at_1_100" in done.stdout and "report written to" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert REPORT_KEYS <= set(report["before"]) and REPORT_KEYS <= set(report["after"])
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 100  # the recipe's toy: 100 test scenes
    assert "| before |" in (tmp_path / "report.md").read_text()
    assert "oracle_p_at_1_100" in (tmp_path / "report.md").read_text()  # the exact oracle beside CLIP
    for name in ("training.png", "captions.png", "judges.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 200 and image.height > 200
    # The quick run is short, but the recipe moves the captioner: distinctiveness rises.
    assert report["after"]["p_at_1_100"] > report["before"]["p_at_1_100"]
