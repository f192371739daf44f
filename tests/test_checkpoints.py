"""Crash-safe checkpoints: a checkpoint counts once complete; resume takes the newest complete one; a run killed
again and again (inside checkpoint writes too) ends where an uninterrupted run ends."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_clipcap, make_tiny_scorer, tiny_rl_args
from safetensors.torch import load_file

from clip_rl_trl import (
    BidirectionalReward,
    CaptionRLTrainer,
    ImageEmbeddingCache,
    ShapesLanguage,
    ShapesWorld,
)
from clip_rl_trl.trainer.checkpoints import MARKER, check_complete, latest_complete

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fault_run.py"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """4 steps with a checkpoint every 2 (``save_total_limit=1``): which checkpoints survive, and in what state."""
    out = tmp_path_factory.mktemp("ckpt")
    data = ShapesWorld(seed=0).to_dataset(8, "train")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    tokenizer = ShapesLanguage.word_tokenizer()
    args = tiny_rl_args(out, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1, baseline="ema")
    trainer = CaptionRLTrainer(model=make_tiny_clipcap(tokenizer), reward_funcs=[BidirectionalReward(scorer, cache)],
                               args=args, train_dataset=data.remove_columns("image"), processing_class=tokenizer)
    trainer.train()
    return out, trainer


def test_a_checkpoint_is_complete_only_with_its_marker(saved_run) -> None:
    out, _ = saved_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # rotated after completion
    assert check_complete(out / "checkpoint-4") is None
    for name in ("model.safetensors", "optimizer.pt", "caption_rl_state.json", "rng_state.pth"):
        assert (out / "checkpoint-4" / name).is_file()


def test_resume_skips_incomplete_checkpoints_and_says_why(saved_run, tmp_path) -> None:
    out, trainer = saved_run
    import shutil

    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-6")
    (tmp_path / "checkpoint-6" / MARKER).unlink()
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-8")
    with open(tmp_path / "checkpoint-8" / "optimizer.pt", "r+b") as f:
        f.truncate(10)  # a write cut short
    with pytest.warns(UserWarning, match=r"resuming from checkpoint-4.*checkpoint-8 \(optimizer.pt has 10 bytes.*"
                                         r"checkpoint-6 \(no checkpoint_complete.json"):
        assert latest_complete(tmp_path) == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="checkpoint-6' is incomplete: no checkpoint_complete.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    (tmp_path / "checkpoint-4" / MARKER).unlink()
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        latest_complete(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint-\\* folder"):
        latest_complete(tmp_path / "empty")


def _run(out: Path, fault: str | None = None, kill_after: float | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CLIP_RL_TRL_FAULT_AT", None)
    if fault:
        env["CLIP_RL_TRL_FAULT_AT"] = fault
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err[-3000:])
    return proc.returncode


@pytest.mark.slow
def test_killed_again_and_again_the_run_ends_as_an_uninterrupted_one(tmp_path) -> None:
    straight = tmp_path / "straight"
    assert _run(straight) == 0
    faulty = tmp_path / "faulty"
    kills = 0
    # Inside training steps drawn at random and at named points inside checkpoint writes (the marker not yet
    # written; HF's files written but not ours; the old checkpoint not yet rotated), in the order a run meets them.
    rng = random.Random(0)
    faults = [f"training_step@{rng.randint(1, 3)}", "checkpoint_before_marker@4", f"training_step@{rng.choice([5, 6])}",
              "checkpoint_hf_saved@6", f"training_step@{rng.choice([7, 8])}", "checkpoint_before_rotation@8"]
    for fault in faults:
        assert _run(faulty, fault=fault) == -signal.SIGKILL, fault
        kills += 1
    # Then SIGKILLs from outside at random moments, until the run finishes.
    while not (faulty / "final.safetensors").is_file() and kills < 12:
        kills += _run(faulty, kill_after=rng.uniform(2.0, 10.0) if kills < 8 else None) != 0
    assert kills >= 6 and (faulty / "final.safetensors").is_file()
    a, b = load_file(straight / "final.safetensors"), load_file(faulty / "final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert float(a["baseline.count"]) == 10
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"kills survived: {kills}; largest difference from the uninterrupted run: {worst}")  # pytest -s shows it
