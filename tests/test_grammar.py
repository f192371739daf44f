"""Grammar negatives, the grammar head, its training and its prompt (Cho et al. 2022) on a tiny random CLIP."""


import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clip_rl_trl import ClipScorer
from clip_rl_trl.rewards.callables import GrammarReward
from clip_rl_trl.rewards.grammar import (
    CORRUPTIONS,
    GrammarHead,
    GrammarNegativeSampler,
    evaluate_grammar_head,
    load_text_tower,
    make_grammar_negatives,
    save_text_tower,
    text_tower_state_dict,
    train_grammar_head,
)

CAPTION = "a large red circle on the left"


def _captions() -> list[str]:
    shapes, colours, sizes = (
        ["circle", "square", "triangle", "star"],
        ["red", "blue", "green", "gray"],
        ["small", "large"],
    )
    return [f"a {s} {c} {sh}" for sh, c, s in itertools.product(shapes, colours, sizes)]


# --- negatives --------------------------------------------------------------------------------------------


def test_each_corruption_by_hand() -> None:
    one = GrammarNegativeSampler(0, max_ngram=1)
    for seed in range(20):
        one.rng.seed(seed)
        assert one.corrupt("a red circle", "repeat") in {
            "a a red circle",
            "a red red circle",
            "a red circle circle",
        }
        assert one.corrupt("a red circle", "remove") in {"red circle", "a circle", "a red"}
        assert one.corrupt("a red circle", "swap") in {"red a circle", "circle red a", "a circle red"}
        assert one.corrupt("a red circle", "insert") in {
            "a a red circle", "red a red circle", "circle a red circle", "a red red circle",
            "a red a circle", "a circle red circle", "a red circle circle", "a red circle a",
            "a red circle red",
        }  # fmt: skip
        assert sorted(one.corrupt("a red circle", "shuffle").split()) == ["a", "circle", "red"]
    vocab = GrammarNegativeSampler(0, max_ngram=1, vocab=["blue"])
    assert {vocab.corrupt("a circle", "insert") for _ in range(50)} == {
        "blue a circle",
        "a blue circle",
        "a circle blue",
    }
    # n-grams up to 3: a bigram repeated in place, a trigram removed.
    three = GrammarNegativeSampler(0)
    repeats = {three.corrupt("a b c d", "repeat") for _ in range(300)}
    assert {"a b a b c d", "a b c b c d", "a b c d b c d", "a b c a b c d"} <= repeats
    removes = {three.corrupt("a b c d", "remove") for _ in range(300)}
    assert removes == {"b c d", "a c d", "a b d", "a b c", "c d", "a d", "a b", "d", "a"}
    swaps = {three.corrupt("a b c d", "swap") for _ in range(300)}
    assert swaps == {"b a c d", "c b a d", "d b c a", "a c b d", "a d c b", "a b d c", "c d a b"}


def test_short_captions() -> None:
    sampler = GrammarNegativeSampler(0)
    assert sampler.applicable(["circle"]) == ("repeat", "insert")
    negatives = {sampler.sample("circle") for _ in range(50)}
    assert {text for text, _ in negatives} == {"circle circle"}
    # repeat, remove, insert (an n-gram of the caption itself), swap / shuffle (the same, for two words)
    assert {text for text, _ in (sampler.sample("a circle") for _ in range(300))} == {
        "a a circle", "a circle circle", "a circle a circle",
        "circle", "a",
        "a circle a", "circle a circle", "a a circle circle",
        "circle a",
    }  # fmt: skip
    assert sampler.applicable(["a", "a"]) == ("repeat", "remove", "insert")
    with pytest.raises(ValueError, match="no corruption"):
        sampler.sample("   ")
    assert GrammarNegativeSampler(0, vocab=["blue"], max_ngram=1).sample("") == ("blue", "insert")


def test_never_the_original_and_every_kind_is_used() -> None:
    sampler = GrammarNegativeSampler(3)
    kinds = Counter()
    for caption in _captions() + ["a circle", "circle", "a a", "a circle a circle"]:
        for _ in range(20):
            text, kind = sampler.sample(caption)
            kinds[kind] += 1
            assert text.split() != caption.split()
            tokens, orig = text.split(), caption.split()
            if kind == "repeat" or kind == "insert":
                assert 1 <= len(tokens) - len(orig) <= 3
            elif kind == "remove":
                assert 1 <= len(orig) - len(tokens) <= 3
            else:
                assert sorted(tokens) == sorted(orig)
    assert set(kinds) == set(CORRUPTIONS)
    assert min(kinds.values()) > 0.1 * sum(kinds.values())  # roughly uniform over kinds


