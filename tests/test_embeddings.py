"""ImageEmbeddingCache: building with a tiny CLIP, look-ups, id types, safetensors round trips, corrupt files."""

import io
import json
import os
import struct

import datasets
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import make_tiny_scorer
from PIL import Image

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.embeddings import ImageEmbeddingCache, UnreadableImagesError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (10, 10, 10)]


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return make_tiny_scorer(batch_size=2)  # small batches, so building a cache crosses batch boundaries


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), c) for c in COLOURS]


def _spy(scorer: ClipScorer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every encode_images call."""
    sizes: list[int] = []
    encode = scorer.encode_images

    def spy(imgs, batch_size=None):
        sizes.append(len(imgs))
        return encode(imgs, batch_size)

    monkeypatch.setattr(scorer, "encode_images", spy)
    return sizes


def _cache(ids, n=None, d=4, dtype=torch.float32, seed=0) -> ImageEmbeddingCache:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(len(ids) if n is None else n, d, generator=g), dim=1).to(dtype)
    return ImageEmbeddingCache(ids, emb)


# -- build ---------------------------------------------------------------------------------------------------


def test_build_from_datasets_dataset_matches_scorer(scorer, images, monkeypatch) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": images, "image_id": [42, 7, 1000, 3, 99], "caption": list("abcde")}
    )
    ds = ds.cast_column("image", datasets.Image())
    sizes = _spy(scorer, monkeypatch)
    cache = ImageEmbeddingCache.build(ds, scorer, progress=False)
    assert sizes == [2, 2, 1]  # batched by the scorer's batch_size
    assert len(cache) == 5 and cache.dim == 64 and cache.id_type is int and cache.ids == [42, 7, 1000, 3, 99]
    expected = scorer.encode_images(images)
    torch.testing.assert_close(cache.embeddings, expected)
    torch.testing.assert_close(cache[[1000, 42]], expected[[2, 0]])
    torch.testing.assert_close(cache[7], expected[1])


def test_build_from_rows_with_paths_and_str_ids(scorer, images, tmp_path) -> None:
    rows = []
    for i, img in enumerate(images[:3]):
        path = tmp_path / f"{i}.png"
        img.save(path)
        rows.append({"file": str(path), "id": f"img-{i}"})
    cache = ImageEmbeddingCache.build(rows, scorer, image_column="file", id_column="id", dtype=torch.float16)
    assert cache.ids == ["img-0", "img-1", "img-2"] and cache.dtype == torch.float16
    torch.testing.assert_close(cache[["img-2", "img-0"]], scorer.encode_images(images[:3])[[2, 0]].half())


def test_build_from_mapping_of_columns(scorer, images) -> None:
    cache = ImageEmbeddingCache.build({"image": images[:2], "image_id": [5, 6]}, scorer, progress=False)
    torch.testing.assert_close(cache[[6]], scorer.encode_images(images[1:2]))


def test_build_missing_column_names_it_and_the_present_ones(scorer, images) -> None:
    ds = datasets.Dataset.from_dict({"img": [0, 1], "image_id": [1, 2]})
    with pytest.raises(ValueError, match=r"no column 'image'; its columns are \['img', 'image_id'\]"):
        ImageEmbeddingCache.build(ds, scorer)
    with pytest.raises(ValueError, match=r"no column 'id'; its columns are \['image', 'image_id'\]"):
        ImageEmbeddingCache.build([{"image": images[0], "image_id": 1}], scorer, id_column="id")


def test_build_duplicate_or_mixed_ids_fail_before_any_image_is_embedded(scorer, images, monkeypatch) -> None:
    sizes = _spy(scorer, monkeypatch)
    with pytest.raises(ValueError, match="duplicate image id 7"):
        ImageEmbeddingCache.build({"image": images[:3], "image_id": [7, 8, 7]}, scorer)
    with pytest.raises(
        ValueError, match=r"ids must be all int or all str; ids\[0\] is int 1 but ids\[1\] is str '2'"
    ):
        ImageEmbeddingCache.build({"image": images[:2], "image_id": [1, "2"]}, scorer)
    assert sizes == []


def test_build_bad_image_names_the_row(scorer, images) -> None:
    with pytest.raises(ValueError, match=r"row 3 \(image id 'd', column 'image'\): got NoneType, not a PIL"):
        ImageEmbeddingCache.build({"image": [images[0]] * 3 + [None], "image_id": list("abcd")}, scorer)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_rows(images, tmp_path) -> list[dict]:
    """Rows 1, 2 and 4 of 6 are unreadable: a garbage file, a missing file, a truncated PNG opened lazily."""
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "cut.png").write_bytes(_png(COLOURS[4])[:60])
    images[1].save(tmp_path / "good.png")
    values = [images[0], str(tmp_path / "garbage.png"), tmp_path / "missing.png", str(tmp_path / "good.png"),
              Image.open(tmp_path / "cut.png"), images[3]]
    return [{"image": v, "image_id": f"id{i}"} for i, v in enumerate(values)]


def test_build_lists_every_unreadable_image_not_only_the_first(scorer, bad_rows, tmp_path, monkeypatch):
    sizes = _spy(scorer, monkeypatch)
    with pytest.raises(UnreadableImagesError) as caught:
        ImageEmbeddingCache.build(bad_rows, scorer, progress=False)
    err = caught.value
    assert isinstance(err, ValueError) and "\n" not in str(err)
    assert str(err).startswith("3 of the 6 images cannot be read (skip_bad_images=True caches the others): ")
    assert [(b.row, b.image_id, b.column) for b in err.bad_images] == [
        (1, "id1", "image"), (2, "id2", "image"), (4, "id4", "image")
    ]
    assert [b.path for b in err.bad_images] == [
        str(tmp_path / "garbage.png"), str(tmp_path / "missing.png"), str(tmp_path / "cut.png")
    ]
    assert (
        f"row 1 (image id 'id1', column 'image'): cannot read image '{tmp_path}/garbage.png': not an image "
        "format PIL can identify; row 2 (image id 'id2', column 'image'): cannot read image "
        f"'{tmp_path}/missing.png': no such file; row 4 (image id 'id4', column 'image'): cannot decode "
        "image: image file is truncated"
    ) in str(err)
    assert sizes == []  # the first batch already holds a bad image: nothing is embedded once the build fails


def test_build_skip_bad_images_caches_the_others_and_lists_them(scorer, images, bad_rows) -> None:
    cache = ImageEmbeddingCache.build(bad_rows, scorer, progress=False, skip_bad_images=True)
    assert cache.ids == ["id0", "id3", "id5"]
    torch.testing.assert_close(cache.embeddings, scorer.encode_images([images[0], images[1], images[3]]))
    assert [(b.row, b.image_id) for b in cache.bad_images] == [(1, "id1"), (2, "id2"), (4, "id4")]
    assert cache.bad_images[1].error.endswith("missing.png': no such file")
    assert "id1" not in cache and cache["id5"].shape == (64,)
    assert ImageEmbeddingCache.build(bad_rows[:1], scorer, skip_bad_images=True).bad_images == ()
    with pytest.raises(UnreadableImagesError, match=r"^2 of the 2 images cannot be read \(no image is left"):
        ImageEmbeddingCache.build(bad_rows[1:3], scorer, progress=False, skip_bad_images=True)


def test_build_corrupt_image_bytes_in_a_saved_dataset_name_row_id_and_column(scorer, tmp_path) -> None:
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64")})
    values = [{"bytes": _png(c), "path": None} for c in COLOURS[:3]]
    values[1] = {"bytes": b"garbage", "path": None}
    datasets.Dataset.from_dict({"image": values, "image_id": [5, 6, 7]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    with pytest.raises(
        ValueError,
        match=r"^1 of the 3 images cannot be read \(skip_bad_images=True caches the others\): row 1 \(image "
        r"id 6, column 'image'\): cannot read the 7 image bytes: not an image format PIL can identify$",
    ):
        ImageEmbeddingCache.build(ds, scorer, progress=False)
    cache = ImageEmbeddingCache.build(ds, scorer, progress=False, skip_bad_images=True)
    assert cache.ids == [5, 7] and cache.bad_images[0].path is None
    expected = scorer.encode_images([Image.new("RGB", (32, 32), c) for c in (COLOURS[0], COLOURS[2])])
    torch.testing.assert_close(cache.embeddings, expected)


def test_build_decodes_image_features_as_datasets_does(scorer) -> None:
    """Read undecoded, an Image() value still gets datasets' decoding (EXIF orientation applied)."""
    img = Image.new("RGB", (32, 16), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 8, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}], "image_id": [1]}, features)
    assert ds[0]["image"].size == (16, 32)
    cache = ImageEmbeddingCache.build(ds, scorer, progress=False)
    torch.testing.assert_close(cache.embeddings, scorer.encode_images([ds[0]["image"]]))


