"""Decoder-only VLMs (Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA) as captioners, on tiny random models with
their real processors (clip_rl_trl.models.toy_vlm): log-probabilities, tokens never sampled, the processor as
``processing_class``, LoRA under gradient checkpointing with every baseline, exact resume, and the toy recipe."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_rl_args, tiny_shapes_setup
from peft import LoraConfig
from transformers import TrainerCallback

from clip_rl_trl import BidirectionalReward, CaptionRLTrainer, ShapesWorld
from clip_rl_trl.baselines import BASELINES
from clip_rl_trl.models.families import family
from clip_rl_trl.models.policies import completion_mask, unwrap_peft
from clip_rl_trl.models.toy_vlm import TOY_VLM_KINDS, build_shapes_toy_vlm
from clip_rl_trl.models.vlm import DEFAULT_INSTRUCTION, CausalVLMPolicy, vlm_prompt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    return tiny_shapes_setup(ShapesWorld(seed=0))


def _rows(data, n: int) -> list[dict]:
    """Shapes rows, every other image stretched to 48 x 32 so Qwen's dynamic resolution gives them fewer patches
    and the prompts different lengths (left padding)."""
    rows = [dict(data[i]) for i in range(n)]
    for row in rows[1::2]:
        row["image"] = row["image"].resize((48, 32))
    return rows


def _policy_logps(policy, model, inputs, ids, mask) -> torch.Tensor:
    logps = policy.logits(model, inputs, ids, mask).float().log_softmax(-1)
    return logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_logps_match_each_rows_own_forward_without_padding(setup, kind: str) -> None:
    """The batched, left-padded, (for Qwen) patch-packed teacher-forced forward gives each sampled caption's
    log-probabilities as the model's own forward over that row alone (prompt + caption, no padding), with the
    never-sampled tokens removed from the distribution: to 1e-5."""
    data, _, _ = setup
    model, processor = build_shapes_toy_vlm(kind)
    policy = CausalVLMPolicy(processor)
    rows = _rows(data, 4)
    inputs = policy.image_inputs(rows, torch.device("cpu"))
    torch.manual_seed(0)
    ids = policy.generate(model, inputs, do_sample=True, max_new_tokens=6)
    mask = completion_mask(ids, processor.tokenizer.eos_token_id)
    got = _policy_logps(policy, model, inputs, ids, mask)
    banned = torch.tensor(policy.suppressed)
    for i, row in enumerate(rows):
        enc = processor(images=[row["image"]], text=[policy.prompt], return_tensors="pt")
        n, p = int(mask[i].sum()), enc["input_ids"].shape[1]
        caption = ids[i : i + 1, :n]
        kwargs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in kwargs:
            kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], torch.zeros_like(caption)], 1)
        full = torch.cat([enc["input_ids"], caption], dim=1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), **kwargs).logits[0, p - 1 : p - 1 + n]
        logits[:, banned] = -float("inf")
        want = logits.log_softmax(-1).gather(-1, caption[0].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got[i, :n], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_greedy_generation_is_the_argmax_of_the_policys_logits(setup, kind: str) -> None:
    """``generate`` (KV cache, M-RoPE deltas, suppression) and ``logits`` (one teacher-forced forward) are the same
    policy: greedy decoding equals a hand loop that appends the argmax of ``logits`` at the last position."""
    data, _, _ = setup
    model, processor = build_shapes_toy_vlm(kind)
    policy = CausalVLMPolicy(processor)
    inputs = policy.image_inputs(_rows(data, 3), torch.device("cpu"))
    out = policy.generate(model, inputs, do_sample=False, num_beams=1, max_new_tokens=5)
    loop = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(out.shape[1]):
            probe = torch.cat([loop, torch.zeros(3, 1, dtype=torch.long)], dim=1)
            step = policy.logits(model, inputs, probe, torch.ones_like(probe))[:, -1].argmax(-1, keepdim=True)
            loop = torch.cat([loop, step], dim=1)
    mask = completion_mask(out, processor.tokenizer.eos_token_id)
    assert torch.equal(out * mask, loop * mask)


@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_captions_never_hold_image_or_chat_tokens(setup, kind: str) -> None:
    data, _, _ = setup
    model, processor = build_shapes_toy_vlm(kind)
    policy = CausalVLMPolicy(processor)
    tok = processor.tokenizer
    assert policy.image_token_id in policy.suppressed and tok.eos_token_id not in policy.suppressed
    inputs = policy.image_inputs(_rows(data, 16), torch.device("cpu"))
    torch.manual_seed(0)
    ids = policy.generate(model, inputs, do_sample=True, temperature=3.0, max_new_tokens=12)
    mask = completion_mask(ids, tok.eos_token_id).bool()
    assert not torch.isin(ids[mask], torch.tensor(policy.suppressed)).any()
    # ... and they have probability exactly 0 under the policy the loss differentiates
    probs = policy.logits(model, inputs, ids, mask.long()).float().softmax(-1)
    assert probs[..., policy.suppressed].max().item() == 0.0


@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_the_processors_outputs_are_found_and_kept_by_row(setup, kind: str) -> None:
    """No image_keys listed by hand; Qwen's flattened patches are stored one padded row per caption and flattened
    back, bit for bit, for the rows at hand (a shuffled subset here)."""
    data, _, _ = setup
    _, processor = build_shapes_toy_vlm(kind)
    policy = CausalVLMPolicy(processor)
    rows = _rows(data, 3)
    inputs = policy.image_inputs(rows, torch.device("cpu"))
    assert all(inputs[key].shape[0] == 3 for key in policy.input_keys)
    expected = {"qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
                "qwen2_5_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
                "idefics3": {"pixel_values", "pixel_attention_mask"}, "llava": {"pixel_values"}}[kind]
    assert set(policy.input_keys) - set(policy.prompt_keys) == expected
    order = [2, 0]
    enc = processor(images=[rows[i]["image"] for i in order], text=[policy.prompt] * 2, return_tensors="pt",
                    padding=True, padding_side="left")
    model_inputs = policy.model_inputs({k: v[order] for k, v in inputs.items()}, build_shapes_toy_vlm(kind)[0])
    assert torch.equal(model_inputs["pixel_values"], enc["pixel_values"])


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3"])
def test_an_images_samples_share_one_preprocessing(setup, kind: str) -> None:
    """Rows of one image_id (a step's samples of an image) are preprocessed once and copied: the tensors equal
    those of preprocessing every row."""
    data, _, _ = setup
    _, processor = build_shapes_toy_vlm(kind)
    policy = CausalVLMPolicy(processor)
    distinct = _rows(data, 2)
    rows = [distinct[0], distinct[0], distinct[1], distinct[1]]
    calls = []
    encode = policy._encode
    policy._encode = lambda images: calls.append(len(images)) or encode(images)
    got = policy.image_inputs(rows, torch.device("cpu"))
    assert calls == [2]
    for key, value in got.items():
        want = policy.image_inputs([dict(r, image_id=i) for i, r in enumerate(rows)], torch.device("cpu"))[key]
        assert torch.equal(value, want), key


def test_the_prompt_is_the_instruction_through_the_chat_template() -> None:
    _, processor = build_shapes_toy_vlm("qwen2_vl")
    prompt = vlm_prompt(processor)
    assert DEFAULT_INSTRUCTION in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|image_pad|>") == 1
    assert "Name a shape." in vlm_prompt(processor, "Name a shape.")
    raw = "<|vision_start|><|image_pad|><|vision_end|>Caption:"
    assert vlm_prompt(processor, raw) == raw  # a prompt with the image token is used as written
    with pytest.raises(ValueError, match="more than once"):
        vlm_prompt(processor, "<|image_pad|><|image_pad|>")
    with pytest.raises(ValueError, match="empty"):
        vlm_prompt(processor, "  ")
    processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        vlm_prompt(processor, "Describe it.")
    with pytest.raises(ValueError, match="image_keys: the processor returns no"):
        CausalVLMPolicy(build_shapes_toy_vlm("llava")[1], image_keys=("pixel_values", "image_sizes"))


def _lora_trainer(setup, kind: str, tmp_path, **overrides) -> CaptionRLTrainer:
    data, scorer, cache = setup
    model, processor = build_shapes_toy_vlm(kind)
    args = tiny_rl_args(tmp_path, gradient_checkpointing=True, gt_loss_weight=0.5, **overrides)
    torch.manual_seed(0)  # LoRA's initialisation draws from the global generator (TRL's scripts seed first too)
    return CaptionRLTrainer(model=model, reward_funcs=[BidirectionalReward(scorer, cache)], args=args,
                            train_dataset=data, eval_dataset=data.select(range(8)), processing_class=processor,
                            peft_config=LoraConfig(r=4, target_modules=family("vlm").lora_targets))


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_lora_with_gradient_checkpointing_trains_with_every_baseline(setup, kind: str, baseline: str,
                                                                     tmp_path) -> None:
    """The processor as processing_class, LoRA on the language model only, TRL's gradient checkpointing on, the
    ground-truth term on: two steps move the adapters, the loss is finite."""
    trainer = _lora_trainer(setup, kind, tmp_path, baseline=baseline)
    assert isinstance(trainer.policy, CausalVLMPolicy) and trainer.processing_class.image_token
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and ("language_model" in n or "text_model" in n) for n in lora)
    trainer.train()
    assert unwrap_peft(trainer.model).is_gradient_checkpointing
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("train/gt_loss" in e for e in trainer.state.log_history)
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)


class _StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.slow
@pytest.mark.parametrize("kind", TOY_VLM_KINDS)
def test_resume_is_exact_and_the_adapter_reloads(setup, kind: str, tmp_path) -> None:
    """3 steps, a checkpoint, 3 more from it equal 6 uninterrupted steps; the saved adapter over a rebuilt base
    gives the trained policy's log-probabilities; evaluation runs."""
    from peft import PeftModel

    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=5e-3)
    straight = _lora_trainer(setup, kind, tmp_path / "straight", **settings)
    straight.train()
    interrupted = _lora_trainer(setup, kind, tmp_path / "resumed", **settings)
    interrupted.add_callback(_StopAfter(3))  # the same run (schedule included), stopped after its checkpoint
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = _lora_trainer(setup, kind, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=True)
    a = dict(straight.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, a[name]), name
    metrics = resumed.evaluate()
    assert "eval/p_at_1_100" in metrics and "eval/recall_at_1" in metrics
    resumed.save_model(str(tmp_path / "adapter"))
    resumed.create_model_card()
    card = (tmp_path / "resumed" / "README.md").read_text()
    assert "LoRA r=4" in card and "caption prompt" in card and "Describe this image in one sentence." in card
    assert (tmp_path / "adapter" / "processor_config.json").is_file()  # the processor is saved with the adapter
    base, processor = build_shapes_toy_vlm(kind)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    policy = CausalVLMPolicy(processor)
    data, _, _ = setup
    inputs = policy.image_inputs(_rows(data, 3), torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, processor.tokenizer.eos_token_id]] * 3)
    mask = torch.ones_like(ids)
    trained = resumed.accelerator.unwrap_model(resumed.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(_policy_logps(policy, reloaded, inputs, ids, mask),
                                   _policy_logps(policy, trained, inputs, ids, mask), atol=1e-6, rtol=0)
