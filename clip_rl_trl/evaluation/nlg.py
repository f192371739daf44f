"""Reference-based caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

The COCO caption evaluation protocol: captions and references are lowercased and tokenised by the Stanford
PTB tokenizer (punctuation dropped), then scored against the references of the same image. The tokenizer,
METEOR and SPICE run on Java. Nothing here downloads anything: without Java every metric is skipped with a
message saying so, and SPICE runs only when the Stanford CoreNLP 3.6.0 jars it needs are already in
pycocoevalcap's ``spice/lib`` folder (pycocoevalcap would otherwise fetch them from the internet on first use).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["NLG_KEYS", "check_refs", "coco_caption_metrics", "java_available", "missing_spice_jars"]

NLG_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

JAVA_MISSING = (
    "Java was not found on PATH: pycocoevalcap's PTB tokenizer, METEOR and SPICE run on Java, so BLEU, "
    "METEOR, ROUGE-L, CIDEr and SPICE were skipped. Install a Java runtime (e.g. `apt-get install "
    "default-jre-headless`) and make sure `java` is on PATH."
)


def check_refs(refs: Sequence[Sequence[str]], n: int) -> list[list[str]]:
    """Validate ``refs`` (one non-empty list of non-empty strings per caption, ``n`` lists); return them as lists."""
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise TypeError(f"refs must be a list of reference lists, got {type(refs).__name__}")
    if len(refs) != n:
        raise ValueError(f"got {n} captions but {len(refs)} reference lists")
    out = []
    for i, rs in enumerate(refs):
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise TypeError(f"refs[{i}] must be a list of reference strings, got {type(rs).__name__}")
        if not rs:
            raise ValueError(f"refs[{i}] is empty; every caption needs at least one reference")
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise TypeError(f"refs[{i}][{j}] is {type(r).__name__}, expected str")
            if not r.strip():
                raise ValueError(f"refs[{i}][{j}] is an empty reference")
        out.append(list(rs))
    return out


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH."""
    return shutil.which("java") is not None


def _spice_lib() -> Path:
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).parent / "lib"


def missing_spice_jars() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs that are not in pycocoevalcap's ``spice/lib`` (empty: SPICE can run)."""
    lib = _spice_lib()
    return [lib / name for name in _SPICE_JARS if not (lib / name).is_file()]


def _spice_missing_message(missing: list[Path]) -> str:
    return (
        f"Stanford CoreNLP 3.6.0 jars not found in {missing[0].parent} "
        f"(missing: {', '.join(p.name for p in missing)}). pycocoevalcap downloads them on first use, which "
        "cannot work offline; to enable SPICE, copy both jars from stanford-corenlp-full-2015-12-09.zip there."
    )


def _tokenize(captions: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """PTB-tokenise captions and references in one JVM run; returns ``(gts, res)`` keyed by caption index."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The tokenizer reads one sentence per line: collapse every whitespace run (newlines included).
    def one_line(text: str) -> dict[str, str]:
        return {"caption": " ".join(text.split())}

    batch = {("res", i): [one_line(c)] for i, c in enumerate(captions)}
    batch.update({("gts", i): [one_line(r) for r in rs] for i, rs in enumerate(refs)})
    tokens = PTBTokenizer().tokenize(batch)
    res = {i: tokens[("res", i)] for i in range(len(captions))}
    gts = {}
    for i in range(len(refs)):
        kept = [r for r in tokens[("gts", i)] if r]
        if not kept:
            raise ValueError(f"refs[{i}] has no reference left after tokenisation (all empty or punctuation)")
        gts[i] = kept
    return gts, res


def _rouge_l(gts: dict, res: dict) -> float:
    """pycocoevalcap's ROUGE-L mean; an empty caption scores 0 (pycocoevalcap divides by its length)."""
    from pycocoevalcap.rouge.rouge import Rouge

    nonempty = [i for i in res if res[i][0]]
    if not nonempty:
        return 0.0
    _, scores = Rouge().compute_score({i: gts[i] for i in nonempty}, {i: res[i] for i in nonempty})
    return float(np.sum(scores)) / len(res)


def _meteor(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR, with its JVM shut down and its pipes closed before returning."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        proc = meteor.meteor_p
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return float(score)


def coco_caption_metrics(
    captions: Sequence[str], refs: Sequence[Sequence[str]], spice: bool = True
) -> tuple[dict[str, float], dict[str, str]]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) of ``captions`` against ``refs`` (one list per caption).

    Returns ``(scores, skipped)``: ``scores`` maps the keys of :data:`NLG_KEYS` (and ``"spice"``) to corpus
    values as pycocoevalcap reports them (BLEU is corpus BLEU, CIDEr is pycocoevalcap's CIDEr-D with document
    frequencies from ``refs``, the others are means over captions); ``skipped`` maps each metric that could
    not be computed to the reason. ``spice=False`` leaves SPICE out silently.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not a single string")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] is {type(caption).__name__}, expected str")
    if not captions:
        raise ValueError("need at least one caption")
    refs = check_refs(refs, len(captions))
    keys = NLG_KEYS + (("spice",) if spice else ())
    if not java_available():
        return {}, dict.fromkeys(keys, JAVA_MISSING)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    try:
        gts, res = _tokenize(captions, refs)
    except (OSError, subprocess.SubprocessError) as err:
        # e.g. a read-only site-packages: the tokenizer writes its input file next to its jar.
        return {}, dict.fromkeys(keys, f"the PTB tokenizer (Java) failed: {err!r}")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{k + 1}": float(b) for k, b in enumerate(bleu)}
    skipped: dict[str, str] = {}
    try:
        scores["meteor"] = _meteor(gts, res)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        skipped["meteor"] = f"METEOR (Java) failed: {err!r}"
    scores["rouge_l"] = _rouge_l(gts, res)
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        missing = missing_spice_jars()
        if missing:
            skipped["spice"] = _spice_missing_message(missing)
        else:
            from pycocoevalcap.spice.spice import Spice

            try:
                scores["spice"] = float(Spice().compute_score(gts, res)[0])
            except (OSError, subprocess.SubprocessError, ValueError) as err:
                skipped["spice"] = f"SPICE (Java) failed: {err!r}; SPICE 1.0 is known to need Java 8"
    return scores, skipped
