"""Crash-safe checkpoints: a checkpoint counts only once everything in it is written, and resuming takes the
newest complete one.

``CaptionRLTrainer`` writes a checkpoint in this order: HF's files (model, optimiser, scheduler, RNG, trainer
state), then its own (baseline state, discriminators), then :data:`MARKER`, a JSON list of every file with its size,
written atomically; only then are older checkpoints rotated away. A process killed at any moment therefore leaves
either a complete checkpoint or a folder without a marker (or with a file whose size no longer matches), which
:func:`latest_complete` skips with a warning.

:func:`fault_point` lets a test kill the process at a named point of that sequence
(``CLIP_RL_TRL_FAULT_AT=checkpoint_before_marker@4``: SIGKILL when step 4's checkpoint reaches that point).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from trl.trainer.utils import RepeatSampler

__all__ = ["MARKER", "STATE_FILE", "ResumableRepeatSampler", "check_complete", "fault_point", "finished_at", "latest_complete", "load_extra_state",
           "remove_incomplete", "resume_target", "save_extra_state", "write_marker"]

MARKER = "checkpoint_complete.json"
STATE_FILE = "caption_rl_state.json"
FAULT_ENV = "CLIP_RL_TRL_FAULT_AT"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process when ``$CLIP_RL_TRL_FAULT_AT`` is ``<name>@<step>`` (fault-injection tests only)."""
    if os.environ.get(FAULT_ENV) == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_marker(folder: str | os.PathLike, step: int) -> None:
    """Record every file of ``folder`` with its size, atomically: the checkpoint is complete from here on."""
    folder = Path(folder)
    files = {
        os.fspath(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)


def check_complete(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why it is not."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER}: the process stopped while writing it"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{MARKER} is unreadable ({err})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when the checkpoint was written"
    return None


def _checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def latest_complete(output_dir: str | os.PathLike) -> str:
    """The newest complete checkpoint of ``output_dir``; newer incomplete ones are skipped with a warning."""
    found = _checkpoints(output_dir)
    skipped = []
    for _, path in reversed(found):
        reason = check_complete(path)
        if reason is None:
            if skipped:
                warnings.warn(
                    f"resuming from {path.name}, the newest complete checkpoint; skipped "
                    + "; ".join(skipped), stacklevel=2
                )
            return os.fspath(path)
        skipped.append(f"{path.name} ({reason})")
    if not found:
        raise ValueError(f"resume_from_checkpoint: no checkpoint-* folder in {os.fspath(output_dir)!r}")
    raise ValueError(
        f"resume_from_checkpoint: no complete checkpoint in {os.fspath(output_dir)!r}: " + "; ".join(skipped)
    )


def remove_incomplete(output_dir: str | os.PathLike, below: int) -> None:
    """Delete the incomplete checkpoints older than step ``below`` (left by a crash; never resumable)."""
    for step, path in _checkpoints(output_dir):
        if step < below and check_complete(path) is not None:
            shutil.rmtree(path, ignore_errors=True)


def save_extra_state(folder: str | os.PathLike, baseline_name: str, baseline: Any, discriminators: Sequence[Any]) -> None:
    """What HF's checkpoint lacks: the baseline's state and every online discriminator (with its optimiser)."""
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({"baseline": baseline_name, "baseline_state": baseline.state_dict()}, f)
    for i, disc in enumerate(discriminators):
        state = {k: v.contiguous() for k, v in disc.discriminator.state_dict().items()}
        save_file(state, os.path.join(folder, f"discriminator_{i}.safetensors"))


def load_extra_state(folder: str | os.PathLike, baseline_name: str, baseline: Any, discriminators: Sequence[Any]) -> None:
    """Restore what :func:`save_extra_state` wrote; errors name the file and the mismatch."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by CaptionRLTrainer")
    with open(path) as f:
        state = json.load(f)
    if state["baseline"] != baseline_name:
        raise ValueError(f"checkpoint used baseline {state['baseline']!r}, this run {baseline_name!r}")
    baseline.load_state_dict(state["baseline_state"])
    for i, disc in enumerate(discriminators):
        disc.discriminator.load_state_dict(load_file(os.path.join(folder, f"discriminator_{i}.safetensors")))


def resume_target(resume: str | bool | os.PathLike | None, output_dir: str | os.PathLike) -> str | bool | None:
    """``True`` -> the newest complete checkpoint of ``output_dir``; a given folder must be complete."""
    if resume is True:
        return latest_complete(output_dir)
    if isinstance(resume, (str, os.PathLike)):
        reason = check_complete(resume)
        if reason is not None:
            raise ValueError(f"resume_from_checkpoint {os.fspath(resume)!r} is incomplete: {reason}")
        return os.fspath(resume)
    return resume


def finished_at(folder: str | os.PathLike, max_steps: int) -> bool:
    """Whether the checkpoint ``folder`` is at (or past) ``max_steps`` (> 0): nothing is left to train."""
    state = Path(folder) / "trainer_state.json"
    return max_steps > 0 and state.is_file() and json.loads(state.read_text()).get("global_step", 0) >= max_steps


class ResumableRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose order in epoch ``e`` does not depend on how the process got there.

    TRL's sampler shuffles each epoch with the next draw of one generator seeded once, so a run resumed at or after
    an epoch boundary starts that generator afresh and sees epoch ``e`` in epoch 0's order. ``set_epoch`` (which the
    Trainer calls before every epoch) re-seeds it and replays the ``e`` earlier draws: an uninterrupted run sees
    exactly TRL's orders, and a resumed one the same.
    """

    @classmethod
    def from_sampler(cls, sampler: RepeatSampler) -> ResumableRepeatSampler:
        return cls(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size, sampler.repeat_count,
                   sampler.shuffle, sampler.seed)

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)
