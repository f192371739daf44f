"""REINFORCE baselines: advantages ``A = r - b`` for the sampled captions of a batch.

A batch holds ``N = B * G`` rewards, the ``G = num_generations`` samples of each image next to each other (TRL's
layout). Every baseline gives

- :meth:`Baseline.advantages`: ``A_i = r_i - b_i`` for the samples;
- :meth:`Baseline.per_image`: the baseline ``b`` of each image for a trajectory that is *not* one of the samples,
  such as a ground-truth caption in Chaffin et al.'s ground-truth term (:func:`ground_truth_weights`);
- :meth:`Baseline.update`: called once per step with that step's rewards, after the advantages were computed,
  so a stateful baseline only ever uses past rewards; ``state_dict`` / ``load_state_dict`` for exact resumption.

Under several processes the trainer passes the rewards of the global batch, so every process holds the same
baseline state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

BASELINES = ("group", "loo", "greedy", "running_mean", "ema", "none")


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of num_generations={num_generations}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.view(-1, num_generations)


class Baseline(ABC):
    """Base class: subclasses define the per-image baseline and, if stateful, ``update`` and the state."""

    name: str = ""
    needs_greedy: bool = False  # the trainer must score a greedy caption per image
    min_generations: int = 1

    def advantages(
        self, rewards: torch.Tensor, num_generations: int, greedy_rewards: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``r - b`` for the ``(N,)`` sampled rewards."""
        self.check_generations(num_generations)
        grouped = _grouped(rewards, num_generations)
        b = self.per_image(rewards, num_generations, greedy_rewards)
        return (grouped - b.unsqueeze(1)).reshape(-1)

    @abstractmethod
    def per_image(
        self, rewards: torch.Tensor, num_generations: int, greedy_rewards: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Baseline ``(N / G,)`` of each image for a trajectory outside the samples."""

    def update(self, rewards: torch.Tensor) -> None:  # noqa: B027 - stateless baselines keep nothing
        """Record this step's rewards (stateless baselines ignore them)."""

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if state:
            raise ValueError(f"baseline {self.name!r} is stateless but got state {sorted(state)}")

    def check_generations(self, num_generations: int) -> None:
        if num_generations < self.min_generations:
            raise ValueError(
                f"baseline {self.name!r} needs num_generations >= {self.min_generations}, got {num_generations}"
            )


class GroupMeanBaseline(Baseline):
    """GRPO (Shao et al. 2024): ``b`` = mean reward of the image's ``G`` samples."""

    name = "group"
    min_generations = 2

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        return _grouped(rewards, num_generations).mean(dim=1)


class LeaveOneOutBaseline(Baseline):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``b_i`` = mean reward of the image's *other* samples.

    For a trajectory outside the samples (a ground-truth caption) every sample is "other": ``b`` = group mean.
    """

    name = "loo"
    min_generations = 2

    def advantages(self, rewards, num_generations, greedy_rewards=None):
        self.check_generations(num_generations)
        grouped = _grouped(rewards, num_generations)
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
        return (grouped - others).reshape(-1)

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        return _grouped(rewards, num_generations).mean(dim=1)


class GreedyBaseline(Baseline):
    """Self-critical sequence training (Rennie et al. 2017): ``b`` = reward of the image's greedy caption.

    The baseline of Cho et al. 2022 and Zhang et al. 2022. The trainer decodes one greedy caption per image and
    scores it with the same rewards.
    """

    name = "greedy"
    needs_greedy = True

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        grouped = _grouped(rewards, num_generations)
        if greedy_rewards is None:
            raise ValueError("the greedy (self-critical) baseline needs greedy_rewards, one per image")
        if greedy_rewards.shape != (grouped.shape[0],):
            raise ValueError(
                f"greedy_rewards must have one value per image, shape ({grouped.shape[0]},); "
                f"got {tuple(greedy_rewards.shape)}"
            )
        if not torch.isfinite(greedy_rewards).all():
            raise ValueError("greedy_rewards contain NaN or inf")
        return greedy_rewards.to(rewards.dtype)


class RunningMeanBaseline(Baseline):
    """DiscriTune (Dessì et al. 2023): ``b`` = cumulative mean of the past batches' mean rewards.

    As in the released code (EGG's ``MeanBaseline``): each batch counts once, the baseline is read before the
    batch is added, and it is 0 before the first batch.
    """

    name = "running_mean"

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        grouped = _grouped(rewards, num_generations)
        return torch.full((grouped.shape[0],), self.mean, dtype=rewards.dtype, device=rewards.device)

    def update(self, rewards: torch.Tensor) -> None:
        self.count += 1
        self.mean += (float(rewards.mean()) - self.mean) / self.count

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


class EMABaseline(Baseline):
    """Exponential moving average of the batches' mean rewards: ``b <- m * b + (1 - m) * mean(r)``.

    Read before the batch is added; the first batch initialises it (its own mean), so the first advantages are
    centred rather than equal to the raw rewards.
    """

    name = "ema"

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.value: float | None = None

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        grouped = _grouped(rewards, num_generations)
        value = float(rewards.mean()) if self.value is None else self.value
        return torch.full((grouped.shape[0],), value, dtype=rewards.dtype, device=rewards.device)

    def update(self, rewards: torch.Tensor) -> None:
        mean = float(rewards.mean())
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean

    def state_dict(self) -> dict[str, float]:
        return {} if self.value is None else {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state.get("value")


class NoBaseline(Baseline):
    """Plain REINFORCE: ``b = 0``."""

    name = "none"

    def per_image(self, rewards, num_generations, greedy_rewards=None):
        return torch.zeros(_grouped(rewards, num_generations).shape[0], dtype=rewards.dtype, device=rewards.device)


def make_baseline(name: str, momentum: float = 0.9) -> Baseline:
    """The baseline called ``name`` (one of :data:`BASELINES`)."""
    classes = {
        "group": GroupMeanBaseline,
        "loo": LeaveOneOutBaseline,
        "greedy": GreedyBaseline,
        "running_mean": RunningMeanBaseline,
        "none": NoBaseline,
    }
    if name == "ema":
        return EMABaseline(momentum)
    if name not in classes:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return classes[name]()


GT_WEIGHTINGS = ("reward", "signed_reward", "advantage", "positive_advantage", "softmax", "uniform")


def ground_truth_weights(
    gt_rewards: torch.Tensor,
    image_baseline: torch.Tensor,
    num_generations: int,
    weighting: str = "reward",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Weights ``w_k`` of Chaffin et al. 2024's ground-truth term ``-sum_k w_k log p(gt_k | I_k)``.

    The slides ("RL objective on ground truth samples") weight each human caption ``x`` by its reward, with no
    baseline: ``grad L = -(alpha r_sim(x) + (1 - alpha) r_regu(x)) grad log p(x)``, "learn to reproduce
    human-written sequences, but focus on highly descriptive ones". A weight below zero turns the term into
    unlikelihood on human captions, which pushes their probability down without limit; the default keeps the
    term a likelihood.

    Args:
        gt_rewards: ``(N,)`` weighted reward of the reference paired with each of the ``N = B * G`` rows (the G
            rows of an image next to each other).
        image_baseline: ``(B,)`` baseline of each image (:meth:`Baseline.per_image`).
        num_generations: G.
        weighting:
            ``"reward"``: ``max(r(gt), 0)``, the slides' weighting kept a likelihood (the default);
            ``"signed_reward"``: ``r(gt)``, the slides' formula as written (negative for a negative reward);
            ``"advantage"``: ``r(gt) - b``, a REINFORCE advantage (unlikelihood once samples out-score the
            references);
            ``"positive_advantage"``: ``max(r(gt) - b, 0)``, only references that beat the samples;
            ``"softmax"``: ``softmax_k(r(gt_k) / temperature)`` over the image's G references, summing to 1 per
            image (self-normalised: the term's size does not depend on the reward's scale);
            ``"uniform"``: 1 (plain teacher forcing on the references).
        temperature: the softmax's temperature (``"softmax"`` only).
    """
    grouped = _grouped(gt_rewards, num_generations)
    if image_baseline.shape != (grouped.shape[0],):
        raise ValueError(f"image_baseline must have shape ({grouped.shape[0]},), got {tuple(image_baseline.shape)}")
    advantage = (grouped - image_baseline.unsqueeze(1)).reshape(-1)
    if weighting == "reward":
        return gt_rewards.clamp(min=0.0)
    if weighting == "signed_reward":
        return gt_rewards.clone()
    if weighting == "advantage":
        return advantage
    if weighting == "positive_advantage":
        return advantage.clamp(min=0.0)
    if weighting == "softmax":
        if temperature <= 0:
            raise ValueError(f"the softmax weighting needs temperature > 0, got {temperature}")
        return (grouped / temperature).softmax(dim=1).reshape(-1)
    if weighting == "uniform":
        return torch.ones_like(gt_rewards)
    raise ValueError(f"unknown gt_weighting {weighting!r}; choose one of {', '.join(GT_WEIGHTINGS)}")
