"""The paper formulas in clip_rl_trl.rewards.functional against hand-computed values.

Most cases use 2-D unit vectors whose cosines are round numbers: e1 = (1, 0), e2 = (0, 1), u = (0.6, 0.8),
v = (0.8, 0.6), so cos(u, e1) = 0.6, cos(u, e2) = 0.8, cos(v, e1) = 0.8, cos(v, e2) = 0.6, cos(u, v) = 0.96.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_rl_trl.rewards.functional import (
    bidirectional_contrastive,
    clip_s,
    group_embedding_gap,
    refclip_s,
    retrieval_logprob,
)

E1, E2, U, V = (1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.8, 0.6)
W = (0.28, 0.96)  # cos(W, e1) = 0.28, cos(W, e2) = 0.96
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def vecs(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def lse(*xs: float) -> float:
    """log(sum(exp(x))) by hand, shifted by the max so that logits of 100 stay finite."""
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def approx(tensor: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert tensor.dtype == torch.float32
    assert tensor.shape == (len(expected),)
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


def random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def bidirectional_oracle(
    txt, img, owner, tau, extra_txt=(), extra_owner=None, extra_img=None, directions="both"
):
    """The bidirectional reward written out with Python loops over lists, independently of the tensor code."""
    distinct: dict[int, list[float]] = {}
    for image, o in zip(img, owner, strict=True):
        distinct.setdefault(o, image)
    rewards = []
    for i, (caption, o) in enumerate(zip(txt, owner, strict=True)):
        positive = dot(caption, img[i]) / tau
        t2i = [dot(caption, image) / tau for oo, image in distinct.items() if oo != o]
        t2i += [dot(caption, h) / tau for h in (extra_img[i] if extra_img is not None else [])]
        i2t = [dot(txt[j], img[i]) / tau for j in range(len(txt)) if owner[j] != o]
        i2t += [
            dot(x, img[i]) / tau
            for m, x in enumerate(extra_txt)
            if extra_owner is None or extra_owner[m] != o
        ]
        terms = {"t2i": [positive - lse(*t2i)], "i2t": [positive - lse(*i2t)]}
        chosen = terms["t2i"] + terms["i2t"] if directions == "both" else terms[directions]
        rewards.append(tau * sum(chosen) / len(chosen))
    return rewards


# ---------------------------------------------------------------- CLIP-S and RefCLIP-S


def test_clip_s_hand_values():
    img = vecs(E1, E1, E2, E2)
    txt = vecs(U, (-0.6, -0.8), V, E1)
    approx(clip_s(img, txt), [2.5 * 0.6, 0.0, 2.5 * 0.6, 0.0])
    approx(clip_s(img, txt, w=1.0), [0.6, 0.0, 0.6, 0.0])


def test_refclip_s_hand_values_and_padding():
    img = vecs(E1, E2, E1, (0.28, 0.96))
    txt = vecs(U, E1, U, E1)
    pad = (9.0, 9.0)  # padding rows are ignored whatever they hold, even unnormalised
    ref = vecs([V, E2, pad], [E2, E1, pad], [(-0.8, -0.6), pad, pad], [(-1.0, 0.0), pad, pad])
    mask = torch.tensor(
        [[True, True, False], [True, False, False], [True, False, False], [True, False, False]]
    )
    a0, b0 = 2.5 * 0.6, 0.96  # best reference of row 0 is V; E2 gives 0.8
    a2, b2 = 2.5 * 0.6, -0.96  # raw negative text-text cosine, A + B > 0: the official formula's value
    expected = [
        2 * a0 * b0 / (a0 + b0),
        0.0,  # A = 0 (orthogonal image) and B = 0 (the masked-out E1 reference would give 1): 0/0 -> 0
        2 * a2 * b2 / (a2 + b2),
        0.0,  # A = 2.5 * 0.28 = 0.7, B = -1: A + B < 0 -> 0 instead of a sign-flipped positive score
    ]
    approx(refclip_s(img, txt, ref, mask), expected)


def test_refclip_s_gradient_has_no_nan_at_zero_sum():
    txt = vecs(E1, U).requires_grad_(True)
    ref = vecs([E2], [V])
    out = refclip_s(vecs(E2, E1), txt, ref, torch.ones(2, 1, dtype=torch.bool))
    out.sum().backward()
    assert out[0].item() == 0.0
    assert torch.isfinite(txt.grad).all()


def test_refclip_s_row_without_reference():
    with pytest.raises(ValueError, match=r"ref_mask has no valid reference in row\(s\) \[1\]"):
        refclip_s(vecs(E1, E2), vecs(U, V), vecs([E1], [E2]), torch.tensor([[True], [False]]))


# ---------------------------------------------------------------- DiscriTune retrieval


def test_retrieval_logprob_repeated_images_are_one_candidate():
    # Captions 0 and 1 share image 7 (e1), caption 2 has image 3 (e2): candidates are {e1, e2} for everyone.
    out = retrieval_logprob(vecs(U, V, U), vecs(E1, E1, E2), torch.tensor([7, 7, 3]), logit_scale=10.0)
    approx(out, [6 - lse(6, 8), 8 - lse(8, 6), 8 - lse(6, 8)])
    # Had the repeat of e1 counted as a distractor, caption 2 would get 8 - lse(6, 6, 8).
    assert out[2].item() != pytest.approx(8 - lse(6, 6, 8), abs=1e-3)


def test_retrieval_logprob_default_scale_and_hard_negatives():
    txt, img, owner = vecs(U, V, U), vecs(E1, E1, E2), torch.tensor([0, 0, 1])
    approx(retrieval_logprob(txt, img, owner), [60 - lse(60, 80), 80 - lse(80, 60), 80 - lse(60, 80)])
    hard = vecs([V, E2], [(-1.0, 0.0), E2], [(0.0, -1.0), E1])  # K = 2 hard negatives per caption
    approx(
        retrieval_logprob(txt, img, owner, logit_scale=10.0, hard_neg_emb=hard),
        [6 - lse(6, 8, 9.6, 8), 8 - lse(8, 6, -8, 6), 8 - lse(6, 8, -8, 6)],
    )


def test_retrieval_logprob_single_image():
    owner, img = torch.tensor([4, 4]), vecs(E1, E1)
    hard = vecs([E2], [E2])
    approx(retrieval_logprob(vecs(U, V), img, owner, 10.0, hard), [6 - lse(6, 8), 8 - lse(8, 6)])
    with pytest.raises(ValueError, match="at least two candidate images"):
        retrieval_logprob(vecs(U, V), img, owner)


def test_retrieval_logprob_matches_cross_entropy_on_tiny_clip(scorer):
    """End to end on a tiny random open_clip model wrapped in ClipScorer (its float32 output passes the checks)."""
    images = scorer.encode_images(torch.rand(2, 3, 32, 32))
    txt = scorer.encode_texts(["a red circle", "a blue square", "a circle", "a square on the left"])
    owner = torch.tensor([0, 0, 1, 1])
    img = images[owner]
    logits = 100.0 * txt @ images.T
    expected = -F.cross_entropy(logits, owner, reduction="none")
    assert torch.allclose(retrieval_logprob(txt, img, owner), expected, atol=1e-5)
    assert torch.allclose(clip_s(img, txt), 2.5 * (txt * img).sum(-1).clamp(min=0), atol=1e-6)
    assert torch.isfinite(bidirectional_contrastive(txt, img, owner)).all()


# ---------------------------------------------------------------- Group Embedding Gap


def test_group_embedding_gap_avg_and_min():
    txt, img = vecs(U, V), vecs(E1, E2)
    group = vecs([E2, V, (-1.0, 0.0)], [E1, E1, U])
    # Row 0: cos(c, I) = 0.6, group cosines 0.8, 0.96, -0.6. Row 1: 0.6, group 0.8, 0.8, 0.96.
    approx(group_embedding_gap(txt, img, group), [0.6 - (0.8 + 0.96 - 0.6) / 3, 0.6 - (0.8 + 0.8 + 0.96) / 3])
    approx(group_embedding_gap(txt, img, group, reduce="min"), [0.6 - 0.96, 0.6 - 0.96])


# ---------------------------------------------------------------- bidirectional contrastive


def test_bidirectional_hand_values_with_repeated_image():
    # Captions 0 and 1 describe image A = e1 (owner 0, twice in the batch), caption 2 = W describes B = e2.
    txt, img, owner = vecs(U, V, W), vecs(E1, E1, E2), torch.tensor([0, 0, 1])
    tau = 0.1  # s = 10 cos
    t2i = [6 - 8, 8 - 6, 9.6 - 2.8]  # caption 0's only negative is B; its sibling's image never counts
    i2t = [6 - 2.8, 8 - 2.8, 9.6 - lse(8, 6)]  # image A against caption 2 only; image B against captions 0, 1
    both = [tau * (a + b) / 2 for a, b in zip(t2i, i2t, strict=True)]
    approx(bidirectional_contrastive(txt, img, owner, temperature=tau), both)
    approx(bidirectional_contrastive(txt, img, owner, tau, directions="t2i"), [tau * x for x in t2i])
    approx(bidirectional_contrastive(txt, img, owner, tau, directions="i2t"), [tau * x for x in i2t])


def test_bidirectional_default_temperature():
    txt, img, owner = vecs(U, V, W), vecs(E1, E1, E2), torch.tensor([0, 0, 1])
    t2i = [60 - 80, 80 - 60, 96 - 28]
    i2t = [60 - 28, 80 - 28, 96 - lse(80, 60)]
    approx(
        bidirectional_contrastive(txt, img, owner),
        [0.01 * (a + b) / 2 for a, b in zip(t2i, i2t, strict=True)],
    )


def test_bidirectional_extra_texts_with_and_without_owners():
    txt, img, owner = vecs(U, V, W), vecs(E1, E1, E2), torch.tensor([0, 0, 1])
    extra = vecs(E2, E1)  # a caption of B (owner 1) and a caption of A (owner 0)
    # s(extra, A) = (0, 10), s(extra, B) = (10, 0).
    i2t_all = [6 - lse(2.8, 0, 10), 8 - lse(2.8, 0, 10), 9.6 - lse(8, 6, 10, 0)]
    i2t_owned = [6 - lse(2.8, 0), 8 - lse(2.8, 0), 9.6 - lse(8, 6, 0)]  # same-image extras left out
    out = bidirectional_contrastive(txt, img, owner, 0.1, directions="i2t", extra_txt_emb=extra)
    approx(out, [0.1 * x for x in i2t_all])
    out = bidirectional_contrastive(
        txt, img, owner, 0.1, directions="i2t", extra_txt_emb=extra, extra_txt_owner=torch.tensor([1, 0])
    )
    approx(out, [0.1 * x for x in i2t_owned])


def test_bidirectional_extra_images():
    txt, img, owner = vecs(U, V, W), vecs(E1, E1, E2), torch.tensor([0, 0, 1])
    extra_img = vecs([V], [(-1.0, 0.0)], [U])  # one hard negative per caption
    out = bidirectional_contrastive(txt, img, owner, 0.1, directions="t2i", extra_img_emb=extra_img)
    approx(
        out, [0.1 * (6 - lse(8, 9.6)), 0.1 * (8 - lse(6, -8)), 0.1 * (9.6 - lse(2.8, 0.28 * 6 + 0.96 * 8))]
    )


def test_bidirectional_siblings_never_in_denominators():
    """Each caption's reward is unchanged when its siblings (other captions of its image) leave the batch."""
    images = random_unit(3, 5, seed=1)
    owner = torch.tensor([0, 0, 0, 1, 1, 2])
    txt = random_unit(6, 5, seed=2)
    full = bidirectional_contrastive(txt, images[owner], owner)
    for i in range(6):
        keep = [j for j in range(6) if j == i or owner[j] != owner[i]]
        alone = bidirectional_contrastive(txt[keep], images[owner[keep]], owner[keep])
        assert full[i].item() == pytest.approx(alone[keep.index(i)].item(), abs=1e-5)
    full = retrieval_logprob(txt, images[owner], owner)
    for i in range(6):
        keep = [j for j in range(6) if j == i or owner[j] != owner[i]]
        alone = retrieval_logprob(txt[keep], images[owner[keep]], owner[keep])
        assert full[i].item() == pytest.approx(alone[keep.index(i)].item(), abs=1e-5)


