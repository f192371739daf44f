r"""The literature's n-gram distinctiveness and diversity metrics: CIDErBtw and Self-CIDEr.

Both read captions through the library's exact CIDEr-D implementation, :class:`~clip_rl_trl.rewards.cider.CiderD`
(its tokenisation and its document frequencies), so they need no Java and no pycocoevalcap.

- :func:`cider_btw`: CIDEr-D of a caption against the references of *other*, similar images (Wang, Xu, Wang and
  Chan, "Compare and Reweight: Distinctive Image Captioning Using Similar Images Sets", ECCV 2020). Lower is
  more distinctive: a caption that would fit its neighbours' references just as well does not tell them apart.
- :func:`self_cider`: diversity of several captions of one image (Wang and Chan, "Describing like Humans: on
  Diversity in Image Captioning", CVPR 2019). Higher is more diverse, in [0, 1].

Document frequencies (the "IDF corpus") are those of the ``CiderD`` passed in; by default one is built from the
references given (``CiderD(refs, normalize=True)``: one document per image, each n-gram counted once per image
whose references contain it; lowercased, ASCII punctuation removed, split on whitespace), which is what
pycocoevalcap's ``Cider`` does with the references it scores. Wang et al.'s released training code loads
precomputed document frequencies of the training references instead; pass ``cider=CiderD(train_refs, ...)`` to
do the same. Values depend on that choice, so compare numbers computed on the same corpus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from clip_rl_trl.evaluation.nlg import check_refs
from clip_rl_trl.rewards.cider import CiderD

__all__ = ["cider_btw", "cider_btw_scores", "self_cider", "self_cider_scores"]


def _check_captions(captions: Any, name: str) -> list[str]:
    if isinstance(captions, (str, bytes)) or not isinstance(captions, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(captions).__name__}")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"{name}[{i}] is {type(caption).__name__}, expected str")
    return list(captions)


def _group_lists(groups: Any, n: int) -> list[list[int]]:
    """``groups`` (an (N, K) integer tensor or array, or N lists of ints) as N lists of other images' indices."""
    if hasattr(groups, "detach"):  # a torch tensor
        groups = groups.detach().cpu().numpy()
    if isinstance(groups, np.ndarray):
        if groups.ndim != 2:
            raise ValueError(f"groups must have shape (N={n}, K), got {groups.shape}")
        if not np.issubdtype(groups.dtype, np.integer):
            raise TypeError(f"groups must hold integer image indices, got dtype {groups.dtype}")
        groups = groups.tolist()
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be an (N, K) integer tensor or N lists of image indices, got "
                        f"{type(groups).__name__}")
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} rows but there are {n} captions: one similar-image group per "
                         "image")
    out = []
    for i, row in enumerate(groups):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"groups[{i}] must be a list of image indices, got {type(row).__name__}")
        if not row:
            raise ValueError(f"groups[{i}] is empty: a similar-image group needs at least one other image")
        for j in row:
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)):
                raise TypeError(f"groups[{i}] holds {j!r} ({type(j).__name__}), expected an integer image index")
            if not 0 <= j < n:
                raise ValueError(f"groups[{i}] holds {j}, not an image index in [0, {n})")
            if j == i:
                raise ValueError(f"groups[{i}] contains image {i} itself; a similar-image group holds other images")
        out.append([int(j) for j in row])
    return out