def test_seeded_and_deterministic() -> None:
    captions = _captions()
    a = make_grammar_negatives(captions, num_negatives=3, seed=7)
    assert a == make_grammar_negatives(captions, num_negatives=3, seed=7)
    assert a != make_grammar_negatives(captions, num_negatives=3, seed=8)
    assert len(a) == len(captions) and all(len(group) == 3 for group in a)


def test_avoid_rejects_known_grammatical_captions() -> None:
    sampler = GrammarNegativeSampler(0, kinds=("remove",), max_ngram=1, avoid={"a circle", "a  red"})
    assert {sampler.sample("a red circle")[0] for _ in range(50)} == {"red circle"}
    is_known = GrammarNegativeSampler(0, kinds=("remove",), max_ngram=1, avoid=lambda t: t.startswith("a "))
    assert {is_known.sample("a red circle")[0] for _ in range(50)} == {"red circle"}
    with pytest.raises(ValueError, match="outside `avoid`"):
        GrammarNegativeSampler(0, kinds=("remove",), avoid={"circle", "a"}, max_tries=10).sample("a circle")


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="kinds"):
        GrammarNegativeSampler(kinds=("repeat", "reverse"))
    with pytest.raises(ValueError, match="max_ngram"):
        GrammarNegativeSampler(max_ngram=0)
    with pytest.raises(ValueError, match="vocab"):
        GrammarNegativeSampler(vocab=["two words"])
    with pytest.raises(TypeError, match="sequence of strings"):
        GrammarNegativeSampler()("a circle")
    with pytest.raises(ValueError, match="cannot change"):
        GrammarNegativeSampler().corrupt("circle", "swap")


# --- head -------------------------------------------------------------------------------------------------


def test_head_architecture_and_hand_computed_reward() -> None:
    head = GrammarHead(4)
    assert [tuple(p.shape) for p in head.parameters()] == [(4, 4), (2, 4)]
    assert all(m.bias is None for m in head.net if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        head.net[0].weight.copy_(torch.eye(4))
        head.net[2].weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]]))
    x = torch.tensor([[0.5, -0.5, 0.5, -0.5], [-1.0, 0, 0, 0], [0.2, 0.3, 0.0, 0.0]])
    # logits = [0, sum(relu(x))], so P(grammatical) = sigmoid(sum(relu(x))).
    expected = torch.sigmoid(torch.tensor([1.0, 0.0, 0.5]))
    reward = head.reward(x)
    torch.testing.assert_close(reward, expected)
    assert reward.dtype == torch.float32 and not reward.requires_grad
    torch.testing.assert_close(head.reward(x.half()), torch.sigmoid(x.half().float().relu().sum(-1)))


def test_head_input_checks() -> None:
    head = GrammarHead(4)
    with pytest.raises(ValueError, match=r"txt_emb must have shape \(N, 4\)"):
        head.reward(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="txt_emb contains NaN"):
        head.reward(torch.full((2, 4), float("nan")))
    with pytest.raises(TypeError, match="txt_emb must be a torch.Tensor"):
        head.reward([[0.0] * 4])


def test_head_save_and_load(tmp_path) -> None:
    head = GrammarHead(8, seed=1, prompt="A photo depicts ")
    head.save_pretrained(tmp_path / "head")
    loaded = GrammarHead.from_pretrained(tmp_path / "head")
    x = F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(loaded.reward(x), head.reward(x))
    assert loaded.prompt == "A photo depicts "
    with pytest.raises(FileNotFoundError, match="grammar_head.safetensors"):
        GrammarHead.from_pretrained(tmp_path / "missing")
    # A head that does not record its training prompt is refused rather than scored with a guessed one.
    weights = {k: v.contiguous() for k, v in head.state_dict().items()}
    (tmp_path / "old").mkdir()
    save_file(weights, tmp_path / "old" / "grammar_head.safetensors", metadata={"config": '{"embed_dim": 8}'})
    with pytest.raises(ValueError, match="does not record the prompt its head was trained with"):
        GrammarHead.from_pretrained(tmp_path / "old")


