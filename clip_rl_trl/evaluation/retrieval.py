"""CLIP retrieval metrics: R@K over the whole set (both directions) and P@1 among 100 candidates.

Query ``i`` (a caption, or an image for image-to-text) has exactly one positive, row ``i`` of the other side;
the similarity is the dot product of L2-normalised CLIP embeddings.

Tie policy, shared by every metric here: similarities within ``atol`` of the positive's count as tied with it
(exact float ties are not reliable: one dot product computed in two GEMM tiles can differ in the last bit).
With ``g`` candidates strictly above the positive and ``t`` tied with it:

- ``ties="expected"`` (default): a tie is broken uniformly at random *in expectation*. The positive's rank is
  ``g + U`` with ``U`` uniform on ``{0, ..., t}``, so a query scores ``P(rank < K) = clamp((K - g) / (t + 1),
  0, 1)``. Deterministic and unbiased: identical images are each found with the chance a random tie-break gives
  them, and a captioner that writes one caption for every image gets chance-level image-to-text recall.
- ``ties="strict"``: the positive must beat every tied candidate (rank ``g + t``). This is the literal
  definition of Dessì et al. 2023 (Sec. 3: retrieved iff ``match(c, i) > match(c, i')`` for every distractor).

Without ties both give the usual ``rank = g``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["distractor_indices", "precision_at_1", "recall_at_k"]

# Rows of queries scored at once: bounds memory at _CHUNK x N similarities (N = 25k is 100 MB in float32).
# Fixed, so that the distractor draws of precision_at_1 depend only on the seed and N.
_CHUNK = 1024
_NORM_TOL = 1e-2
_TIE_POLICIES = ("expected", "strict")


def check_embeddings(name: str, x: object, rows: int | None = None, dim: int | None = None) -> Tensor:
    """Validate ``(N, D)`` L2-normalised embeddings and return them as float32; errors name ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {rows} (one per caption)")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, but the other embeddings have {dim}")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    off = ((x.norm(dim=-1) - 1).abs() > _NORM_TOL).nonzero().flatten()
    if len(off):
        row = int(off[0])
        raise ValueError(
            f"{name} must hold L2-normalised rows, but row {row} has norm {float(x[row].norm()):.4g}; "
            "normalise with torch.nn.functional.normalize(x, dim=-1)"
        )
    return x


def _pair(query_emb: Tensor, key_emb: Tensor) -> tuple[Tensor, Tensor]:
    query = check_embeddings("query_emb", query_emb)
    key = check_embeddings("key_emb", key_emb, rows=len(query), dim=query.shape[1])
    if len(query) < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {len(query)}")
    if key.device != query.device:
        raise ValueError(f"key_emb is on {key.device} but query_emb is on {query.device}")
    return query, key


def _tie_counts(sims: Tensor, positive: Tensor, atol: float) -> tuple[Tensor, Tensor]:
    """Per row: candidates strictly above the positive similarity, and candidates tied with it (itself excluded)."""
    pos = positive.unsqueeze(1)
    greater = (sims > pos + atol).sum(1)
    ties = ((sims - pos).abs() <= atol).sum(1) - 1
    return greater, ties


def _check_ties(ties: str) -> None:
    if ties not in _TIE_POLICIES:
        raise ValueError(f"ties must be one of {', '.join(map(repr, _TIE_POLICIES))}, got {ties!r}")


def _hit(greater: Tensor, ties: Tensor, k: int, policy: str) -> Tensor:
    """Per query: ``clamp((k - g) / (t + 1), 0, 1)`` ("expected") or ``1[g + t < k]`` ("strict")."""
    if policy == "strict":
        return (greater + ties < k).double()
    return ((k - greater).double() / (ties + 1).double()).clamp(0, 1)