def cider_btw_scores(
    captions: Sequence[str],
    refs: Sequence[Sequence[str]],
    groups: Any,
    cider: CiderD | None = None,
) -> np.ndarray:
    r"""CIDErBtw of each caption: its CIDEr-D against the references of the other images of its group.

    With :math:`S_i = \{I_{g_{i1}}, \dots, I_{g_{iK}}\}` the similar-image group of image :math:`i` (``groups[i]``,
    never image :math:`i` itself) and :math:`r^k_1, \dots, r^k_{N_k}` the references of the :math:`k`-th of them,

    .. math:: \mathrm{CIDErBtw}(c_i) = \frac{1}{\sum_k N_k} \sum_{k=1}^{K} \sum_{n=1}^{N_k}
              \mathrm{CIDEr\text{-}D}(c_i, \{r^k_n\})

    the mean CIDEr-D of the caption against every reference of every similar image. This is Wang et al.'s
    definition, :math:`\frac{1}{KN}\sum_k\sum_n g_c(c, c^k_n)` (ECCV 2020, Sec. 3.1; N references per image,
    :math:`g_c` CIDEr), and since CIDEr-D against a list of references is the mean over them, it is computed as one
    CIDEr-D of :math:`c_i` against the pooled references of the group (as their released code does). When every
    image has the same number of references (COCO's 5, the shapes world's 5) it also equals the mean over the K
    similar images of the caption's CIDEr-D against that image's references. Lower is more distinctive.

    Which similar images: ``groups``, the library's similar-image groups (the GEG groups of ``evaluate_captions``:
    the K = 5 most similar other images of the evaluated split, built by
    ``clip_rl_trl.neighbors.groups_within_split``, by Zhang et al.'s Eq. 2 through the references or by image
    cosine). Wang et al. build theirs with a VSE++ image-text model over the same kind of max-over-references
    similarity; the number depends on the groups, so state which ones.

    Args:
        captions: N captions, caption ``i`` of image ``i``.
        refs: N reference lists, ``refs[j]`` the references of image ``j``.
        groups: ``(N, K)`` integer tensor / array, or N lists of indices of *other* images.
        cider: the CIDEr-D scorer whose document frequencies are used (module docstring); default
            ``CiderD(refs, normalize=True)``, the references' own corpus.

    Returns:
        ``(N,)`` float64 array. An empty caption scores 0, as CIDEr-D scores it.

    Raises:
        TypeError / ValueError: a caption or reference that is not a string, an empty reference list, ``refs`` or
            ``groups`` of the wrong length, a group that is empty, holds a non-integer (a float or NaN), an index
            out of range, or its own image.
    """
    captions = _check_captions(captions, "captions")
    n = len(captions)
    if n < 2:
        raise ValueError(f"CIDErBtw compares each image with other images: needs at least 2 captions, got {n}")
    refs = check_refs(refs, n)
    rows = _group_lists(groups, n)
    if cider is None:
        cider = CiderD(refs, normalize=True)
    elif not isinstance(cider, CiderD):
        raise TypeError(f"cider must be a CiderD, got {type(cider).__name__}")
    pooled = [[r for j in row for r in refs[j]] for row in rows]
    return cider.score(captions, pooled)


def cider_btw(
    captions: Sequence[str],
    refs: Sequence[Sequence[str]],
    groups: Any,
    cider: CiderD | None = None,
) -> float:
    """Mean :func:`cider_btw_scores` over the N captions (the number Wang et al. report; lower is more distinctive)."""
    return float(cider_btw_scores(captions, refs, groups, cider).mean())


def _kernels(samples: list[list[str]], cider: CiderD) -> np.ndarray:
    """The ``(n, m, m)`` CIDEr kernels: ``K[i, a, b] = CIDEr(samples[i][a], samples[i][b])`` (Vedantam et al.'s
    CIDEr, no clipping, no length penalty), the tf-idf weights and idf read through ``cider``."""
    n, m = len(samples), len(samples[0])
    # CiderD's own n-gram encoding and tf-idf weighting (with its document frequencies), for all n*m sentences at
    # once: an n-gram unseen in its corpus gets one id for the whole call, idf log N, as CiderD scores candidates.
    sentence, feature, unit = cider.unit_tfidf([s for row in samples for s in row])
    # Per image, a dense (m, F_i) matrix of unit-normalised per-order vectors: K = 10/4 * X X^T, a Gram matrix.
    kernels = np.zeros((n, m, m), dtype=np.float64)
    image = sentence // m
    bounds = np.searchsorted(image, np.arange(n + 1))  # keys are sorted by sentence, hence by image
    for i in range(n):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            continue
        cols, col = np.unique(feature[lo:hi], return_inverse=True)
        x = np.zeros((m, len(cols)))
        x[sentence[lo:hi] - i * m, col.reshape(-1)] = unit[lo:hi]
        kernels[i] = x @ x.T
    return kernels * (10.0 / 4)  # CIDEr's mean over n = 1..4