@pytest.mark.parametrize(
    "ids, message",
    [
        ([True, 1], r"^ids\[0\] is bool True: an image id must be an int or a str \(all ids of one "
                    r"type\), not bool$"),
        ([1, 2.0], r"^ids\[1\] is float 2\.0: an image id must be an int or a str .*not float$"),
        (["a", None], r"^ids\[1\] is NoneType None: .*not NoneType$"),
    ],
)
def test_ids_of_other_types_name_the_id_and_the_accepted_types(ids, message) -> None:
    with pytest.raises(ValueError, match=message):
        ImageEmbeddingCache(ids, torch.zeros(len(ids), 4))


# -- look-ups ------------------------------------------------------------------------------------------------


def test_lookup_forms_and_order() -> None:
    cache = _cache([10, 3, 7, -2])
    emb = cache.embeddings
    torch.testing.assert_close(cache[[7, 10, 7]], emb[[2, 0, 2]])
    torch.testing.assert_close(cache[torch.tensor([3, -2])], emb[[1, 3]])
    torch.testing.assert_close(cache[np.array([[3], [7]], dtype=np.int32)], emb[[1, 2]])
    torch.testing.assert_close(cache[(i for i in [7])], emb[[2]])
    assert cache[[]].shape == (0, 4)
    assert cache[np.int64(3)].shape == (4,)
    assert cache.rows([7, 10]).tolist() == [2, 0] and cache.rows(3).item() == 1
    assert list(cache) == [10, 3, 7, -2]


