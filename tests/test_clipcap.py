"""ClipCap captioner: mappers, logit convention, generation, save/load, pixel path, LoRA, MLE training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clipcap, tiny_gpt2_config
from transformers import GPT2Config, GPT2LMHeadModel

from clip_rl_trl.data.shapes import ShapesLanguage
from clip_rl_trl.models import ClipCapConfig, ClipCapModel
from clip_rl_trl.models.clipcap import clipcap_lora_config, tokenize_captions, train_clipcap_mle

TINY_CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=4, width=96, layers=3, head_width=32),
    text_cfg=dict(context_length=24, width=64, heads=4, layers=2),
)
CAPTIONS = ["a red circle", "a circle", "a small blue square on the left"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices on a shared 2-core machine: one thread is several times faster than two contending ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return ShapesLanguage.word_tokenizer()


def gpt2_config(tok, **kw) -> GPT2Config:
    return tiny_gpt2_config(tok, n_positions=64, **kw)


def make_model(tok, seed: int = 0, **kw) -> ClipCapModel:
    return make_tiny_clipcap(tok, seed, gpt={"n_positions": 64}, **kw).eval()


def embeds(n: int, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)


def greedy_by_hand(
    model: ClipCapModel, e: torch.Tensor, steps: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Argmax decoding by re-running the full GPT-2 over prefix + tokens at every step (no cache)."""
    eos, pad = model.config.gpt2_config.eos_token_id, model.config.gpt2_config.pad_token_id
    prefix = model.prefix_embeds(e)
    tokens = torch.empty(len(e), 0, dtype=torch.long)
    done = torch.zeros(len(e), dtype=torch.bool)
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([prefix, model.gpt.transformer.wte(tokens)], dim=1)
            logits = model.gpt(inputs_embeds=x).logits[:, -1]
            step_logits.append(logits)
            nxt = logits.argmax(-1).masked_fill(done, pad)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos
            if done.all():
                break
    return tokens, step_logits


# ---------------------------------------------------------------------- config


def test_config_validation_names_the_field(tok):
    g = gpt2_config(tok)
    with pytest.raises(ValueError, match="mapper_type"):
        ClipCapConfig(gpt2_config=g, mapper_type="lstm")
    with pytest.raises(ValueError, match="prefix_length"):
        ClipCapConfig(gpt2_config=g, prefix_length=0)
    with pytest.raises(ValueError, match="prefix_length .64. leaves no room"):
        ClipCapConfig(gpt2_config=g, prefix_length=64)
    with pytest.raises(ValueError, match="mapper_num_heads"):
        ClipCapConfig(gpt2_config=g, mapper_type="transformer", mapper_num_heads=3)
    with pytest.raises(ValueError, match="not both"):
        ClipCapConfig(gpt2_config=g, clip_model_name="ViT-B-32", clip_model_config=TINY_CLIP)
    with pytest.raises(ValueError, match="clip_pretrained needs clip_model_name"):
        ClipCapConfig(gpt2_config=g, clip_pretrained="openai")
    with pytest.raises(ValueError, match="prefix_dim"):
        ClipCapConfig(gpt2_config=g, prefix_dim=True)


def test_config_nested_gpt2_round_trip(tok, tmp_path):
    cfg = ClipCapConfig(
        prefix_dim=64,
        prefix_length=4,
        mapper_type="transformer",
        clip_length=3,
        mapper_num_layers=2,
        mapper_num_heads=2,
        gpt2_config=gpt2_config(tok).to_dict(),
    )
    assert isinstance(cfg.gpt2_config, GPT2Config) and cfg.gpt2_config.n_embd == 32
    cfg.save_pretrained(tmp_path)
    back = ClipCapConfig.from_pretrained(tmp_path)
    assert back.model_type == "clipcap" and back.mapper_type == "transformer" and back.clip_length == 3
    assert (
        isinstance(back.gpt2_config, GPT2Config) and back.gpt2_config.to_dict() == cfg.gpt2_config.to_dict()
    )
    assert ClipCapConfig().gpt2_config.n_embd == 768  # default decoder: GPT-2 small


# ---------------------------------------------------------------------- mappers and init


