"""``clip_rl_trl.study`` without a browser: the statistics against hand-computed cases, study creation, answer
validation and durability, the web app through Starlette's test client, the static bundle, the simulated
annotator against the exact oracle, and the ``clip-rl-trl study`` commands."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from clip_rl_trl.data.shapes import ShapesLanguage, ShapesWorld
from clip_rl_trl.evaluation.oracle import oracle_at_1
from clip_rl_trl.study import (
    AnswerError,
    AnswersLog,
    create_study,
    dataset_images,
    expected_accuracy,
    export_bundle,
    folder_images,
    format_results,
    load_study,
    parse_system,
    read_answers,
    simulate_answers,
    study_results,
    write_answers,
)
from clip_rl_trl.study.answers import check_answer, normalize_name
from clip_rl_trl.study.stats import binomial_test, cohen_kappa, fleiss_kappa, mean_interval, wilson_interval

# ---------------------------------------------------------------- helpers


def write_shapes_captions(folder: Path, n: int, split: str = "test") -> tuple[Path, list[dict]]:
    """A captions file over the first ``n`` scenes of the shapes world (seed 0): ``full`` says everything,
    ``short`` only the salient object's shape (often true of distractors too), ``wrong`` a false caption."""
    world = ShapesWorld(seed=0)
    rows = []
    for i, scene in enumerate(world.scenes(n, split)):
        other = dict(scene["objects"][0])
        other["shape"] = "cross" if other["shape"] != "cross" else "circle"
        rows.append({
            "image_id": f"{split}-{i:06d}",
            "full": world.describe(scene),
            "short": world.describe(scene, ("shape",), [world.salient_object(scene)], background=False),
            "wrong": world.describe({"objects": [other], "background": scene["background"]}, background=False),
        })
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path, rows


def shapes_study(tmp_path: Path, n: int = 24, systems=("full", "short"), **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path, rows = write_shapes_captions(tmp_path, n)
    captions = {s: {r["image_id"]: r[s] for r in rows} for s in systems}
    pool = dataset_images("shapes", [r["image_id"] for r in rows], "test")
    return create_study(tmp_path / "study", captions, pool, **options)


# ---------------------------------------------------------------- statistics


def test_wilson_interval_by_hand() -> None:
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716768, half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    z = 1.96
    low, high = wilson_interval(8, 10, z)
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_binomial_test_by_hand() -> None:
    assert binomial_test(9, 10) == pytest.approx(2 * (1 + 10) / 1024)  # sign test: 2 * P(K <= 1)
    assert binomial_test(1, 10) == binomial_test(9, 10)
    assert binomial_test(2, 12) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert binomial_test(5, 10) == 1.0 and binomial_test(0, 0) == 1.0
    # Not symmetric: p = 0.25, n = 4, x = 3. P(K=k) = C(4,k) .25^k .75^(4-k): 81, 108, 54, 12, 1 (/256).
    # Outcomes no more likely than P(3) = 12/256: k = 3 and 4 -> 13/256.
    assert binomial_test(3, 4, 0.25) == pytest.approx(13 / 256)
    assert binomial_test(1, 4, 0.25) == 1.0  # the most likely outcome


def test_fleiss_kappa_worked_example() -> None:
    # The worked example of Fleiss' kappa (14 raters, 10 subjects, 5 categories): P = 0.378, Pe = 0.213, 0.210.
    rows = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(rows) == pytest.approx(0.20993, abs=1e-5)
    # By hand, two raters on three subjects: agree, agree, split. P = (1 + 1 + 0) / 3; p = (3/6, 3/6) -> Pe 1/2.
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1]]) == pytest.approx((2 / 3 - 1 / 2) / (1 / 2))
    assert fleiss_kappa([[3, 0], [0, 3]]) == 1.0
    assert math.isnan(fleiss_kappa([[2, 0], [2, 0]]))
    with pytest.raises(ValueError, match="two ratings"):
        fleiss_kappa([[1, 0]])