@pytest.mark.parametrize("directions", ["both", "t2i", "i2t"])
def test_bidirectional_matches_loop_oracle_with_all_extras(directions):
    images = random_unit(4, 6, seed=3)
    owner = [2, 2, 9, 5, 5, 5, 1]
    txt, extra_txt = random_unit(7, 6, seed=4), random_unit(3, 6, seed=5)
    extra_img = F.normalize(torch.randn(7, 2, 6, generator=torch.Generator().manual_seed(6)), dim=-1)
    extra_owner = [9, 3, 2]
    img = images[torch.tensor([0, 0, 1, 2, 2, 2, 3])]
    out = bidirectional_contrastive(
        txt,
        img,
        torch.tensor(owner),
        0.05,
        directions,
        extra_txt_emb=extra_txt,
        extra_img_emb=extra_img,
        extra_txt_owner=torch.tensor(extra_owner),
    )
    expected = bidirectional_oracle(
        txt.tolist(),
        img.tolist(),
        owner,
        0.05,
        extra_txt.tolist(),
        extra_owner,
        extra_img.tolist(),
        directions,
    )
    approx(out, expected, tol=1e-4)


def test_bidirectional_empty_denominator():
    txt, img, owner = vecs(U, V), vecs(E1, E1), torch.tensor([3, 3])
    with pytest.raises(ValueError, match="at least two distinct images"):
        bidirectional_contrastive(txt, img, owner)
    # Extras fill the denominator of their own direction only.
    approx(
        bidirectional_contrastive(txt, img, owner, 0.1, "t2i", extra_img_emb=vecs([E2], [E2])),
        [0.1 * (6 - 8), 0.1 * (8 - 6)],
    )
    with pytest.raises(ValueError, match="empty i2t denominator"):
        bidirectional_contrastive(txt, img, owner, 0.1, "both", extra_img_emb=vecs([E2], [E2]))
    extra_txt = vecs(E2)
    approx(bidirectional_contrastive(txt, img, owner, 0.1, "i2t", extra_txt_emb=extra_txt), [0.6, 0.8])
    with pytest.raises(ValueError, match="empty i2t denominator"):
        bidirectional_contrastive(
            txt, img, owner, 0.1, "i2t", extra_txt_emb=extra_txt, extra_txt_owner=torch.tensor([3])
        )