def test_mlp_mapper_is_linear_tanh_linear(tok):
    model = make_model(tok)
    e = embeds(2)
    lin1, lin2 = model.mapper.net[0], model.mapper.net[2]
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (64, 32 * 4 // 2, 32 * 4)
    by_hand = (torch.tanh(e @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).view(2, 4, 32)
    torch.testing.assert_close(model.prefix_embeds(e), by_hand)


def test_transformer_mapper_outputs_the_constant_positions(tok):
    model = make_model(tok, mapper_type="transformer", clip_length=3, mapper_num_layers=2, mapper_num_heads=2)
    mapper, e = model.mapper, embeds(2)
    x = torch.cat([mapper.linear(e).view(2, 3, 32), mapper.prefix_const.expand(2, -1, -1)], dim=1)
    for layer in mapper.transformer.layers:  # pre-norm blocks, ReLU MLP of width 2d
        h = layer.norm1(x)
        x = x + layer.self_attn(h, h, h, need_weights=False)[0]
        x = x + layer.linear2(torch.relu(layer.linear1(layer.norm2(x))))
    torch.testing.assert_close(model.prefix_embeds(e), x[:, 3:])
    assert mapper.transformer.layers[0].linear1.out_features == 64


def test_init_keeps_gpt2_and_clip_schemes(tok):
    model = make_model(tok, clip_model_config=TINY_CLIP)
    n_layer = model.config.gpt2_config.n_layer
    # GPT-2's own scheme: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer).
    assert model.gpt.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.gpt.transformer.h])
    assert c_proj.std().item() == pytest.approx(0.02 / (2 * n_layer) ** 0.5, rel=0.1)
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight
    # Mapper: PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not HF's N(0, 0.02).
    w = model.mapper.net[0].weight
    assert w.abs().max().item() <= 64**-0.5 and w.std().item() == pytest.approx(64**-0.5 / 3**0.5, rel=0.1)
    # The open_clip tower keeps open_clip's init (conv default bound 1/sqrt(3*4*4)), and is frozen.
    conv = model.clip_visual.conv1.weight
    assert conv.std().item() == pytest.approx(48**-0.5 / 3**0.5, rel=0.15)
    assert not any(p.requires_grad for p in model.clip_visual.parameters())


# ---------------------------------------------------------------------- forward, log-probs, loss


def test_logits_predict_the_token_at_the_same_index(tok):
    model = make_model(tok)
    e = embeds(3)
    ids, mask = tokenize_captions(CAPTIONS, tok)
    assert ids[0].tolist() == tok(CAPTIONS[0], add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id,
        0,
        0,
        0,
        0,
    ]
    logits = model(ids, mask, image_embeds=e).logits
    assert logits.shape == (3, ids.shape[1], len(tok))
    # Reference: full GPT-2 logits over prefix + tokens, where position P - 1 + t predicts token t.
    x = torch.cat([model.prefix_embeds(e), model.gpt.transformer.wte(ids)], dim=1)
    full = model.gpt(inputs_embeds=x, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1))
    torch.testing.assert_close(logits, full.logits[:, 3:-1])
    # Right padding changes nothing before it: caption 1 alone gives the same logits on its tokens.
    alone = model(ids[1:2, :3], image_embeds=e[1:2]).logits
    torch.testing.assert_close(alone, logits[1:2, :3])


def test_token_logprobs_and_loss_by_hand(tok):
    model = make_model(tok)
    e = embeds(3)
    ids, mask = tokenize_captions(CAPTIONS, tok)
    lp = model.token_logprobs(e, ids, mask)
    logits = model(ids, mask, image_embeds=e).logits
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0] * mask
    torch.testing.assert_close(lp, expected)
    assert (lp[mask == 0] == 0).all() and (lp[mask == 1] < 0).all()
    # Loss: mean over the 4 + 3 + 8 real tokens (EOS included), pad id 0 never counted.
    loss = model(ids, mask, image_embeds=e, labels=ids).loss
    assert int(mask.sum()) == 15
    torch.testing.assert_close(loss, -lp.sum() / 15)
    # Temperature divides the logits.
    lp_t = model.token_logprobs(e, ids, mask, temperature=2.0)
    torch.testing.assert_close(
        lp_t, torch.log_softmax(logits / 2, -1).gather(-1, ids[..., None])[..., 0] * mask
    )
    # One pass, with gradients reaching the mapper and GPT-2.
    lp.sum().backward()
    assert (
        model.mapper.net[0].weight.grad.abs().sum() > 0 and model.gpt.transformer.wte.weight.grad is not None
    )