def test_cohen_kappa_by_hand() -> None:
    # po = 4/6; each rater says a 3 times and b 3 times: pe = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3.
    assert cohen_kappa("aabbab", "ababab") == pytest.approx(1 / 3)
    assert cohen_kappa([0, 1, 2], [0, 1, 2]) == 1.0
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))
    # Two raters, 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
    a = [0] * 25 + [1] * 25
    b = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_mean_interval_by_hand() -> None:
    mean, low, high = mean_interval([1, 2, 3, 4, 5], z=2.0)
    assert mean == 3.0 and high - mean == pytest.approx(2.0 * math.sqrt(2.5) / math.sqrt(5))
    assert mean_interval([4]) == (4, 4, 4) and math.isnan(mean_interval([])[0])


# ---------------------------------------------------------------- creating a study


def test_parse_system() -> None:
    from clip_rl_trl.study import SystemSpec

    assert parse_system("after=demo/captions.jsonl:after") == SystemSpec("after", "demo/captions.jsonl", "after")
    spec = parse_system("base=eval.captions.jsonl")
    assert (spec.path, spec.column) == ("eval.captions.jsonl", "caption")
    assert parse_system("x=C:\\runs\\c.jsonl").path == "C:\\runs\\c.jsonl"
    for bad in ("no-equals", "=a.jsonl", "bad name=a.jsonl", "x="):
        with pytest.raises(ValueError, match="--system"):
            parse_system(bad)


