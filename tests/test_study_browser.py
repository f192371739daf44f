"""The study page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

1. Served: an annotator enters a name, answers part of a shapes-world study by mouse and keyboard, the tab is
   closed and the server interrupted; a new server and a new browser resume at the first unanswered trial with
   the same name; ``study results`` then reports exactly the accuracies of the clicks.
2. Static bundle: the ``file://`` page, answered, reloaded (answers kept in the browser), finished, and its
   downloaded answers JSONL read by ``study results``.

Skipped, with the reason, when chromium / chromedriver, Selenium or the study extra is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from clip_rl_trl.study import create_study, dataset_images, export_bundle, read_answers, study_results

CHROMIUM = os.environ.get("CLIP_RL_TRL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CLIP_RL_TRL_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


def _requirements() -> None:
    for module in ("selenium", "starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev,study]')")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            pytest.skip(f"{path} not found (apt-get install chromium chromium-driver)")


def _browser(profile: Path, downloads: Path | None = None):
    """A headless chromium with a new empty profile; the driver path is explicit, so Selenium never runs
    selenium-manager (which would download a driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def _shapes_study(folder: Path, n: int, **options):
    from clip_rl_trl.data.shapes import ShapesWorld

    world = ShapesWorld(seed=0)
    ids = [f"test-{i:06d}" for i in range(n)]
    scenes = world.scenes(n, "test")
    systems = {
        "full": {i: world.describe(s) for i, s in zip(ids, scenes, strict=True)},
        "short": {i: world.describe(s, ("shape",), [world.salient_object(s)], False)
                  for i, s in zip(ids, scenes, strict=True)},
    }
    return create_study(folder, systems, dataset_images("shapes", ids, "test"), **options)


def _plan(study) -> dict[str, int]:
    """The test's answers: discrimination right on two trials of three, wrong on the third (the next position);
    pairwise the first caption; fluency ratings cycling 1..5."""
    choices = {}
    for n, trial in enumerate(study.trials):
        if trial["kind"] == "discrimination":
            k = len(trial["candidates"])
            choices[trial["id"]] = trial["target"] if n % 3 != 2 else (trial["target"] + 1) % k
        elif trial["kind"] == "pairwise":
            choices[trial["id"]] = 0
        else:
            choices[trial["id"]] = n % 5 + 1
    return choices


def _wait(driver, condition, timeout: float = 15.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def _start(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "progress-text").text.endswith("trials"))
    box = driver.find_element(By.ID, "name")
    box.clear()
    box.send_keys(name)
    driver.find_element(By.ID, "start-button").click()


def _current_trial(driver) -> str | None:
    from selenium.webdriver.common.by import By

    if driver.find_element(By.ID, "done").is_displayed():
        return None
    return driver.find_element(By.ID, "choices").get_attribute("data-trial")


def _answer(driver, study, plan: dict[str, int], stop_after: int | None = None) -> int:
    """Answer trials in the order the page shows them, alternating mouse clicks and number keys; returns how
    many were answered."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    answered = 0
    while stop_after is None or answered < stop_after:
        trial_id = _wait(driver, lambda d: _current_trial(d) or (d.find_element(By.ID, "done").is_displayed()
                                                               and "done"))
        if trial_id == "done":
            break
        choice = plan[trial_id]
        trial = study.by_id[trial_id]
        if answered % 2:
            key = choice if trial["kind"] == "fluency" else choice + 1
            ActionChains(driver).send_keys(str(key)).perform()
        else:
            driver.find_element(By.CSS_SELECTOR, f'#choices button[data-choice="{choice}"]').click()
        answered += 1
        # The page moves on only once the answer is stored.
        _wait(driver, lambda d, t=trial_id: _current_trial(d) != t)
    return answered


def _expected(study, plan: dict[str, int]) -> dict[str, tuple[int, int]]:
    right: dict[str, list[int]] = {}
    for trial in study.trials:
        if trial["kind"] == "discrimination":
            tally = right.setdefault(trial["system"], [0, 0])
            tally[0] += plan[trial["id"]] == trial["target"]
            tally[1] += 1
    return {system: (hit, n) for system, (hit, n) in right.items()}


def test_served_study_resumes_after_a_crash(tmp_path) -> None:
    _requirements()
    from selenium.webdriver.common.by import By

    from clip_rl_trl.study.server import BackgroundServer

    study = _shapes_study(tmp_path / "study", 4, k=3, pairwise=True, fluency=True)
    plan = _plan(study)
    answers = tmp_path / "answers.jsonl"
    name = "Tester <b>&amp;</b>"
    total = len(study.trials)

    server = BackgroundServer(study, answers).start()
    port = server.port
    driver = _browser(tmp_path / "profile-1")
    try:
        driver.get(server.url)
        _start(driver, name)
        _wait(driver, lambda d: d.find_element(By.ID, "progress-text").text == f"Trial 1 of {total}")
        who = driver.find_element(By.ID, "who")
        assert who.text == f"Annotating as {name}" and not who.find_elements(By.TAG_NAME, "b")  # shown as text
        first = _answer(driver, study, plan, stop_after=9)
        assert first == 9
        assert len(answers.read_text().splitlines()) == 9  # on disk before the page moved on
    finally:
        driver.quit()  # the tab is gone
        server.stop()  # and the server interrupted

    server = BackgroundServer(study, answers, port=port).start()
    driver = _browser(tmp_path / "profile-2")  # a fresh browser: nothing remembered on the client side
    try:
        driver.get(server.url)
        _start(driver, f"  {name}  ")
        _wait(driver, lambda d: d.find_element(By.ID, "progress-text").text == f"Trial 10 of {total}")
        assert _current_trial(driver) == study.trials[9]["id"]
        assert _answer(driver, study, plan) == total - 9
        assert driver.find_element(By.ID, "progress-text").text == f"All {total} trials answered"
    finally:
        driver.quit()
        server.stop()

    records = read_answers(study, [answers])
    assert len(records) == total and {r["annotator"] for r in records} == {name}
    assert {r["trial"]: r["choice"] for r in records} == plan
    results = study_results(study, records)
    for system, (hit, n) in _expected(study, plan).items():
        accuracy = results["systems"][system]["accuracy"]
        assert (accuracy["successes"], accuracy["n"]) == (hit, n)
    ratings = {s: [plan[t["id"]] for t in study.trials if t["kind"] == "fluency" and t["system"] == s]
               for s in study.systems}
    for system, values in ratings.items():
        assert results["systems"][system]["fluency"]["mean"] == pytest.approx(sum(values) / len(values))


def test_static_bundle_collects_and_downloads_answers(tmp_path) -> None:
    _requirements()
    from selenium.webdriver.common.by import By

    study = _shapes_study(tmp_path / "study", 3, k=2, pairwise=True)
    plan = _plan(study)
    index = export_bundle(study, tmp_path / "bundle")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(tmp_path / "profile", downloads)
    try:
        driver.get(index.as_uri())
        _start(driver, "crowd worker 7")
        assert _answer(driver, study, plan, stop_after=4) == 4
        driver.refresh()  # a reload keeps the answers (localStorage, per study and name)
        _start(driver, "crowd worker 7")
        _wait(driver, lambda d: d.find_element(By.ID, "progress-text").text == f"Trial 5 of {len(study.trials)}")
        assert _answer(driver, study, plan) == len(study.trials) - 4
        driver.find_element(By.ID, "download").click()
        deadline = time.monotonic() + 15
        files: list[Path] = []
        while time.monotonic() < deadline and not files:
            files = [p for p in downloads.glob("*.jsonl")]
            time.sleep(0.05)
        assert files, "the answers download did not arrive"
        assert files[0].name == f"answers-{study.study_id}-crowd_worker_7.jsonl"
        page_copy = driver.execute_script("return window.studyAnswersJsonl()")
    finally:
        driver.quit()
    assert files[0].read_text("utf-8") == page_copy
    records = read_answers(study, files)
    assert {r["trial"]: r["choice"] for r in records} == plan
    assert all(json.loads(line)["source"] == "export" for line in page_copy.splitlines())
    results = study_results(study, records)
    for system, (hit, n) in _expected(study, plan).items():
        accuracy = results["systems"][system]["accuracy"]
        assert (accuracy["successes"], accuracy["n"]) == (hit, n)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