def test_bidirectional_distinctive_caption_beats_generic_one():
    images = torch.eye(3)
    owner = torch.tensor([0, 1, 2])
    others = vecs((0.0, 0.8, 0.6), (0.0, 0.6, 0.8))  # captions of images 1 and 2, orthogonal to image 0
    distinctive = torch.cat([vecs((1.0, 0.0, 0.0)), others])  # equal to its image, orthogonal to the others
    generic = torch.cat([F.normalize(torch.ones(1, 3), dim=-1), others])  # as close to every image
    r_distinctive = bidirectional_contrastive(distinctive, images, owner)[0]
    r_generic = bidirectional_contrastive(generic, images, owner)[0]
    assert r_distinctive > r_generic
    # By hand: t2i = 100 - lse(0, 0) and i2t = 100 - lse(0, 0) (image 0 against captions 1, 2: cos 0, 0).
    assert r_distinctive.item() == pytest.approx(0.01 * (100 - math.log(2)), abs=1e-5)


def test_bidirectional_stable_at_small_temperature_and_differentiable():
    txt = random_unit(6, 4, seed=7).requires_grad_(True)
    images = random_unit(3, 4, seed=8)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    out = bidirectional_contrastive(txt, images[owner], owner, temperature=1e-3)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(txt.grad).all() and txt.grad.abs().sum() > 0


