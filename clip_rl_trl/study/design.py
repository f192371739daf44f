"""A study: its systems, trials and images, built from caption files (``study create``) and read back.

A study folder holds ``study.json`` (the manifest below) and ``images/`` (the re-encoded copies of the images the
trials show, named ``0000.png``, ...). The manifest keeps everything the annotators must not see (which system
wrote a caption, which candidate is the target, what CLIP and the exact oracle chose); :meth:`Study.public` is
the only view that leaves the machine, in the served page and in the static bundle.

Trials, in three kinds:

- ``discrimination``: one caption and ``k`` candidate images, the caption's image among ``k - 1`` distractors
  (random images of the pool by default, or the image's CLIP nearest neighbours); the answer is a position.
- ``pairwise``: one image and two systems' captions of it; the answer is the caption that singles it out.
- ``fluency``: one caption; the answer is a rating from 1 (not fluent) to 5 (perfectly fluent).

All systems' discrimination trials of one image use the same candidate set (a paired comparison), each trial in
its own seeded order. Trials come in blocks (discrimination, then pairwise, then fluency), systems interleaved
and shuffled within each block by ``seed``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clip_rl_trl.study.images import ImagePool, write_image

__all__ = ["FORMAT", "FLUENCY_SCALE", "Study", "SystemSpec", "create_study", "load_study", "parse_system"]

FORMAT = "clip-rl-trl-study"
VERSION = 1
#: fluency ratings run from 1 to this
FLUENCY_SCALE = 5
KINDS = ("discrimination", "pairwise", "fluency")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class SystemSpec:
    """One system of a study: its name (as reported, never shown to annotators), caption file and column."""

    name: str
    path: str
    column: str = "caption"


def parse_system(spec: str) -> SystemSpec:
    """``NAME=PATH[:COLUMN]`` -> :class:`SystemSpec`; ``COLUMN`` defaults to ``caption`` (``clip-rl-trl eval``'s
    field). ``before=demo/captions.jsonl:before`` reads the demo report's ``before`` column. A ``:`` followed by
    a path separator (``C:\\x``) is part of the path, not a column."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--system {spec!r}: expected NAME=PATH[:COLUMN], e.g. after=demo/captions.jsonl:after")
    if not _NAME.match(name):
        raise ValueError(
            f"--system {spec!r}: the name {name!r} must be 1-64 letters, digits or _ . + - (starting with a "
            "letter or digit)"
        )
    path, colon, column = rest.rpartition(":")
    if not colon or not path or not column or "/" in column or "\\" in column:
        path, column = rest, "caption"
    return SystemSpec(name, path, column)


class Study:
    """A study folder read back: the manifest (``data``), its trials by id and the image files."""

    def __init__(self, folder: Path, data: dict[str, Any]) -> None:
        self.folder = folder
        self.data = data
        self.trials: list[dict[str, Any]] = data["trials"]
        self.by_id = {t["id"]: t for t in self.trials}
        self.image_files: list[str] = [image["file"] for image in data["images"]]

    @property
    def study_id(self) -> str:
        return self.data["study_id"]

    @property
    def systems(self) -> list[str]:
        return [s["name"] for s in self.data["systems"]]

    @property
    def settings(self) -> dict[str, Any]:
        return self.data["settings"]

    def image_path(self, index: int) -> Path | None:
        """The file of image ``index`` (an int from a request), or None: never a path built from user text."""
        if not 0 <= index < len(self.image_files):
            return None
        return self.folder / "images" / self.image_files[index]

    def choice_range(self, trial: dict[str, Any]) -> range:
        """The valid answers of ``trial``: candidate positions, caption positions or fluency ratings."""
        if trial["kind"] == "discrimination":
            return range(len(trial["candidates"]))
        if trial["kind"] == "pairwise":
            return range(2)
        return range(1, FLUENCY_SCALE + 1)

    def public(self) -> dict[str, Any]:
        """What the annotators' page receives: captions, image indices and instructions; no system names,
        targets, CLIP or oracle choices."""
        keep = {"discrimination": ("id", "kind", "caption", "candidates"), "pairwise": ("id", "kind", "image",
                "captions"), "fluency": ("id", "kind", "caption")}
        return {
            "study": self.study_id,
            "title": self.data["title"],
            "fluency_scale": FLUENCY_SCALE,
            "n_images": len(self.image_files),
            "trials": [{key: t[key] for key in keep[t["kind"]]} for t in self.trials],
        }


