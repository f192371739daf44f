"""Reward callables: values equal the paper formulas, one shared text pass, clear errors, a stock GRPOTrainer."""


import pytest
import torch
from PIL import Image

from clip_rl_trl import ClipScorer, ImageEmbeddingCache, similar_image_groups
from clip_rl_trl.rewards import functional as RF
from clip_rl_trl.rewards.callables import (
    BidirectionalReward,
    CiderReward,
    ClipSReward,
    DiscriminatorReward,
    GrammarReward,
    GroupGapReward,
    RetrievalReward,
    completion_texts,
)
from clip_rl_trl.rewards.cider import CiderD
from clip_rl_trl.rewards.discriminator import Discriminator
from clip_rl_trl.rewards.grammar import GrammarHead

COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (200, 200, 0), (128, 0, 128), (0, 200, 200)]
NAMES = ["red", "blue", "green", "yellow", "purple", "cyan"]


@pytest.fixture(scope="module")
def cache(scorer: ClipScorer) -> ImageEmbeddingCache:
    rows = [{"image": Image.new("RGB", (32, 32), c), "image_id": f"img{i}"} for i, c in enumerate(COLOURS)]
    return ImageEmbeddingCache.build(rows, scorer, progress=False)


# Two samples per image (num_generations = 2), images 0..3; one empty completion (a legal output).
IDS = ["img0", "img0", "img1", "img1", "img2", "img2", "img3", "img3"]
COMPLETIONS = ["a red square", "a square", "a blue square", "", "a green square", "green", "a yellow one", "a"]
REFS = {f"img{i}": [f"a {n} square", f"a {n} block on white"] for i, n in enumerate(NAMES)}


def columns(**extra):
    return {"image_id": list(IDS), "captions": [REFS[i] for i in IDS], **extra}


def call(reward, completions=COMPLETIONS, **kw):
    return reward(prompts=[""] * len(completions), completions=completions, completion_ids=None, **columns(**kw))


def owner() -> torch.Tensor:
    return torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def test_clip_s_equals_formula_with_and_without_prompt(scorer, cache) -> None:
    img = cache[IDS]
    with_prompt = call(ClipSReward(scorer, cache))
    txt = scorer.encode_texts(["A photo depicts " + c for c in COMPLETIONS])
    torch.testing.assert_close(torch.tensor(with_prompt), 2.5 * (txt * img).sum(-1).clamp(min=0))
    bare = call(ClipSReward(scorer, cache, w=1.0, prompt=""))
    torch.testing.assert_close(torch.tensor(bare), RF.clip_s(img, scorer.encode_texts(COMPLETIONS), w=1.0))
    assert ClipSReward(scorer, cache).__name__ == "clip_s"


def test_retrieval_and_group_gap_equal_formulas(scorer, cache) -> None:
    txt, img = scorer.encode_texts(COMPLETIONS), cache[IDS]
    got = call(RetrievalReward(scorer, cache))
    torch.testing.assert_close(torch.tensor(got), RF.retrieval_logprob(txt, img, owner(), scorer.logit_scale))
    # Hand check of one value: caption 0 against the 4 distinct images, scaled by CLIP's logit scale.
    logits = scorer.logit_scale * txt[0] @ cache[["img0", "img1", "img2", "img3"]].T
    assert got[0] == pytest.approx(float(torch.log_softmax(logits, 0)[0]), abs=1e-5)

    groups = similar_image_groups(cache.embeddings, k=2)
    gap = call(GroupGapReward(scorer, cache, groups, reduce="min"))
    group_emb = cache.embeddings[groups[cache.rows(IDS)]]
    torch.testing.assert_close(torch.tensor(gap), RF.group_embedding_gap(txt, img, group_emb, reduce="min"))
    as_mapping = {i: [cache.ids[j] for j in groups[r].tolist()] for r, i in enumerate(cache.ids)}
    torch.testing.assert_close(torch.tensor(call(GroupGapReward(scorer, cache, as_mapping, reduce="min"))), torch.tensor(gap))


