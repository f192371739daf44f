"""ClipScorer on a tiny random open_clip model: normalisation, batching, inputs, truncation, errors."""

import io
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_rl_trl import ClipScorer
from clip_rl_trl.clip import load_image


def _images() -> list[Image.Image]:
    return [
        Image.new("RGB", (32, 32), (255, 0, 0)),
        Image.new("L", (48, 40), 128),  # grayscale, other size
        Image.new("RGBA", (32, 32), (0, 0, 255, 128)),
        Image.new("P", (32, 32), 3),
    ]


def test_embeddings_are_normalised_and_frozen(scorer: ClipScorer) -> None:
    txt = scorer.encode_texts(["a red circle", "a blue square on a gray background"])
    img = scorer.encode_images(_images())
    assert txt.shape == (2, 64) and img.shape == (4, 64)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert not txt.requires_grad and not img.requires_grad
    assert all(not p.requires_grad for p in scorer.model.parameters())
    assert not scorer.model.training


def test_matches_open_clip_directly(scorer: ClipScorer) -> None:
    texts = ["a small green triangle", "a circle"]
    with torch.no_grad():
        expected = F.normalize(scorer.model.encode_text(open_clip.SimpleTokenizer(context_length=24)(texts)), dim=-1)
    torch.testing.assert_close(scorer.encode_texts(texts), expected)


def test_batch_size_does_not_change_results(scorer: ClipScorer) -> None:
    texts = [f"a {c} circle" for c in ["red", "blue", "green", "gray", "white"]]
    torch.testing.assert_close(scorer.encode_texts(texts, batch_size=2), scorer.encode_texts(texts, batch_size=64))
    imgs = _images()
    torch.testing.assert_close(
        scorer.encode_images(imgs, batch_size=3), scorer.encode_images(imgs, batch_size=1), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="batch_size"):
        scorer.encode_texts(texts, batch_size=0)


def test_paths_tensors_and_pil_agree(scorer: ClipScorer, tmp_path) -> None:
    imgs = _images()
    paths = []
    for i, img in enumerate(imgs):
        path = tmp_path / f"{i}.png"
        img.save(path)
        paths.append(path)
    from_pil = scorer.encode_images(imgs)
    torch.testing.assert_close(scorer.encode_images(paths), from_pil)
    torch.testing.assert_close(scorer.encode_images([str(p) for p in paths]), from_pil)
    pixels = torch.stack([scorer.preprocess(img.convert("RGB")) for img in imgs])
    torch.testing.assert_close(scorer.encode_images(pixels), from_pil)


def test_unreadable_image_names_the_path(scorer: ClipScorer, tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        scorer.encode_images([bad])
    with pytest.raises(ValueError, match="missing.png"):
        scorer.encode_images([tmp_path / "missing.png"])


def test_load_image_reads_datasets_image_values_and_names_what_is_unreadable(tmp_path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    assert load_image({"bytes": buf.getvalue(), "path": None}).getpixel((0, 0)) == (1, 2, 3)
    Image.new("L", (8, 8), 9).save(tmp_path / "grey.png")
    assert load_image({"bytes": None, "path": str(tmp_path / "grey.png")}).getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(ValueError, match=r"^cannot read the 7 image bytes of 'x.png': not an image format"):
        load_image({"bytes": b"garbage", "path": "x.png"})
    with pytest.raises(ValueError, match=r"^cannot read image '/no/such\.png': no such file$"):
        load_image({"bytes": None, "path": "/no/such.png"})
    with pytest.raises(ValueError, match="^the image value has neither bytes nor a path$"):
        load_image({"bytes": None, "path": None})
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])  # header intact, data cut
    with pytest.raises(ValueError, match="^cannot decode image: image file is truncated"):
        load_image(Image.open(tmp_path / "cut.png"))  # opened lazily: the data is read by load_image
    with pytest.raises(TypeError, match="^got int, not a PIL image, a path or a datasets.Image value$"):
        load_image(3)


def test_tokenizer_context_must_match_the_text_tower(scorer: ClipScorer) -> None:
    with pytest.raises(
        ValueError,
        match=r"^the tokenizer's context length is 77 but the model's text tower has 24 positions: build the "
        r"tokenizer with the model's context length, e.g. "
        r"open_clip.get_tokenizer\(name, context_length=24\)$",
    ):
        ClipScorer(scorer.model, open_clip.SimpleTokenizer(), scorer.preprocess)
    # A tokenizer without a context_length (a plain function) is not checked.
    plain = ClipScorer(scorer.model, lambda texts: scorer.tokenizer(texts), scorer.preprocess)
    assert plain.encode_texts(["a circle"]).shape == (1, 64)


def test_bad_inputs_raise_clear_errors(scorer: ClipScorer) -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        scorer.encode_texts("a circle")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        scorer.encode_texts(["a circle", None])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorer.encode_images(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="list"):
        scorer.encode_images(_images()[0])


