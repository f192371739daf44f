"""The tiny random VLMs of ``clip_rl_trl.models.toy_vlm``: each family's processor and model agree, run,
generate, decode shapes captions, build deterministically and reload offline through the Auto classes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from clip_rl_trl.models.toy_vlm import (
    TOY_VLM_KINDS,
    build_shapes_toy_vlm,
    build_toy_vlm,
    toy_kind,
)
from clip_rl_trl.models.vlm import DEFAULT_INSTRUCTION, vlm_prompt

IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "idefics3": "<image>", "llava": "<image>"}
EOS = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "idefics3": "<end_of_utterance>", "llava": "</s>"}
PROMPT_START = {
    "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
    "idefics3": "<|im_start|>User:<image>",
    "llava": "USER: <image>\n",
}
PROMPT_END = {"qwen2_vl": "<|im_start|>assistant\n", "qwen2_5_vl": "<|im_start|>assistant\n",
              "idefics3": "<end_of_utterance>\nAssistant:", "llava": " ASSISTANT:"}


@pytest.fixture(scope="module", params=TOY_VLM_KINDS)
def toy(request):
    model, processor = build_toy_vlm(request.param)
    return request.param, model, processor


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue"), Image.new("RGB", (32, 32), "green")]


def _encode(processor, n: int = 3):
    prompt = vlm_prompt(processor)
    return processor(images=_images()[:n], text=[prompt] * n, padding=True, padding_side="left",
                     return_tensors="pt")


def test_chat_template_prompt_has_the_family_shape(toy):
    kind, _, processor = toy
    prompt = vlm_prompt(processor)
    assert prompt.count(IMAGE_TOKEN[kind]) == 1 and processor.image_token == IMAGE_TOKEN[kind]
    assert prompt.startswith(PROMPT_START[kind]) and prompt.endswith(PROMPT_END[kind])
    assert DEFAULT_INSTRUCTION in prompt
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids  # every word of the prompt is in the vocabulary


def test_forward_and_generate_on_left_padded_batch(toy):
    kind, model, processor = toy
    enc = _encode(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    assert (enc["input_ids"] == image_id).any(dim=1).all()
    assert enc["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position
    vocab = len(processor.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == vocab
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (3, enc["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=4, do_sample=True, suppress_tokens=[image_id])
    assert out.shape[0] == 3 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 4


def test_processor_outputs(toy):
    kind, model, processor = toy
    enc = _encode(processor, 2)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    n_image_tokens = (enc["input_ids"] == image_id).sum(dim=1).tolist()
    if kind.startswith("qwen"):
        assert sorted(enc) == ["attention_mask", "image_grid_thw", "input_ids", "mm_token_type_ids", "pixel_values"]
        assert enc["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 8]]  # 48x32 -> 32 wide x 24 high
        assert enc["pixel_values"].shape == (64 + 48, 3 * 2 * 4 * 4)
        assert n_image_tokens == [16, 12]
        assert (enc["mm_token_type_ids"] == (enc["input_ids"] == image_id)).all()
    elif kind == "idefics3":
        assert sorted(enc) == ["attention_mask", "input_ids", "pixel_attention_mask", "pixel_values"]
        assert enc["pixel_values"].shape == (2, 1, 3, 32, 32)
        assert enc["pixel_attention_mask"].shape == (2, 1, 32, 32)
        assert n_image_tokens == [16, 16] == [processor.image_seq_len] * 2
    else:
        assert sorted(enc) == ["attention_mask", "input_ids", "pixel_values"]
        assert enc["pixel_values"].shape == (2, 3, 32, 32)
        assert n_image_tokens == [64, 64] == [model.config.image_seq_length] * 2


def test_tokens_and_caption_round_trip(toy):
    kind, model, processor = toy
    tok = processor.tokenizer
    assert tok.eos_token == EOS[kind]
    assert model.generation_config.pad_token_id == tok.pad_token_id == model.config.text_config.pad_token_id
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id == (eos[0] if isinstance(eos, list) else eos) == model.config.text_config.eos_token_id
    for caption in ("a large red circle", "a small blue square on the left and a triangle on a white background"):
        ids = tok(caption)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok.decode(tok(DEFAULT_INSTRUCTION, add_special_tokens=False)["input_ids"]) == DEFAULT_INSTRUCTION


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = build_toy_vlm("qwen2_vl", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_toy_vlm("qwen2_vl", seed=3)
    c, _ = build_toy_vlm("qwen2_vl", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_reload_through_auto_classes(toy, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kind, model, processor = toy
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    processor2 = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(model2) is type(model) and type(processor2) is type(processor)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor2.tokenizer.eos_token == processor.tokenizer.eos_token
    assert vlm_prompt(processor2) == vlm_prompt(processor)
    enc, enc2 = _encode(processor), _encode(processor2)
    assert sorted(enc) == sorted(enc2) and all(torch.equal(enc[k], enc2[k]) for k in enc)
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, model2.eval()(**enc2).logits, atol=1e-5)


def test_shapes_world_size_and_names():
    from clip_rl_trl.data.shapes import ShapesWorld

    model, processor = build_shapes_toy_vlm("llava", world=ShapesWorld(image_size=48))
    assert model.config.vision_config.image_size == 48
    assert toy_kind("toy:qwen2_vl") == "qwen2_vl" and toy_kind("Qwen/Qwen2-VL-2B-Instruct") is None
    assert toy_kind(None) is None
    with pytest.raises(ValueError, match="unknown toy VLM kind"):
        toy_kind("toy:nope")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_toy_vlm("idefics3", image_size=36)


def test_teacher_forced_logits_match_generation(toy):
    """One forward over prompt + caption (``mm_token_type_ids`` extended with zeros) gives the logits generation
    sampled from, on left-padded rows too (Qwen's 48x32 image has fewer image tokens): what GRPO's ratio needs."""
    kind, model, processor = toy
    tok = processor.tokenizer
    enc = _encode(processor)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=tok.eos_token_id)
        n = enc["input_ids"].shape[1]
        ids = out.sequences[:, n:]
        full = {**enc, "input_ids": out.sequences,
                "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(ids)], dim=1)}
        if "mm_token_type_ids" in enc:
            full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
        logits = model(**full, logits_to_keep=ids.shape[1] + 1).logits[:, :-1]
    assert (enc["attention_mask"] == 0).any() == kind.startswith("qwen")
    assert torch.allclose(logits, torch.stack(out.logits, dim=1), atol=1e-5)


def test_idefics3_sizes_override_the_toy_widths():
    # benchmarks/rl_step_throughput.py builds a SmolVLM-256M-sized model this way; here at small widths.
    sizes = {"text": {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1, "num_hidden_layers": 3},
             "vision": {"hidden_size": 24, "patch_size": 8}, "scale_factor": 4}
    model, processor = build_toy_vlm("idefics3", image_size=64, sizes=sizes)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers) == (48, 3, 1, 3)
    assert (vision.hidden_size, vision.patch_size, vision.image_size, model.config.scale_factor) == (24, 8, 64, 4)
    enc = processor(images=[Image.new("RGB", (64, 48), "red")], text=[vlm_prompt(processor)], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == (64 // 8) ** 2 // 4**2
    with torch.no_grad():
        assert model(**enc).logits.shape[-1] == len(processor.tokenizer)
    with pytest.raises(ValueError, match="vocab_size 10 but the tokenizer has"):
        build_toy_vlm("idefics3", sizes={"text": {"vocab_size": 10}})
    with pytest.raises(ValueError, match="only the idefics3"):
        build_toy_vlm("llava", sizes={})
    with pytest.raises(ValueError, match="multiple of 32"):
        build_toy_vlm("idefics3", image_size=48, sizes={"vision": {"patch_size": 8}, "scale_factor": 4})