def test_group_gap_with_groups_built_within_a_split(scorer, cache) -> None:
    """Groups of cache rows built within a split (as 'clip-rl-trl neighbors --dataset' writes them): the other
    rows are -1, never a negative, and asking for their group is an error naming the image."""
    split = ["img0", "img1", "img2", "img3"]
    rows = cache.rows(split)
    within = similar_image_groups(cache[split], k=2)
    groups = torch.full((len(cache), 2), -1, dtype=torch.long).index_copy_(0, rows, rows[within])
    assert set(groups[rows].flatten().tolist()) <= set(rows.tolist())
    gap = call(GroupGapReward(scorer, cache, groups))
    as_mapping = {split[i]: [split[j] for j in row] for i, row in enumerate(within.tolist())}
    torch.testing.assert_close(
        torch.tensor(gap), torch.tensor(call(GroupGapReward(scorer, cache, as_mapping)))
    )
    with pytest.raises(KeyError, match="image id 'img5' has no similar-image group"):
        GroupGapReward(scorer, cache, groups)(
            prompts=[""] * 2, completions=["a", "b"], completion_ids=None, image_id=["img0", "img5"]
        )


def test_bidirectional_with_references_masks_own_references(scorer, cache) -> None:
    txt, img = scorer.encode_texts(COMPLETIONS), cache[IDS]
    plain = call(BidirectionalReward(scorer, cache))
    torch.testing.assert_close(torch.tensor(plain), RF.bidirectional_contrastive(txt, img, owner()))
    with_refs = call(BidirectionalReward(scorer, cache, refs_column="captions", directions="i2t"))
    ref_texts = [r for i in ["img0", "img1", "img2", "img3"] for r in REFS[i]]
    ref_owner = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = RF.bidirectional_contrastive(
        txt, img, owner(), directions="i2t",
        extra_txt_emb=scorer.encode_texts(ref_texts), extra_txt_owner=ref_owner,
    )
    torch.testing.assert_close(torch.tensor(with_refs), expected)
    # More negatives in the denominator can only lower the image-to-text reward.
    only_i2t = call(BidirectionalReward(scorer, cache, directions="i2t"))
    assert all(a <= b + 1e-6 for a, b in zip(with_refs, only_i2t, strict=True))


def test_all_clip_rewards_share_one_text_pass(scorer, cache, monkeypatch) -> None:
    completions = [c + " now" for c in COMPLETIONS]  # not yet seen by the scorer's shared memory
    groups = similar_image_groups(cache.embeddings, k=2)
    rewards = [
        ClipSReward(scorer, cache, prompt=""),
        RetrievalReward(scorer, cache),
        GroupGapReward(scorer, cache, groups),
        BidirectionalReward(scorer, cache),
        DiscriminatorReward(Discriminator(scorer.embed_dim, seed=0), scorer, cache, update=False),
        GrammarReward(scorer, GrammarHead(scorer.embed_dim, seed=0)),
    ]
    calls = []
    original = scorer.model.encode_text
    monkeypatch.setattr(scorer.model, "encode_text", lambda t: calls.append(len(t)) or original(t))
    for reward in rewards:
        call(reward, completions)
    assert calls == [len(completions)]


def test_discriminator_reward_uses_pre_update_probabilities_then_updates(scorer, cache) -> None:
    disc = Discriminator(scorer.embed_dim, lr=1e-2, seed=0)
    txt, img = scorer.encode_texts(COMPLETIONS), cache[IDS]
    before = disc.reward(img, txt)
    logged = {}
    reward = DiscriminatorReward(disc, scorer, cache)
    got = call(reward, log_metric=lambda k, v: logged.__setitem__(k, v))
    torch.testing.assert_close(torch.tensor(got), before)
    assert not torch.allclose(disc.reward(img, txt), before)  # it was trained after scoring
    assert set(logged) >= {"discriminator/loss", "discriminator/accuracy_gt"}
    frozen = DiscriminatorReward(disc, scorer, cache, update=False)
    now = disc.reward(img, txt)
    call(frozen)
    torch.testing.assert_close(disc.reward(img, txt), now)


