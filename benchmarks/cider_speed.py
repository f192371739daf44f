"""CIDEr-D speed and agreement: clip_rl_trl's ``CiderD`` against pycocoevalcap's ``Cider``, side by side.

Command (from the repository root)::

    python benchmarks/cider_speed.py

Data: 5,000 images x 5 references and 5,000 candidates, synthetic sentences of 5-20 words drawn from a
2,000-word vocabulary with Zipf word frequencies (fixed seed); each candidate is one of its references with 30%
of the words redrawn. Both scorers take document frequencies from
the same 25,000 references. Timed, in one run: pycocoevalcap ``Cider().compute_score``; ``CiderD`` cold (the
one-off corpus setup ``CiderD(refs)`` plus the first ``score``, which caches the reference vectors); ``CiderD``
warm (a later ``score`` on the same references, as in every training step after the first); and a warm
training-step-sized call of 256 captions. Prints times, ratios and the largest per-caption difference.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider

from clip_rl_trl.rewards.cider import CiderD


def synthetic_captions(
    num_images: int, refs_per_image: int, vocab_size: int, seed: int
) -> tuple[list[list[str]], list[str]]:
    """References of 5-20 words, word ranks drawn with probability proportional to 1/rank, and candidates."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(vocab_size)])
    p = 1.0 / np.arange(1, vocab_size + 1)
    p /= p.sum()

    def zipf_words(count: int) -> np.ndarray:
        return vocab[rng.choice(vocab_size, size=count, p=p)]

    lengths = rng.integers(5, 21, size=num_images * refs_per_image)
    words = zipf_words(int(lengths.sum()))
    ends = np.cumsum(lengths)
    flat = [" ".join(words[e - n : e]) for e, n in zip(ends, lengths, strict=True)]
    refs = [flat[i * refs_per_image : (i + 1) * refs_per_image] for i in range(num_images)]
    # A candidate is one of its image's references with each word replaced with probability 0.3, so that it
    # shares n-grams of every order with its references, as a trained captioner's output does.
    candidates = []
    for image_refs in refs:
        words = np.array(image_refs[rng.integers(refs_per_image)].split())
        swap = rng.random(len(words)) < 0.3
        words[swap] = zipf_words(int(swap.sum()))
        candidates.append(" ".join(words))
    return refs, candidates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--step-size", type=int, default=256, help="captions in the training-step-sized call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    refs, candidates = synthetic_captions(args.images, args.refs, args.vocab, args.seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(candidates)}

    t0 = time.perf_counter()
    _, reference = Cider().compute_score(gts, res)
    t_coco = time.perf_counter() - t0

    t0 = time.perf_counter()
    cider = CiderD(refs)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = cider.score(candidates, refs)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = cider.score(candidates, refs)
    t_warm = time.perf_counter() - t0

    step = args.step_size
    t0 = time.perf_counter()
    small = cider.score(candidates[:step], refs[:step])
    t_small = time.perf_counter() - t0

    t_cold = t_setup + t_first
    max_diff = float(max(np.abs(cold - reference).max(), np.abs(warm - reference).max()))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"data: {args.images} images x {args.refs} refs, {args.images} candidates, vocab {args.vocab}")
    print(f"pycocoevalcap Cider.compute_score:   {t_coco:8.3f} s")
    print(
        f"CiderD cold (setup + first score):   {t_cold:8.3f} s  (setup {t_setup:.3f} s, score {t_first:.3f} s)"
    )
    print(f"CiderD warm (cached references):     {t_warm:8.3f} s")
    print(f"CiderD warm, {step} captions:           {t_small * 1e3:8.2f} ms")
    print(f"speed-up cold (pycocoevalcap / ours): {t_coco / t_cold:8.1f}x")
    print(f"speed-up warm (pycocoevalcap / ours): {t_coco / t_warm:8.1f}x")
    print(f"max |CiderD - pycocoevalcap| per caption: {max_diff:.2e} (mean CIDEr-D {reference.mean():.4f})")
    print(f"max |small call - full call|: {float(np.abs(small - warm[:step]).max()):.2e}")


if __name__ == "__main__":
    main()
