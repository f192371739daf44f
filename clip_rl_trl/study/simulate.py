"""A simulated annotator for studies whose trials record the exact oracle (the shapes world).

It reads each caption as a perfect reader of the world's grammar would (``clip_rl_trl.evaluation.oracle``):

- discrimination: among the candidates the caption is true of, pick one uniformly (the target alone: a sure
  hit; the target and ``t`` others: a hit with probability ``1 / (t + 1)``); when the caption is true of none or
  does not parse, pick uniformly among all candidates;
- pairwise: prefer the caption a perfect reader finds its image with more often (its oracle@1 on the image's
  discrimination trial), a coin flip on a tie;
- fluency: 5 for a sentence of the grammar, 1 otherwise.

With probability ``error_rate`` an answer is instead uniform over every valid choice (a lapse). The expected
discrimination accuracy of a system is therefore ``(1 - e) * (oracle@1 + g / k) + e / k``, where ``g`` is the share
of its trials whose caption is true of no candidate (the reader can only guess; the oracle scores those 0). For a
system whose captions are true of their own image ``g = 0``, and without lapses the simulated accuracy is the
oracle@1 itself: what the tests check ``study results`` recovers.
"""

from __future__ import annotations

import random
from typing import Any

from clip_rl_trl.study.design import FLUENCY_SCALE, Study

__all__ = ["expected_accuracy", "guess_score", "oracle_score", "simulate_answers"]


def oracle_score(trial: dict[str, Any]) -> float:
    """oracle@1 of a discrimination trial (``ties="expected"``): ``1 / (t + 1)`` when the caption is true of the
    target and of ``t`` other candidates, 0 when it is false of the target or does not parse."""
    fits = trial.get("oracle")
    if fits is None or not fits[trial["target"]]:
        return 0.0
    return 1.0 / sum(fits)


def guess_score(trial: dict[str, Any]) -> float:
    """The simulated reader's hit probability without lapses: oracle@1, or ``1 / k`` when the caption is true of
    no candidate (or does not parse) and the reader guesses among all ``k``."""
    fits = trial.get("oracle")
    if fits is None or not any(fits):
        return 1.0 / len(trial["candidates"])
    return oracle_score(trial)


def expected_accuracy(study: Study, system: str, error_rate: float = 0.0) -> float:
    """The simulated annotator's expected accuracy on ``system``'s discrimination trials: the mean over them of
    ``(1 - e) * guess_score + e / k`` (a lapse hits the target with probability ``1 / k``)."""
    trials = [t for t in study.trials if t["kind"] == "discrimination" and t["system"] == system]
    if not trials:
        raise ValueError(f"study {study.study_id} has no discrimination trial of system {system!r}")
    return sum((1 - error_rate) * guess_score(t) + error_rate / len(t["candidates"]) for t in trials) / len(trials)


def simulate_answers(study: Study, annotators: int = 3, error_rate: float = 0.0, seed: int = 0,
                     prefix: str = "sim") -> list[dict[str, Any]]:
    """Answers of ``annotators`` simulated annotators (``sim-1``, ...) to every trial, in the answers format
    (``source: "simulated"``). The study must record the oracle (created from the shapes world)."""
    if not study.settings.get("oracle"):
        raise ValueError(
            f"study {study.folder}: its trials do not record the exact oracle (only studies of the shapes world, "
            "--dataset shapes, do): nothing to simulate an annotator from"
        )
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"--error-rate must be in [0, 1], got {error_rate}")
    if isinstance(annotators, bool) or not isinstance(annotators, int) or annotators < 1:
        raise ValueError(f"--annotators must be an int >= 1, got {annotators!r}")
    # The oracle@1 of each (image, system) caption, for the pairwise preference.
    score = {(t["image_id"], t["system"]): oracle_score(t) for t in study.trials if t["kind"] == "discrimination"}
    parses = {(t["image_id"], t["system"]): t.get("oracle") is not None
              for t in study.trials if t["kind"] == "discrimination"}
    records = []
    for a in range(1, annotators + 1):
        rng = random.Random(f"clip-rl-trl-study-sim:{seed}:{a}")
        name = f"{prefix}-{a}"
        for trial in study.trials:
            allowed = list(study.choice_range(trial))
            if rng.random() < error_rate:
                choice = rng.choice(allowed)
            elif trial["kind"] == "discrimination":
                fits = trial.get("oracle")
                fitting = [i for i, f in enumerate(fits) if f] if fits is not None else []
                choice = rng.choice(fitting or allowed)
            elif trial["kind"] == "pairwise":
                a_score, b_score = (score[(trial["image_id"], s)] for s in trial["systems"])
                choice = 0 if a_score > b_score else 1 if b_score > a_score else rng.randrange(2)
            else:
                choice = FLUENCY_SCALE if parses[(trial["image_id"], trial["system"])] else 1
            records.append({"study": study.study_id, "annotator": name, "trial": trial["id"], "choice": choice,
                            "source": "simulated"})
    return records