def check_samples(samples: Any) -> list[list[str]]:
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise TypeError(f"samples must be N lists of m captions, got {type(samples).__name__}")
    if not samples:
        raise ValueError("samples is empty: Self-CIDEr needs at least one image's captions")
    rows = []
    for i, row in enumerate(samples):
        row = _check_captions(row, f"samples[{i}]")
        rows.append(row)
    m = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != m:
            raise ValueError(f"samples[{i}] has {len(row)} captions but samples[0] has {m}: Self-CIDEr's log base "
                             "is the number of captions per image, so every image needs the same number")
    if m < 2:
        raise ValueError(f"Self-CIDEr needs at least 2 captions per image, got {m}")
    return rows


def self_cider_scores(samples: Sequence[Sequence[str]], cider: CiderD | None = None) -> list[float | None]:
    r"""Self-CIDEr diversity of each image's set of m captions (Wang and Chan, CVPR 2019, Sec. 3).

    For the captions :math:`c_1..c_m` of one image, :math:`K_{ab} = \mathrm{CIDEr}(c_a, c_b)` is the kernel matrix
    of CIDEr similarities (Vedantam et al.'s CIDEr: the mean over n = 1..4 of the cosine between tf-idf n-gram
    vectors, times 10; no clipping and no length penalty, as in the paper's and its code's CIDEr, so that :math:`K`
    is a Gram matrix and positive semi-definite). With its eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_m \ge 0`,
    :math:`\sqrt{\lambda_a}` are the singular values of the (kernelised) caption-feature matrix, and the diversity
    is kernelised latent semantic analysis' ratio of the largest singular value to their sum:

    .. math:: \mathrm{div} = -\log_m \left( \frac{\sqrt{\lambda_1}}{\sum_{a=1}^{m} \sqrt{\lambda_a}} \right)

    It lies in [0, 1]: 0 when every caption says the same thing (one non-zero eigenvalue), 1 when the m captions
    share no n-gram and have equal norms (:math:`K \propto I`). The scale of :math:`K` cancels. Eigenvalues below 0
    (rounding only) are clipped to 0, as in the authors' code.

    Args:
        samples: N lists of m >= 2 captions, ``samples[i]`` the captions of image ``i`` (e.g. m sampled captions).
        cider: the scorer whose document frequencies give the idf weights (module docstring); default
            ``CiderD(samples, normalize=True)``, each image's m captions one document.

    Returns:
        One value per image; ``None`` for an image whose m captions all have an all-zero tf-idf vector (empty
        captions, or only n-grams that occur in every document of the corpus), where the ratio is 0/0.

    Raises:
        TypeError / ValueError: samples that are not N lists of the same number m >= 2 of strings.
    """
    rows = check_samples(samples)
    if cider is None:
        cider = CiderD(rows, normalize=True)
    elif not isinstance(cider, CiderD):
        raise TypeError(f"cider must be a CiderD, got {type(cider).__name__}")
    m = len(rows[0])
    eig = np.clip(np.linalg.eigvalsh(_kernels(rows, cider)), 0.0, None)
    roots = np.sqrt(eig)
    total = roots.sum(axis=1)
    out: list[float | None] = []
    for i in range(len(rows)):
        if total[i] <= 0.0:
            out.append(None)
            continue
        ratio = min(1.0, roots[i].max() / total[i])
        out.append(max(0.0, -math.log(ratio) / math.log(m)))
    return out


def self_cider(samples: Sequence[Sequence[str]], cider: CiderD | None = None) -> float:
    """Mean :func:`self_cider_scores` over the images where it is defined (higher is more diverse).

    Raises:
        ValueError: it is defined for no image (every caption of every image has an all-zero tf-idf vector).
    """
    scores = [s for s in self_cider_scores(samples, cider) if s is not None]
    if not scores:
        raise ValueError("Self-CIDEr is undefined for every image: all captions have all-zero tf-idf vectors "
                         "(empty, or made only of n-grams found in every document of the corpus)")
    return sum(scores) / len(scores)
