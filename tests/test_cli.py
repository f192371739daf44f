"""The clip-rl-trl command: embed a dataset, build similar-image groups, clear errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file

from clip_rl_trl import ImageEmbeddingCache, similar_image_groups
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
    assert main(["embed", "--dataset", str(dataset_dir), "--clip", "RN50", "--output", str(cache_path),
                 "--dtype", "float32", "--batch-size", "2"]) == 0
    assert "wrote 5 embeddings" in capsys.readouterr().out
    cache = ImageEmbeddingCache.load(cache_path)
    assert cache.ids == [10, 11, 12, 13, 14] and cache.dim == 1024
    torch.testing.assert_close(cache.embeddings.float().norm(dim=-1), torch.ones(5))

    groups_path = tmp_path / "groups.safetensors"
    assert main(["neighbors", "--cache", str(cache_path), "-k", "2", "--output", str(groups_path)]) == 0
    groups = load_file(groups_path)["groups"]
    torch.testing.assert_close(groups, similar_image_groups(cache.embeddings.float(), k=2))


def test_errors_name_the_bad_flag(dataset_dir, tmp_path, capsys) -> None:
    assert main(["neighbors", "--cache", str(tmp_path / "nope.safetensors"), "--output", "x"]) == 2
    assert "--cache" in capsys.readouterr().err
    assert main(["embed", "--dataset", str(dataset_dir), "--output", "x"]) == 2
    assert "--clip is required" in capsys.readouterr().err
    assert main(["embed", "--dataset", str(dataset_dir), "--clip", "RN50", "--id-column", "nope",
                 "--output", str(tmp_path / "c.safetensors")]) == 2
    assert "'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--dataset", str(dataset_dir), "--dtype", "int8", "--output", "x"])


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "clip_rl_trl.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "embed" in out.stdout and "neighbors" in out.stdout
