"""CaptionRLTrainer on tiny real models: every baseline trains, ground-truth term, errors, exact resume."""

import os

import pytest
import torch
from conftest import make_tiny_clipcap, tiny_rl_args, tiny_shapes_setup
from trl import GRPOTrainer

from clip_rl_trl import (
    BidirectionalReward,
    CaptionRLConfig,
    CaptionRLTrainer,
    ClipCapModel,
    Discriminator,
    DiscriminatorReward,
    RetrievalReward,
    ShapesWorld,
)
from clip_rl_trl.baselines import BASELINES
from clip_rl_trl.data import ShapesLanguage


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0)


@pytest.fixture(scope="module")
def setup(world):
    torch.manual_seed(0)
    data, scorer, cache = tiny_shapes_setup(world)
    return data.remove_columns("image"), scorer, cache, ShapesLanguage.word_tokenizer()


make_model = make_tiny_clipcap


def make_args(tmp_path, **overrides) -> CaptionRLConfig:
    return tiny_rl_args(tmp_path, **{"max_completion_length": 10, **overrides})


def make_trainer(setup, args, rewards=None, model=None, **kwargs) -> CaptionRLTrainer:
    data, scorer, cache, tokenizer = setup
    if rewards is None:
        rewards = [BidirectionalReward(scorer, cache)]
    model = model or make_model(tokenizer)
    return CaptionRLTrainer(
        model=model, reward_funcs=rewards, args=args, train_dataset=kwargs.pop("train_dataset", data),
        processing_class=tokenizer, **kwargs,
    )


def test_is_a_grpo_trainer() -> None:
    assert issubclass(CaptionRLTrainer, GRPOTrainer)


@pytest.mark.parametrize("baseline", BASELINES)
def test_every_baseline_trains(setup, tmp_path, baseline: str) -> None:
    trainer = make_trainer(setup, make_args(tmp_path, baseline=baseline))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/bidirectional/mean", "train/advantage_std", "train/in_batch_p_at_1", "reward"} <= logs
    if baseline == "greedy":
        assert "train/greedy_reward" in logs
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)]
    assert any(changed)


def test_group_advantages_are_centred_per_image(setup, tmp_path) -> None:
    trainer = make_trainer(setup, make_args(tmp_path, baseline="group"))
    batch = [setup[0][i] for i in range(2) for _ in range(4)]  # 2 images x 4 samples
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    torch.testing.assert_close(out["advantages"].view(2, 4).sum(dim=1), torch.zeros(2), atol=1e-5, rtol=0)
    assert out["image_embeds"].shape == (8, 64)
    assert out["completion_ids"].shape[0] == 8 and out["completion_mask"].shape == out["completion_ids"].shape


def test_single_sample_self_critical(setup, tmp_path) -> None:
    args = make_args(tmp_path, baseline="greedy", num_generations=1, per_device_train_batch_size=4)
    assert args.num_generations == 1
    trainer = make_trainer(setup, args, rewards=[RetrievalReward(setup[1], setup[2])])
    trainer.train()
    assert "train/greedy_reward" in {k for e in trainer.state.log_history for k in e}


def test_ground_truth_term_and_discriminator(setup, tmp_path) -> None:
    data, scorer, cache, tokenizer = setup
    disc = Discriminator(64, lr=1e-2, seed=0)
    rewards = [BidirectionalReward(scorer, cache), DiscriminatorReward(disc, scorer, cache)]
    before = [p.detach().clone() for p in disc.parameters()]
    trainer = make_trainer(setup, make_args(tmp_path, gt_loss_weight=1.0, reward_weights=[0.94, 0.06]), rewards)
    assert rewards[1].update is False  # the trainer updates it once per step itself
    trainer.train()
    logs = {k: v for e in trainer.state.log_history for k, v in e.items()}
    assert "train/gt_loss" in logs and "train/gt_reward" in logs and "discriminator/loss" in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))