def recall_at_k(
    query_emb: Tensor,
    key_emb: Tensor,
    k: int | Sequence[int] = (1, 5, 10),
    ties: str = "expected",
    atol: float = 1e-6,
) -> dict[int, float]:
    r"""Recall@K over the whole set: the share of queries whose positive is among the K most similar keys.

    .. math:: \mathrm{R@K} = \frac{1}{N} \sum_{i=1}^{N} \mathbb{1}[\operatorname{rank}_i < K], \quad
              \operatorname{rank}_i = |\{j : \cos(q_i, k_j) > \cos(q_i, k_i)\}|

    R@K-CLIP of Zhang et al. 2022 (Sec. 3.3): text-to-image with ``query_emb`` the captions and ``key_emb``
    their images (one caption per image, N images); swap the arguments for image-to-text. ``ties`` and
    ``atol`` set the tie policy (module docstring). Returns ``{K: recall}`` in [0, 1]; ``K >= N`` gives 1.
    """
    _check_ties(ties)
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(f"k must be a positive int or a non-empty sequence of them, got {k!r}")
    query, key = _pair(query_emb, key_emb)
    n = len(query)
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        q = query[start : start + _CHUNK]
        rows = torch.arange(len(q), device=q.device)
        sims = q @ key.T
        greater, tied = _tie_counts(sims, sims[rows, rows + start], atol)
        for i, kk in enumerate(ks):
            hits[i] += _hit(greater, tied, kk, ties).sum().cpu()
    return {kk: float(h / n) for kk, h in zip(ks, hits, strict=True)}


def distractor_indices(n: int, n_candidates: int, seed: int = 0) -> Tensor | None:
    """``(n, n_candidates - 1)`` indices of each query's distractors among the other ``n - 1`` items, as
    :func:`precision_at_1` draws them (so another judge can be scored on the same trials); ``None`` when every
    other item is a distractor (``n <= n_candidates``)."""
    n_distractors = min(n_candidates - 1, n - 1)
    if n_distractors >= n - 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        # A uniform subset of {0..N-2} (top-k of i.i.d. uniforms), shifted past the query's own item.
        drawn = torch.rand(rows, n - 1, generator=generator).topk(n_distractors, dim=1).indices
        chunks.append(drawn + (drawn >= torch.arange(start, start + rows).unsqueeze(1)))
    return torch.cat(chunks)


def precision_at_1(
    txt_emb: Tensor,
    img_emb: Tensor,
    n_candidates: int = 100,
    seed: int = 0,
    ties: str = "expected",
    atol: float = 1e-6,
) -> float:
    r"""P@1 among ``n_candidates`` images: caption i against its image and ``n_candidates - 1`` distractors.

    .. math:: \mathrm{P@1} = \frac{1}{N} \sum_{i=1}^{N}
              \mathbb{1}\big[\cos(c_i, I_i) > \max_{j \in D_i} \cos(c_i, I_j)\big]

    The evaluation of Dessì et al. 2023 (Sec. 3 for the retrieval rule, Table 1 for P@1 among 100 candidates).
    ``D_i`` is drawn uniformly without replacement from the other N - 1 images with a ``torch.Generator``
    seeded by ``seed`` (a result depends only on the seed and N); when ``N < n_candidates`` every other image
    is a distractor.
    ``ties="strict"`` is the paper's literal definition; the default ``"expected"`` scores a tie with ``t``
    distractors as ``1 / (t + 1)`` (module docstring). Returns a value in [0, 1].
    """
    _check_ties(ties)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 2:
        raise ValueError(
            f"n_candidates must be an int >= 2 (the target and one distractor), got {n_candidates!r}"
        )
    txt, img = _pair(txt_emb, img_emb)
    n = len(txt)
    drawn = distractor_indices(n, n_candidates, seed)
    hits = 0.0
    for start in range(0, n, _CHUNK):
        t = txt[start : start + _CHUNK]
        rows = torch.arange(len(t), device=t.device)
        sims = t @ img.T
        positive = sims[rows, rows + start]
        if drawn is not None:
            sims = torch.cat([positive.unsqueeze(1), sims.gather(1, drawn[start : start + len(t)].to(t.device))], 1)
        greater, tied = _tie_counts(sims, positive, atol)
        hits += float(_hit(greater, tied, 1, ties).sum())
    return hits / n