def test_unknown_id_raises_key_error_naming_it() -> None:
    cache = _cache([10, 3, 7])
    with pytest.raises(
        KeyError, match=r"image id 5 is not in the cache \(2 of the 3 ids asked for are missing\)"
    ):
        cache[[3, 5, 6]]
    with pytest.raises(KeyError, match="image id 2.5 \\(float\\) is not in the cache: its ids are int"):
        cache[[2.5]]
    with pytest.raises(KeyError, match=r"image id True \(bool\)"):
        cache[True]
    with pytest.raises(TypeError, match="not slice"):
        cache[0:2]


def test_int_and_str_ids_are_distinct_and_the_error_suggests_the_other_type() -> None:
    ints, strs = _cache([1, 2]), _cache(["1", "x"])
    assert 1 in ints and "1" not in ints and "1" in strs and 1 not in strs and "zz" not in strs
    with pytest.raises(
        KeyError, match=r"image id '1' \(str\) is not in the cache: its ids are int; did you mean 1\?"
    ):
        ints["1"]
    with pytest.raises(KeyError, match=r"image id '9' \(str\) is not in the cache: its ids are int") as err:
        ints[["9"]]
    assert "did you mean" not in str(err.value)
    with pytest.raises(
        KeyError, match=r"image id 1 \(int\) is not in the cache: its ids are str; did you mean '1'\?"
    ):
        strs[[1]]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="3 ids but 2 embedding rows"):
        _cache([1, 2, 3], n=2)
    with pytest.raises(ValueError, match="duplicate image id 'a'"):
        _cache(["a", "b", "a"])
    with pytest.raises(ValueError, match="ids is empty"):
        _cache([], n=0)
    with pytest.raises(ValueError, match="NUL"):
        _cache(["a\x00"])
    with pytest.raises(ValueError, match="does not fit in int64"):
        _cache([2**63])
    with pytest.raises(ValueError, match="floating"):
        ImageEmbeddingCache([1], torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the embedding of image id 'b' \(row 1\) is not finite"):
        ImageEmbeddingCache(["a", "b"], torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))


def test_to_changes_dtype_and_keeps_ids() -> None:
    cache = _cache(["a", "b"])
    half = cache.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.ids == ["a", "b"]
    torch.testing.assert_close(half["b"], cache["b"].half())


# -- save / load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ids", [[100, -5, 2**40, 7], ["b", "ä-ünï", "", "a-longer/id.jpg"]])
def test_round_trip_and_readable_by_safetensors(tmp_path, dtype, ids) -> None:
    cache = _cache(ids, d=6, dtype=dtype)
    path = cache.save(tmp_path / "cache.safetensors")
    for mmap in (True, False):
        loaded = ImageEmbeddingCache.load(path, mmap=mmap)
        assert loaded.ids == ids and loaded.dtype == dtype and loaded.id_type is type(ids[0])
        assert torch.equal(loaded.embeddings, cache.embeddings)
        assert torch.equal(loaded[[ids[2], ids[0]]], cache.embeddings[[2, 0]])
    tensors = safetensors.torch.load_file(path)
    assert torch.equal(tensors["embeddings"], cache.embeddings)
    if isinstance(ids[0], int):
        assert tensors["ids"].tolist() == ids
    else:
        assert [bytes(r).rstrip(b"\0").decode() for r in tensors["ids"].tolist()] == ids