def test_cider_reward_matches_cider(scorer, cache) -> None:
    corpus = [REFS[i] for i in sorted(REFS)]
    cider = CiderD(corpus)
    got = call(CiderReward(cider))
    expected = cider.score(COMPLETIONS, [REFS[i] for i in IDS])
    assert got == pytest.approx(expected.tolist(), rel=1e-6)  # TRL keeps rewards in float32
    assert got[3] == 0.0  # the empty completion scores zero, without crashing
    assert got[0] > 0 and got[1] == 0.0  # "a" and "square" occur in every image's references: idf 0


def test_conversational_completions_are_read_as_text(scorer, cache) -> None:
    chat = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert completion_texts(chat) == COMPLETIONS
    assert call(RetrievalReward(scorer, cache), chat) == pytest.approx(call(RetrievalReward(scorer, cache)))
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        completion_texts([3])


def test_clear_errors(scorer, cache) -> None:
    reward = RetrievalReward(scorer, cache)
    with pytest.raises(ValueError, match="'image_id'.*columns present"):
        reward(prompts=[""], completions=["a"], completion_ids=None, captions=[["a"]])
    with pytest.raises(KeyError, match="nope"):
        reward(prompts=[""] * 2, completions=["a", "b"], completion_ids=None, image_id=["img0", "nope"])
    with pytest.raises(ValueError, match="'captions'"):
        CiderReward(CiderD([["a b"]]))(prompts=[""], completions=["a"], completion_ids=None, image_id=["img0"])
    with pytest.raises(ValueError, match="groups"):
        GroupGapReward(scorer, cache, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduce"):
        GroupGapReward(scorer, cache, similar_image_groups(cache.embeddings, k=2), reduce="max")


@pytest.mark.parametrize("bad, what", [(None, "None"), ("", "empty"), ("  ", "empty"), (3, "a int")])
def test_bad_references_name_reward_completion_image_and_column(scorer, cache, bad, what) -> None:
    refs = [REFS[i] for i in IDS]
    refs[2] = refs[3] = ["a blue square", "a blue block", bad]  # image img1: completions 2 and 3
    rewards = [
        BidirectionalReward(scorer, cache, refs_column="captions"),
        DiscriminatorReward(Discriminator(scorer.embed_dim, seed=0), scorer, cache),
    ]
    for reward in rewards:
        with pytest.raises(
            ValueError,
            match=rf"^reward '{reward.__name__}', completion 2: reference 2 of image 'img1' in column "
            rf"'captions' is {what}, expected a non-empty string$",
        ):
            call(reward, captions=refs)
        with pytest.raises(ValueError, match=r"references of image 'img0' in column 'captions' are a str"):
            call(reward, captions=["a red square"] + refs[1:])


def test_non_finite_reward_is_an_error(scorer, cache) -> None:
    head = GrammarHead(scorer.embed_dim, seed=0)
    with torch.no_grad():
        for p in head.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        GrammarReward(scorer, head)(prompts=[""], completions=["a"], completion_ids=None)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_rewards_drive_a_stock_grpo_trainer(scorer, cache, tmp_path) -> None:
    from conftest import tiny_gpt2_config
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    words = sorted({w for refs in REFS.values() for r in refs for w in r.split()} | {"describe:"})
    tokenizer = _word_tokenizer(words)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tokenizer, n_positions=32))
    ids = [f"img{i}" for i in range(4)]
    data = Dataset.from_dict(
        {"prompt": ["describe:"] * 4, "image_id": ids, "captions": [REFS[i] for i in ids]}
    )
    rewards = [
        ClipSReward(scorer, cache),
        RetrievalReward(scorer, cache),
        GroupGapReward(scorer, cache, similar_image_groups(cache.embeddings, k=2)),
        BidirectionalReward(scorer, cache, refs_column="captions"),
        CiderReward(CiderD([REFS[i] for i in sorted(REFS)])),
        DiscriminatorReward(Discriminator(scorer.embed_dim, seed=0), scorer, cache),
        GrammarReward(scorer, GrammarHead(scorer.embed_dim, seed=0)),
    ]
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data, processing_class=tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    logs = {k for entry in trainer.state.log_history for k in entry}
    for name in ["clip_s", "retrieval", "group_gap", "bidirectional", "cider", "discriminator", "grammar"]:
        assert f"rewards/{name}/mean" in logs
    assert "discriminator/loss" in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
