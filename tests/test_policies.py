"""Policy adapters on tiny real models: BLIP and a text-only GPT-2 generate, score and train (decoder-only VLMs:
tests/test_vlm.py)."""


import pytest
import torch
from conftest import tiny_gpt2_config, tiny_rl_args, tiny_shapes_setup
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    GPT2LMHeadModel,
)

from clip_rl_trl import (
    BidirectionalReward,
    CaptionRLTrainer,
    ClipCapConfig,
    ClipCapModel,
    ShapesWorld,
)
from clip_rl_trl.data import ShapesLanguage
from clip_rl_trl.models.clipcap import tokenize_captions
from clip_rl_trl.models.families import policy_for
from clip_rl_trl.models.policies import (
    BlipPolicy,
    CausalLMPolicy,
    ClipCapPolicy,
    completion_mask,
    unwrap_peft,
)
from clip_rl_trl.models.toy_vlm import build_shapes_toy_vlm
from clip_rl_trl.models.vlm import CausalVLMPolicy

BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP's BERT specials, [DEC] = BOS


# ---------------------------------------------------------------------- tiny models (built offline)


def blip_tokenizer() -> BertTokenizerFast:
    vocab = {w: i for i, w in enumerate(BLIP_SPECIALS + ShapesLanguage.vocabulary())}
    return BertTokenizerFast(vocab=vocab, bos_token="[DEC]", eos_token="[SEP]")


def blip_model(tokenizer, seed: int = 0) -> BlipForConditionalGeneration:
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=48, bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    return BlipForConditionalGeneration(config)


def gpt2_lm(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(tokenizer, n_positions=32))


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0)


@pytest.fixture(scope="module")
def setup(world):
    """Shapes rows with their images, a tiny random CLIP judge and its embedding cache (as in test_trainer)."""
    return tiny_shapes_setup(world)


def rows(data, n: int = 3) -> list[dict]:
    return [data[i] for i in range(n)]


