"""Answers: one JSON line per answer, validated against the study, appended durably, read back.

A record::

    {"study": "<study id>", "annotator": "Ada", "trial": "t0003", "choice": 2, "elapsed_ms": 1840,
     "time": "2025-01-31T12:00:00+00:00", "source": "server"}

``choice`` is a candidate position (discrimination), a caption position (pairwise) or a rating 1-5 (fluency).
The served page, the static bundle and the simulated annotator all write this format, and ``study results``
reads it the same way whatever wrote it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clip_rl_trl.study.design import Study

__all__ = ["AnswerError", "AnswersLog", "check_answer", "normalize_name", "read_answers", "write_answers"]

logger = logging.getLogger(__name__)

MAX_NAME = 64


class AnswerError(ValueError):
    """An answer the study refuses, with the HTTP status the server answers it with."""

    def __init__(self, message: str, status: int = 422, code: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        #: ``duplicate`` for an answer already given (the page moves on), ``invalid`` otherwise
        self.code = code


def normalize_name(name: Any) -> str:
    """An annotator's name as stored: NFC, surrounding whitespace dropped, inner runs of whitespace made one
    space; 1-64 characters, no control characters. Names are matched exactly after this (resume by name)."""
    if not isinstance(name, str):
        raise AnswerError("the annotator name must be a string")
    cleaned = " ".join(unicodedata.normalize("NFC", name).split())
    if not cleaned:
        raise AnswerError("enter a name (the annotator name is empty)")
    if len(cleaned) > MAX_NAME:
        raise AnswerError(f"the annotator name is longer than {MAX_NAME} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in cleaned):
        raise AnswerError("the annotator name contains control characters")
    return cleaned


def check_answer(study: Study, record: Any) -> dict[str, Any]:
    """The validated, normalised record (``study``, ``annotator``, ``trial``, ``choice``, optional
    ``elapsed_ms``); :class:`AnswerError` (with a 4xx status) names what is wrong."""
    if not isinstance(record, dict):
        raise AnswerError("an answer must be a JSON object", 400)
    if record.get("study", study.study_id) != study.study_id:
        raise AnswerError(f"the answer is for study {record.get('study')!r}, this is study {study.study_id}", 409)
    annotator = normalize_name(record.get("annotator"))
    trial_id = record.get("trial")
    trial = study.by_id.get(trial_id) if isinstance(trial_id, str) else None
    if trial is None:
        raise AnswerError(f"unknown trial {str(trial_id)[:40]!r}: not a trial of study {study.study_id}", 404)
    choice = record.get("choice")
    allowed = study.choice_range(trial)
    if isinstance(choice, bool) or not isinstance(choice, int) or choice not in allowed:
        raise AnswerError(
            f"choice {str(choice)[:20]} is out of range for trial {trial_id} ({trial['kind']}: "
            f"{allowed.start}..{allowed.stop - 1})"
        )
    clean: dict[str, Any] = {"study": study.study_id, "annotator": annotator, "trial": trial_id, "choice": choice}
    elapsed = record.get("elapsed_ms")
    if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and 0 <= elapsed < 1e9:
        clean["elapsed_ms"] = int(elapsed)
    return clean


class AnswersLog:
    """The served study's answers file: every accepted answer is appended, flushed and ``os.fsync``-ed before
    the request returns, so a crash or a closed tab loses nothing. One log per file and process; a lock
    serialises the appends of concurrent requests."""

    def __init__(self, study: Study, path: str | Path) -> None:
        self.study = study
        self.path = Path(path)
        self._lock = threading.Lock()
        self._answered: dict[str, set[str]] = {}
        if self.path.exists():
            for record in read_answers(study, [self.path]):
                self._answered.setdefault(record["annotator"], set()).add(record["trial"])
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash mid-write can leave a last line without its newline: start the next record on a line of its
        # own so that one torn line stays the only casualty.
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._append("")

    def answered(self, annotator: str) -> set[str]:
        """The trial ids ``annotator`` (already normalised) has answered."""
        with self._lock:
            return set(self._answered.get(annotator, ()))

    def add(self, record: Any, source: str = "server") -> dict[str, Any]:
        """Validate ``record`` and append it durably; a second answer of one annotator to one trial is refused
        (409): answers are final."""
        clean = check_answer(self.study, record)
        with self._lock:
            done = self._answered.setdefault(clean["annotator"], set())
            if clean["trial"] in done:
                raise AnswerError(f"{clean['annotator']!r} has already answered trial {clean['trial']}", 409,
                                  "duplicate")
            clean["time"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            clean["source"] = source
            self._append(json.dumps(clean, ensure_ascii=False))
            done.add(clean["trial"])
        return clean

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_answers(study: Study, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every answer of the JSONL files ``paths`` (served answers, bundle downloads, simulations), validated
    against ``study``. An answer of another study is an error naming the file; so is a line that is not a JSON
    object, except a torn last line (a crash mid-write), which is skipped with a warning. The same answer twice
    (one download passed twice) counts once; two different answers of one annotator to one trial are an error."""
    seen: dict[tuple[str, str], tuple[int, str, int]] = {}
    records = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"answers file {path}: no such file")
        lines = file.read_text("utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                if number == len(lines):  # no newline after it: the write was cut short
                    logger.warning("answers file %s: skipping a torn last line (%s)", path, err.msg)
                    continue
                raise ValueError(f"answers file {path} line {number}: not valid JSON ({err.msg})") from None
            if isinstance(raw, dict) and raw.get("study") not in (None, study.study_id):
                raise ValueError(
                    f"answers file {path} line {number}: the answers are for study {raw.get('study')!r}, "
                    f"not {study.study_id} ({study.folder}): pass the study they were given in"
                )
            if isinstance(raw, dict) and "study" not in raw:
                raise ValueError(f"answers file {path} line {number}: no 'study' field: not a study answers file")
            try:
                record = check_answer(study, raw)
            except AnswerError as err:
                raise ValueError(f"answers file {path} line {number}: {err}") from None
            key = (record["annotator"], record["trial"])
            if key in seen:
                first_choice, first_path, first_line = seen[key]
                if first_choice != record["choice"]:
                    raise ValueError(
                        f"answers file {path} line {number}: {record['annotator']!r} answered trial "
                        f"{record['trial']} differently at {first_path} line {first_line}"
                    )
                continue
            seen[key] = (record["choice"], str(path), number)
            records.append(record)
    return records


def write_answers(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` (already validated) as an answers JSONL file, durably; returns how many."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n