def test_normalize_prefix(tok):
    e = embeds(2)
    plain, norm = make_model(tok), make_model(tok, normalize_prefix=True)
    torch.testing.assert_close(norm.prefix_embeds(3.0 * e), plain.prefix_embeds(e))
    assert not torch.allclose(plain.prefix_embeds(3.0 * e), plain.prefix_embeds(e))


def test_bad_inputs_fail_loudly(tok):
    model = make_model(tok)
    ids, mask = tokenize_captions(CAPTIONS, tok)
    with pytest.raises(ValueError, match=r"image_embeds must be \(B, 64\)"):
        model(ids, mask, image_embeds=torch.randn(3, 32))
    with pytest.raises(ValueError, match="exactly one of image_embeds and pixel_values"):
        model(ids, mask)
    with pytest.raises(ValueError, match="2 images for 3 captions"):
        model(ids, mask, image_embeds=embeds(2))
    with pytest.raises(ValueError, match="pixel_values need an image tower"):
        model(ids, mask, pixel_values=torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="exceed the 60 positions"):
        model(torch.zeros(1, 61, dtype=torch.long), image_embeds=embeds(1))
    with pytest.raises(ValueError, match="temperature"):
        model.token_logprobs(embeds(3), ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="caption 0 .* over 3"):
        tokenize_captions(CAPTIONS, tok, max_length=3)


# ---------------------------------------------------------------------- generation


def test_greedy_equals_hand_rolled_argmax_and_beam_1(tok):
    model = make_model(tok)
    e = embeds(4)
    gen = model.generate(e, max_new_tokens=7)
    by_hand, step_logits = greedy_by_hand(model, e, 7)
    assert torch.equal(gen, by_hand)
    assert torch.equal(model.generate(e, max_new_tokens=7, num_beams=1), gen)
    # The cached incremental logits agree with the teacher-forced ones used for RL log-probs.
    lp = model.token_logprobs(e, gen)
    by_hand_lp = torch.stack([torch.log_softmax(s, -1) for s in step_logits], 1).gather(-1, gen[..., None])[
        ..., 0
    ]
    torch.testing.assert_close(lp, by_hand_lp, rtol=1e-4, atol=1e-5)


def test_sampling_is_seeded_and_rows_are_grouped_by_image(tok):
    model = make_model(tok)
    e = embeds(2)
    torch.manual_seed(5)
    a = model.generate(
        e, do_sample=True, top_k=10, top_p=0.9, temperature=1.3, max_new_tokens=6, num_return_sequences=3
    )
    torch.manual_seed(5)
    b = model.generate(
        e, do_sample=True, top_k=10, top_p=0.9, temperature=1.3, max_new_tokens=6, num_return_sequences=3
    )
    assert a.shape == (6, 6) and torch.equal(a, b)
    # Rows 0-2 belong to image 0: the same samples come out of image 0 repeated three times.
    torch.manual_seed(5)
    c = model.generate(
        e.repeat_interleave(3, 0), do_sample=True, top_k=10, top_p=0.9, temperature=1.3, max_new_tokens=6
    )
    assert torch.equal(a, c)
    beams = model.generate(e, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert beams.shape[0] == 4


# ---------------------------------------------------------------------- save / load, pretrained GPT-2


@pytest.mark.parametrize("mapper_type", ["mlp", "transformer"])
def test_save_pretrained_round_trip(tok, tmp_path, mapper_type):
    model = make_model(
        tok,
        mapper_type=mapper_type,
        clip_length=3,
        mapper_num_layers=2,
        mapper_num_heads=2,
        clip_model_config=TINY_CLIP,
    )
    model.save_pretrained(tmp_path)
    back = ClipCapModel.from_pretrained(tmp_path).eval()
    assert back.gpt.lm_head.weight is back.gpt.transformer.wte.weight
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = tokenize_captions(CAPTIONS, tok)
    e = embeds(3)
    assert torch.equal(back(ids, mask, image_embeds=e).logits, model(ids, mask, image_embeds=e).logits)
    # The tower's attention kernels may pick another path for freshly loaded tensors: equal to float rounding.
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back.encode_pixels(px), model.encode_pixels(px), rtol=0, atol=1e-6)


