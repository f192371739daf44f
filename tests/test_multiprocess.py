"""Two processes (`accelerate launch --cpu --num_processes 2`): rewards see the global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "two_process_rewards.py"


def _launch(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu` starts several processes only through MPI; --multi_gpu uses torchrun, and the
    # script's `use_cpu=True` then selects the gloo (multi-CPU) backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gather", "local", "vlm"])
def test_rewards_under_two_processes(tmp_path: Path, mode: str) -> None:
    """With gathering on (the default) the rewards equal one process's rewards on the global batch; with it off,
    each process's rewards on its own slice. The two differ, so the check can tell them apart. ``vlm``: the same
    with a tiny Qwen2-VL policy (LoRA, gradient checkpointing, its processor as processing_class)."""
    result = _launch(tmp_path, mode)
    assert result["num_processes"] == 2
    assert len(result["records"]) == 2  # one scoring pass per step with the group baseline: 2 steps
    differs = False
    for rec in result["records"]:
        assert len(rec["texts"]) == 8 and len(set(rec["ids"])) == 4  # 2 processes x 2 images x 2 samples
        expected = rec["local_expected"] if mode == "local" else rec["global_expected"]
        assert len(rec["rewards"]) == len(expected) == 8
        for got, want in zip(rec["rewards"], expected, strict=True):
            assert got == pytest.approx(want, abs=1e-5)
        differs |= any(
            g != pytest.approx(loc, abs=1e-4)
            for g_row, l_row in zip(rec["global_expected"], rec["local_expected"], strict=True)
            for g, loc in zip(g_row, l_row, strict=True)
        )
    assert differs
