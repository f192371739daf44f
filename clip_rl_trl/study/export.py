"""``study export``: the study as a self-contained static bundle for a crowdsourcing platform.

The bundle is a folder (and optionally a zip of it): ``index.html``, ``study.js``, ``study.css``,
``study-data.js`` (the public view of the trials: captions and image indices, no system names, targets or CLIP
choices) and ``images/``. It runs from any static host or straight from the disk (``file://``): the annotator
enters a name, answers, and presses "Download answers", which saves the same answers JSONL that ``study serve``
writes (``source: "export"``); answers also survive a reload in the browser's ``localStorage``. Pass the
downloaded files to ``study results``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from clip_rl_trl.study.design import Study
from clip_rl_trl.study.page import SCRIPT, STYLE, page_html

__all__ = ["export_bundle"]


def export_bundle(study: Study, output: str | Path, zip_file: bool = False) -> Path:
    """Write the bundle into the new or empty folder ``output``; with ``zip_file`` also ``output.zip``.
    Returns the path of ``index.html``."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {output}: the folder is not empty; choose a new folder")
    if out.resolve() == study.folder.resolve() or study.folder.resolve() in out.resolve().parents:
        raise ValueError(f"--output {output}: export outside the study folder (the bundle is for publishing)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in study.image_files:
        shutil.copyfile(study.folder / "images" / name, out / "images" / name)
    data = study.public()
    data["image_files"] = study.image_files
    # A script, not a fetched JSON file: browsers refuse fetch() on file:// pages.
    (out / "study-data.js").write_text(
        "window.STUDY_DATA = " + json.dumps(data, ensure_ascii=False, indent=1) + ";\n", "utf-8"
    )
    (out / "study.js").write_text(SCRIPT, "utf-8")
    (out / "study.css").write_text(STYLE, "utf-8")
    (out / "index.html").write_text(page_html("static"), "utf-8")
    if zip_file:
        shutil.make_archive(str(out), "zip", root_dir=out)
    return out / "index.html"