def test_from_gpt2_loads_pretrained_weights(tok, tmp_path):
    torch.manual_seed(3)
    gpt = GPT2LMHeadModel(gpt2_config(tok))
    gpt.save_pretrained(tmp_path / "gpt2")
    model = ClipCapModel.from_gpt2(str(tmp_path / "gpt2"), prefix_dim=64, prefix_length=4)
    assert model.config.gpt2_config.n_embd == 32 and model.config.prefix_dim == 64
    ref = gpt.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.gpt.state_dict().items())
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight
    model.save_pretrained(tmp_path / "clipcap")
    back = ClipCapModel.from_pretrained(tmp_path / "clipcap")
    assert torch.equal(back.gpt.transformer.h[1].mlp.c_fc.weight, gpt.transformer.h[1].mlp.c_fc.weight)
    with pytest.raises(ValueError, match="do not pass gpt2_config"):
        ClipCapModel.from_gpt2(str(tmp_path / "gpt2"), prefix_dim=64, gpt2_config={})


# ---------------------------------------------------------------------- pixel path


def test_pixel_path_matches_clip_scorer(tok):
    import open_clip

    from clip_rl_trl.clip import ClipScorer

    torch.manual_seed(7)
    clip = open_clip.CLIP(**TINY_CLIP)
    scorer = ClipScorer(
        clip,
        open_clip.SimpleTokenizer(context_length=24),
        open_clip.transform.image_transform(32, is_train=False),
    )
    model = make_model(tok, clip_model_config=TINY_CLIP)
    model.load_clip_tower(clip)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cached = scorer.encode_images(px)
    torch.testing.assert_close(model.encode_pixels(px), cached)
    ids, mask = tokenize_captions(CAPTIONS[:2], tok)
    torch.testing.assert_close(
        model(ids, mask, pixel_values=px).logits, model(ids, mask, image_embeds=cached).logits
    )
    torch.testing.assert_close(
        model.generate(pixel_values=px, max_new_tokens=5), model.generate(cached, max_new_tokens=5)
    )
    with pytest.raises(ValueError, match="needs ClipCapConfig.clip_pretrained"):
        model.load_clip_tower()
    with pytest.raises(ValueError, match="no image tower"):
        make_model(tok).load_clip_tower(clip)


def test_tower_from_open_clip_registry_round_trip(tok, tmp_path):
    # `from_pretrained` builds models on the meta device; open_clip's factory must follow it there.
    model = make_model(tok, prefix_dim=384, clip_model_name="ViT-S-32")
    assert sum(p.numel() for p in model.clip_visual.parameters()) > 10**7
    model.save_pretrained(tmp_path)
    back = ClipCapModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    with pytest.raises(ValueError, match="embeds to 384 dimensions but ClipCapConfig.prefix_dim is 64"):
        make_model(tok, clip_model_name="ViT-S-32")
    with pytest.raises(ValueError, match="cannot build open_clip model 'no-such-model'"):
        make_model(tok, clip_model_name="no-such-model")


# ---------------------------------------------------------------------- LoRA


def test_lora_on_gpt2_blocks_only(tok, tmp_path):
    from peft import PeftModel, get_peft_model

    base = make_model(tok, clip_model_config=TINY_CLIP)
    base.save_pretrained(tmp_path / "base")
    e = embeds(3)
    ids, mask = tokenize_captions(CAPTIONS, tok)
    base_logits = base(ids, mask, image_embeds=e).logits

    peft_model = get_peft_model(base, clipcap_lora_config(r=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B); the tower's c_fc/c_proj are untouched.
    assert len(lora) == 16 and all(".gpt.transformer.h." in n for n in lora)
    assert trainable - lora == {n for n in trainable if ".mapper.modules_to_save.default." in n} != set()
    assert not any("clip_visual" in n for n in trainable)
    lora_a = peft_model.base_model.model.gpt.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert lora_a.shape == (4, 32)  # Conv1D read as (in, out): fan_in_fan_out took effect

    # B starts at zero: same logits; one step moves them; a second backward reaches A and B.
    torch.testing.assert_close(peft_model(ids, mask, image_embeds=e).logits, base_logits)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.token_logprobs(e, ids, mask).sum().neg().backward()
    opt.step()
    opt.zero_grad()
    peft_model.token_logprobs(e, ids, mask).sum().neg().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if n in lora
    )
    tuned = peft_model(ids, mask, image_embeds=e).logits.detach()
    assert not torch.allclose(tuned, base_logits)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(ids, mask, image_embeds=e).logits, base_logits)
    assert peft_model.generate(e, max_new_tokens=4).shape[0] == 3

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        ClipCapModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    torch.testing.assert_close(reloaded(ids, mask, image_embeds=e).logits, tuned)