def argmax_loop(policy, model, inputs, steps: int, banned: int | None = None) -> torch.Tensor:
    """Greedy decoding by hand: ``logits()`` at the last position of ``ids + [dummy]`` predicts the next token."""
    batch = next(iter(inputs.values())).shape[0]
    ids = torch.zeros(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            probe = torch.cat([ids, torch.zeros(batch, 1, dtype=torch.long)], dim=1)
            nxt = policy.logits(model, inputs, probe, torch.ones_like(probe))[:, -1]
            if banned is not None:
                nxt[:, banned] = -float("inf")
            ids = torch.cat([ids, nxt.argmax(dim=-1, keepdim=True)], dim=1)
    return ids


# ---------------------------------------------------------------------- BLIP


def test_blip_tokenizer_convention() -> None:
    """Trainer captions are "caption + [SEP]" (tokenize_captions); the adapter adds [DEC] (BOS) itself."""
    tok = blip_tokenizer()
    ids, mask = tokenize_captions(["a red circle"], tok)
    words = BLIP_SPECIALS + ShapesLanguage.vocabulary()
    assert ids.tolist() == [[words.index("a"), words.index("red"), words.index("circle"), words.index("[SEP]")]]
    assert tok.decode(ids[0].tolist(), skip_special_tokens=True) == "a red circle"
    policy = BlipPolicy(tok, blip_model(tok).config)
    assert policy.prefix.tolist() == [words.index("[DEC]")]
    prompted = BlipPolicy(tok, blip_model(tok).config, prompt="a large")
    assert prompted.prefix.tolist() == [words.index("[DEC]"), words.index("a"), words.index("large")]


@pytest.mark.parametrize("prompt", [None, "a large"])
def test_blip_greedy_equals_argmax_loop(setup, prompt) -> None:
    tok = blip_tokenizer()
    model = blip_model(tok).eval()
    policy = BlipPolicy(tok, model.config, prompt=prompt)
    inputs = policy.image_inputs(rows(setup[0]), torch.device("cpu"))
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    with torch.no_grad():
        out = policy.generate(model, inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    expected = argmax_loop(policy, model, inputs, out.shape[1])
    mask = completion_mask(out, tok.eos_token_id)
    assert torch.equal(out * mask, expected * mask)


def test_blip_logits_are_the_model_forward_over_bos_prompt_caption(setup) -> None:
    tok = blip_tokenizer()
    model = blip_model(tok).eval()
    policy = BlipPolicy(tok, model.config, prompt="a")
    inputs = policy.image_inputs(rows(setup[0], 2), torch.device("cpu"))
    ids, mask = tokenize_captions(["red circle", "the small blue square at the top"], tok)
    with torch.no_grad():
        got = policy.logits(model, inputs, ids, mask)
        bos, a = tok.bos_token_id, tok.convert_tokens_to_ids("a")
        full = torch.cat([torch.tensor([[bos, a]] * 2), ids], dim=1)
        ref = model(pixel_values=inputs["pixel_values"], input_ids=full,
                    attention_mask=torch.cat([torch.ones(2, 2, dtype=torch.long), mask], dim=1)).logits
    assert got.shape == (2, ids.shape[1], len(tok))
    # position 1 (the prompt's last token) predicts the caption's first token
    torch.testing.assert_close(got, ref[:, 1:-1], atol=1e-5, rtol=0)


def test_blip_captions_stop_at_sep(setup) -> None:
    """With [SEP] made the likeliest token, every caption is exactly [SEP]: generation ends at BLIP's EOS."""
    tok = blip_tokenizer()
    model = blip_model(tok).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tok.sep_token_id] = 100.0
    policy = BlipPolicy(tok, model.config)
    inputs = policy.image_inputs(rows(setup[0]), torch.device("cpu"))
    with torch.no_grad():
        out = policy.generate(model, inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    assert out.tolist() == [[tok.sep_token_id]] * 3


def test_blip_sampled_logprobs_are_finite_and_differentiable(setup) -> None:
    tok = blip_tokenizer()
    model = blip_model(tok)
    policy = BlipPolicy(tok, model.config, prompt="a")
    inputs = policy.image_inputs(rows(setup[0], 4), torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        ids = policy.generate(model.eval(), inputs, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    model.train()
    mask = completion_mask(ids, tok.eos_token_id)
    logps = policy.logits(model, inputs, ids, mask).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.isfinite(logps).all() and (logps <= 0).all()
    (logps * mask).sum().backward()
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.text_decoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_blip_beam_search_runs(setup) -> None:
    tok = blip_tokenizer()
    model = blip_model(tok).eval()
    policy = BlipPolicy(tok, model.config)
    inputs = policy.image_inputs(rows(setup[0], 2), torch.device("cpu"))
    with torch.no_grad():
        out = policy.generate(model, inputs, max_new_tokens=5, do_sample=False, num_beams=3)
    assert out.shape[0] == 2 and out.shape[1] <= 5


def test_blip_errors(setup) -> None:
    tok = blip_tokenizer()
    config = blip_model(tok).config
    no_eos = BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_SPECIALS + ShapesLanguage.vocabulary())})
    with pytest.raises(ValueError, match="tokenizer.eos_token = tokenizer.sep_token"):
        BlipPolicy(no_eos, config)
    policy = BlipPolicy(tok, config, image_column="picture")
    with pytest.raises(KeyError, match="no image column 'picture'"):
        policy.image_inputs(rows(setup[0], 1), torch.device("cpu"))
    policy = BlipPolicy(tok, config, image_column="image_id")
    with pytest.raises(TypeError, match="not a PIL image"):
        policy.image_inputs([{"image_id": 3}], torch.device("cpu"))


def test_unreadable_images_name_the_row_id_and_column(tmp_path) -> None:
    import io

    import datasets
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (16, 16), 7).save(buf, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string")})
    values = [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"garbage", "path": None}]
    datasets.Dataset.from_dict({"image": values, "image_id": ["a", "b"]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    # Read undecoded, the policy decodes each image itself and names the one that fails.
    ds = datasets.load_from_disk(str(tmp_path / "ds")).cast_column("image", datasets.Image(decode=False))
    tok = blip_tokenizer()
    policy = BlipPolicy(tok, blip_model(tok).config)
    assert policy.image_inputs([ds[0]], torch.device("cpu"))["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(
        ValueError,
        match=r"^row 1 \(image id 'b'\), column 'image': cannot read the 7 image bytes: not an image format "
        r"PIL can identify$",
    ):
        policy.image_inputs(list(ds), torch.device("cpu"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"^row 0, column 'image': cannot read image '{tmp_path}/bad.jpg'"):
        policy.image_inputs([{"image": str(tmp_path / "bad.jpg")}], torch.device("cpu"))


# ---------------------------------------------------------------------- text-only decoder (GPT-2)


def test_text_lm_greedy_equals_argmax_loop_and_prompt_is_stripped(setup) -> None:
    tok = ShapesLanguage.word_tokenizer()
    model = gpt2_lm(tok).eval()
    policy = CausalLMPolicy(tok, prompt="a red")
    inputs = policy.image_inputs(rows(setup[0]), torch.device("cpu"))
    assert set(inputs) == set(policy.input_keys) == {"lm_prompt_ids", "lm_prompt_mask"}
    # tokenized as TRL tokenizes a plain-text prompt
    assert inputs["lm_prompt_ids"].tolist() == [tok("a red")["input_ids"]] * 3
    with torch.no_grad():
        out = policy.generate(model, inputs, max_new_tokens=6, do_sample=False, num_beams=1)
    assert out.shape[0] == 3 and out.shape[1] <= 6
    expected = argmax_loop(policy, model, inputs, out.shape[1])
    mask = completion_mask(out, tok.eos_token_id)
    assert torch.equal(out * mask, expected * mask)


def test_text_lm_logits_are_one_forward_over_prompt_and_caption(setup) -> None:
    tok = ShapesLanguage.word_tokenizer()
    model = gpt2_lm(tok).eval()
    policy = CausalLMPolicy(tok, prompt="a")
    inputs = policy.image_inputs(rows(setup[0], 2), torch.device("cpu"))
    ids, mask = tokenize_captions(["red circle", "small blue square at the top"], tok)
    with torch.no_grad():
        got = policy.logits(model, inputs, ids, mask)
        ref = model(input_ids=torch.cat([inputs["lm_prompt_ids"], ids], 1),
                    attention_mask=torch.cat([torch.ones(2, 1, dtype=torch.long), mask], 1)).logits
    torch.testing.assert_close(got, ref[:, : ids.shape[1]], atol=1e-5, rtol=0)


def test_text_lm_errors() -> None:
    tok = ShapesLanguage.word_tokenizer()
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        CausalLMPolicy(tok, prompt="")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        CausalLMPolicy(tok, prompt="a")


def test_text_lm_trains_in_caption_rl_trainer(setup, tmp_path) -> None:
    data, scorer, cache = setup
    tok = ShapesLanguage.word_tokenizer()
    trainer = CaptionRLTrainer(
        model=gpt2_lm(tok), reward_funcs=[BidirectionalReward(scorer, cache)], args=tiny_rl_args(tmp_path),
        train_dataset=data.remove_columns("image"), processing_class=tok, policy=CausalLMPolicy(tok, prompt="a"),
    )
    _train(trainer)


# ---------------------------------------------------------------------- adapter choice


def test_policy_for_picks_the_family(setup) -> None:
    data, scorer, cache = setup
    tok = blip_tokenizer()
    blip = blip_model(tok)
    policy = policy_for(blip, None, "image_id", tok, image_column="img")
    assert isinstance(policy, BlipPolicy) and policy.image_column == "img"
    assert isinstance(policy.image_processor, BlipImageProcessor)
    assert policy.image_processor.size == {"height": 32, "width": 32}
    own = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    via_processor = policy_for(blip, None, "image_id", BlipProcessor(image_processor=own, tokenizer=tok))
    assert via_processor.image_processor is own and via_processor.tokenizer is tok
    llava, processor = build_shapes_toy_vlm("llava")
    assert isinstance(policy_for(llava, None, "image_id", processor), CausalVLMPolicy)
    with pytest.raises(ValueError, match="needs its processor"):
        policy_for(llava, None, "image_id", processor.tokenizer)
    gpt = dict(vocab_size=40, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    clipcap = ClipCapModel(ClipCapConfig(prefix_dim=64, prefix_length=2, gpt2_config=gpt))
    assert isinstance(policy_for(clipcap, cache, "image_id", tok), ClipCapPolicy)
    with pytest.raises(TypeError, match="no policy adapter for Linear"):
        policy_for(torch.nn.Linear(2, 2), cache, "image_id", tok)
    # a text-only decoder cannot see the image: only an explicit CausalLMPolicy drives one
    with pytest.raises(TypeError, match=r"no policy adapter for GPT2LMHeadModel.*CausalLMPolicy"):
        policy_for(gpt2_lm(ShapesLanguage.word_tokenizer()), cache, "image_id", ShapesLanguage.word_tokenizer())


# ---------------------------------------------------------------------- inside CaptionRLTrainer


def _train(trainer) -> None:
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/bidirectional/mean", "reward", "train/in_batch_p_at_1", "completions/mean_length"} <= logs
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_blip_trains_in_caption_rl_trainer(setup, tmp_path) -> None:
    data, scorer, cache = setup
    tok = blip_tokenizer()
    trainer = CaptionRLTrainer(
        model=blip_model(tok), reward_funcs=[BidirectionalReward(scorer, cache)],
        args=tiny_rl_args(tmp_path, gt_loss_weight=0.5), train_dataset=data, processing_class=tok,
    )
    assert isinstance(trainer.policy, BlipPolicy)
    _train(trainer)


def test_blip_processor_with_lora_and_gradient_checkpointing_trains(setup, tmp_path) -> None:
    """A BlipProcessor as processing_class (as TRL users pass it) and LoRA under TRL's default gradient
    checkpointing: the adapters change, the loss is finite, and the trainer keeps the processor for saving."""
    from peft import LoraConfig

    data, scorer, cache = setup
    tok = blip_tokenizer()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    trainer = CaptionRLTrainer(
        model=blip_model(tok), reward_funcs=[BidirectionalReward(scorer, cache)],
        args=tiny_rl_args(tmp_path, gradient_checkpointing=True, gt_loss_weight=0.5), train_dataset=data,
        processing_class=processor, peft_config=LoraConfig(r=4, target_modules=r".*text_decoder.*\.(query|value)"),
    )
    assert trainer.processing_class is processor and isinstance(trainer.policy, BlipPolicy)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    assert unwrap_peft(trainer.model).text_decoder.bert.encoder.gradient_checkpointing  # enabled by train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