# --- training ---------------------------------------------------------------------------------------------


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_fine_tunes_the_text_tower_only_and_the_head_learns(scorer: ClipScorer) -> None:
    captions = _captions()[::2]  # 16 images, one caption each
    image_emb = F.normalize(
        torch.randn(len(captions), 64, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    before = _snapshot(scorer.model)
    old_txt = scorer.encode_texts(captions[:4])
    history: list[dict[str, float]] = []
    new_scorer, head = train_grammar_head(
        scorer, image_emb, captions, epochs=10, batch_size=16, lr=1e-3, head_lr=3e-2,
        seed=0, progress=False, callback=history.append,
    )  # fmt: skip
    assert len(history) == 10 and history[-1]["epoch"] == 9
    first = sum(h["grammar_loss"] for h in history[:3]) / 3
    last = sum(h["grammar_loss"] for h in history[-3:]) / 3
    assert last < 0.8 * first
    assert sum(h["clip_loss"] for h in history[-3:]) < sum(h["clip_loss"] for h in history[:3])

    # The input scorer is untouched, the copy is a new, frozen model.
    for k, v in _snapshot(scorer.model).items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(scorer.encode_texts(captions[:4]), old_txt, rtol=0, atol=0)
    assert new_scorer is not scorer and new_scorer.model is not scorer.model
    assert all(not p.requires_grad for p in new_scorer.model.parameters()) and not new_scorer.model.training

    after = _snapshot(new_scorer.model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert not any(k.startswith("visual.") for k in changed)
    assert "logit_scale" not in changed
    assert {"token_embedding.weight", "text_projection", "ln_final.weight"} <= changed
    assert any(k.startswith("transformer.") for k in changed)
    assert not torch.allclose(new_scorer.encode_texts(captions[:4]), old_txt)
    # Images embed exactly as before: the image tower is frozen.
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(new_scorer.encode_images(images), scorer.encode_images(images), rtol=0, atol=0)
    assert not head.training and all(not p.requires_grad for p in head.parameters())


def test_training_is_seeded(scorer: ClipScorer) -> None:
    captions = [[c, c.replace("a ", "one ", 1)] for c in _captions()[:8]]  # two captions per image
    image_emb = F.normalize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    kwargs = dict(epochs=2, batch_size=4, lr=1e-3, head_lr=1e-2, progress=False)
    runs = [train_grammar_head(scorer, image_emb, captions, seed=s, **kwargs) for s in (0, 0, 1)]
    rewards = [head.reward(s.encode_texts(["a small red circle"])) for s, head in runs]
    torch.testing.assert_close(rewards[0], rewards[1], rtol=0, atol=0)
    assert not torch.equal(rewards[0], rewards[2])


def test_evaluate_with_an_undecided_head(scorer: ClipScorer) -> None:
    head = GrammarHead(64)
    torch.nn.init.zeros_(head.net[2].weight)  # P(grammatical) = 0.5 everywhere: every caption "negative"
    result = evaluate_grammar_head(scorer, head, _captions()[:6], num_negatives=2)
    assert result["accuracy_grammatical"] == 0.0 and result["accuracy_negative"] == 1.0
    assert result["accuracy"] == 0.5
    assert result["prob_grammatical"] == pytest.approx(0.5) and result["prob_negative"] == pytest.approx(0.5)
    assert all(result[k] == 1.0 for k in result if k.startswith("accuracy_") and k[9:] in CORRUPTIONS)


def test_text_tower_save_and_load(scorer: ClipScorer, tmp_path) -> None:
    captions = _captions()[:8]
    image_emb = F.normalize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    tuned, _ = train_grammar_head(
        scorer, image_emb, captions, epochs=1, batch_size=4, lr=1e-3, progress=False
    )
    save_text_tower(tuned, tmp_path / "text.safetensors")
    reloaded = load_text_tower(scorer, tmp_path / "text.safetensors")
    torch.testing.assert_close(reloaded.encode_texts(captions), tuned.encode_texts(captions))
    assert set(text_tower_state_dict(scorer)) == {
        k for k in dict(scorer.model.named_parameters()) if not k.startswith("visual.") and k != "logit_scale"
    }


def test_training_and_scoring_see_the_same_prompt(scorer: ClipScorer, monkeypatch, tmp_path) -> None:
    """One prompt: the head is trained on prompted text, records the prompt, and is scored on prompted text."""
    prompt = "A photo depicts "
    captions = _captions()[:8]
    image_emb = F.normalize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    seen: list[str] = []
    # Training tokenizes (the text tower is trained); scoring encodes through encode_texts: watch both doors.
    tokenize, encode = ClipScorer.tokenize, ClipScorer.encode_texts
    monkeypatch.setattr(
        ClipScorer, "tokenize", lambda self, texts: seen.extend(texts) or tokenize(self, texts)
    )
    monkeypatch.setattr(
        ClipScorer, "encode_texts", lambda self, texts, **kw: seen.extend(texts) or encode(self, texts, **kw)
    )
    tuned, head = train_grammar_head(
        scorer, image_emb, captions, epochs=1, batch_size=4, lr=1e-3, prompt=prompt, progress=False
    )
    assert head.prompt == prompt
    assert len(seen) == 16 and all(t.startswith(prompt) for t in seen)  # 8 captions + 8 negatives
    assert set(captions) <= {t[len(prompt) :] for t in seen}

    completions = ["a small red circle", "circle circle a"]
    seen.clear()
    reward = GrammarReward(tuned, head)
    values = reward(prompts=[""] * 2, completions=completions, completion_ids=None)
    assert seen == [prompt + c for c in completions]
    expected = head.reward(tuned.encode_texts([prompt + c for c in completions]))
    torch.testing.assert_close(torch.tensor(values), expected)
    assert GrammarReward(tuned, head, prompt=prompt).prompt == prompt  # the same prompt, given explicitly

    seen.clear()
    evaluate_grammar_head(tuned, head, completions[:1])
    assert len(seen) == 2 and all(t.startswith(prompt) for t in seen)

    # The prompt travels with the saved head.
    head.save_pretrained(tmp_path)
    loaded = GrammarReward(tuned, GrammarHead.from_pretrained(tmp_path))
    assert loaded.prompt == prompt
    torch.testing.assert_close(
        torch.tensor(loaded(prompts=[""] * 2, completions=completions, completion_ids=None)), expected
    )


def test_a_prompt_other_than_the_training_prompt_is_refused(scorer: ClipScorer) -> None:
    head = GrammarHead(scorer.embed_dim, seed=0, prompt="A photo depicts ")
    with pytest.raises(ValueError, match="grammar prompt '' differs from 'A photo depicts ', the prompt the"):
        GrammarReward(scorer, head, prompt="")
    with pytest.raises(ValueError, match="'a picture of ' differs from ''"):
        GrammarReward(scorer, GrammarHead(scorer.embed_dim), prompt="a picture of ")


def test_training_input_checks(scorer: ClipScorer) -> None:
    emb = F.normalize(torch.randn(4, 64), dim=-1)
    caps = _captions()[:4]
    with pytest.raises(ValueError, match="captions has 3 entries but image_emb has 4 rows"):
        train_grammar_head(scorer, emb, caps[:3], progress=False)
    with pytest.raises(ValueError, match=r"captions\[1\] must be a non-empty caption"):
        train_grammar_head(scorer, emb, [caps[0], [], caps[2], caps[3]], progress=False)
    with pytest.raises(ValueError, match=r"image_emb must have shape \(N, 64\)"):
        train_grammar_head(scorer, emb[:, :32], caps, progress=False)
    with pytest.raises(ValueError, match="image_emb contains NaN"):
        train_grammar_head(scorer, torch.full_like(emb, float("nan")), caps, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        train_grammar_head(scorer, emb, caps, batch_size=1, progress=False)


# --- the shapes world -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shapes_world_head_separates_held_out_captions() -> None:
    """benchmarks/grammar_head.py in small: held-out grammatical captions vs their negatives, accuracy >= 0.9."""
    from clip_rl_trl.data.shapes import ShapesWorld, train_shapes_clip

    world = ShapesWorld(seed=0)
    scorer = train_shapes_clip(world, progress=False)  # cached after the first run
    train, test = world.to_dataset(1000, "train"), world.to_dataset(200, "test")
    tuned, head = train_grammar_head(
        scorer, scorer.encode_images(train["image"]), train["captions"],
        epochs=80, batch_size=256, lr=3e-4, head_lr=1e-2, seed=0, progress=False,
    )  # fmt: skip
    captions = [c for group in test["captions"] for c in group]
    result = evaluate_grammar_head(tuned, head, captions, seed=1)
    assert result["accuracy"] >= 0.9, result
