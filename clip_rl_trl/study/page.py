"""The annotators' page: one HTML shell, one stylesheet and one script, shared by the served study and the
static bundle (``<body data-mode="server">`` or ``"static"``).

The HTML holds no study data and no annotator text: the script fills the page with ``textContent`` only (never
``innerHTML``), so a caption or a name is shown as text whatever characters it holds. Served, the script reads
``api/study``, ``api/progress`` and posts each answer to ``api/answer`` before showing the next trial; static, it
reads ``study-data.js`` and keeps the answers in the page and in ``localStorage`` (per study and name), with a
button that downloads them as an answers JSONL file.
"""

from __future__ import annotations

__all__ = ["SCRIPT", "STYLE", "page_html"]

_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Caption study</title>
<link rel="stylesheet" href="study.css">
</head>
<body data-mode="{mode}">
<header>
  <h1 id="title">Caption study</h1>
  <div id="status"><span id="progress-text" aria-live="polite"></span>
    <button id="download" type="button" hidden>Download answers</button></div>
  <div class="bar" aria-hidden="true"><div id="bar-fill"></div></div>
</header>
<main>
  <section id="start">
    <p>You will see short image captions. For most of them, pick the one image among several that the caption
      describes. Some trials ask which of two captions singles out an image, or how fluent a caption reads.</p>
    <p>Answer with the mouse, or with the number keys (<kbd>1</kbd>, <kbd>2</kbd>, ...). Each answer is saved at
      once and is final.</p>
    <form id="name-form" autocomplete="off">
      <label for="name">Your name</label>
      <input id="name" name="name" maxlength="64" required>
      <button id="start-button" type="submit">Start</button>
    </form>
    <p class="hint">Use the same name to come back later: you continue where you left off.</p>
  </section>
  <section id="trial" hidden>
    <p id="who" class="hint"></p>
    <p id="prompt"></p>
    <p id="caption"></p>
    <div id="choices"></div>
    <p id="keys" class="hint"></p>
  </section>
  <section id="done" hidden>
    <h2>All done: thank you!</h2>
    <p id="done-text"></p>
  </section>
  <p id="error" role="alert"></p>
</main>
{data}<script src="study.js"></script>
</body>
</html>
"""

STYLE = """* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330;
  background: #f5f6f8; }