def load_study(folder: str | Path) -> Study:
    """Read a study folder written by :func:`create_study`; errors name what is wrong with it."""
    root = Path(folder)
    manifest = root / "study.json"
    if not manifest.is_file():
        raise ValueError(f"study {folder}: no study.json in it (create one with 'clip-rl-trl study create')")
    try:
        data = json.loads(manifest.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"study {folder}: study.json is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"study {folder}: study.json is not a clip-rl-trl study manifest")
    if data.get("version") != VERSION:
        raise ValueError(f"study {folder}: manifest version {data.get('version')!r}, this library reads {VERSION}")
    study = Study(root, data)
    missing = [name for name in study.image_files if not (root / "images" / name).is_file()]
    if missing:
        raise ValueError(f"study {folder}: {len(missing)} image file(s) missing from images/, e.g. {missing[:3]}")
    return study


def create_study(
    output: str | Path,
    systems: dict[str, dict[str, str]],
    pool: ImagePool,
    *,
    specs: Sequence[SystemSpec] = (),
    k: int = 4,
    n_images: int | None = None,
    seed: int = 0,
    distractors: str = "random",
    pairwise: bool = False,
    fluency: bool = False,
    judge: Any = None,
    judge_name: str | None = None,
    title: str = "Caption study",
    image_format: str = "auto",
    max_side: int | None = 512,
) -> Study:
    """Build a study in the empty (or new) folder ``output`` and return it.

    ``systems`` maps a system name to its captions (``image_id -> caption``; ``read_captions`` gives them);
    the images shown are ``n_images`` (default: all) drawn with ``seed`` from the ids every system captions,
    and the distractors come from the same ids. ``pool`` loads them (:mod:`clip_rl_trl.study.images`).
    ``distractors="similar"`` takes each image's ``k - 1`` nearest neighbours by ``judge``'s image embeddings
    (``clip_rl_trl.neighbors.similar_image_groups``). With ``judge`` (a ``ClipScorer``) each trial also records
    CLIP's own choice; with a pool that knows its scenes (the shapes world), what the exact oracle
    (``language.consistent``) says of each candidate.
    """
    out = Path(output)
    if (out / "study.json").exists():
        raise ValueError(f"--output {output}: already holds a study (study.json); choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {output}: the folder is not empty; choose a new folder")
    if not systems:
        raise ValueError("a study needs at least one system (--system NAME=PATH[:COLUMN])")
    if pairwise and len(systems) < 2:
        raise ValueError("--pairwise needs at least two systems")
    if distractors not in ("random", "similar"):
        raise ValueError(f"--distractors must be random or similar, got {distractors!r}")
    if distractors == "similar" and judge is None:
        raise ValueError("--distractors similar needs a CLIP judge for the image embeddings (--judge)")
    common = sorted(set.intersection(*(set(captions) for captions in systems.values())))
    if not common:
        raise ValueError("the caption files share no image_id: every system must caption the same images")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"-k must be an int >= 2 (the target and at least one distractor), got {k!r}")
    if k > len(common):
        raise ValueError(f"-k {k} is larger than the {len(common)} images the systems caption in common")
    if n_images is not None and not 1 <= n_images <= len(common):
        raise ValueError(f"--n-images must be in [1, {len(common)}] (the images captioned by every system), "
                         f"got {n_images}")
    available = set(pool.ids)
    missing = [i for i in common if i not in available]
    if missing:
        raise ValueError(f"{pool.describe}: no image for image id(s) {missing[:3]}")

    rng = random.Random(f"clip-rl-trl-study:{seed}")
    targets = sorted(rng.sample(common, n_images)) if n_images is not None else common
    names = list(systems)
    groups = _distractors(targets, common, k, distractors, pool, judge, rng)

    # Image indices in order of first use; only these images are copied.
    index: dict[str, int] = {}
    for image_id in targets:
        for other in [image_id, *groups[image_id]]:
            index.setdefault(other, len(index))

    blocks: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for image_id in targets:
        candidates = [image_id, *groups[image_id]]
        for name in names:
            order = candidates[:]
            rng.shuffle(order)
            blocks["discrimination"].append({
                "kind": "discrimination", "system": name, "image_id": image_id, "caption": systems[name][image_id],
                "candidates": [index[c] for c in order], "candidate_ids": order, "target": order.index(image_id),
            })
        if pairwise:
            for a, b in itertools.combinations(names, 2):
                pair = [a, b] if rng.random() < 0.5 else [b, a]
                blocks["pairwise"].append({
                    "kind": "pairwise", "systems": pair, "image_id": image_id, "image": index[image_id],
                    "captions": [systems[s][image_id] for s in pair],
                })
        if fluency:
            for name in names:
                blocks["fluency"].append({"kind": "fluency", "system": name, "image_id": image_id,
                                          "caption": systems[name][image_id]})
    trials = []
    for kind in KINDS:
        rng.shuffle(blocks[kind])
        trials += blocks[kind]
    for n, trial in enumerate(trials, 1):
        trial["id"] = f"t{n:04d}"

    _annotate_oracle(trials, pool)
    if judge is not None:
        _annotate_clip(trials, pool, judge)

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    images = []
    for image_id, i in index.items():
        try:
            file = write_image(pool.load(image_id), out / "images", i, image_format, max_side)
        except (OSError, ValueError) as err:
            raise ValueError(f"{pool.describe}: image {image_id!r}: {err}") from err
        images.append({"file": file, "image_id": image_id})
    settings = {
        "k": k, "n_images": len(targets), "distractors": distractors, "pairwise": pairwise, "fluency": fluency,
        "image_source": pool.describe, "judge": judge_name if judge is not None else None,
        "oracle": pool.scenes is not None and pool.language is not None, **pool.extra,
    }
    by_name = {s.name: s for s in specs}
    data = {
        "format": FORMAT, "version": VERSION, "title": title, "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "systems": [{"name": n, **({"path": by_name[n].path, "column": by_name[n].column} if n in by_name else {})}
                    for n in names],
        "settings": settings, "images": images, "trials": [_ordered(t) for t in trials],
    }
    data["study_id"] = _study_id(data)
    (out / "study.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", "utf-8")
    return load_study(out)