def test_gradient_checkpointing_keeps_gradients(tok):
    from peft import get_peft_model

    # TRL's GRPOConfig turns gradient checkpointing on by default; dropout off so both passes are comparable.
    torch.manual_seed(0)
    config = gpt2_config(tok, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ClipCapModel(ClipCapConfig(prefix_dim=64, prefix_length=4, gpt2_config=config)).train()
    e, ids = embeds(2), torch.randint(4, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))

    def grads(m):
        m.zero_grad()
        m.token_logprobs(e, ids).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    for m in (model, get_peft_model(model, clipcap_lora_config(r=4, train_mapper=False))):
        plain = grads(m)
        m.gradient_checkpointing_enable()
        assert model.gpt.transformer.gradient_checkpointing
        checkpointed = grads(m)
        m.gradient_checkpointing_disable()
        assert plain.keys() == checkpointed.keys() and len(plain) > 0
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name])


def test_lora_config_refuses_overrides():
    with pytest.raises(ValueError, match="target_modules"):
        clipcap_lora_config(target_modules=["c_attn"])
    assert clipcap_lora_config(train_mapper=False).modules_to_save is None


# ---------------------------------------------------------------------- MLE training


def test_mle_training_memorises_captions(tok):
    model = make_model(tok)
    e = embeds(3)
    losses = train_clipcap_mle(
        model, e, CAPTIONS, tok, epochs=40, batch_size=3, lr=2e-2, seed=0, progress=False
    )
    assert len(losses) == 40 and losses[0] == pytest.approx(3.47, abs=0.15)  # ~ln(32) at init
    assert losses[-1] < 0.1 and not model.training
    gen = model.generate(e, max_new_tokens=12)
    assert tok.batch_decode(gen, skip_special_tokens=True) == CAPTIONS
    # Finished rows are padded after their EOS, exactly as the hand-rolled argmax loop does it.
    assert (
        gen[1].tolist()
        == tok("a circle", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + [0] * 5
    )
    assert torch.equal(gen, greedy_by_hand(model, e, 12)[0])
    # Same seed, same run.
    again = train_clipcap_mle(
        make_model(tok), e, CAPTIONS, tok, epochs=2, batch_size=2, lr=2e-2, seed=0, progress=False
    )
    assert again == train_clipcap_mle(
        make_model(tok), e, CAPTIONS, tok, epochs=2, batch_size=2, lr=2e-2, seed=0, progress=False
    )
    assert len(again) == 4  # ceil(3 / 2) steps per epoch


def test_mle_accepts_several_captions_per_image_and_checks_input(tok):
    model = make_model(tok)
    e = embeds(2)
    captions = [["a circle", "a red circle"], ["a square"]]
    losses = train_clipcap_mle(model, e, captions, tok, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=False)
    assert len(losses) == 1
    with pytest.raises(ValueError, match="3 caption entries for 2 image embeddings"):
        train_clipcap_mle(model, e, CAPTIONS, tok, epochs=1, batch_size=2, lr=1e-3, seed=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_clipcap_mle(
            model, e, CAPTIONS[:2], tok, epochs=1, batch_size=0, lr=1e-3, seed=0, progress=False
        )
    with pytest.raises(TypeError, match="single string"):
        train_clipcap_mle(model, e, "a circle", tok, epochs=1, batch_size=2, lr=1e-3, seed=0, progress=False)