def test_embeddings_start_on_a_page_boundary(tmp_path) -> None:
    path = _cache([1, 2, 3]).save(tmp_path / "c.safetensors")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    assert (8 + length + header["embeddings"]["data_offsets"][0]) % 4096 == 0


def test_load_is_copy_on_write_and_save_over_the_loaded_file_is_safe(tmp_path) -> None:
    path = _cache([1, 2]).save(tmp_path / "c.safetensors")
    loaded = ImageEmbeddingCache.load(path)
    original = loaded[1].clone()
    loaded.embeddings[0] = 0.0  # private pages: the file is untouched
    torch.testing.assert_close(ImageEmbeddingCache.load(path)[1], original)
    loaded.save(path)
    assert ImageEmbeddingCache.load(path)[1].abs().sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc and posix_fadvise")
def test_load_maps_instead_of_reading(tmp_path) -> None:
    # 16 MiB of embeddings: a memory-mapped open + 20 look-ups maps a few pages, a full read maps all of it.
    path = _cache(list(range(8192)), d=512, dtype=torch.float32).save(tmp_path / "c.safetensors")
    # Drop the just-written file from the page cache, as for a cache on disk: the kernel maps whole cached
    # folios on a fault, which would make RssFile reflect the page cache rather than what the cache touches.
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = _rss_file_kb()
    cache = ImageEmbeddingCache.load(path)
    cache[list(range(0, 8192, 410))]
    assert _rss_file_kb() - before < 4 * 1024
    assert cache.embeddings.sum().isfinite()  # reading everything does map the file
    assert _rss_file_kb() - before > 12 * 1024


def _rewrite_header(path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(data[:8] + raw + data[8 + length :])


def test_corrupt_or_foreign_files_raise_naming_the_problem(tmp_path) -> None:
    good = _cache([1, 2, 3]).save(tmp_path / "good.safetensors")
    data = good.read_bytes()

    def write(name, content) -> os.PathLike:
        (tmp_path / name).write_bytes(content)
        return tmp_path / name

    with pytest.raises(ValueError, match="not a safetensors file: it has 3 bytes"):
        ImageEmbeddingCache.load(write("tiny", b"abc"))
    with pytest.raises(ValueError, match="header length"):
        ImageEmbeddingCache.load(write("len", struct.pack("<Q", 10**9) + data[8:]))
    with pytest.raises(ValueError, match="unreadable header"):
        ImageEmbeddingCache.load(write("json", data[:8] + b"x" + data[9:]))
    with pytest.raises(
        ValueError, match=r"corrupt or truncated cache: 'embeddings' F32\[3, 4\] needs 48 bytes"
    ):
        ImageEmbeddingCache.load(write("truncated", data[:-30]))
    safetensors.torch.save_file({"embeddings": torch.ones(2, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="was not written by ImageEmbeddingCache.save"):
        ImageEmbeddingCache.load(tmp_path / "foreign.safetensors")

    cases = {
        "rows": (
            lambda h: h["ids"].update(shape=[2], data_offsets=[0, 16]),
            "needs|2 ids but 3 embedding rows",
        ),
        "dtype": (lambda h: h["embeddings"].update(dtype="I32"), "'embeddings' has dtype 'I32'"),
        "version": (
            lambda h: h["__metadata__"].update(version="9"),
            "unsupported ImageEmbeddingCache format version",
        ),
        "idtype": (lambda h: h["__metadata__"].update(id_type="float"), "id_type is 'float'"),
        "missing": (lambda h: h.pop("ids"), "no 'ids' tensor"),
    }
    for name, (edit, message) in cases.items():
        path = write(name, data)
        _rewrite_header(path, edit)
        with pytest.raises(ValueError, match=message):
            ImageEmbeddingCache.load(path)
    # Duplicate ids written into the data section: caught at load.
    dup = _cache([1, 2, 3]).save(tmp_path / "dup.safetensors")
    raw = bytearray(dup.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    raw[8 + length + 8 : 8 + length + 16] = struct.pack("<q", 1)  # ids[1] := 1
    with pytest.raises(ValueError, match="corrupt cache: duplicate image id 1"):
        ImageEmbeddingCache.load(write("dup.safetensors", bytes(raw)))
