"""Similar-image groups: the K most similar *other* images of each image, chunked so no N x N matrix is built.

The groups are the hard negatives of the Group Embedding Gap (Zhang et al. 2022, section 3.2; DESIGN.md 4.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clip_rl_trl.clip import ClipScorer

# How a candidate image is scored: through its ground-truth captions (Zhang et al. Eq. 2) or by image cosine.
SIMILARITIES = ("image", "captions")
# Similarity entries per query chunk when chunk_size is not given: 2**26 float32 values = 256 MiB.
_AUTO_CHUNK_ELEMENTS = 2**26
_NORM_TOLERANCE = 1e-2  # generous enough for float16 / bfloat16 caches of normalised embeddings


def similar_image_groups(
    img_emb: torch.Tensor,
    k: int = 5,
    exclude_above: float | None = None,
    text_emb: torch.Tensor | None = None,
    text_owner: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Indices ``(N, k)`` of the ``k`` most similar other images of each image, most similar first.

    Similarity of image ``a`` to a candidate image ``b``:

    - images only: ``s(a, b) = cos(e_I(a), e_I(b))``;
    - with ``text_emb`` ``(M, D)`` and ``text_owner`` ``(M,)`` (row of ``img_emb`` each caption belongs to), Zhang
      et al. 2022, Eq. 2: ``s(I_0, I_i) = max_n f_CLIP(I_0, c_i^n)``, the best cosine between ``a`` and the
      ground-truth captions of ``b``. An image without captions is then never anyone's neighbour.

    An image is never its own neighbour (nor, with captions, through its own captions). ``exclude_above``
    drops near-duplicates: candidates with ``s(a, b) > exclude_above`` are not eligible (DiscriTune used 0.8 on
    image cosine). If fewer than ``k`` candidates remain for an image, ``ValueError`` names it: groups are never
    padded with images that do not qualify. Ties are broken by the lower index, so the result is deterministic.

    Inputs must be L2-normalised (checked) and on one device; similarities are computed in float32. Query rows
    are processed ``chunk_size`` at a time (default: as many as keep a chunk's similarity block near 256 MiB),
    so memory is ``O(chunk_size * (N + M))`` and the result equals the brute-force one for any chunk size.
    """
    n = _check_embeddings("img_emb", img_emb)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an int in [1, N - 1] = [1, {n - 1}] for N = {n} images, got {k!r}")
    if exclude_above is not None and not (
        isinstance(exclude_above, (int, float)) and exclude_above == exclude_above
    ):
        raise ValueError(f"exclude_above must be a number or None, got {exclude_above!r}")
    if (text_emb is None) != (text_owner is None):
        raise ValueError("text_emb and text_owner go together: pass both (caption similarity) or neither")
    keys = img_emb.float()
    owner = None
    if text_emb is not None and text_owner is not None:
        m = _check_embeddings("text_emb", text_emb)
        if text_emb.shape[1] != img_emb.shape[1] or text_emb.device != img_emb.device:
            raise ValueError(
                f"text_emb must match img_emb's width and device: got (M, {text_emb.shape[1]}) on "
                f"{text_emb.device} vs (N, {img_emb.shape[1]}) on {img_emb.device}"
            )
        if (
            not isinstance(text_owner, torch.Tensor)
            or text_owner.shape != (m,)
            or text_owner.is_floating_point()
        ):
            raise ValueError(
                f"text_owner must be an integer tensor of shape ({m},), one image row per caption"
            )
        if m and not (0 <= int(text_owner.min()) and int(text_owner.max()) < n):
            raise ValueError(f"text_owner values must be rows of img_emb, in [0, {n - 1}]")
        keys = text_emb.float()
        owner = text_owner.to(img_emb.device, torch.long)
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // (n + len(keys)))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    out = torch.empty(n, k, dtype=torch.long, device=img_emb.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sim = img_emb[start:stop].float() @ keys.T
        if owner is not None:
            # Eq. 2: max over each candidate image's captions (a scatter-max over caption owners).
            per_image = torch.full((stop - start, n), float("-inf"), device=sim.device)
            sim = per_image.scatter_reduce_(1, owner.expand_as(sim), sim, reduce="amax", include_self=True)
        rows = torch.arange(stop - start, device=sim.device)
        sim[rows, rows + start] = float("-inf")
        if exclude_above is not None:
            sim.masked_fill_(sim > exclude_above, float("-inf"))
        out[start:stop] = _top_k(sim, k, start, exclude_above)
    return out


