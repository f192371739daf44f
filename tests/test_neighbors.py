"""similar_image_groups: hand-computed cases, Zhang et al. Eq. 2, ties, chunking == brute force, bad input;
groups_within_split: Eq. 2 from a split's references."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_rl_trl.neighbors import groups_within_split, similar_image_groups


def _unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at the given angles: cos between two of them is cos(angle difference)."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def _brute_force(img, k, exclude_above=None, text_emb=None, text_owner=None) -> list[list[int]]:
    """Reference in float64 with Python loops: full N x N similarity, sorted by (-similarity, index)."""
    img = img.double()
    n = len(img)
    if text_emb is None:
        sim = (img @ img.T).tolist()
    else:
        cap = (img @ text_emb.double().T).tolist()
        sim = [[-math.inf] * n for _ in range(n)]
        for a in range(n):
            for j, b in enumerate(text_owner.tolist()):
                sim[a][b] = max(sim[a][b], cap[a][j])
    groups = []
    for a in range(n):
        cands = [
            (s, b)
            for b, s in enumerate(sim[a])
            if b != a and s > -math.inf and (exclude_above is None or s <= exclude_above)
        ]
        groups.append([b for _, b in sorted(cands, key=lambda t: (-t[0], t[1]))[:k]])
    return groups


def test_hand_computed_image_cosine() -> None:
    # Angles 0, 10, 30, 90, 180 degrees: cos(10)=.985, cos(20)=.940, cos(30)=.866, cos(60)=.5, cos(80)=.174.
    img = _unit(0, 10, 30, 90, 180)
    assert similar_image_groups(img, k=2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    # exclude_above=0.95 drops the 0/10-degree pair (cos .985) and nothing else.
    assert similar_image_groups(img, k=2, exclude_above=0.95).tolist() == [
        [2, 3],
        [2, 3],
        [1, 0],
        [2, 1],
        [3, 2],
    ]


def test_hand_computed_caption_similarity_eq2() -> None:
    # Images at 0, 90, 45 degrees; captions: image 0 -> {0}, image 1 -> {10, 90}, image 2 -> {135}.
    img = _unit(0, 90, 45)
    txt = _unit(0, 10, 90, 135)
    owner = torch.tensor([0, 1, 1, 2])
    # s(0, 1) = max(cos 10, cos 90) = .985 > s(0, 2) = cos 135; s(1, 0) = cos 90 = 0 < s(1, 2) = cos 45;
    # s(2, 0) = cos 45 = .707 < s(2, 1) = max(cos 35, cos 45) = .819. Image 1's own caption at 90 (cos 1) is ignored.
    groups = similar_image_groups(img, k=1, text_emb=txt, text_owner=owner)
    assert groups.tolist() == [[1], [2], [1]]
    # Image-to-image cosine ranks differently: image 0's nearest is image 2 (cos 45 > cos 90).
    assert similar_image_groups(img, k=1).tolist() == [[2], [2], [0]]
    # exclude_above applies to the Eq. 2 similarity: .985 > .9 removes candidate 1 for image 0.
    assert similar_image_groups(img, k=1, exclude_above=0.9, text_emb=txt, text_owner=owner).tolist() == [
        [2],
        [2],
        [1],
    ]


def test_ties_break_by_lower_index() -> None:
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # three duplicates, one orthogonal
    assert similar_image_groups(e, k=2).tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert similar_image_groups(e, k=3, chunk_size=1).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    # A row of all-equal candidates, and ties inside the chosen set, across chunk boundaries.
    for chunk in (1, 2, 4):
        assert similar_image_groups(e, k=1, chunk_size=chunk).tolist() == [[1], [0], [0], [0]]


def test_exclude_above_too_strict_raises_naming_the_image() -> None:
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert similar_image_groups(e, k=1, exclude_above=0.99).tolist() == [[3], [3], [3], [0]]
    with pytest.raises(
        ValueError, match=r"image 0 has only 1 candidate image\(s\) with similarity <= exclude_above=0.99"
    ):
        similar_image_groups(e, k=2, exclude_above=0.99)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_brute_force_on_random_inputs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d, k = 37, 8, 5
    img = F.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = F.normalize(torch.randn(3 * n + 4, d, generator=g), dim=1)
    owner = torch.cat([torch.arange(n).repeat(3), torch.randint(0, n, (4,), generator=g)])
    owner = owner[torch.randperm(len(owner), generator=g)]  # captions in no particular order
    for exclude in (None, 0.6):
        expected_img = _brute_force(img, k, exclude)
        expected_txt = _brute_force(img, k, exclude, txt, owner)
        for chunk in (1, 5, n, None):
            assert similar_image_groups(img, k, exclude, chunk_size=chunk).tolist() == expected_img
            got = similar_image_groups(img, k, exclude, text_emb=txt, text_owner=owner, chunk_size=chunk)
            assert got.tolist() == expected_txt
    # The threshold really removed candidates (the exclude_above cases are not vacuous).
    assert _brute_force(img, k, 0.6) != _brute_force(img, k)


def test_half_precision_and_output_type() -> None:
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    out = similar_image_groups(img.half(), k=4)
    assert out.dtype == torch.long and out.shape == (20, 4)
    assert out.tolist() == _brute_force(img.half().float(), 4)


def test_images_without_captions_are_never_neighbours() -> None:
    img = _unit(0, 20, 40, 70)
    txt = _unit(0, 20, 70)
    owner = torch.tensor([0, 1, 3])  # image 2 (40 degrees) has no caption; it would be image 1's nearest
    groups = similar_image_groups(img, k=2, text_emb=txt, text_owner=owner)
    assert groups.tolist() == [[1, 3], [0, 3], [1, 3], [1, 0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(img_emb=torch.ones(4)), "img_emb must be a floating"),
        (dict(img_emb=torch.eye(4, dtype=torch.long)), "img_emb must be a floating"),
        (dict(img_emb=torch.eye(4) * 2), "img_emb must be L2-normalised: row 0 has norm 2"),
        (
            dict(img_emb=torch.eye(4).index_fill(0, torch.tensor([2]), float("nan"))),
            "img_emb row 2 is not finite",
        ),
        (dict(img_emb=torch.eye(4), k=4), r"k must be an int in \[1, N - 1\] = \[1, 3\]"),
        (dict(img_emb=torch.eye(4), k=0), "k must be an int"),
        (dict(img_emb=torch.eye(4), exclude_above=float("nan")), "exclude_above must be a number"),
        (dict(img_emb=torch.eye(4), text_emb=torch.eye(4)), "text_emb and text_owner go together"),
        (dict(img_emb=torch.eye(4), text_owner=torch.arange(4)), "text_emb and text_owner go together"),
        (
            dict(img_emb=torch.eye(4), text_emb=torch.eye(3), text_owner=torch.arange(3)),
            "text_emb must match",
        ),
        (
            dict(img_emb=torch.eye(4), text_emb=torch.eye(4), text_owner=torch.arange(3)),
            "text_owner must be an int",
        ),
        (
            dict(img_emb=torch.eye(4), text_emb=torch.eye(4), text_owner=torch.arange(4.0)),
            "text_owner must be an int",
        ),
        (
            dict(img_emb=torch.eye(4), text_emb=torch.eye(4), text_owner=torch.tensor([0, 1, 2, 4])),
            r"in \[0, 3\]",
        ),
        (dict(img_emb=torch.eye(4), chunk_size=0), "chunk_size must be a positive int"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs: dict, message: str) -> None:
    kwargs.setdefault("k", 2)
    with pytest.raises(ValueError, match=message):
        similar_image_groups(**kwargs)


class AngleScorer:
    """A stand-in judge for hand-checkable cases: the caption "c<angle>" embeds as the 2-D unit vector at that angle."""

    embed_dim = 2

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.seen += texts
        return _unit(*(float(t[1:]) for t in texts))


def test_groups_within_split_eq2_from_references() -> None:
    # The hand-computed Eq. 2 case above, with the captions given as each image's references.
    img = _unit(0, 90, 45)
    refs = [["c0"], ["c10", "c90"], ["c135"]]
    scorer = AngleScorer()
    groups = groups_within_split(img, 1, similarity="captions", scorer=scorer, refs=refs)
    assert groups.tolist() == [[1], [2], [1]]
    assert scorer.seen == ["c0", "c10", "c90", "c135"]  # the raw references: no prompt
    owner = torch.tensor([0, 1, 1, 2])
    assert torch.equal(groups, similar_image_groups(img, 1, text_emb=_unit(0, 10, 90, 135), text_owner=owner))
    assert groups_within_split(img, 1, similarity="image").tolist() == [[2], [2], [0]]
    # exclude_above reaches similar_image_groups; an image without references is never a neighbour
    assert groups_within_split(
        img, 1, similarity="captions", scorer=scorer, refs=refs, exclude_above=0.9
    ).tolist() == [[2], [2], [1]]
    assert groups_within_split(
        img, 1, similarity="captions", scorer=scorer, refs=[["c0"], [], ["c135"]]
    ).tolist() == [[2], [2], [0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(similarity="text"), "similarity must be one of"),
        (dict(), "pass refs"),
        (dict(refs=[["c0"], ["c1"]], scorer=AngleScorer()), "got 2 for 3 images"),
        (dict(refs=["c0", ["c1"], ["c2"]], scorer=AngleScorer()), r"refs\[0\] is a string"),
    ],
)
def test_groups_within_split_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        groups_within_split(_unit(0, 90, 45), 1, **kwargs)