def _distractors(targets: list[str], pool_ids: list[str], k: int, how: str, pool: ImagePool, judge: Any,
                 rng: random.Random) -> dict[str, list[str]]:
    """``k - 1`` distractor ids per target: a uniform sample of the other pool images, or the target's
    nearest neighbours by the judge's image embeddings (most similar first)."""
    if how == "random":
        return {t: rng.sample([i for i in pool_ids if i != t], k - 1) for t in targets}
    from clip_rl_trl.neighbors import similar_image_groups

    emb = judge.encode_images([pool.load(i) for i in pool_ids]).float()
    groups = similar_image_groups(emb, k - 1)
    row = {image_id: n for n, image_id in enumerate(pool_ids)}
    return {t: [pool_ids[int(j)] for j in groups[row[t]]] for t in targets}


def _annotate_oracle(trials: list[dict[str, Any]], pool: ImagePool) -> None:
    """Per discrimination trial, which candidates the caption is true of (``None``: it does not parse); the
    exact oracle of ``clip_rl_trl.evaluation.oracle``, recorded so results and simulations need no world."""
    if pool.scenes is None or pool.language is None:
        return
    for trial in trials:
        if trial["kind"] == "discrimination":
            scenes = [pool.scenes[i] for i in trial["candidate_ids"]]
            trial["oracle"] = pool.language.consistent(trial["caption"], scenes)


def _annotate_clip(trials: list[dict[str, Any]], pool: ImagePool, judge: Any) -> None:
    """CLIP's choice per trial: the candidate image most similar to the caption (discrimination), or the
    caption most similar to the image (pairwise); ties go to the first position."""
    ids = sorted({i for t in trials if t["kind"] != "fluency" for i in t.get("candidate_ids", [t["image_id"]])})
    image_emb = judge.encode_images([pool.load(i) for i in ids]).float()
    row = {image_id: n for n, image_id in enumerate(ids)}
    texts = sorted({c for t in trials for c in ([t["caption"]] if t["kind"] == "discrimination" else
                                                t.get("captions", []))})
    text_emb = judge.encode_texts(texts).float() if texts else None
    text_row = {text: n for n, text in enumerate(texts)}
    for trial in trials:
        if trial["kind"] == "discrimination":
            sims = image_emb[[row[i] for i in trial["candidate_ids"]]] @ text_emb[text_row[trial["caption"]]]
            trial["clip_choice"] = int(sims.argmax())
        elif trial["kind"] == "pairwise":
            sims = text_emb[[text_row[c] for c in trial["captions"]]] @ image_emb[row[trial["image_id"]]]
            trial["clip_choice"] = int(sims.argmax())


def _ordered(trial: dict[str, Any]) -> dict[str, Any]:
    """The id first: the manifest reads trial by trial."""
    return {"id": trial["id"], **{key: value for key, value in trial.items() if key != "id"}}


def _study_id(data: dict[str, Any]) -> str:
    """A fingerprint of what annotators answer (trials, images, seed): answers carry it, so answers of another
    study, or of this folder re-created differently, are refused."""
    content = json.dumps({k: data[k] for k in ("seed", "images", "trials")}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
