"""``CaptionRLConfig``: ``GRPOConfig`` plus what the captioning papers need (baselines, ground truth, columns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from clip_rl_trl.baselines import BASELINES, GT_WEIGHTINGS, make_baseline
from clip_rl_trl.credentials import redact

TRAIN_DECODINGS = ("sample", "greedy")


@dataclass
class CaptionRLConfig(GRPOConfig):
    """Configuration of :class:`~clip_rl_trl.CaptionRLTrainer`; every ``GRPOConfig`` field applies as well.

    Parameters beyond ``GRPOConfig``:
        baseline: how advantages are computed from rewards: ``"group"`` (GRPO group mean), ``"loo"`` (RLOO),
            ``"greedy"`` (self-critical: the reward of a greedy caption of the same image; Cho et al., Zhang et
            al.), ``"running_mean"`` (cumulative mean of past batches; DiscriTune), ``"ema"``, ``"none"``.
        baseline_momentum: momentum of the ``"ema"`` baseline.
        gt_loss_weight: weight of Chaffin et al.'s ground-truth term ``-sum_k w_k log p(gt_k | I_k)``, reference
            captions as extra teacher-forced trajectories (0 switches it off). Its tokens are aggregated like the
            policy loss's (``loss_type``), so the two terms are on one scale.
        gt_weighting: ``w_k`` (see :func:`~clip_rl_trl.baselines.ground_truth_weights`): ``"reward"``
            (``max(r(gt), 0)``: the slides' reward weighting, kept a likelihood; the default), ``"signed_reward"``
            (``r(gt)``, the slides' formula as written), ``"advantage"`` (``r(gt) - b``), ``"positive_advantage"``
            (``max(r(gt) - b, 0)``), ``"softmax"`` (softmax of ``r(gt) / gt_temperature`` over an image's
            references) or ``"uniform"`` (1: plain teacher forcing on the references).
        gt_temperature: temperature of the ``"softmax"`` weighting.
        train_decoding: ``"sample"`` (the policy's distribution, with ``temperature`` / ``top_k`` / ``top_p``) or
            ``"greedy"`` (DiscriTune's training decoding; needs ``num_generations=1``).
        eval_num_beams: beam size of the evaluation captions.
        eval_coco_metrics: compute the pycocoevalcap metrics in :meth:`CaptionRLTrainer.evaluate` (needs Java).
        selection_metric, fluency_metric, fluency_threshold: :meth:`CaptionRLTrainer.evaluate` logs
            ``eval/selection_score``: ``selection_metric`` (a rate in [0, 1] such as ``p_at_1_100`` or
            ``recall_at_1``) when ``fluency_metric`` (e.g. ``grammar_valid`` in the shapes world) is at least
            ``fluency_threshold``, and ``selection_metric - 1`` when it is not, so every fluent checkpoint ranks
            above every degenerate one. With ``metric_for_best_model="selection_score"`` and
            ``load_best_model_at_end=True`` the run ends on its best fluent checkpoint, not its last.
        captions_column, image_column, image_id_column: dataset columns with the reference captions (a list of
            strings per row), the image (PIL or path; only needed by captioners that read pixels), and the
            image id (a key of the image-embedding cache).
        gather_rewards_across_processes: under several processes, rewards that compare captions across the
            batch (retrieval, bidirectional) see the global batch, not each process's slice.
    """

    baseline: str = field(default="group", metadata={"help": f"one of {', '.join(BASELINES)}"})
    baseline_momentum: float = field(default=0.9, metadata={"help": "momentum of the 'ema' baseline"})
    gt_loss_weight: float = field(default=0.0, metadata={"help": "weight of the ground-truth RL term"})
    gt_weighting: str = field(default="reward", metadata={"help": f"one of {', '.join(GT_WEIGHTINGS)}"})
    gt_temperature: float = field(default=0.1, metadata={"help": "temperature of gt_weighting='softmax'"})
    train_decoding: str = field(default="sample", metadata={"help": f"one of {', '.join(TRAIN_DECODINGS)}"})
    eval_num_beams: int = field(default=3, metadata={"help": "beam size for evaluation captions"})
    eval_coco_metrics: bool = field(
        default=True, metadata={"help": "BLEU / METEOR / ROUGE-L / CIDEr in evaluation (needs Java)"}
    )
    selection_metric: str = field(
        default="p_at_1_100", metadata={"help": "evaluation metric (a rate in [0, 1]) that selection_score ranks by"}
    )
    fluency_metric: str | None = field(
        default=None, metadata={"help": "evaluation metric a checkpoint must keep >= fluency_threshold to be selected"}
    )
    fluency_threshold: float = field(default=0.95, metadata={"help": "see fluency_metric"})
    captions_column: str = field(default="captions", metadata={"help": "column of reference captions"})
    image_column: str = field(default="image", metadata={"help": "column of images"})
    image_id_column: str = field(default="image_id", metadata={"help": "column of image ids"})
    gather_rewards_across_processes: bool = field(
        default=True, metadata={"help": "rewards compare captions across the global batch"}
    )

    def generation_settings(self, mode: str = "eval", greedy: bool = False) -> dict[str, Any]:
        """``policy.generate`` settings: beam search for ``mode="eval"`` (the trainer's evaluations and the
        report alike), else the training decoding (greedy with ``greedy`` or ``train_decoding="greedy"``)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_completion_length, **(self.generation_kwargs or {})}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if mode == "eval":
            kwargs.update(do_sample=False, num_beams=self.eval_num_beams)
        elif greedy or self.train_decoding == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or 0)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
            if self.min_p is not None:
                kwargs["min_p"] = self.min_p
        return kwargs

    def __getstate__(self) -> dict:
        # HF pickles the arguments into training_args.bin in the model folder and in every checkpoint, which `push`
        # uploads: a credential (hub_token, any *_token field) lives only in the running process, never on disk.
        # A token pasted into another field (run_name, hub_model_id, ...) is redacted too.
        state = {k: None if k.endswith("_token") and isinstance(v, str) else v for k, v in self.__dict__.items()}
        return redact(state)

    def __post_init__(self) -> None:
        # GRPOConfig insists on two generations per prompt, which only its group baseline needs; self-critical
        # and running-mean training (Cho et al., DiscriTune) sample one caption per image.
        single = self.num_generations == 1
        if single:
            self.num_generations = 2
        try:
            super().__post_init__()
        except ValueError as err:
            if single and "divisible by num_generations" in str(err):
                raise ValueError(
                    "with num_generations=1 the generation batch (per_device_train_batch_size x processes x "
                    "steps_per_generation) must be even, a constraint GRPOConfig's own checks impose"
                ) from err
            raise
        if single:
            self.num_generations = 1
            if self.num_generations_eval == 2:
                self.num_generations_eval = 1
        if self.gt_weighting not in GT_WEIGHTINGS:
            raise ValueError(f"gt_weighting must be one of {', '.join(GT_WEIGHTINGS)}, got {self.gt_weighting!r}")
        if self.train_decoding not in TRAIN_DECODINGS:
            raise ValueError(
                f"train_decoding must be one of {', '.join(TRAIN_DECODINGS)}, got {self.train_decoding!r}"
            )
        if self.gt_temperature <= 0:
            raise ValueError(f"gt_temperature must be > 0, got {self.gt_temperature}")
        if self.gt_loss_weight < 0:
            raise ValueError(f"gt_loss_weight must be >= 0, got {self.gt_loss_weight}")
        if self.eval_num_beams < 1:
            raise ValueError(f"eval_num_beams must be >= 1, got {self.eval_num_beams}")
        baseline = make_baseline(self.baseline, self.baseline_momentum)  # raises on an unknown name
        baseline.check_generations(self.num_generations)
        if self.baseline == "greedy" and self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"baseline='greedy' decodes one greedy caption per image on each process: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations})"
            )
        if self.train_decoding == "greedy" and self.num_generations != 1:
            raise ValueError(
                f"train_decoding='greedy' gives the same caption num_generations={self.num_generations} times; "
                "set num_generations=1 (DiscriTune) or train_decoding='sample'"
            )
