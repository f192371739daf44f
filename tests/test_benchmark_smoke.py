"""``benchmarks/rl_step_throughput.py --tiny`` runs end to end on the CPU and writes well-formed rows (no timing
assertions: only that every figure is there, positive, and the step's shares add up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step_throughput.py"
KEYS = {"model", "trainer", "batch", "device", "dtype", "steps", "median_step_s", "captions_per_s", "peak_memory_mb",
        "memory_kind", "share_generation", "share_rewards", "share_inputs", "share_loss_backward", "share_other",
        "completion_tokens", "seconds_generation", "seconds_rewards", "seconds_inputs", "seconds_loss_backward",
        "seconds_other"}


def test_rl_step_throughput_tiny(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--batches", "8", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    sides = {(r["model"], r["trainer"]) for r in rows}
    # ClipCap under ours; the text GPT-2 and the Idefics3 VLM under ours and under the stock GRPOTrainer.
    assert sides == {("clipcap", "ours"), ("text", "ours"), ("text", "stock"), ("vlm", "ours"), ("vlm", "stock")}
    for row in rows:
        assert set(row) == KEYS
        assert row["batch"] == 8 and row["steps"] == 2 and row["device"] == "cpu" and row["dtype"] == "fp32"
        for key in ("median_step_s", "captions_per_s", "peak_memory_mb", "completion_tokens"):
            assert row[key] > 0, (key, row)
        shares = [row[k] for k in sorted(KEYS) if k.startswith("share_")]
        assert all(s >= 0 for s in shares) and abs(sum(shares) - 1) < 1e-6
        assert row["share_generation"] > 0 and row["share_rewards"] > 0 and row["share_loss_backward"] > 0
        assert abs(row["captions_per_s"] * row["median_step_s"] - 8) < 1e-6
        seconds = [row[k] for k in sorted(KEYS) if k.startswith("seconds_")]
        assert all(s >= 0 for s in seconds) and row["seconds_rewards"] > 0
    assert "| model | trainer | batch |" in proc.stdout and "ours/stock" in proc.stdout