header { background: #fff; border-bottom: 1px solid #dde1e7; padding: 12px 24px 0; }
h1 { font-size: 1.15rem; margin: 0 0 6px; }
#status { display: flex; gap: 16px; align-items: center; font-size: .95rem; color: #4a5568; min-height: 28px; }
.bar { height: 6px; background: #e5e8ee; margin: 8px -24px 0; }
#bar-fill { height: 6px; width: 0; background: #3b6fd8; transition: width .2s; }
main { max-width: 980px; margin: 24px auto; padding: 0 24px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 10px; padding: 20px 24px; }
.hint { color: #6b7280; font-size: .9rem; }
#prompt { font-weight: 600; margin: 4px 0; }
#caption { font-size: 1.35rem; margin: 8px 0 18px; padding: 12px 16px; background: #f0f4fd;
  border-left: 4px solid #3b6fd8; border-radius: 4px; }
#choices { display: flex; flex-wrap: wrap; gap: 14px; }
.choice { border: 2px solid #cfd5df; border-radius: 8px; background: #fff; padding: 8px; cursor: pointer;
  font: inherit; color: inherit; display: flex; flex-direction: column; align-items: center; gap: 6px; }
.choice:hover, .choice:focus-visible { border-color: #3b6fd8; outline: none; box-shadow: 0 0 0 3px #c9d8f7; }
.choice img { width: 168px; height: 168px; object-fit: contain; image-rendering: pixelated; background: #eee; }
.choice .key { font-size: .85rem; color: #4a5568; font-weight: 600; }
.choice.text { flex: 1 1 240px; align-items: flex-start; text-align: left; font-size: 1.1rem; }
.choice.rating { min-width: 92px; }
.target img { width: 200px; height: 200px; object-fit: contain; image-rendering: pixelated; }
#choices.busy .choice { opacity: .55; cursor: progress; }
form { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin: 14px 0; }
input { font: inherit; padding: 7px 10px; border: 1px solid #b8c0cc; border-radius: 6px; min-width: 240px; }
button { font: inherit; }
#start-button, #download { padding: 7px 16px; border-radius: 6px; border: 1px solid #3b6fd8; background: #3b6fd8;
  color: #fff; cursor: pointer; }
#error { color: #b42318; font-weight: 600; min-height: 1.2em; }
kbd { border: 1px solid #b8c0cc; border-bottom-width: 2px; border-radius: 4px; padding: 0 5px; font-size: .85em; }
"""

SCRIPT = r""""use strict";
(function () {
  const MODE = document.body.dataset.mode;
  const $ = (id) => document.getElementById(id);
  const PROMPTS = {
    discrimination: "Which image does this caption describe?",
    pairwise: "Which caption singles out this image best (would let someone pick it out from similar ones)?",
    fluency: "How fluent is this caption? (grammar and naturalness only, not whether it is true)",
  };
  const FLUENCY_LABELS = ["", "1 not fluent", "2", "3", "4", "5 perfectly fluent"];
  let study = null;
  let annotator = null;
  let answered = new Set();
  let records = [];            // static mode: every answer of this annotator, for the download
  let current = null;
  let shownAt = 0;
  let busy = false;

  function showError(text) { $("error").textContent = text || ""; }
  function storageKey() { return "clip-rl-trl-study:" + study.study + ":" + annotator; }
  function imageUrl(i) { return MODE === "server" ? "images/" + i : "images/" + study.image_files[i]; }

  async function fetchJson(url, options) {
    const response = await fetch(url, options);
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const err = new Error((body && body.error) || ("the server answered " + response.status));
      err.status = response.status;
      err.code = body && body.code;
      throw err;
    }
    return body;
  }

  async function loadStudy() {
    if (MODE === "server") {
      study = await fetchJson("api/study");
    } else {
      study = window.STUDY_DATA;
      $("download").hidden = false;
    }
    $("title").textContent = study.title;
    document.title = study.title;
    updateProgress();
  }

  function updateProgress() {
    const n = study.trials.length;
    const done = study.trials.filter((t) => answered.has(t.id)).length;
    const position = Math.min(done + 1, n);
    $("progress-text").textContent = annotator === null ? n + " trials"
      : (done === n ? "All " + n + " trials answered" : "Trial " + position + " of " + n);
    $("bar-fill").style.width = (100 * done / n) + "%";
    $("download").textContent = "Download answers (" + records.length + ")";
  }

  async function start(event) {
    event.preventDefault();
    showError("");
    // As the server normalises names: no control characters, runs of whitespace made one space.
    const name = $("name").value.replace(/[\u0000-\u001f\u007f-\u009f]/g, "").trim().split(/\s+/).join(" ");
    if (!name) { showError("Enter a name first."); return; }
    $("start-button").disabled = true;
    try {
      if (MODE === "server") {
        const progress = await fetchJson("api/progress?annotator=" + encodeURIComponent(name));
        annotator = progress.annotator;
        answered = new Set(progress.answered);
      } else {
        annotator = name.normalize("NFC");
        const saved = window.localStorage ? window.localStorage.getItem(storageKey()) : null;
        records = saved ? JSON.parse(saved) : [];
        answered = new Set(records.map((r) => r.trial));
      }
    } catch (err) {
      showError("Could not start: " + err.message);
      $("start-button").disabled = false;
      return;
    }
    $("start").hidden = true;
    $("who").textContent = "Annotating as " + annotator;
    next();
  }

  function next() {
    busy = false;
    current = study.trials.find((t) => !answered.has(t.id)) || null;
    updateProgress();
    if (current === null) { finish(); return; }
    render(current);
    const following = study.trials.find((t) => !answered.has(t.id) && t !== current);
    if (following) { preload(following); }
  }

  function preload(trial) {
    const indices = trial.kind === "discrimination" ? trial.candidates : trial.kind === "pairwise" ? [trial.image] : [];
    for (const i of indices) { const img = new Image(); img.src = imageUrl(i); }
  }

  function choiceButton(label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "choice";
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = label;
    button.appendChild(key);
    button.addEventListener("click", onClick);
    return button;
  }

  function render(trial) {
    $("trial").hidden = false;
    $("prompt").textContent = PROMPTS[trial.kind];
    const caption = $("caption");
    const choices = $("choices");
    choices.replaceChildren();
    choices.classList.remove("busy");
    choices.dataset.trial = trial.id;
    if (trial.kind === "discrimination") {
      caption.hidden = false;
      caption.textContent = trial.caption;
      trial.candidates.forEach((image, position) => {
        const button = choiceButton(String(position + 1), () => answer(position));
        const img = document.createElement("img");
        img.src = imageUrl(image);
        img.alt = "candidate image " + (position + 1);
        button.insertBefore(img, button.firstChild);
        button.dataset.choice = String(position);
        choices.appendChild(button);
      });
      $("keys").textContent = "Click an image or press 1-" + trial.candidates.length + ".";
    } else if (trial.kind === "pairwise") {
      caption.hidden = true;
      const figure = document.createElement("div");
      figure.className = "target";
      const img = document.createElement("img");
      img.src = imageUrl(trial.image);
      img.alt = "the image";
      figure.appendChild(img);
      choices.appendChild(figure);
      trial.captions.forEach((text, position) => {
        const button = choiceButton(String(position + 1), () => answer(position));
        button.classList.add("text");
        const span = document.createElement("span");
        span.textContent = text;
        button.appendChild(span);
        button.dataset.choice = String(position);
        choices.appendChild(button);
      });
      $("keys").textContent = "Click a caption or press 1 or 2.";
    } else {
      caption.hidden = false;
      caption.textContent = trial.caption;
      for (let rating = 1; rating <= study.fluency_scale; rating++) {
        const button = choiceButton(FLUENCY_LABELS[rating] || String(rating), () => answer(rating));
        button.classList.add("rating");
        button.dataset.choice = String(rating);
        choices.appendChild(button);
      }
      $("keys").textContent = "Click a rating or press 1-" + study.fluency_scale + ".";
    }
    shownAt = performance.now();
  }

  async function answer(choice) {
    if (busy || current === null) { return; }
    busy = true;
    showError("");
    $("choices").classList.add("busy");
    const record = { study: study.study, annotator: annotator, trial: current.id, choice: choice,
      elapsed_ms: Math.round(performance.now() - shownAt) };
    if (MODE === "server") {
      try {
        await fetchJson("api/answer", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(record) });
      } catch (err) {
        if (err.code !== "duplicate") {   // already answered (e.g. in another tab): move on
          showError("Your answer was not saved: " + err.message + ". Earlier answers are safe; try again.");
          $("choices").classList.remove("busy");
          busy = false;
          return;
        }
      }
    } else {
      record.time = new Date().toISOString();
      record.source = "export";
      records.push(record);
      try { window.localStorage.setItem(storageKey(), JSON.stringify(records)); } catch (e) { /* private mode */ }
    }
    answered.add(current.id);
    next();
  }

  function finish() {
    $("trial").hidden = true;
    $("done").hidden = false;
    $("done-text").textContent = MODE === "server"
      ? "Your " + study.trials.length + " answers are saved. You can close this tab."
      : "Press \u201cDownload answers\u201d and send the file to the study's organisers.";
  }

  function answersJsonl() { return records.map((r) => JSON.stringify(r)).join("\n") + (records.length ? "\n" : ""); }

  function download() {
    const blob = new Blob([answersJsonl()], { type: "application/x-ndjson" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    const safe = (annotator || "anonymous").replace(/[^A-Za-z0-9_-]+/g, "_").slice(0, 40);
    link.download = "answers-" + study.study + "-" + safe + ".jsonl";
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  document.addEventListener("keydown", (event) => {
    if (current === null || event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    const digit = Number.parseInt(event.key, 10);
    if (Number.isNaN(digit)) { return; }
    if (current.kind === "discrimination" && digit >= 1 && digit <= current.candidates.length) { answer(digit - 1); }
    else if (current.kind === "pairwise" && (digit === 1 || digit === 2)) { answer(digit - 1); }
    else if (current.kind === "fluency" && digit >= 1 && digit <= study.fluency_scale) { answer(digit); }
  });
  $("name-form").addEventListener("submit", start);
  $("download").addEventListener("click", download);
  // For platforms that embed the bundle: read the answers without a download.
  window.studyAnswersJsonl = answersJsonl;
  loadStudy().catch((err) => showError("Could not load the study: " + err.message));
})();
"""


def page_html(mode: str) -> str:
    """The page shell for ``mode`` ``"server"`` (data from the API) or ``"static"`` (data from
    ``study-data.js`` beside it)."""
    if mode not in ("server", "static"):
        raise ValueError(f"mode must be server or static, got {mode!r}")
    data = '<script src="study-data.js"></script>\n' if mode == "static" else ""
    return _HTML.format(mode=mode, data=data)