def test_ground_truth_term_alone_moves_the_policy_towards_references(setup, tmp_path) -> None:
    """With uniform weights and zero policy advantage the ground-truth term is teacher forcing: NLL falls."""
    data, scorer, cache, tokenizer = setup
    from clip_rl_trl.models.clipcap import tokenize_captions

    args = make_args(tmp_path, baseline="group", gt_loss_weight=1.0, gt_weighting="uniform", max_steps=4,
                     learning_rate=3e-3)
    def zero(prompts, completions, completion_ids, **kw):
        return [0.0] * len(completions)

    trainer = make_trainer(setup, args, rewards=[zero], image_cache=cache)
    refs = [r[0] for r in data["captions"][:8]]
    ids, mask = tokenize_captions(refs, tokenizer)
    emb = cache[data["image_id"][:8]].float()

    def nll() -> float:
        with torch.no_grad():
            return -(trainer.model.token_logprobs(emb, ids, mask).sum() / mask.sum()).item()

    start = nll()
    trainer.train()
    assert nll() < start


def _reference_reward(value: float, refs: set[str]):
    """A reward of ``value`` for a reference caption and 0 for anything else."""

    def reward(prompts, completions, completion_ids, **kw):
        return [value if c in refs else 0.0 for c in completions]

    return reward


