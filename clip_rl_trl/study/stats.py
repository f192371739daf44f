"""The statistics of a human study, one small pure-Python function each (no SciPy).

Every function states its formula and where it comes from; ``tests/test_study.py`` checks each against cases
computed by hand or published worked examples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["Z_95", "binomial_test", "category_counts", "cohen_kappa", "fleiss_kappa", "mean_interval", "wilson_interval"]

#: the 97.5% quantile of the standard normal distribution: two-sided 95% intervals
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927, "Probable inference, the law of
    succession, and statistical inference", JASA 22).

    With :math:`\\hat p = x / n`:

    .. math:: \\frac{\\hat p + \\frac{z^2}{2n}}{1 + \\frac{z^2}{n}} \\pm
              \\frac{z}{1 + \\frac{z^2}{n}} \\sqrt{\\frac{\\hat p (1 - \\hat p)}{n} + \\frac{z^2}{4 n^2}}

    Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps its coverage near 0 and 1 and for
    small n (Brown, Cai and DasGupta 2001). ``n = 0`` gives the uninformative ``(0.0, 1.0)``.
    """
    _check_count(successes, n)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The bounds at x = 0 and x = n are exactly 0 and 1 in theory; do not let float rounding move them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def binomial_test(successes: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test of ``H0: P(success) = p``; with ``p = 0.5`` it is the sign test.

    The p-value sums the probabilities of every outcome no more likely than the one observed (the "minlike"
    rule of Clopper-Pearson style exact tests, as R's ``binom.test`` and SciPy's ``binomtest`` compute it):

    .. math:: P = \\sum_{k:\\, P(K = k) \\le P(K = x)} \\binom{n}{k} p^k (1 - p)^{n - k}

    For ``p = 0.5`` this is :math:`\\min(1, 2 \\sum_{k \\le \\min(x, n - x)} \\binom{n}{k} 2^{-n})` (the sign test,
    Dixon and Mood 1946). ``n = 0`` gives 1.0 (no evidence).
    """
    _check_count(successes, n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if n == 0:
        return 1.0
    probabilities = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    observed = probabilities[successes]
    # A relative tolerance so outcomes exactly as likely as the observed one (the mirror image at p = 0.5)
    # are not lost to rounding.
    total = sum(q for q in probabilities if q <= observed * (1 + 1e-7))
    return min(1.0, total)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa for many raters (Fleiss 1971, "Measuring nominal scale agreement among many raters",
    Psychological Bulletin 76(5)).

    ``counts[i][j]`` is how many raters put subject ``i`` in category ``j``; subject ``i`` has
    :math:`n_i = \\sum_j n_{ij} \\ge 2` ratings. With :math:`N` subjects:

    .. math:: P_i = \\frac{\\sum_j n_{ij}^2 - n_i}{n_i (n_i - 1)}, \\quad \\bar P = \\frac1N \\sum_i P_i, \\quad
              p_j = \\frac{\\sum_i n_{ij}}{\\sum_i n_i}, \\quad \\bar P_e = \\sum_j p_j^2, \\quad
              \\kappa = \\frac{\\bar P - \\bar P_e}{1 - \\bar P_e}

    With the same number of raters per subject this is Fleiss' statistic exactly; a varying :math:`n_i` uses
    each subject's own pair count in :math:`P_i`. Subjects with fewer than two ratings carry no agreement and
    must be left out by the caller. When every rating falls in one category (:math:`\\bar P_e = 1`) kappa is
    undefined: ``nan``.
    """
    rows = [list(row) for row in counts]
    if not rows:
        raise ValueError("fleiss_kappa needs at least one subject")
    width = len(rows[0])
    if any(len(row) != width for row in rows) or width < 2:
        raise ValueError("fleiss_kappa needs the same number (>= 2) of categories in every row")
    if any(c < 0 or int(c) != c for row in rows for c in row):
        raise ValueError("fleiss_kappa counts must be non-negative integers")
    totals = [sum(row) for row in rows]
    if min(totals) < 2:
        raise ValueError("every subject of fleiss_kappa needs at least two ratings")
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row, n in zip(rows, totals, strict=True)) / len(rows)
    all_ratings = sum(totals)
    p_e = sum((sum(row[j] for row in rows) / all_ratings) ** 2 for j in range(width))
    if p_e >= 1.0:
        return math.nan
    return (p_bar - p_e) / (1 - p_e)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters on the same subjects (Cohen 1960, "A coefficient of agreement for nominal
    scales", Educational and Psychological Measurement 20(1)).

    .. math:: \\kappa = \\frac{p_o - p_e}{1 - p_e}, \\quad p_o = \\frac1n \\sum_i \\mathbb 1[a_i = b_i], \\quad
              p_e = \\sum_c \\frac{n_a(c)}{n} \\frac{n_b(c)}{n}

    where :math:`n_a(c)` is how often rater ``a`` chose category ``c``. ``nan`` when :math:`p_e = 1` (both
    raters always used one and the same category: agreement beyond chance is undefined).
    """
    if len(first) != len(second):
        raise ValueError(f"cohen_kappa needs paired ratings, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        raise ValueError("cohen_kappa needs at least one shared subject")
    p_o = sum(a == b for a, b in zip(first, second, strict=True)) / n
    counts_a: dict[Hashable, int] = {}
    counts_b: dict[Hashable, int] = {}
    for a, b in zip(first, second, strict=True):
        counts_a[a] = counts_a.get(a, 0) + 1
        counts_b[b] = counts_b.get(b, 0) + 1
    p_e = sum(counts_a[c] * counts_b.get(c, 0) for c in counts_a) / (n * n)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1 - p_e)


def mean_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval of ratings: :math:`\\bar x \\pm z\\, s / \\sqrt n`, with the
    sample standard deviation :math:`s = \\sqrt{\\sum_i (x_i - \\bar x)^2 / (n - 1)}` (the large-sample interval
    of the central limit theorem; see e.g. Wasserman 2004, "All of Statistics", §6.3). Returns
    ``(mean, low, high)``; one value gives an interval of zero width, no value ``nan``s."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def category_counts(ratings: Mapping[str, Sequence[int]], categories: int) -> list[list[int]]:
    """Rows of per-category counts for :func:`fleiss_kappa`: ``ratings`` maps a subject to the categories
    (``0 .. categories - 1``) its raters chose; subjects with fewer than two ratings are left out."""
    rows = []
    for chosen in ratings.values():
        if len(chosen) >= 2:
            row = [0] * categories
            for c in chosen:
                row[c] += 1
            rows.append(row)
    return rows


def _check_count(successes: int, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(successes, bool) or not isinstance(successes, int) or not 0 <= successes <= n:
        raise ValueError(f"successes must be an int in [0, n] = [0, {n}], got {successes!r}")