def groups_within_split(
    img_emb: torch.Tensor,
    k: int = 5,
    *,
    similarity: str = "captions",
    scorer: ClipScorer | None = None,
    refs: Sequence[Sequence[str]] | None = None,
    exclude_above: float | None = None,
) -> torch.Tensor:
    """The similar-image groups of one split's images: ``(N, k)`` rows of ``img_emb``, most similar first.

    Zhang et al. 2022, section 3.2: "In each split of the training, validation and test dataset, we construct
    the similar image group within the same split", so ``img_emb`` holds the images of one split only.
    ``similarity="captions"`` is their Eq. 2, ``s(I_0, I_i) = max_n cos(I_0, c_i^n)``: ``refs[i]`` are the
    ground-truth captions of image ``i``, encoded by ``scorer`` as they are, without a prompt (as the retrieval
    metrics and rewards read captions). ``similarity="image"`` is image-image cosine and needs neither.
    ``exclude_above`` and the errors are those of :func:`similar_image_groups`.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if similarity == "image":
        return similar_image_groups(img_emb, k, exclude_above)
    if scorer is None or refs is None:
        raise ValueError(
            "similarity='captions' (Zhang et al. Eq. 2) scores images through their reference captions: "
            "pass refs (one list of captions per image) and the scorer that encodes them"
        )
    n = _check_embeddings("img_emb", img_emb)
    if isinstance(refs, str) or len(refs) != n:
        raise ValueError(f"refs must hold one list of captions per image: got {len(refs)} for {n} images")
    strings = [i for i, captions in enumerate(refs) if isinstance(captions, str)]
    if strings:
        raise ValueError(f"refs[{strings[0]}] is a string: give each image a list of captions")
    text_emb = scorer.encode_texts([c for captions in refs for c in captions]).float().to(img_emb.device)
    counts = torch.tensor([len(captions) for captions in refs], device=img_emb.device)
    text_owner = torch.repeat_interleave(torch.arange(n, device=img_emb.device), counts)
    return similar_image_groups(img_emb, k, exclude_above, text_emb=text_emb, text_owner=text_owner)


def _top_k(sim: torch.Tensor, k: int, start: int, exclude_above: float | None) -> torch.Tensor:
    """Columns of the k largest finite entries per row, by value descending then column ascending."""
    # One extra entry tells whether the k-th value is tied with an entry left out (k + 1 <= N always holds).
    values, idx = sim.topk(k + 1, dim=1)
    kth, idx = values[:, k - 1], idx[:, :k]
    short = ~torch.isfinite(kth)
    if short.any():
        row = int(short.nonzero()[0])
        eligible = int(torch.isfinite(sim[row]).sum())
        cause = "" if exclude_above is None else f" with similarity <= exclude_above={exclude_above}"
        raise ValueError(
            f"image {start + row} has only {eligible} candidate image(s){cause}, fewer than k={k}"
        )
    # topk orders ties arbitrarily. Where the k-th value is tied with an entry outside the top k, the chosen set
    # itself is ambiguous: those (rare) rows take a stable full sort. Elsewhere the set is exact and only its
    # order needs fixing: sort by column, then stable-sort by value.
    boundary_tie = values[:, k] == kth
    idx, _ = idx.sort(dim=1)
    order = sim.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    idx = idx.gather(1, order)
    if boundary_tie.any():
        tied = boundary_tie.nonzero().squeeze(1)
        idx[tied] = sim[tied].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def _check_embeddings(name: str, emb: torch.Tensor) -> int:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
        got = (
            f"{emb.dtype} of shape {tuple(emb.shape)}"
            if isinstance(emb, torch.Tensor)
            else type(emb).__name__
        )
        raise ValueError(f"{name} must be a floating (rows, D) tensor, got {got}")
    finite = torch.isfinite(emb).all(dim=1)
    if not finite.all():
        raise ValueError(f"{name} row {int((~finite).nonzero()[0])} is not finite (NaN or inf)")
    norms = emb.float().norm(dim=1)
    off = (norms - 1).abs() > _NORM_TOLERANCE
    if off.any():
        row = int(off.nonzero()[0])
        raise ValueError(f"{name} must be L2-normalised: row {row} has norm {float(norms[row]):.4g}")
    return emb.shape[0]
