"""Karpathy-split loader and Hub caption loader: columns, the restval rule, limits, decoding, every error."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import pytest
import torch
from PIL import Image

from clip_rl_trl.data import load_hub_captions, load_karpathy
from clip_rl_trl.embeddings import ImageEmbeddingCache

# (split, cocoid, folder): two train, two restval, one val, one test, as in dataset_coco.json.
COCO_ENTRIES = [
    ("train", 9, "train2014"),
    ("restval", 25, "val2014"),
    ("train", 30, "train2014"),
    ("val", 42, "val2014"),
    ("restval", 57, "val2014"),
    ("test", 73, "val2014"),
]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (90, 90, 90)]


def _captions(cocoid: int) -> list[str]:
    return [f"  caption {k} of image {cocoid}\n" for k in range(5)]


def _coco_json(tmp_path, entries=COCO_ENTRIES, write_images=True):
    images = []
    for imgid, (split, cocoid, folder) in enumerate(entries):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "imgid": imgid,
                "cocoid": cocoid,
                "split": split,
                "sentids": list(range(5 * imgid, 5 * imgid + 5)),
                "sentences": [
                    {"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": 5 * imgid + k}
                    for k, raw in enumerate(_captions(cocoid))
                ],
            }
        )
        if write_images:
            (tmp_path / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), COLOURS[imgid]).save(tmp_path / "images" / folder / filename, "PNG")
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, tmp_path / "images"


@pytest.fixture
def coco(tmp_path):
    return _coco_json(tmp_path)


def test_train_columns_and_restval_default(coco):
    json_path, root = coco
    ds = load_karpathy(json_path, root)
    assert ds.column_names == ["image", "image_id", "captions", "file_name"]
    # Karpathy convention: train includes restval, in file order.
    assert ds["image_id"] == [9, 25, 30, 57]
    assert ds.features["image_id"] == datasets.Value("int64")
    assert ds.features["image"] == datasets.Value("string")
    row = ds[1]
    assert row["file_name"] == os.path.join("val2014", "COCO_val2014_000000000025.jpg")
    assert row["image"] == os.path.join(root, row["file_name"])
    assert os.path.isfile(row["image"])
    assert row["captions"] == [f"caption {k} of image 25" for k in range(5)]  # stripped


def test_relative_image_root_gives_absolute_paths(coco, monkeypatch):
    json_path, root = coco
    monkeypatch.chdir(root.parent)
    ds = load_karpathy(json_path, "images", "val")
    assert ds["image"] == [str(root / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert ds["file_name"] == [os.path.join("val2014", "COCO_val2014_000000000042.jpg")]


def test_restval_switch_and_other_splits(coco):
    json_path, root = coco
    assert load_karpathy(json_path, root, "train", include_restval=False)["image_id"] == [9, 30]
    assert load_karpathy(json_path, root, "train", include_restval=True)["image_id"] == [9, 25, 30, 57]
    assert load_karpathy(json_path, root, "restval")["image_id"] == [25, 57]
    assert load_karpathy(json_path, root, "val")["image_id"] == [42]
    test = load_karpathy(json_path, root, "test")
    assert test["image_id"] == [73]
    assert test[0]["captions"] == [f"caption {k} of image 73" for k in range(5)]
    with pytest.raises(ValueError, match=r"include_restval=True only applies to split='train'"):
        load_karpathy(json_path, root, "val", include_restval=True)


def test_max_images(coco):
    json_path, root = coco
    assert load_karpathy(json_path, root, max_images=3)["image_id"] == [9, 25, 30]
    assert load_karpathy(json_path, root, "val", max_images=10)["image_id"] == [42]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_images must be a positive int"):
            load_karpathy(json_path, root, max_images=bad)


def test_max_images_checks_only_the_kept_images(coco):
    json_path, root = coco
    (root / "val2014" / "COCO_val2014_000000000057.jpg").unlink()  # the 4th train image
    assert len(load_karpathy(json_path, root, max_images=3)) == 3
    with pytest.raises(FileNotFoundError):
        load_karpathy(json_path, root)


def test_decode_images(coco):
    json_path, root = coco
    ds = load_karpathy(json_path, root, "train", decode_images=True)
    assert isinstance(ds.features["image"], datasets.Image)
    image = ds[2]["image"]
    assert isinstance(image, Image.Image)
    assert image.size == (32, 32) and image.convert("RGB").getpixel((0, 0)) == COLOURS[2]
    assert ds[2]["file_name"] == os.path.join("train2014", "COCO_train2014_000000000030.jpg")


def test_flickr_uses_imgid_and_flat_folder(tmp_path):
    images = []
    for imgid, split in enumerate(["train", "train", "val", "test"]):
        filename = f"{1000 + imgid}.jpg"
        Image.new("RGB", (32, 32), COLOURS[imgid]).save(tmp_path / filename, "PNG")
        sentences = [{"raw": f"a photo number {imgid}, take {k}", "imgid": imgid} for k in range(5)]
        images.append({"filename": filename, "imgid": imgid, "split": split, "sentences": sentences})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    train = load_karpathy(path, tmp_path)  # no restval in Flickr: the default changes nothing
    assert train["image_id"] == [0, 1]
    assert train["file_name"] == ["1000.jpg", "1001.jpg"]
    assert train["image"] == [os.path.join(tmp_path, "1000.jpg"), os.path.join(tmp_path, "1001.jpg")]
    assert load_karpathy(path, tmp_path, "test")[0]["captions"][4] == "a photo number 3, take 4"
    with pytest.raises(
        ValueError, match=r"has no images in split 'restval'; its splits are \['test', 'train', 'val'\]"
    ):
        load_karpathy(path, tmp_path, "restval")


def test_file_errors(tmp_path, coco):
    json_path, root = coco
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(tmp_path / "nope.json", root)
    bad = tmp_path / "annotations.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="has no 'images' list"):
        load_karpathy(bad, root)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_karpathy(bad, root)
    with pytest.raises(
        ValueError,
        match=r"unknown split 'validation'; the Karpathy splits are \['train', 'restval', 'val', 'test'\]",
    ):
        load_karpathy(json_path, root, "validation")


def test_missing_images(tmp_path):
    json_path, root = _coco_json(tmp_path)
    (root / "train2014" / "COCO_train2014_000000000030.jpg").unlink()
    (root / "val2014" / "COCO_val2014_000000000057.jpg").unlink()
    first = os.path.join(root, "train2014", "COCO_train2014_000000000030.jpg")
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 images of split 'train' are missing") as err:
        load_karpathy(json_path, root)
    assert repr(first) in str(err.value)
    assert len(load_karpathy(json_path, root, check_images=False)) == 4
    assert len(load_karpathy(json_path, root, "val")) == 1  # val's image is present


def _edit_first_train_entry(json_path, edit):
    data = json.loads(json_path.read_text())
    edit(data["images"][0])
    json_path.write_text(json.dumps(data))


def test_caption_errors(coco):
    json_path, root = coco
    _edit_first_train_entry(json_path, lambda e: e.update(sentences=[]))
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000009.jpg' \(cocoid 9\) has no captions"):
        load_karpathy(json_path, root)
    load_karpathy(json_path, root, "val")  # other splits are not affected

    def blank_third(entry):
        entry["sentences"] = [{"raw": "a dog"}, {"raw": "a cat"}, {"raw": "  \n"}]

    _edit_first_train_entry(json_path, blank_third)
    with pytest.raises(ValueError, match=r"\(cocoid 9\): caption sentences\[2\] is empty"):
        load_karpathy(json_path, root)
    _edit_first_train_entry(json_path, lambda e: e.update(sentences=[{"tokens": ["a", "dog"]}]))
    with pytest.raises(ValueError, match=r"sentences\[0\] has no 'raw' string"):
        load_karpathy(json_path, root)
    _edit_first_train_entry(json_path, lambda e: e.pop("filename"))
    with pytest.raises(ValueError, match="has no 'filename' field"):
        load_karpathy(json_path, root)


def test_plugs_into_image_embedding_cache(coco, scorer):
    json_path, root = coco
    ds = load_karpathy(json_path, root)
    cache = ImageEmbeddingCache.build(ds, scorer, progress=False)
    assert cache.id_type is int and len(cache) == 4
    expected = scorer.encode_images([Image.new("RGB", (32, 32), COLOURS[i]) for i in (0, 1, 2, 4)])
    torch.testing.assert_close(cache[[9, 25, 30, 57]], expected)
    decoded = ImageEmbeddingCache.build(
        load_karpathy(json_path, root, decode_images=True), scorer, progress=False
    )
    torch.testing.assert_close(decoded[[9, 25, 30, 57]], expected)


# ---------------------------------------------------------------------------------------------- Hub loader


def _pil(i: int) -> Image.Image:
    return Image.new("RGB", (32, 32), COLOURS[i])


def test_hub_captions_from_save_to_disk(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "img": [_pil(0), _pil(1)],
            "caption": [["a red square", "red"], ["a green square"]],
            "img_id": ["a", "b"],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "caption": datasets.List(datasets.Value("string")),
                "img_id": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(tmp_path / "dict")
    ds.save_to_disk(tmp_path / "single")
    for path in (tmp_path / "dict", tmp_path / "single"):
        out = load_hub_captions(
            path, "test", image_column="img", captions_column="caption", id_column="img_id"
        )
        assert sorted(out.column_names) == ["captions", "image", "image_id"]
        assert out["image_id"] == ["a", "b"]
        assert out[0]["captions"] == ["a red square", "red"]
        assert isinstance(out[1]["image"], Image.Image)
    with pytest.raises(ValueError, match=r"has no split 'train'; its splits are \['test'\]"):
        load_hub_captions(tmp_path / "dict", "train", image_column="img", captions_column="caption")


def test_hub_captions_from_local_files(tmp_path, scorer):
    for i in range(3):
        _pil(i).save(tmp_path / f"{i}.png")
    rows = [
        {"file": str(tmp_path / f"{i}.png"), "sentence": f"caption {i}", "source": "web", "id": 10 + i}
        for i in range(3)
    ]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = load_hub_captions(
        jsonl, "validation", image_column="file", captions_column="sentence", id_column="id"
    )
    assert out["captions"] == [["caption 0"], ["caption 1"], ["caption 2"]]  # one string per row is wrapped
    assert out["image_id"] == [10, 11, 12] and out["source"] == ["web"] * 3  # other columns kept
    cache = ImageEmbeddingCache.build(out, scorer, progress=False)
    torch.testing.assert_close(cache[[11]], scorer.encode_images([_pil(1)]))

    parquet = tmp_path / "captions.parquet"
    datasets.Dataset.from_list(rows).map(lambda r: {"refs": [r["sentence"], "x"]}).to_parquet(parquet)
    sliced = load_hub_captions(
        parquet, "train[:2]", image_column="file", captions_column="refs", id_column=None
    )
    assert sliced["image_id"] == [0, 1]
    assert sliced["captions"] == [["caption 0", "x"], ["caption 1", "x"]]


def test_hub_captions_errors(tmp_path):
    path = tmp_path / "c.jsonl"

    def write(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(
        [
            {"image": "a.png", "captions": ["x"], "image_id": 1},
            {"image": "b.png", "captions": ["y"], "image_id": 1},
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"no column 'caption' \(captions_column\); its columns are \['image', 'captions', 'image_id'\]",
    ):
        load_hub_captions(path, "train", captions_column="caption")
    with pytest.raises(ValueError, match=r"repeats the id 1 \(row 1\)"):
        load_hub_captions(path, "train")
    with pytest.raises(ValueError, match="already has an 'image_id' column"):
        load_hub_captions(path, "train", id_column=None)
    with pytest.raises(ValueError, match="must name different columns"):
        load_hub_captions(path, "train", captions_column="image")

    write([{"img": "a.png", "image": "b.png", "captions": ["x"], "image_id": 1}])
    with pytest.raises(ValueError, match="cannot rename column 'img' to 'image': the dataset already has"):
        load_hub_captions(path, "train", image_column="img")

    write([{"image": "a.png", "captions": ["x", " "], "image_id": 1}])
    with pytest.raises(ValueError, match=r"row 0 of .*: caption 1 of 'captions' is empty"):
        load_hub_captions(path, "train")
    write(
        [
            {"image": "a.png", "captions": [], "image_id": 1},
            {"image": "b.png", "captions": ["y"], "image_id": 2},
        ]
    )
    with pytest.raises(ValueError, match="row 0 of .* has no captions"):
        load_hub_captions(path, "train")
    write([{"image": "a.png", "captions": 3, "image_id": 1}])
    with pytest.raises(ValueError, match="expected a list of strings or a string per row"):
        load_hub_captions(path, "train")
    bad = tmp_path / "c.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="must end in one of"):
        load_hub_captions(bad, "train")