def test_long_texts_are_truncated_counted_and_warned_once(scorer: ClipScorer, caplog) -> None:
    scorer.num_truncated = 0
    scorer._warned_truncation = False
    long = "a large red circle on the left and a small blue square on the right " * 3
    with caplog.at_level(logging.WARNING, logger="clip_rl_trl.clip"):
        out = scorer.encode_texts([long, "a circle", long])
        scorer.encode_texts([long])
    assert out.shape == (3, 64)
    assert scorer.num_truncated == 3
    assert sum("truncated" in r.message for r in caplog.records) == 1
    # Truncation keeps the first context_length tokens: the embedding equals that of the clipped text.
    tokens = scorer.tokenize([long])
    assert tokens.shape == (1, 24)


def test_empty_inputs_and_properties(scorer: ClipScorer) -> None:
    assert scorer.encode_texts([]).shape == (0, 64)
    assert scorer.encode_images([]).shape == (0, 64)
    assert scorer.encode_texts([""]).shape == (1, 64)  # an empty caption is a legal policy output
    assert scorer.context_length == 24
    assert scorer.embed_dim == 64
    assert scorer.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert scorer.device == torch.device("cpu") and scorer.dtype == torch.float32


def test_from_open_clip_random_init_offline() -> None:
    scorer = ClipScorer.from_open_clip("RN50", pretrained=None, batch_size=4)
    assert scorer.context_length == 77
    emb = scorer.encode_texts(["a photo of a dog"])
    assert emb.shape == (1, 1024)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))


def test_from_open_clip_unknown_pretrained_fails_loudly() -> None:
    with pytest.raises(RuntimeError):
        ClipScorer.from_open_clip("ViT-B-32", pretrained="no-such-tag")


def test_shared_encoding_runs_the_text_tower_once_per_distinct_list(scorer: ClipScorer, monkeypatch) -> None:
    calls = []
    original = scorer.model.encode_text
    monkeypatch.setattr(scorer.model, "encode_text", lambda tokens: calls.append(len(tokens)) or original(tokens))
    step = ["a red circle", "a blue square", ""]
    first = scorer.encode_texts_shared(step)
    again = scorer.encode_texts_shared(list(step))
    assert again is first and calls == [3]
    torch.testing.assert_close(first, scorer.encode_texts(step))
    for i in range(scorer.shared_capacity):
        scorer.encode_texts_shared([f"caption {i}"])
    scorer.encode_texts_shared(step)  # evicted by the newer lists: encoded again
    assert calls[-1] == 3 and len(calls) == 2 + scorer.shared_capacity + 1


def _tricky_texts() -> list[str]:
    import random

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + list("\t\n\r\x00\x1b&éü—’“”ﬁＡ😀") + ["&amp;", "&lt;b&gt;"]
    texts = ["", " ", "a red circle", "A  Red\tCircle  ", "I'm here, it's 3.5km!", "<start_of_text> x",
             "<END_OF_TEXT>", "don't&amp;do", "café crème", "naïve ﬁle", "\x1b[31mred", "line\r\nbreak",
             "word " * 40, "supercalifragilisticexpialidocious antidisestablishmentarianism"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    return texts


@pytest.mark.parametrize("clean", ["lower", "whitespace"])
def test_fast_tokenization_is_open_clips_token_for_token(scorer: ClipScorer, clean: str) -> None:
    # ClipScorer encodes open_clip's SimpleTokenizer texts itself (faster); ids and truncation counts must equal
    # the tokenizer's own, on plain captions and on text that needs ftfy / html cleaning or is not ASCII.
    from clip_rl_trl.clip import _FastClipTokens

    tokenizer = open_clip.SimpleTokenizer(context_length=24, clean=clean)
    assert _FastClipTokens.supports(tokenizer)
    fast = ClipScorer(scorer.model, tokenizer, scorer.preprocess)
    texts = _tricky_texts()
    for _ in range(2):  # second pass: every text and word from the memo
        torch.testing.assert_close(fast.tokenize(texts), tokenizer(texts), rtol=0, atol=0)
        assert [fast._fast().encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
    # The same embeddings and truncation count as the tokenizer's own path (a plain function takes that path).
    def plain(batch):
        return tokenizer(batch)

    plain.encode, plain.context_length = tokenizer.encode, 24  # what the slow path counts truncations with
    slow = ClipScorer(scorer.model, plain, scorer.preprocess)
    torch.testing.assert_close(fast.encode_texts(texts), slow.encode_texts(texts), rtol=0, atol=0)
    assert fast.num_truncated == slow.num_truncated == sum(len(tokenizer.encode(t)) > 22 for t in texts) > 0


def test_other_tokenizers_keep_their_own_path(scorer: ClipScorer) -> None:
    from clip_rl_trl.clip import _FastClipTokens

    calls = []

    def plain(texts):
        calls.append(list(texts))
        return scorer.tokenizer(texts)

    other = ClipScorer(scorer.model, plain, scorer.preprocess)
    assert not _FastClipTokens.supports(plain) and other._fast() is None
    torch.testing.assert_close(other.encode_texts(["a red circle"]), scorer.encode_texts(["a red circle"]))
    assert calls == [["a red circle"]]
    # A scorer whose tokenizer is replaced follows the new one.
    swapped = ClipScorer(scorer.model, scorer.tokenizer, scorer.preprocess)
    assert swapped._fast() is not None
    swapped.tokenizer = plain
    assert swapped._fast() is None