# ---------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("device", DEVICES)
def test_float16_input_returns_float32_on_input_device(device):
    txt16, img16 = vecs(U, V, W).half().to(device), vecs(E1, E1, E2).half().to(device)
    owner = torch.tensor([0, 0, 1], device=device)
    group = vecs([E2], [E2], [E1]).half().to(device)
    calls = [
        lambda t, i: clip_s(i, t),
        lambda t, i: refclip_s(i, t, group, torch.ones(3, 1, dtype=torch.bool, device=device)),
        lambda t, i: retrieval_logprob(t, i, owner),
        lambda t, i: group_embedding_gap(t, i, group),
        lambda t, i: bidirectional_contrastive(t, i, owner),
    ]
    for call in calls:
        out = call(txt16, img16)
        assert out.dtype == torch.float32 and out.device == txt16.device
        assert torch.equal(out, call(txt16.float(), img16.float()))  # upcast first, then computed in float32


# ---------------------------------------------------------------- validation


def test_errors_name_the_argument():
    txt, img, owner = vecs(U, V), vecs(E1, E2), torch.tensor([0, 1])
    nan = vecs(U, (math.nan, 1.0))
    inf = vecs(U, (math.inf, 1.0))
    cases = [
        (lambda: clip_s(img, nan), ValueError, "txt_emb contains NaN"),
        (lambda: clip_s(inf, txt), ValueError, "img_emb contains inf"),
        (
            lambda: retrieval_logprob(txt, img, owner, hard_neg_emb=nan[:, None]),
            ValueError,
            "hard_neg_emb contains NaN",
        ),
        (lambda: group_embedding_gap(txt, img, inf[:, None]), ValueError, "group_emb contains inf"),
        (
            lambda: clip_s(img, txt[:1]),
            ValueError,
            r"txt_emb has shape \(1, 2\) \(N, D\), so N = 1, but img_emb has N = 2",
        ),
        (lambda: clip_s(img, torch.ones(2, 3) / 3**0.5), ValueError, "so D = 3, but img_emb has D = 2"),
        (lambda: clip_s(img, U), TypeError, "txt_emb must be a torch.Tensor, got tuple"),
        (lambda: clip_s(img[0], txt), ValueError, r"img_emb must be 2-D \(N, D\), got shape \(2,\)"),
        (lambda: clip_s(img.int(), txt), TypeError, "img_emb must be a floating-point tensor"),
        (lambda: clip_s(img[:0], txt[:0]), ValueError, "img_emb has shape .*N must be at least 1"),
        (
            lambda: clip_s(img, 2 * txt),
            ValueError,
            "txt_emb must hold L2-normalised rows, but row 0 has norm 2",
        ),
        (lambda: retrieval_logprob(txt, img, owner.float()), TypeError, "owner must be an integer tensor"),
        (
            lambda: retrieval_logprob(txt, img, owner[:1]),
            ValueError,
            "owner has shape .*N = 1, but txt_emb has N = 2",
        ),
        (lambda: retrieval_logprob(txt, img, owner[None]), ValueError, r"owner must be 1-D \(N\)"),
        (lambda: retrieval_logprob(txt, img, [0, 1]), TypeError, "owner must be a torch.Tensor"),
        (
            lambda: retrieval_logprob(txt, img, owner, hard_neg_emb=img),
            ValueError,
            r"hard_neg_emb must be 3-D \(N, K, D\)",
        ),
        (
            lambda: retrieval_logprob(txt, img, torch.tensor([1, 1])),
            ValueError,
            "img_emb rows 0 and 1 share owner 1",
        ),
        (
            lambda: retrieval_logprob(txt, img, owner, logit_scale=math.nan),
            ValueError,
            "logit_scale must be a finite",
        ),
        (lambda: clip_s(img, txt, w=0), ValueError, "w must be a finite number > 0"),
        (lambda: clip_s(img, txt, w=True), TypeError, "w must be a number"),
        (
            lambda: bidirectional_contrastive(txt, img, owner, temperature=-1),
            ValueError,
            "temperature must be",
        ),
        (
            lambda: group_embedding_gap(txt, img, img[:, None], reduce="max"),
            ValueError,
            "reduce must be one of 'avg', 'min', got 'max'",
        ),
        (
            lambda: group_embedding_gap(txt, img, img[:, :0, None]),
            ValueError,
            "group_emb has shape .*K must be at least 1",
        ),
        (
            lambda: bidirectional_contrastive(txt, img, owner, directions="t2t"),
            ValueError,
            "directions must be one of 'both', 't2i', 'i2t'",
        ),
        (
            lambda: bidirectional_contrastive(txt, img, owner, extra_txt_owner=owner),
            ValueError,
            "extra_txt_owner was given without extra_txt_emb",
        ),
        (
            lambda: bidirectional_contrastive(txt, img, owner, extra_txt_emb=txt, extra_txt_owner=owner[:1]),
            ValueError,
            "extra_txt_owner has shape .*M = 1, but extra_txt_emb has M = 2",
        ),
        (
            lambda: bidirectional_contrastive(txt, img, owner, extra_img_emb=img[:1, None]),
            ValueError,
            "extra_img_emb has shape .*N = 1",
        ),
        (
            lambda: refclip_s(img, txt, img[:, None], torch.ones(2, 1)),
            TypeError,
            "ref_mask must be a bool tensor",
        ),
        (
            lambda: refclip_s(img, txt, img[:, None], torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            "ref_mask has shape .*R = 2, but ref_emb has R = 1",
        ),
        (
            lambda: refclip_s(img, txt, 3 * img[:, None], torch.ones(2, 1, dtype=torch.bool)),
            ValueError,
            r"ref_emb must hold L2-normalised rows, but row \(0, 0\)",
        ),
        (lambda: clip_s(img, txt.to("meta")), ValueError, "txt_emb is on meta but img_emb is on cpu"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
