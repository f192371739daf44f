"""``CaptionRLTrainer``: TRL's ``GRPOTrainer`` driving image captioners, with the papers' baselines and terms.

Written against TRL 1.16 (``pyproject.toml`` pins the minor version). It overrides three of GRPOTrainer's
methods and keeps everything else (optimiser, schedule, accumulation, logging, checkpoints, TRL's loss types):

- ``_generate_and_score_completions``: captions from the policy adapter; rewards over the global batch; the
  configured baseline (self-critical greedy captions, running mean, ...); the online discriminator update;
  the ground-truth trajectories of Chaffin et al.;
- ``_get_per_token_logps_and_entropies``: per-token log-probabilities from the adapter (ClipCap reads its image
  prefix, which TRL's decoder-only path cannot pass);
- ``_compute_loss``: TRL's policy loss plus ``gt_loss_weight * loss_gt``.

Data flows one way: dataset rows -> cached image embeddings -> captions -> one CLIP text pass shared by every
reward -> baseline -> loss.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from clip_rl_trl.baselines import ground_truth_weights, make_baseline
from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.evaluation.captioning import evaluate_policy
from clip_rl_trl.models.clipcap import tokenize_captions
from clip_rl_trl.models.families import policy_for
from clip_rl_trl.models.policies import CaptionPolicy, completion_mask, decode_captions, unwrap_peft
from clip_rl_trl.rewards.callables import DiscriminatorReward
from clip_rl_trl.trainer.checkpoints import (
    ResumableRepeatSampler,
    fault_point,
    finished_at,
    load_extra_state,
    remove_incomplete,
    resume_target,
    save_extra_state,
    write_marker,
)
from clip_rl_trl.trainer.config import CaptionRLConfig
from clip_rl_trl.trainer.input_grads import embeddings_require_grad
from clip_rl_trl.trainer.model_card import CARD_SETTINGS, captioner_details, model_card_text
from clip_rl_trl.trainer.selection import check_selection, selection_score

_TRL_KWARGS = ("trainer_state", "log_extra", "log_metric")


class CaptionRLTrainer(GRPOTrainer):
    """Reinforcement learning of an image captioner with CLIP-based rewards (see the module docstring).

    Args:
        model: the captioner (a :class:`~clip_rl_trl.ClipCapModel`, optionally a PEFT model around one).
        reward_funcs: reward callables (``clip_rl_trl`` rewards or any TRL-style function); modules are refused.
        args: a :class:`CaptionRLConfig`.
        train_dataset / eval_dataset: rows with the image id column and, when a reward or the ground-truth term
            needs them, the reference captions column.
        processing_class: the captioner's tokenizer.
        image_cache: the image-embedding cache the rewards and ClipCap read (defaults to a reward's cache).
        scorer: the CLIP scorer for in-batch metrics (defaults to a reward's scorer).
        policy: a :class:`CaptionPolicy` for a captioner family the library does not know.
        world: a world whose parser and scenes give ``grammar_valid`` and the attribute metrics in
            :meth:`evaluate` (the shapes world; the evaluation rows then need a ``scene`` column).
    """

    _tag_names = ["trl", "grpo", "clip-rl-trl", "image-captioning", "distinctive-captioning"]
    _name = "CaptionRL"

    def __init__(
        self,
        model: nn.Module,
        reward_funcs: Callable | Sequence[Callable],
        args: CaptionRLConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        image_cache: ImageEmbeddingCache | None = None,
        scorer: ClipScorer | None = None,
        policy: CaptionPolicy | None = None,
        world: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ) -> None:
        if not isinstance(args, CaptionRLConfig):
            raise TypeError(f"args must be a CaptionRLConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("pass the captioner's tokenizer (or its processor) as processing_class")
        # A processor (BLIP, LLaVA) carries the tokenizer that decodes captions and tokenizes references.
        self.caption_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
        if not reward_funcs:
            raise ValueError("CaptionRLTrainer needs at least one reward function")
        for func in reward_funcs:
            if isinstance(func, nn.Module) or isinstance(func, str):
                raise TypeError(
                    f"reward {func!r} is a model; CaptionRLTrainer takes reward callables "
                    "(reward(prompts, completions, completion_ids, **columns) -> list[float])"
                )
        self.image_cache = image_cache or next((f.cache for f in reward_funcs if hasattr(f, "cache")), None)
        self.scorer = scorer or next((f.scorer for f in reward_funcs if hasattr(f, "scorer")), None)
        # The trainer updates each discriminator once per step itself (after all scoring passes of the step).
        self.discriminators = [f for f in reward_funcs if isinstance(f, DiscriminatorReward)]
        for disc in self.discriminators:
            disc.update = False
        self.baseline = make_baseline(args.baseline, args.baseline_momentum)
        self.policy = policy or policy_for(
            model, self.image_cache, args.image_id_column, processing_class, image_column=args.image_column
        )
        self.world = world
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None:
                self._check_dataset(name, dataset, args, reward_funcs)
        check_selection(args, has_world=world is not None)
        if getattr(model, "generation_config", None) is None:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig(
                eos_token_id=self.caption_tokenizer.eos_token_id, pad_token_id=self.caption_tokenizer.pad_token_id
            )
        # GRPOTrainer would load a reference model for the KL penalty by Hub name, which a captioner built from
        # a config does not have: copy the initial policy instead (PEFT: the policy with its adapter disabled).
        # The copy is made before GRPOTrainer patches the model's forward, which a copy would still call.
        from peft import PeftModel

        uses_peft = peft_config is not None or isinstance(model, PeftModel)
        reference = None
        if args.beta != 0.0 and not uses_peft:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        beta, args.beta = args.beta, 0.0
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                # GRPOTrainer reads a processor's `config.image_token_id` (BLIP has none) and would treat the
                # model as a TRL VLM; the policy handles images, so TRL gets the tokenizer. Checkpoints and the
                # saved model keep the processor (restored below), as a reload needs it.
                processing_class=self.caption_tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        finally:
            args.beta = beta
        self.processing_class = processing_class
        if args.gradient_checkpointing and isinstance(self.model, PeftModel):
            embeddings_require_grad(self.model)
        self.beta = beta
        self.ref_model = None if reference is None else reference.to(self.accelerator.device)
        self._loss_image_inputs: dict[str, torch.Tensor] | None = None
        self.last_eval_metrics: dict[str, Any] = {}
        self._train_captions: list[str] | None = None
        self._groups_memo: dict[tuple, torch.Tensor | None] = {}

    # ------------------------------------------------------------------ checks

    def _check_dataset(self, name: str, dataset: Any, args: CaptionRLConfig, reward_funcs: list) -> None:
        """Missing columns or ids absent from the cache fail here, before any training step."""
        columns = list(dataset.column_names)
        needed = {args.image_id_column: "the image id"}
        image_column = getattr(self.policy, "image_column", None)
        if image_column is not None:
            needed[image_column] = f"the images {type(self.policy).__name__} reads"
        if args.gt_loss_weight > 0:
            needed[args.captions_column] = "the reference captions (gt_loss_weight > 0)"
        for func in reward_funcs:
            for attr in ("refs_column", "id_column"):
                column = getattr(func, attr, None)
                if column is not None:
                    needed.setdefault(column, f"reward {getattr(func, '__name__', func)!r}")
        if name == "eval_dataset" and self.world is not None:
            needed["scene"] = "with world= the world's metrics read the 'scene' column"
        for column, why in needed.items():
            if column not in columns:
                raise ValueError(f"{name} has no column {column!r} ({why}); its columns are {columns}")
        if self.image_cache is not None:
            missing = [i for i in dict.fromkeys(dataset[args.image_id_column]) if i not in self.image_cache]
            if missing:
                raise ValueError(
                    f"{name}: {len(missing)} image id(s) are not in the image-embedding cache, e.g. {missing[:5]}"
                )

    # ------------------------------------------------------------------ rewards

    def _reward_columns(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
        skip = {"prompt", self.args.image_column}
        return {key: [row[key] for row in rows] for key in rows[0] if key not in skip}

    def _score(self, texts: list[str], rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Rewards ``(N_global, F)`` of every process's captions, in process order, identical on every process.

        With ``gather_rewards_across_processes`` the rewards are computed on the global batch (so in-batch
        comparisons see every process's captions); otherwise each process scores its slice and they are gathered.
        """
        columns = self._reward_columns(rows)
        if self.accelerator.num_processes > 1 and self.args.gather_rewards_across_processes:
            texts = gather_object(texts)
            columns = {key: gather_object(values) for key, values in columns.items()}
            return self._call_rewards(texts, columns)
        return self.accelerator.gather(self._call_rewards(texts, columns))

    def _call_rewards(self, texts: list[str], columns: dict[str, list]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(self.reward_funcs), device=self.accelerator.device)
        extra = {"trainer_state": self.state, "log_extra": self._log_completion_extra, "log_metric": self._log_metric}
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
            values = func(prompts=[""] * len(texts), completions=texts, completion_ids=None, **columns, **extra)
            values = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32)
            if len(values) != len(texts) or not torch.isfinite(values).all():
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(texts)} captions, "
                                 "or a None / NaN / inf value")
            out[:, i] = values.to(out.device)
        return out

    def _local(self, values: torch.Tensor, n_local: int) -> torch.Tensor:
        """This process's rows of a global-batch tensor (processes' batches are concatenated in rank order)."""
        start = self.accelerator.process_index * n_local
        return values[start : start + n_local]

    def _weighted(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        return (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).sum(dim=1)

    # ------------------------------------------------------------------ generation and scoring

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return decode_captions(ids, mask, self.caption_tokenizer)

    def _captions(self, image_inputs: dict[str, torch.Tensor], mode: str, greedy: bool = False) -> torch.Tensor:
        kwargs = self.args.generation_settings(mode, greedy)
        unwrapped = self.accelerator.unwrap_model(self.model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad():
                return self.policy.generate(unwrapped, image_inputs, **kwargs)
        finally:
            unwrapped.train(was_training)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        fault_point("training_step", self.state.global_step + 1)
        args = self.args
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        eos = self.caption_tokenizer.eos_token_id

        image_inputs = self.policy.image_inputs(inputs, device)
        completion_ids = self._captions(image_inputs, mode).to(device)
        mask = completion_mask(completion_ids, eos)
        texts = self._decode(completion_ids, mask)

        rewards_per_func = self._score(texts, inputs)
        rewards = self._weighted(rewards_per_func)
        greedy_rewards = None
        if self.baseline.needs_greedy:
            firsts = inputs[::num_generations]  # one row per image (rows of an image are consecutive)
            first_inputs = {k: v[::num_generations] for k, v in image_inputs.items()}
            greedy_ids = self._captions(first_inputs, mode, greedy=True).to(device)
            greedy_texts = self._decode(greedy_ids, completion_mask(greedy_ids, eos))
            greedy_rewards = self._weighted(self._score(greedy_texts, firsts))
            self._metrics[mode]["train/greedy_reward"].append(greedy_rewards.mean().item())
        advantages = self.baseline.advantages(rewards, num_generations, greedy_rewards)
        image_baseline = self.baseline.per_image(rewards, num_generations, greedy_rewards)
        if mode == "train":
            self.baseline.update(rewards)

        output: dict[str, Any] = {
            "prompt_ids": torch.zeros(len(inputs), 0, dtype=torch.long, device=device),
            "prompt_mask": torch.zeros(len(inputs), 0, dtype=torch.long, device=device),
            "completion_ids": completion_ids,
            "completion_mask": mask,
            "advantages": self._local(advantages, len(inputs)),
            "num_items_in_batch": self.accelerator.gather(mask.sum()).sum(),
            **image_inputs,
        }
        if mode == "train" and (self.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps):
            with torch.no_grad():
                output["old_per_token_logps"] = self._token_logps(self.model, image_inputs, completion_ids, mask)[0]
        if self.beta != 0.0:
            output["ref_per_token_logps"] = self._reference_logps(image_inputs, completion_ids, mask)
        if mode == "train" and args.gt_loss_weight > 0:
            output.update(self._ground_truth(inputs, image_baseline, num_generations, device))
        if mode == "train":
            self._update_discriminators(texts, inputs)
        self._log_step(mode, texts, inputs, rewards_per_func, rewards, advantages)
        return output

    @torch.no_grad()
    def _reference_logps(
        self, image_inputs: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-probabilities under the reference policy (the initial one) for TRL's KL penalty."""
        if self.ref_model is not None:
            return self._token_logps(self.ref_model, image_inputs, ids, mask)[0]
        unwrapped = self.accelerator.unwrap_model(self.model)
        with unwrapped.disable_adapter():
            return self._token_logps(self.model, image_inputs, ids, mask)[0]

    def _ground_truth(
        self, inputs: list[dict[str, Any]], image_baseline: torch.Tensor, num_generations: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Chaffin et al.'s ground-truth trajectories: sample k of an image is paired with one of its references.

        References rotate with the step so every one is used over training. Each is scored with the same
        rewards and weighted by :func:`~clip_rl_trl.baselines.ground_truth_weights` (``gt_weighting``).
        """
        args = self.args
        gt_texts = []
        for k, row in enumerate(inputs):
            refs = row[args.captions_column]
            if not refs:
                raise ValueError(f"image {row[args.image_id_column]!r} has no reference captions")
            gt_texts.append(refs[(k % num_generations + self.state.global_step) % len(refs)])
        gt_rewards = self._weighted(self._score(gt_texts, inputs))
        weights = ground_truth_weights(
            gt_rewards, image_baseline, num_generations, args.gt_weighting, args.gt_temperature
        )
        gt_ids, gt_mask = tokenize_captions(gt_texts, self.caption_tokenizer)
        gt_mask = gt_mask.to(device)
        metrics = self._metrics["train"]
        metrics["train/gt_reward"].append(gt_rewards.mean().item())
        metrics["train/gt_weight"].append(weights.mean().item())
        metrics["train/gt_negative_weight_share"].append((weights < 0).float().mean().item())
        return {
            "gt_ids": gt_ids.to(device),
            "gt_mask": gt_mask,
            "gt_weights": self._local(weights, len(inputs)).to(device),
            "gt_num_items": self.accelerator.gather(gt_mask.sum()).sum(),
        }

    def _update_discriminators(self, texts: list[str], inputs: list[dict[str, Any]]) -> None:
        """One step per discriminator on this step's references (human) vs sampled captions, global batch."""
        if not self.discriminators:
            return
        args = self.args
        ids = [row[args.image_id_column] for row in inputs]
        refs = [row[args.captions_column] for row in inputs]
        if self.accelerator.num_processes > 1:
            texts, ids, refs = gather_object(texts), gather_object(ids), gather_object(refs)
        for disc in self.discriminators:
            txt = disc.scorer.encode_texts_shared(texts)
            img = disc.cache[ids].to(txt.device)
            for key, value in disc.update_from_batch(img, txt, ids, refs).items():
                self._metrics["train"][f"discriminator/{key}"].append(value)

    def _log_step(
        self,
        mode: str,
        texts: list[str],
        inputs: list[dict[str, Any]],
        rewards_per_func: torch.Tensor,
        rewards: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(rewards_per_func[:, i].mean().item())
            metrics[f"rewards/{name}/std"].append(rewards_per_func[:, i].std().item() if len(rewards) > 1 else 0.0)
        metrics["reward"].append(rewards.mean().item())
        metrics["train/advantage_std"].append(advantages.std().item() if len(advantages) > 1 else 0.0)
        all_texts = gather_object(texts)
        metrics["completions/mean_length"].append(sum(len(t.split()) for t in all_texts) / max(len(all_texts), 1))
        if self.scorer is not None and self.image_cache is not None:
            ids = gather_object([row[self.args.image_id_column] for row in inputs])
            metrics["train/in_batch_p_at_1"].append(self._in_batch_p_at_1(all_texts, ids))
        self._logs["prompt"].extend([str(i) for i in gather_object([r[self.args.image_id_column] for r in inputs])])
        self._logs["completion"].extend(all_texts)
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())

    def _in_batch_p_at_1(self, texts: list[str], ids: list[Any]) -> float:
        """Share of captions whose own image is CLIP's top choice among the batch's distinct images."""
        txt = self.scorer.encode_texts_shared(texts)
        position = {image_id: k for k, image_id in enumerate(dict.fromkeys(ids))}
        img = self.image_cache[list(position)].to(txt.device, txt.dtype)
        target = torch.tensor([position[i] for i in ids], device=txt.device)
        return (txt @ img.T).argmax(dim=1).eq(target).float().mean().item()

    # ------------------------------------------------------------------ loss

    def _token_logps(
        self, model: nn.Module, image_inputs: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities and entropies ``(B, T)`` of ``ids`` under the (tempered) policy."""
        logits = self.policy.logits(model, image_inputs, ids, mask).float()
        if self.args.train_decoding == "sample" and self.temperature != 1.0:
            logits = logits / self.temperature
        logps_all = logits.log_softmax(dim=-1)
        logps = logps_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
        entropies = -(logps_all.exp() * logps_all).sum(dim=-1)
        return logps, entropies

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **kwargs,
    ):
        if self._loss_image_inputs is None:
            raise RuntimeError("image inputs of the batch are missing: _compute_loss sets them before TRL's loss")
        ids = input_ids[:, -logits_to_keep:]
        mask = attention_mask[:, -logits_to_keep:]
        logps, entropies = self._token_logps(model, self._loss_image_inputs, ids, mask)
        return logps, (entropies if compute_entropy else None), None

    def _aggregate_like_policy(
        self, per_token: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor, mode: str
    ) -> torch.Tensor:
        """Reduce a ``(B, T)`` per-token loss exactly as ``GRPOTrainer._compute_loss`` reduces the policy loss.

        Written out because TRL keeps this reduction inline for its own policy term (TRL 1.16); the ground-truth
        term then weighs each token as the policy term does, whatever ``loss_type`` is.
        """
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = per_token * mask
        loss_type = self.loss_type
        if loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        if loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        # dapo, cispo, vespo: token sum over the generation batch, as TRL rescales num_items_in_batch.
        normalizer = num_items.clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return masked.sum() / normalizer

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        self._loss_image_inputs = {key: inputs[key] for key in self.policy.input_keys}
        try:
            loss = super()._compute_loss(model, inputs)
            if "gt_ids" in inputs:
                mode = "train" if self.model.training else "eval"
                mask = inputs["gt_mask"]
                logps, _ = self._token_logps(model, self._loss_image_inputs, inputs["gt_ids"], mask)
                per_token = -inputs["gt_weights"].unsqueeze(1) * logps
                gt_loss = self._aggregate_like_policy(per_token, mask, inputs["gt_num_items"], mode)
                loss = loss + self.args.gt_loss_weight * gt_loss
                accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
                logged = self.accelerator.gather((gt_loss * accumulation).detach()).mean().item()
                self._metrics[mode]["train/gt_loss"].append(logged)
        finally:
            self._loss_image_inputs = None
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, then the baseline and discriminators, then the completion marker; old checkpoints are
        rotated away only after that (see :mod:`clip_rl_trl.trainer.checkpoints`)."""
        step = self.state.global_step
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if self.args.should_save and os.path.isdir(output_dir):
            shutil.rmtree(output_dir)  # a crashed attempt at this step: never mix its files with this one's
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # HF would rotate before we finish
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        fault_point("checkpoint_hf_saved", step)
        save_extra_state(output_dir, self.args.baseline, self.baseline, self.discriminators)
        fault_point("checkpoint_before_marker", step)
        write_marker(output_dir, step)
        fault_point("checkpoint_before_rotation", step)
        remove_incomplete(run_dir, below=step)
        rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=False)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (a crash while
        writing one leaves it incomplete: it is skipped with a warning), and a given folder must be complete."""
        target = resume_target(resume_from_checkpoint, self.args.output_dir)
        if isinstance(target, str) and finished_at(target, self.args.max_steps):
            # Trainer would still take one step past max_steps: a run killed after its last checkpoint (while
            # writing the model or the report) and started again loads that checkpoint and trains no further.
            self._load_from_checkpoint(target)
            load_extra_state(target, self.args.baseline, self.baseline, self.discriminators)
            self.state = TrainerState.load_from_json(os.path.join(target, TRAINER_STATE_NAME))
            return TrainOutput(self.state.global_step, 0.0, {})
        return super().train(target, *args, **kwargs)

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(dataset)
        return ResumableRepeatSampler.from_sampler(sampler) if isinstance(sampler, RepeatSampler) else sampler

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_extra_state(checkpoint, self.args.baseline, self.baseline, self.discriminators)

    # ------------------------------------------------------------------ evaluation and model card

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """Beam-search captions for every distinct image of the evaluation set, scored by ``evaluate_captions``.

        Logs ``<prefix>/<metric>`` (``eval/recall_at_1``, ``eval/p_at_1_100``, ``eval/cider``, ...) and keeps the
        metrics for the model card. With a ``world`` the shapes-world metrics (``grammar_valid``, attribute
        precision and recall) join them; ``eval/selection_score`` ranks checkpoints for
        ``metric_for_best_model="selection_score"`` (see ``CaptionRLConfig.fluency_metric``).
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate needs an eval_dataset")
        if self.scorer is None or self.image_cache is None:
            raise ValueError("evaluate needs a scorer and an image cache (pass scorer= and image_cache=)")
        args = self.args
        if self._train_captions is None and self.train_dataset is not None:
            column = self.train_dataset[args.captions_column] if args.captions_column in self.train_dataset.column_names else []
            self._train_captions = [c for caps in column for c in caps]
        metrics, captions, _ = evaluate_policy(
            self.accelerator.unwrap_model(self.model), self.policy, dataset, tokenizer=self.caption_tokenizer,
            scorer=self.scorer, cache=self.image_cache, id_column=args.image_id_column,
            captions_column=args.captions_column, batch_size=args.per_device_eval_batch_size,
            generation=args.generation_settings("eval"), language=self.world,
            train_captions=self._train_captions or None, coco_metrics=args.eval_coco_metrics, seed=args.seed,
            groups_memo=self._groups_memo,
        )
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        selection = selection_score(self.args, numeric)
        if selection is not None:
            numeric["selection_score"] = selection
        scalars = {f"{metric_key_prefix}/{k}": v for k, v in numeric.items()}
        self.log(scalars)
        self.last_eval_metrics = numeric
        self.last_eval_captions = captions
        return scalars

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        # The evaluation logs stable "eval/<name>" keys; Trainer looks up metric_for_best_model as "eval_<name>".
        aliased = {**metrics, **{f"eval_{k[len('eval/'):]}": v for k, v in metrics.items() if k.startswith("eval/")}}
        return super()._determine_best_metric(aliased, trial)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags: Any = None):
        """Write ``README.md`` in ``output_dir``: captioner, rewards and weights, baseline, last metrics, papers."""
        if not self.is_world_process_zero():
            return
        base = unwrap_peft(self.accelerator.unwrap_model(self.model))
        args = self.args
        settings = {k: getattr(args, k) for k in CARD_SETTINGS}
        settings.update({"steps": self.state.global_step, "beta (KL)": self.beta})
        tag_list = [tags] if isinstance(tags, str) else list(tags or [])
        text = model_card_text(
            model_name=model_name or os.path.basename(os.path.normpath(args.output_dir)),
            captioner=type(base).__name__,
            captioner_details=captioner_details(base, self.model, getattr(self.policy, "prompt", None)),
            rewards=list(zip(self.reward_func_names, self.reward_weights.tolist(), strict=True)),
            settings=settings,
            metrics=self.last_eval_metrics,
            tags=list(dict.fromkeys([*self._tag_names, *tag_list])),
            dataset_name=dataset_name,
        )
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "README.md"), "w") as f:
            f.write(text)
