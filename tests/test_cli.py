"""The clip-rl-trl command: embed, neighbors, train, eval, push: help, results and errors naming the flag."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image
from safetensors.torch import load_file

from clip_rl_trl import ImageEmbeddingCache, ShapesWorld, similar_image_groups
from clip_rl_trl.cli import main


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    colours = [(255, 0, 0), (250, 10, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)]
    data = Dataset.from_dict(
        {"image": [Image.new("RGB", (40, 40), c) for c in colours], "image_id": [10, 11, 12, 13, 14]}
    )
    path = tmp_path_factory.mktemp("data") / "colours"
    data.save_to_disk(str(path))
    return path


def test_embed_then_neighbors(dataset_dir, tmp_path, capsys) -> None:
    cache_path = tmp_path / "cache.safetensors"
    assert (
        main(
            [
                "embed",
                "--dataset",
                str(dataset_dir),
                "--clip",
                "RN50",
                "--output",
                str(cache_path),
                "--dtype",
                "float32",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert "wrote 5 embeddings" in capsys.readouterr().out
    cache = ImageEmbeddingCache.load(cache_path)
    assert cache.ids == [10, 11, 12, 13, 14] and cache.dim == 1024
    torch.testing.assert_close(cache.embeddings.float().norm(dim=-1), torch.ones(5))

    groups_path = tmp_path / "groups.safetensors"
    assert main(["neighbors", "--cache", str(cache_path), "-k", "2", "--output", str(groups_path)]) == 0
    groups = load_file(groups_path)["groups"]
    torch.testing.assert_close(groups, similar_image_groups(cache.embeddings.float(), k=2))


@pytest.fixture
def corrupt_dir(tmp_path):
    """A saved dataset of four images whose third (id 12) is garbage bytes."""
    import io

    from datasets import Features, Value
    from datasets import Image as ImageFeature

    values = []
    for colour in [(255, 0, 0), (0, 0, 255), None, (0, 255, 0)]:
        buf = io.BytesIO()
        if colour is not None:
            Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
        values.append({"bytes": buf.getvalue() or b"garbage", "path": None})
    features = Features({"image": ImageFeature(), "image_id": Value("int64")})
    Dataset.from_dict({"image": values, "image_id": [10, 11, 12, 13]}, features=features).save_to_disk(
        str(tmp_path / "corrupt")
    )
    return tmp_path / "corrupt"


def test_embed_lists_unreadable_images_or_skips_them(corrupt_dir, tmp_path, monkeypatch, capsys) -> None:
    from conftest import make_tiny_scorer

    import clip_rl_trl.cli

    monkeypatch.setattr(clip_rl_trl.cli, "_scorer", lambda args: make_tiny_scorer(batch_size=2))
    out = tmp_path / "cache.safetensors"
    argv = ["embed", "--dataset", str(corrupt_dir), "--clip", "tiny", "--output", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(
        "1 of the 4 images cannot be read (--skip-bad-images caches the others): row 2 (image id 12, column "
        "'image'): cannot read the 7 image bytes: not an image format PIL can identify"
    )
    assert not out.exists()

    assert main([*argv, "--skip-bad-images"]) == 0
    report = Path(f"{out}.bad_images.jsonl")
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 3 embeddings of dimension 64 to {out}",
        f"skipped 1 unreadable image(s), listed in {report}",
    ]
    assert ImageEmbeddingCache.load(out).ids == [10, 11, 13]
    assert [json.loads(line) for line in report.read_text().splitlines()] == [
        {"row": 2, "image_id": 12, "column": "image", "path": None,
         "error": "cannot read the 7 image bytes: not an image format PIL can identify"}
    ]


class AngleScorer:
    """A stand-in judge: the caption "c<angle>" embeds as the 2-D unit vector at that angle (hand-checkable)."""

    embed_dim = 2

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return _unit(*(float(t[1:]) for t in texts))


def _unit(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_neighbors_eq2_within_a_split(tmp_path, monkeypatch, capsys) -> None:
    # One cache over two splits; the test images sit right beside training images (5 and 95 degrees).
    cache_ids = ["test-0", "train-0", "train-1", "test-1", "train-2", "train-3"]
    angles = {"train-0": 0, "train-1": 90, "train-2": 45, "train-3": 180, "test-0": 5, "test-1": 95}
    ImageEmbeddingCache(cache_ids, _unit(*(angles[i] for i in cache_ids))).save(
        tmp_path / "cache.safetensors"
    )
    refs = {"train-0": ["c0"], "train-1": ["c10", "c90"], "train-2": ["c135"], "train-3": ["c180"]}
    train_ids = list(refs)
    DatasetDict(
        {
            "train": Dataset.from_dict({"image_id": train_ids, "captions": [refs[i] for i in train_ids]}),
            "test": Dataset.from_dict({"image_id": ["test-0", "test-1"], "captions": [["c5"], ["c95"]]}),
        }
    ).save_to_disk(str(tmp_path / "data"))
    monkeypatch.setattr("clip_rl_trl.cli._scorer", lambda args: AngleScorer())
    base = ["neighbors", "--cache", str(tmp_path / "cache.safetensors"), "-k", "1", "--dataset"]
    base += [str(tmp_path / "data"), "--split", "train"]

    out = tmp_path / "eq2.safetensors"
    assert main([*base, "--similarity", "captions", "--output", str(out)]) == 0
    assert "within the 4 images of split train" in capsys.readouterr().out
    groups = load_file(out)["groups"]
    # Eq. 2 by hand, s(a, b) = max cos(a, captions of b): train-0 (0) -> train-1 (caption at 10: .985);
    # train-1 (90) -> train-2 (caption at 135: .707); train-2 (45) -> train-1 (caption at 10: .819 > .707 for
    # train-0); train-3 (180) -> train-2 (caption at 135: .707). As cache rows; the test rows have no group.
    assert groups.tolist() == [[-1], [2], [4], [-1], [2], [4]]
    train_rows = torch.tensor([1, 2, 4, 5])
    expected = similar_image_groups(
        _unit(0, 90, 45, 180),
        1,
        text_emb=_unit(0, 10, 90, 135, 180),
        text_owner=torch.tensor([0, 1, 1, 2, 3]),
    )
    assert torch.equal(groups[train_rows], train_rows[expected])

    # Image cosine within the split: train-0's nearest is train-2 (45), not test-0 (5) from the other split.
    assert main([*base, "--output", str(tmp_path / "image.safetensors")]) == 0
    assert load_file(tmp_path / "image.safetensors")["groups"].tolist() == [[-1], [4], [4], [-1], [1], [2]]
    # Over the whole cache (no --dataset), the test images leak in.
    whole = tmp_path / "whole.safetensors"
    assert (
        main(["neighbors", "--cache", str(tmp_path / "cache.safetensors"), "-k", "1", "--output", str(whole)])
        == 0
    )
    assert load_file(whole)["groups"][1].tolist() == [0]

    assert main([*base[:-4], "--similarity", "captions", "--output", str(out)]) == 2
    assert "--similarity captions (Zhang et al. Eq. 2) needs --dataset" in capsys.readouterr().err
    assert main([*base, "--similarity", "captions", "--refs-column", "refs", "--output", str(out)]) == 2
    assert "no column 'refs'" in capsys.readouterr().err


def test_errors_name_the_bad_flag(dataset_dir, tmp_path, capsys) -> None:
    assert main(["neighbors", "--cache", str(tmp_path / "nope.safetensors"), "--output", "x"]) == 2
    assert "--cache" in capsys.readouterr().err
    assert main(["embed", "--dataset", str(dataset_dir), "--output", "x"]) == 2
    assert "--clip is required" in capsys.readouterr().err
    assert (
        main(
            [
                "embed",
                "--dataset",
                str(dataset_dir),
                "--clip",
                "RN50",
                "--id-column",
                "nope",
                "--output",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 2
    )
    assert "'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--dataset", str(dataset_dir), "--dtype", "int8", "--output", "x"])


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "clip_rl_trl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "embed" in out.stdout and "neighbors" in out.stdout


# ---------------------------------------------------------------------- train, eval, push

TINY_CLIP = "clip-rl-trl-cli-tiny"  # an open_clip architecture registered below (random weights, offline)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """Eight shapes-world scenes saved to disk, and a tiny open_clip architecture to judge them with."""
    root = tmp_path_factory.mktemp("cli_eval")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    ShapesWorld(seed=0).to_dataset(8, "test").save_to_disk(str(root / "scenes"))
    return root


@pytest.mark.parametrize("command", ["demo", "embed", "neighbors", "train", "eval", "push"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"clip-rl-trl {command}" in capsys.readouterr().out


def test_train_errors_name_the_flag(tmp_path, capsys) -> None:
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "--config is required" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("lr: 1\n")
    assert main(["train", "--config", str(tmp_path / "r.yaml")]) == 2
    assert "unknown field ['lr']" in capsys.readouterr().err
    (tmp_path / "old.yaml").write_text("captioner: {family: clipcap}\n")
    assert main(["train", "--config", str(tmp_path / "old.yaml")]) == 2
    assert "captioner.family -> captioner_family" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["train", "--config", "shapes_demo", "--output_dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "exists and is not a folder" in err
    # an output folder that cannot be written fails before any work, in one line
    assert main(["demo", "--quick", "--output-dir", "/proc/clip-rl-trl-test"]) == 2
    err = capsys.readouterr().err
    assert "output_dir '/proc/clip-rl-trl-test': cannot write there" in err and len(err.strip().splitlines()) == 1


def test_train_help_lists_the_recipe_fields(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--config", "shapes_demo", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--reward_funcs" in out and "--captioner_family" in out and "--learning_rate" in out


def test_eval_scores_a_captions_file(shapes_dir, tmp_path, capsys) -> None:
    scenes = ShapesWorld(seed=0).to_dataset(8, "test")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"image_id": i, "before": "a circle", "after": ShapesWorld.describe(s)}) + "\n"
            for i, s in zip(scenes["image_id"], scenes["scene"], strict=True)
        )
    )
    out = tmp_path / "metrics.json"
    torch.manual_seed(0)  # the tiny judge is randomly initialised: the same seed, the same judge
    args = [
        "eval",
        "--captions",
        str(captions),
        "--dataset",
        str(shapes_dir / "scenes"),
        "--clip",
        TINY_CLIP,
        "--column",
        "after",
        "--no-coco-metrics",
        "-k",
        "3",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    for key in ("recall_at_1", "p_at_1_100", "geg_avg", "clip_s", "refclip_s", "distinct_2", "self_bleu"):
        assert key in metrics and key in printed
    assert "cider" in metrics["skipped"]
    # a JSON list of records (COCO results format) gives the same numbers; the default output sits beside it
    torch.manual_seed(0)
    listed = tmp_path / "results.json"
    listed.write_text(
        json.dumps(
            [
                {"image_id": i, "caption": ShapesWorld.describe(s)}
                for i, s in zip(scenes["image_id"], scenes["scene"], strict=True)
            ]
        )
    )
    assert (
        main(
            [
                "eval",
                "--captions",
                str(listed),
                "--dataset",
                str(shapes_dir / "scenes"),
                "--clip",
                TINY_CLIP,
                "--no-coco-metrics",
                "-k",
                "3",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "results.metrics.json").read_text())
    assert again["recall_at_1"] == pytest.approx(metrics["recall_at_1"])


def test_eval_geg_groups_by_eq2_within_the_scored_split(shapes_dir, tmp_path, groups_spy, capsys) -> None:
    scenes = ShapesWorld(seed=0).to_dataset(8, "test")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"image_id": i, "caption": "a circle"}) + "\n" for i in scenes["image_id"])
    )
    calls = groups_spy
    base = ["eval", "--captions", str(captions), "--dataset", str(shapes_dir / "scenes"), "--clip", TINY_CLIP]
    base += ["--no-coco-metrics", "-k", "3", "--output", str(tmp_path / "m.json")]
    assert main(base) == 0
    (call,) = calls
    # Eq. 2 over the scored split's references, encoded raw by the judge; groups index the 8 scored images.
    assert (
        call["similarity"] == "captions" and call["refs"] == scenes["captions"] and len(call["img_emb"]) == 8
    )
    text_emb = call["scorer"].encode_texts([c for refs in scenes["captions"] for c in refs]).float()
    owner = torch.arange(8).repeat_interleave(torch.tensor([len(r) for r in scenes["captions"]]))
    expected = similar_image_groups(call["img_emb"], 3, text_emb=text_emb, text_owner=owner)
    assert torch.equal(call["groups"], expected)
    assert main([*base, "--similarity", "image"]) == 0
    assert calls[-1]["similarity"] == "image"
    assert main([*base, "--refs-column", "none"]) == 0
    assert calls[-1]["similarity"] == "image"
    assert "GEG groups by image cosine: no --refs-column 'none'" in capsys.readouterr().out


def test_eval_errors_name_the_flag(shapes_dir, tmp_path, capsys) -> None:
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image_id": "test-000000", "before": "a circle"}) + "\n")
    base = ["eval", "--captions", str(captions), "--dataset", str(shapes_dir / "scenes"), "--clip", TINY_CLIP]
    assert main(base) == 2
    assert "needs 'image_id' and 'caption' (column)" in capsys.readouterr().err
    captions.write_text(json.dumps({"image_id": "val-000042", "caption": "a circle"}) + "\n")
    assert main(base) == 2
    assert "1 image id(s) are not in --dataset" in capsys.readouterr().err
    assert main(["eval", "--captions", str(tmp_path / "none.jsonl"), "--dataset", "shapes"]) == 2
    assert "--captions" in capsys.readouterr().err
    assert main(["eval", "--captions", str(captions)]) == 2
    assert "--captions needs --dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": "test-000000", "caption": "a"}) + "\n{broken\n")
    assert main(["eval", "--captions", str(bad), "--dataset", "shapes"]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    bad.write_bytes(b"\xff\xfe\x00")
    assert main(["eval", "--captions", str(bad), "--dataset", "shapes"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "--config is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source only
        main(["eval", "--captions", str(captions), "--model", str(tmp_path)])


def model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "README.md").write_text("# card\n")
    return path


def test_push_refuses_a_folder_holding_a_credential(tmp_path, capsys) -> None:
    folder = model_folder(tmp_path / "model")
    (folder / "notes.txt").write_text("token: hf_" + "AbCdEf0123" * 4 + "\n")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "x.txt").write_text("hf_" + "Z" * 40)  # not uploaded: ignored by push
    assert main(["push", "--model", str(folder), "--repo-id", "someone/captioner"]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload what looks like a credential: Hugging Face token in notes.txt (remove it" in err
    assert "checkpoint-2" not in err


def test_push_offline_fails_with_one_clear_line(tmp_path) -> None:
    folder = model_folder(tmp_path / "model")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_rl_trl.cli",
            "push",
            "--model",
            str(folder),
            "--repo-id",
            "someone/captioner",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and lines[0].startswith("clip-rl-trl push: error:")
    )


def test_push_errors_name_the_flag(tmp_path, capsys) -> None:
    assert main(["push", "--model", str(tmp_path / "none"), "--repo-id", "a/b"]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", "--model", str(tmp_path / "empty"), "--repo-id", "a/b"]) == 2
    assert "no saved model" in capsys.readouterr().err
    folder = model_folder(tmp_path / "model")
    assert main(["push", "--model", str(folder), "--repo-id", "not a repo//id"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    (folder / "README.md").unlink()
    assert main(["push", "--model", str(folder), "--repo-id", "a/b"]) == 2
    assert "no README.md model card" in capsys.readouterr().err