@pytest.mark.parametrize(
    ("weighting", "ref_reward", "direction"),
    [
        ("reward", 1.0, "up"),
        ("reward", -1.0, "still"),  # clamped at 0: a reference below the baseline is never pushed down
        ("signed_reward", -1.0, "down"),
        ("advantage", 1.0, "up"),
        ("advantage", -1.0, "down"),  # r(gt) - b < 0: unlikelihood on the references
        ("positive_advantage", -1.0, "still"),
        ("softmax", -1.0, "up"),
        ("uniform", -1.0, "up"),
    ],
)
def test_ground_truth_term_sign_under_each_weighting(setup, tmp_path, weighting, ref_reward, direction) -> None:
    """Samples score 0 (zero advantages: no policy gradient), references ``ref_reward``: the term alone moves
    the references' likelihood, up for a positive weight, down for a negative one, not at all for zero."""
    data, scorer, cache, tokenizer = setup
    from clip_rl_trl.models.clipcap import tokenize_captions

    refs = {c for caps in data["captions"] for c in caps}
    args = make_args(tmp_path, baseline="group", gt_loss_weight=1.0, gt_weighting=weighting, max_steps=3,
                     learning_rate=3e-3)
    trainer = make_trainer(setup, args, rewards=[_reference_reward(ref_reward, refs)], image_cache=cache)
    ids, mask = tokenize_captions([r[0] for r in data["captions"][:8]], tokenizer)
    emb = cache[data["image_id"][:8]].float()
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def nll() -> float:
        with torch.no_grad():
            return -(trainer.model.token_logprobs(emb, ids, mask).sum() / mask.sum()).item()

    start = nll()
    trainer.train()
    sampled = trainer.state.log_history
    assert all(e.get("rewards/reward/mean", 0.0) == 0.0 for e in sampled)  # no sample was a reference
    if direction == "still":
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    elif direction == "up":
        assert nll() < start - 1e-3
    else:
        assert nll() > start + 1e-3
    logs = {k: v for e in sampled for k, v in e.items()}
    assert logs["train/gt_reward"] == pytest.approx(ref_reward)
    negative = weighting in ("signed_reward", "advantage") and ref_reward < 0
    assert logs["train/gt_negative_weight_share"] == (1.0 if negative else 0.0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_ground_truth_term_is_reduced_like_the_policy_loss(setup, tmp_path, loss_type) -> None:
    """The term's tokens are reduced as TRL reduces the policy loss of ``loss_type``: checked against a hand
    reduction of the same per-token values."""
    data, scorer, cache, tokenizer = setup
    trainer = make_trainer(setup, make_args(tmp_path, loss_type=loss_type, max_completion_length=10))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = {
        "dapo": 15.0 / 5,  # token sum / tokens of the generation batch (one process, no accumulation)
        "grpo": (6.0 / 3 + 9.0 / 2) / 2,  # per-caption token mean, then mean over captions
        "bnpo": 15.0 / 5,
        "dr_grpo": 15.0 / (2 * 10),  # / (captions x max_completion_length)
    }[loss_type]
    got = trainer._aggregate_like_policy(per_token, mask, mask.sum(), "train")
    assert got.item() == pytest.approx(expected)


def test_clear_errors_before_training(setup, tmp_path) -> None:
    data, scorer, cache, tokenizer = setup
    with pytest.raises(ValueError, match="'captions'.*gt_loss_weight"):
        make_trainer(setup, make_args(tmp_path, gt_loss_weight=1.0), train_dataset=data.remove_columns("captions"))
    with pytest.raises(ValueError, match="no column 'image_id'"):
        make_trainer(setup, make_args(tmp_path), train_dataset=data.rename_column("image_id", "id"))
    other = ShapesWorld(seed=0).to_dataset(4, "test").remove_columns("image")
    with pytest.raises(ValueError, match="not in the image-embedding cache"):
        make_trainer(setup, make_args(tmp_path), train_dataset=other)
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        make_args(tmp_path, baseline="mean")
    with pytest.raises(ValueError, match="num_generations >= 2"):
        make_args(tmp_path, baseline="group", num_generations=1)
    with pytest.raises(ValueError, match="train_decoding='greedy'"):
        make_args(tmp_path, train_decoding="greedy")
    with pytest.raises(ValueError, match="gt_weighting"):
        make_args(tmp_path, gt_weighting="sometimes")
    with pytest.raises(TypeError, match="is a model"):
        make_trainer(setup, make_args(tmp_path), rewards=[torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="tokenizer"):
        CaptionRLTrainer(model=make_model(tokenizer), reward_funcs=[BidirectionalReward(scorer, cache)],
                         args=make_args(tmp_path), train_dataset=data)


def _train_params(setup, args, resume=None):
    data, scorer, cache, tokenizer = setup
    disc = Discriminator(64, lr=1e-2, seed=0)
    rewards = [BidirectionalReward(scorer, cache), DiscriminatorReward(disc, scorer, cache)]
    trainer = make_trainer(setup, args, rewards=rewards, model=make_model(tokenizer, seed=1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, disc


def test_resume_gives_the_same_parameters(setup, tmp_path) -> None:
    """6 steps straight == the same run restarted from its step-3 checkpoint (policy, optimiser, scheduler, RNG,
    running-mean baseline, discriminator and its optimiser all restored)."""
    common = dict(baseline="running_mean", gt_loss_weight=0.5, max_steps=6, learning_rate=1e-3,
                  save_strategy="steps", save_steps=3)
    straight, disc_a = _train_params(setup, make_args(tmp_path / "a", **common))
    resumed, disc_b = _train_params(setup, make_args(tmp_path / "b", **common),
                                    resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for a, b in zip(disc_a.parameters(), disc_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert straight.baseline.state_dict() == pytest.approx(resumed.baseline.state_dict())
    assert straight.baseline.state_dict()["count"] == 6


def test_evaluate_and_model_card(setup, tmp_path) -> None:
    data, scorer, cache, tokenizer = setup
    args = make_args(tmp_path / "run", eval_coco_metrics=False, per_device_eval_batch_size=8, eval_num_beams=2,
                     baseline="greedy", gt_loss_weight=0.5, reward_weights=[0.94, 0.06])
    disc = Discriminator(64, seed=0)
    rewards = [BidirectionalReward(scorer, cache), DiscriminatorReward(disc, scorer, cache)]
    trainer = make_trainer(setup, args, rewards=rewards, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval/recall_at_1", "eval/p_at_1_100", "eval/clip_s", "eval/distinct_1"} <= set(metrics)
    assert 0.0 <= metrics["eval/recall_at_1"] <= 1.0
    assert len(trainer.last_eval_captions) == 16  # one beam-search caption per distinct image
    assert any(e.get("eval/recall_at_1") is not None for e in trainer.state.log_history)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.args.output_dir = str(out)
    trainer.create_model_card(model_name="shapes-clipcap-bidir")
    card = (out / "README.md").read_text()
    assert "library_name: clip-rl-trl" in card and "ClipCapModel" in card
    assert "| bidirectional | 0.94 |" in card and "| discriminator | 0.06 |" in card
    assert "| baseline | greedy |" in card and "| gt_loss_weight | 0.5 |" in card
    assert "recall_at_1" in card
    for key in ("chaffin2024", "rennie2017", "mokady2021"):
        assert key in card
    reloaded = ClipCapModel.from_pretrained(str(out))
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_penalty_to_the_initial_policy(setup, tmp_path, lora: bool) -> None:
    """beta > 0: reference log-probabilities from a frozen copy of the initial policy, or the LoRA policy with its
    adapter disabled; TRL's KL term is logged and grows from 0 as the policy moves away."""
    from clip_rl_trl.models.clipcap import clipcap_lora_config

    tokenizer = setup[3]
    args = make_args(tmp_path, beta=0.1, max_steps=3, learning_rate=1e-2, disable_dropout=True)  # exact 0 at step 1
    trainer = make_trainer(setup, args, peft_config=clipcap_lora_config(r=4) if lora else None)
    assert trainer.beta == 0.1 and (trainer.ref_model is None) == lora
    if not lora:
        initial = make_model(tokenizer)
        for a, b in zip(trainer.ref_model.parameters(), initial.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    trainer.train()
    kl = [e["kl"] for e in trainer.state.log_history if "kl" in e]
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0


def test_unsupported_settings_fail_loudly(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of num_generations"):
        make_args(tmp_path, baseline="greedy", per_device_train_batch_size=6, num_generations=4,
                  generation_batch_size=24)


def test_selection_score_ranks_fluent_checkpoints_first(setup, tmp_path) -> None:
    """``eval/selection_score`` is P@1 when grammar validity passes the threshold, P@1 - 1 when it does not."""
    data, scorer, cache, tokenizer = setup
    for threshold, penalty in ((0.0, 0.0), (1.01, 1.0)):
        args = make_args(tmp_path, eval_coco_metrics=False, per_device_eval_batch_size=16, eval_num_beams=1,
                         fluency_metric="grammar_valid", fluency_threshold=threshold)
        metrics = make_trainer(setup, args, eval_dataset=data, world=ShapesLanguage()).evaluate()
        assert 0.0 <= metrics["eval/grammar_valid"] <= 1.0
        assert metrics["eval/selection_score"] == pytest.approx(metrics["eval/p_at_1_100"] - penalty)
    args = make_args(tmp_path, eval_coco_metrics=False, fluency_metric="grammar_valid")
    with pytest.raises(ValueError, match="'grammar_valid'.*world"):
        make_trainer(setup, args, eval_dataset=data).evaluate()  # no world: no grammar validity
    with pytest.raises(ValueError, match="'scene' column"):
        make_trainer(setup, args, eval_dataset=data.remove_columns("scene"), world=ShapesLanguage()).evaluate()
    # Caught when the trainer is built, before any training step.
    with pytest.raises(ValueError, match="'grammar_valid'.*world"):
        make_trainer(setup, args, eval_dataset=data)
    with pytest.raises(ValueError, match="'scene' column"):
        make_trainer(setup, args, eval_dataset=data.remove_columns("scene"), world=ShapesLanguage())
    with pytest.raises(ValueError, match="'cider'.*eval_coco_metrics=True"):
        make_trainer(setup, make_args(tmp_path, eval_coco_metrics=False, fluency_metric="cider"), eval_dataset=data)


def test_load_best_model_at_end_keeps_the_best_selection_score(setup, tmp_path) -> None:
    data, scorer, cache, tokenizer = setup
    args = make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                     save_steps=1, load_best_model_at_end=True, metric_for_best_model="selection_score",
                     fluency_metric="grammar_valid", eval_coco_metrics=False, per_device_eval_batch_size=16,
                     eval_num_beams=1, learning_rate=1e-2)
    trainer = make_trainer(setup, args, eval_dataset=data, world=ShapesLanguage())
    trainer.train()
    scores = {e["step"]: e["eval/selection_score"] for e in trainer.state.log_history if "eval/selection_score" in e}
    assert sorted(scores) == [1, 2, 3, 4]
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first of equal scores stays best
    assert trainer.state.best_metric == pytest.approx(scores[best_step])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    from safetensors.torch import load_file

    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in saved.items())  # the run ends on the best checkpoint