def test_create_study_shapes(tmp_path) -> None:
    study = shapes_study(tmp_path, n=24, k=4, n_images=10, pairwise=True, fluency=True, seed=3)
    kinds = [t["kind"] for t in study.trials]
    assert kinds == ["discrimination"] * 20 + ["pairwise"] * 10 + ["fluency"] * 20  # blocks, systems interleaved
    disc = [t for t in study.trials if t["kind"] == "discrimination"]
    assert {t["system"] for t in disc[:6]} == {"full", "short"}
    for t in disc:
        assert len(t["candidates"]) == 4 and t["candidate_ids"][t["target"]] == t["image_id"]
        assert len(set(t["candidate_ids"])) == 4 and t["oracle"] is not None
    # Both systems' trials of an image show the same candidates (a paired comparison).
    by_image: dict[str, set] = {}
    for t in disc:
        by_image.setdefault(t["image_id"], set()).add(frozenset(t["candidates"]))
    assert all(len(v) == 1 for v in by_image.values())
    # Only the images used are copied, under opaque names, re-encoded as PNG.
    used = {i for t in disc for i in t["candidates"]}
    assert used == set(range(len(study.image_files)))
    files = sorted(p.name for p in (study.folder / "images").iterdir())
    assert files == [f"{i:04d}.png" for i in range(len(used))]
    assert (study.folder / "images" / files[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The public view hides systems, targets, ids and the oracle.
    public = json.dumps(study.public())
    for secret in ('"system', '"target"', "image_id", "oracle", "candidate_ids", "test-0000"):
        assert secret not in public
    # Seeded: the same inputs give the same study; another seed another one.
    again = shapes_study(tmp_path / "again", n=24, k=4, n_images=10, pairwise=True, fluency=True, seed=3)
    other = shapes_study(tmp_path / "other", n=24, k=4, n_images=10, pairwise=True, fluency=True, seed=4)
    assert again.study_id == study.study_id and other.study_id != study.study_id


def test_create_study_records_clip_choice(tmp_path) -> None:
    from conftest import make_tiny_scorer

    scorer = make_tiny_scorer()
    study = shapes_study(tmp_path, n=12, k=3, pairwise=True, judge=scorer, judge_name="tiny")
    world = ShapesWorld(seed=0)
    images = {f"test-{i:06d}": world.example(i, "test")[1] for i in range(12)}
    for t in study.trials:
        if t["kind"] == "discrimination":
            sims = scorer.encode_images([images[i] for i in t["candidate_ids"]]) @ scorer.encode_texts([t["caption"]])[0]
            assert t["clip_choice"] == int(sims.argmax())
        else:
            sims = scorer.encode_texts(t["captions"]) @ scorer.encode_images([images[t["image_id"]]])[0]
            assert t["clip_choice"] == int(sims.argmax())
    assert study.settings["judge"] == "tiny"


def test_similar_distractors_are_nearest_neighbours(tmp_path) -> None:
    from conftest import make_tiny_scorer

    from clip_rl_trl.neighbors import similar_image_groups

    scorer = make_tiny_scorer()
    study = shapes_study(tmp_path, n=10, systems=("full",), k=3, distractors="similar", judge=scorer)
    world = ShapesWorld(seed=0)
    groups = similar_image_groups(scorer.encode_images([world.example(i, "test")[1] for i in range(10)]).float(), 2)
    for t in study.trials:
        row = int(t["image_id"].split("-")[1])
        assert set(t["candidate_ids"]) == {t["image_id"]} | {f"test-{int(j):06d}" for j in groups[row]}


def test_create_study_errors(tmp_path) -> None:
    path, rows = write_shapes_captions(tmp_path, 5)
    captions = {"full": {r["image_id"]: r["full"] for r in rows}}
    pool = dataset_images("shapes", [r["image_id"] for r in rows], "test")
    with pytest.raises(ValueError, match="-k 6 is larger than the 5 images"):
        create_study(tmp_path / "a", captions, pool, k=6)
    with pytest.raises(ValueError, match="--n-images"):
        create_study(tmp_path / "b", captions, pool, n_images=9)
    with pytest.raises(ValueError, match="--pairwise needs at least two systems"):
        create_study(tmp_path / "c", captions, pool, pairwise=True)
    with pytest.raises(ValueError, match="needs a CLIP judge"):
        create_study(tmp_path / "d", captions, pool, distractors="similar")
    with pytest.raises(ValueError, match="share no image_id"):
        create_study(tmp_path / "e", {"a": {"x": "c"}, "b": {"y": "c"}}, pool)
    create_study(tmp_path / "ok", captions, pool, k=3)
    with pytest.raises(ValueError, match="already holds a study"):
        create_study(tmp_path / "ok", captions, pool, k=3)
    with pytest.raises(ValueError, match="not a scene of the shapes world's split 'test'"):
        dataset_images("shapes", ["train-000001"], "test")


def test_folder_images(tmp_path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (600, 300), (200, 10, 10)).save(folder / "cat.jpg")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(folder / "dog.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    pool = folder_images(folder, ["cat", "dog.png"])
    assert pool.load("cat").size == (600, 300)
    with pytest.raises(ValueError, match=r"no image for 1 image id\(s\), e.g. \['\.\./secret'\]"):
        folder_images(folder, ["cat", "../secret"])
    with pytest.raises(ValueError, match="no image for 1 image id"):
        folder_images(folder, [str(tmp_path / "secret")])  # an absolute path is not inside the folder
    captions = {"a": {"cat": "a red picture", "dog.png": "a blue square"}}
    study = create_study(tmp_path / "study", captions, pool, k=2, max_side=256)
    names = sorted(p.name for p in (study.folder / "images").iterdir())
    assert names == ["0000.jpg", "0001.png"] or names == ["0000.png", "0001.jpg"]
    big = next(p for p in (study.folder / "images").iterdir() if p.suffix == ".jpg")
    assert Image.open(big).size == (256, 128)  # downscaled, aspect kept, JPEG above 256 px


# ---------------------------------------------------------------- answers


def test_check_answer_and_names(tmp_path) -> None:
    study = shapes_study(tmp_path, n=8, systems=("full",), k=3)
    trial = study.trials[0]
    ok = check_answer(study, {"study": study.study_id, "annotator": "  Ada \t Lovelace ", "trial": trial["id"],
                              "choice": 2, "elapsed_ms": 1200.7})
    assert ok == {"study": study.study_id, "annotator": "Ada Lovelace", "trial": trial["id"], "choice": 2,
                  "elapsed_ms": 1200}
    cases = [({"trial": "t9999", "choice": 0}, 404, "unknown trial"),
             ({"trial": trial["id"], "choice": 3}, 422, "out of range"),
             ({"trial": trial["id"], "choice": True}, 422, "out of range"),
             ({"trial": trial["id"], "choice": 0, "study": "0000"}, 409, "this is study")]
    for extra, status, message in cases:
        with pytest.raises(AnswerError, match=message) as err:
            check_answer(study, {"annotator": "a", **extra})
        assert err.value.status == status
    for bad in ("", "   ", "x" * 65, "a\x00b", 7):
        with pytest.raises(AnswerError):
            normalize_name(bad)
    assert normalize_name("<b>Zoë</b>") == "<b>Zoë</b>"  # kept as typed; escaped wherever it is shown


def test_answers_log_is_durable_and_refuses_duplicates(tmp_path, monkeypatch) -> None:
    import os

    study = shapes_study(tmp_path, n=8, systems=("full",), k=3)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "answers.jsonl"
    log = AnswersLog(study, path)
    t0, t1 = study.trials[0]["id"], study.trials[1]["id"]
    log.add({"annotator": "ada", "trial": t0, "choice": 1})
    assert len(synced) == 1 and json.loads(path.read_text().splitlines()[0])["trial"] == t0
    with pytest.raises(AnswerError, match="already answered") as err:
        log.add({"annotator": "ada", "trial": t0, "choice": 0})
    assert err.value.status == 409
    # A crash mid-write leaves a torn line: the next server skips it and starts on a fresh line.
    with path.open("a") as f:
        f.write('{"study": "' + study.study_id + '", "annot')
    again = AnswersLog(study, path)
    assert again.answered("ada") == {t0}
    again.add({"annotator": "ada", "trial": t1, "choice": 2})
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_answers(study, [path])  # the torn line is now in the middle: a damaged file, reported
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert [r["trial"] for r in read_answers(study, [path])] == [t0, t1]


def test_read_answers_checks_study_and_duplicates(tmp_path) -> None:
    study = shapes_study(tmp_path, n=8, systems=("full",), k=3)
    t0 = study.trials[0]["id"]
    record = {"study": study.study_id, "annotator": "ada", "trial": t0, "choice": 1}
    one = tmp_path / "one.jsonl"
    write_answers(one, [record])
    assert len(read_answers(study, [one, one])) == 1  # the same download passed twice counts once
    other = tmp_path / "other.jsonl"
    write_answers(other, [{**record, "choice": 2}])
    with pytest.raises(ValueError, match="answered trial t0001 differently"):
        read_answers(study, [one, other])
    foreign = tmp_path / "foreign.jsonl"
    write_answers(foreign, [{**record, "study": "abcdef0123456789"}])
    with pytest.raises(ValueError, match="for study 'abcdef0123456789', not " + study.study_id):
        read_answers(study, [foreign])
    with pytest.raises(ValueError, match="no such file"):
        read_answers(study, [tmp_path / "missing.jsonl"])


# ---------------------------------------------------------------- the web app (no browser)


def test_server_routes_validate_and_serve_only_study_images(tmp_path) -> None:
    pytest.importorskip("starlette", reason="the study extra is not installed")
    pytest.importorskip("httpx", reason="Starlette's test client needs httpx")
    from starlette.testclient import TestClient

    from clip_rl_trl.study.server import build_app

    study = shapes_study(tmp_path, n=8, systems=("full",), k=3)
    answers = tmp_path / "answers.jsonl"
    client = TestClient(build_app(study, answers), base_url="http://127.0.0.1:8000")
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/study.js").headers["content-type"].startswith("text/javascript")
    image = client.get("/images/0")
    assert image.status_code == 200 and image.content == (study.folder / "images" / study.image_files[0]).read_bytes()
    for path in ("/images/999", "/images/-1", "/images/..%2Fstudy.json", "/images/0.png", "/study.json"):
        assert client.get(path).status_code == 404, path
    public = client.get("/api/study").json()
    assert public["study"] == study.study_id and "target" not in json.dumps(public)
    t0 = study.trials[0]["id"]
    post = client.post("/api/answer", json={"study": study.study_id, "annotator": "<i>Ada</i>", "trial": t0,
                                            "choice": 0})
    assert post.status_code == 200 and post.json()["answered"] == 1
    assert client.get("/api/progress", params={"annotator": " <i>Ada</i> "}).json() == {
        "annotator": "<i>Ada</i>", "answered": [t0]}
    errors = [
        ({"json": {"annotator": "<i>Ada</i>", "trial": t0, "choice": 1}}, 409, "already answered"),
        ({"json": {"annotator": "a", "trial": "nope", "choice": 0}}, 404, "unknown trial"),
        ({"json": {"annotator": "a", "trial": t0, "choice": 7}}, 422, "out of range"),
        ({"json": {"annotator": "", "trial": t0, "choice": 0}}, 422, "enter a name"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b'{"trial": "t0001"}', "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ({"content": b"{" + b" " * 5000 + b"}", "headers": {"content-type": "application/json"}}, 413, "at most"),
    ]
    for kwargs, status, message in errors:
        response = client.post("/api/answer", **kwargs)
        assert response.status_code == status and message in response.json()["error"], (kwargs, response.text)
        assert response.json()["code"] == ("duplicate" if status == 409 else "invalid")  # the page moves on, or not
    assert len(answers.read_text().splitlines()) == 1
    # DNS rebinding: a page served by another name cannot reach the loopback server.
    assert client.get("/api/study", headers={"host": "evil.example"}).status_code == 400


def test_serve_without_the_extra_says_how_to_install(tmp_path, monkeypatch, capsys) -> None:
    from clip_rl_trl.cli import main

    shapes_study(tmp_path, n=6, systems=("full",), k=2)
    monkeypatch.delitem(sys.modules, "clip_rl_trl.study.server", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["study", "serve", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'clip-rl-trl[study]'" in err


def test_export_bundle(tmp_path) -> None:
    study = shapes_study(tmp_path, n=8, k=3, pairwise=True)
    index = export_bundle(study, tmp_path / "bundle", zip_file=True)
    bundle = index.parent
    assert sorted(p.name for p in bundle.iterdir()) == ["images", "index.html", "study-data.js", "study.css",
                                                        "study.js"]
    assert (tmp_path / "bundle.zip").is_file()
    data = (bundle / "study-data.js").read_text()
    assert study.study_id in data
    for secret in ('"system', '"target"', "oracle", "test-0000", "short", "full"):  # no system name either
        assert secret not in data
    assert len(list((bundle / "images").iterdir())) == len(study.image_files)
    with pytest.raises(ValueError, match="not empty"):
        export_bundle(study, bundle)


# ---------------------------------------------------------------- simulation and results


def test_simulated_study_recovers_the_oracle(tmp_path) -> None:
    """Known truth end to end: the oracle@1 the study records equals the library's oracle_at_1 on the same
    candidates, and the accuracy study_results reports for simulated annotators covers what they should score
    with its Wilson interval: the oracle@1 itself without lapses (for captions true of their image), and
    (1 - e) * (oracle@1 + g / k) + e / k with lapses at rate e (g: trials where the caption fits no candidate)."""
    n, k = 60, 4
    study = shapes_study(tmp_path, n=n, systems=("full", "short", "wrong"), k=k, pairwise=True)
    scenes = ShapesWorld(seed=0).scenes(n, "test")
    oracle = {}
    for system in ("full", "short", "wrong"):
        trials = sorted((t for t in study.trials if t["kind"] == "discrimination" and t["system"] == system),
                        key=lambda t: t["image_id"])
        candidates = torch.tensor([[int(c.split("-")[1]) for c in t["candidate_ids"] if c != t["image_id"]]
                                   for t in trials])
        oracle[system] = oracle_at_1([t["caption"] for t in trials], scenes, ShapesLanguage(), candidates)
    assert oracle["full"] > 0.9 > oracle["short"] > 0.3 and oracle["wrong"] == 0.0

    exact = study_results(study, simulate_answers(study, annotators=4, error_rate=0.0, seed=1))
    for system in ("full", "short"):
        row = exact["systems"][system]
        assert row["oracle_accuracy"] == pytest.approx(oracle[system])
        assert expected_accuracy(study, system) == pytest.approx(oracle[system])
        assert row["accuracy"]["n"] == 4 * n
        assert row["accuracy"]["low"] <= oracle[system] <= row["accuracy"]["high"], (system, row)

    error = 0.2
    noisy = study_results(study, simulate_answers(study, annotators=4, error_rate=error, seed=2))
    for system in ("full", "short", "wrong"):
        trials = [t for t in study.trials if t["kind"] == "discrimination" and t["system"] == system]
        guesses = sum(t["oracle"] is None or not any(t["oracle"]) for t in trials) / len(trials)
        expected = (1 - error) * (oracle[system] + guesses / k) + error / k
        assert expected_accuracy(study, system, error) == pytest.approx(expected)
        accuracy = noisy["systems"][system]["accuracy"]
        assert accuracy["low"] <= expected <= accuracy["high"], (system, accuracy, expected)
    # The distinctive system wins the pairwise trials, significantly, by the sign test.
    full_vs_short = next(p for p in noisy["pairwise"] if {p["a"], p["b"]} == {"full", "short"})
    assert full_vs_short["p_value"] < 1e-6
    assert noisy["agreement"]["discrimination"]["annotators"] == 4
    assert -1 <= noisy["agreement"]["discrimination"]["fleiss_kappa"] <= 1


def test_results_with_one_annotator_and_hostile_names(tmp_path) -> None:
    study = shapes_study(tmp_path, n=8, k=3)
    name = "<script>alert(1)</script> | [x](javascript:y)"
    records = [{"study": study.study_id, "annotator": name, "trial": t["id"], "choice": t["target"]}
               for t in study.trials]
    results = study_results(study, records)
    assert results["systems"]["full"]["accuracy"]["rate"] == 1.0
    assert results["agreement"]["discrimination"]["note"] == "agreement needs at least two annotators"
    report = format_results(results)
    assert "<script>" not in report and "&lt;script&gt;" in report and "\\[x\\]" in report and "\\|" in report
    assert "agreement needs at least two annotators" in report


def test_study_cli_end_to_end(tmp_path, capsys) -> None:
    from clip_rl_trl.cli import main

    captions, _ = write_shapes_captions(tmp_path, 16)
    study_dir = tmp_path / "study"
    create = ["study", "create", "--output", str(study_dir), "--system", f"full={captions}:full",
              "--system", f"short={captions}:short", "--dataset", "shapes", "-k", "3", "--n-images", "12",
              "--pairwise", "--fluency"]
    assert main(create) == 0
    assert "60 trials (24 discrimination, 12 pairwise, 24 fluency)" in capsys.readouterr().out
    assert main(["study", "simulate", str(study_dir), "--annotators", "2", "--error-rate", "0.1"]) == 0
    simulated = study_dir / "simulated_answers.jsonl"
    assert len(simulated.read_text().splitlines()) == 2 * 60  # two annotators, every trial
    assert main(["study", "results", str(study_dir), "--answers", str(simulated)]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "Fleiss' kappa" in out
    for name in ("results.md", "results.json", "results.png"):
        assert (study_dir / "results" / name).is_file()
    json.loads((study_dir / "results" / "results.json").read_text())
    assert load_study(study_dir).study_id == json.loads((study_dir / "study.json").read_text())["study_id"]
    # User errors: one line on stderr, exit status 2.
    bad = [
        (["study", "create", "--output", str(tmp_path / "x"), "--system", f"a={captions}:nope", "--dataset",
          "shapes"], "needs 'image_id' and 'nope'"),
        (["study", "create", "--output", str(tmp_path / "y"), "--system", f"a={captions}:full", "--dataset",
          "shapes", "-k", "40"], "-k 40 is larger than the 16 images"),
        (["study", "create", "--output", str(tmp_path / "z"), "--system", f"a={captions}:full", "--images",
          str(tmp_path)], "no image for 16 image id(s)"),
        (["study", "results", str(tmp_path / "nothing")], "no study.json"),
    ]
    if all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn")):  # serving reads the answers first
        foreign = tmp_path / "foreign.jsonl"
        foreign.write_text(json.dumps({"study": "0123456789abcdef", "annotator": "a", "trial": "t0001",
                                       "choice": 0}) + "\n")
        bad.append((["study", "serve", str(study_dir), "--answers", str(foreign)], "for study '0123456789abcdef'"))
    for argv, message in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
