"""The shapes world: determinism, dataset columns; its language: grammar, faithfulness, tokenizer; its tiny CLIP."""


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clip_rl_trl import ClipScorer
from clip_rl_trl.data import ShapesLanguage, ShapesWorld, train_shapes_clip
from clip_rl_trl.data.shapes import judge
from clip_rl_trl.data.shapes.world import BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SIZES
from clip_rl_trl.evaluation import evaluate_shapes_clip

TWO = {
    "objects": [
        {"size": "large", "colour": "red", "shape": "circle", "position": "left"},
        {"size": "small", "colour": "blue", "shape": "square", "position": "right"},
    ],
    "background": "gray",
}
ONE = {
    "objects": [{"size": "large", "colour": "red", "shape": "circle", "position": "center"}],
    "background": "white",
}

TINY = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def ds():
    return ShapesWorld(0).to_dataset(200, "train")


def test_same_seed_same_data_and_prefix(ds) -> None:
    again = ShapesWorld(0).to_dataset(30, "train")
    for a, b in zip(ds.select(range(30)), again, strict=True):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert (a["image_id"], a["captions"], a["full_caption"], a["scene"]) == (
            b["image_id"],
            b["captions"],
            b["full_caption"],
            b["scene"],
        )


def test_other_seed_or_split_gives_other_images(ds) -> None:
    first = [np.asarray(img) for img in ds[:20]["image"]]
    for other in (ShapesWorld(1).to_dataset(20, "train"), ShapesWorld(0).to_dataset(20, "test")):
        assert not any(np.array_equal(a, np.asarray(b)) for a, b in zip(first, other["image"], strict=True))
    assert ShapesWorld(0).to_dataset(3, "test")["image_id"] == ["test-000000", "test-000001", "test-000002"]


def test_columns_and_types(ds) -> None:
    assert ds.column_names == ["image", "image_id", "captions", "full_caption", "scene"]
    row = ds[17]
    assert (
        isinstance(row["image"], Image.Image) and row["image"].size == (32, 32) and row["image"].mode == "RGB"
    )
    assert row["image_id"] == "train-000017"
    assert len(row["captions"]) == 5 and all(isinstance(c, str) for c in row["captions"])
    assert row["full_caption"] == ShapesWorld.describe(row["scene"])
    scene = row["scene"]
    assert set(scene) == {"objects", "background"} and scene["background"] in BACKGROUNDS
    assert 1 <= len(scene["objects"]) <= 2
    for obj in scene["objects"]:
        assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES
        assert obj["position"] in POSITION_PHRASES
    assert ShapesWorld(0).scenes(200) == ds["scene"]
    assert len(ShapesWorld(0).to_dataset(0)) == 0


def test_background_pixel_is_the_scene_background(ds) -> None:
    for row in ds.select(range(20)):
        corner = np.asarray(row["image"])[0, 0]  # no object reaches the corner pixel
        assert tuple(corner) == BACKGROUNDS[row["scene"]["background"]]


def test_full_caption_example() -> None:
    assert ShapesWorld.describe(TWO) == (
        "a large red circle on the left and a small blue square on the right on a gray background"
    )
    assert ShapesWorld.describe(TWO, ("colour", "shape"), [1], background=False) == "a blue square"
    with pytest.raises(ValueError, match="shape"):
        ShapesWorld.describe(TWO, ("colour",))
    with pytest.raises(ValueError, match="background"):
        ShapesWorld.describe({"objects": TWO["objects"], "background": "grey"})


def test_every_caption_parses_and_is_faithful(ds) -> None:
    language = ShapesLanguage()
    n_full = n_one_object = 0
    for row in ds:
        scene = row["scene"]
        assert language.attribute_precision(row["full_caption"], scene) == 1.0
        assert language.attribute_recall(row["full_caption"], scene) == 1.0
        for caption in row["captions"]:
            parsed = language.parse(caption)
            assert parsed is not None, caption
            assert language.attribute_precision(caption, scene) == 1.0
            n_full += caption == row["full_caption"]
            n_one_object += len(parsed["objects"]) == 1 and len(scene["objects"]) == 2
    n = 5 * len(ds)
    assert 0.05 < n_full / n < 0.15  # about one annotator in ten is thorough
    assert n_one_object / n > 0.4  # most two-object captions name only the salient object


def test_salient_object_is_named_most() -> None:
    world = ShapesWorld(3)
    hits = total = 0
    for row in world.to_dataset(100):
        objects = row["scene"]["objects"]
        if len(objects) == 2 and objects[0]["size"] != objects[1]["size"]:
            salient = objects[world.salient_object(row["scene"])]
            assert salient["size"] == "large"
            for caption in row["captions"]:
                mentioned = ShapesLanguage.parse(caption)["objects"]
                hits += len(mentioned) == 1 and mentioned[0]["shape"] == salient["shape"]
                total += 1
    assert hits / total > 0.6


def test_parse_structure() -> None:
    assert ShapesLanguage.parse("a circle") == {"objects": [{"shape": "circle"}]}
    assert ShapesLanguage.parse("a small cross at the top and a diamond on a black background") == {
        "objects": [{"size": "small", "shape": "cross", "position": "top"}, {"shape": "diamond"}],
        "background": "black",
    }
    assert ShapesLanguage.parse(ShapesWorld.describe(TWO)) == {
        "objects": TWO["objects"],
        "background": "gray",
    }
    assert ShapesLanguage.parse("  a pink   triangle in the center ") == {
        "objects": [{"colour": "pink", "shape": "triangle", "position": "center"}]
    }


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red red circle",
        "a circle a circle",
        "a circle and",
        "and a circle",
        "a circle and and a square",
        "a red large circle",  # wrong order
        "a red",  # no noun
        "red circle",
        "a circle on the left on the left",
        "a circle on a gray background on a gray background",
        "a circle on a gray background and a square",
        "a circle and a square and a cross",
        "a circle.",
        "A circle",
        "a grey circle",
        "a circle on a red background",
        "a circle on the middle",
        "a circle on a gray",
        "a green green circle a green circle a green circle",
    ],
)
def test_parse_rejects(caption: str) -> None:
    assert ShapesLanguage.parse(caption) is None
    assert ShapesLanguage.attribute_precision(caption, TWO) == 0.0
    assert ShapesLanguage.attribute_recall(caption, TWO) == 0.0


@pytest.mark.parametrize(
    ("caption", "scene", "precision", "recall"),
    [
        ("a red circle", TWO, 2 / 2, 2 / 9),
        ("a blue circle", TWO, 1 / 2, 1 / 9),  # either object matches one attribute of two
        ("a large red circle on the right on a black background", TWO, 3 / 5, 3 / 9),
        ("a small blue square and a red circle on the left", TWO, 6 / 6, 6 / 9),  # order is free
        (
            "a large red circle on the left and a small blue square on the right on a gray background",
            TWO,
            1,
            1,
        ),
        ("a red circle and a red circle", ONE, 2 / 4, 2 / 5),  # no second object to match
        ("a large circle in the center on a white background", ONE, 4 / 4, 4 / 5),
        ("a small green cross on the left on a black background", ONE, 0 / 6, 0 / 5),
    ],
)
def test_precision_recall_by_hand(caption: str, scene: dict, precision: float, recall: float) -> None:
    assert ShapesLanguage.attribute_precision(caption, scene) == pytest.approx(precision)
    assert ShapesLanguage.attribute_recall(caption, scene) == pytest.approx(recall)


def test_word_tokenizer_round_trip(ds) -> None:
    tok = ShapesLanguage.word_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(ShapesLanguage.vocabulary())
    captions = [c for caps in ds["captions"] for c in caps] + list(ds["full_caption"])
    for caption in captions:
        ids = tok(caption)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == len(caption.split())
        assert tok.decode(ids) == caption
    ids = [tok.bos_token_id, *tok("a red circle")["input_ids"], tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tok("a purple blob")["input_ids"][-1] == tok.unk_token_id


def test_train_shapes_clip_caches_and_reuses(tmp_path, monkeypatch) -> None:
    world = ShapesWorld(0)
    settings = dict(n_scenes=64, epochs=1, batch_size=32, cache_dir=tmp_path, progress=False, **TINY)
    first = train_shapes_clip(world, **settings)
    assert isinstance(first, ClipScorer) and first.context_length == 24 and first.embed_dim == 16
    (folder,) = (tmp_path / "shapes_clip").iterdir()
    saved = load_file(folder / "model.safetensors")

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the weights were cached")

    monkeypatch.setattr(judge, "_fit_clip", no_training)
    second = train_shapes_clip(world, **settings)
    for name, value in second.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
        torch.testing.assert_close(value, first.model.state_dict()[name], rtol=0, atol=0)
    texts = ["a red circle", world.describe(TWO)]
    torch.testing.assert_close(first.encode_texts(texts), second.encode_texts(texts))
    with pytest.raises(AssertionError, match="retrained"):
        train_shapes_clip(world, **{**settings, "force": True})
    with pytest.raises(AssertionError, match="retrained"):  # another config is another cache entry
        train_shapes_clip(world, **{**settings, "epochs": 2})


def test_train_shapes_clip_scorer_matches_training_preprocessing(tmp_path) -> None:
    scorer = train_shapes_clip(
        ShapesWorld(0), n_scenes=32, epochs=1, batch_size=32, cache_dir=tmp_path, progress=False, **TINY
    )
    image = ShapesWorld(0).to_dataset(1)[0]["image"]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    torch.testing.assert_close(scorer.preprocess(image), (pixels - mean) / std)


def test_train_shapes_clip_rejects_bad_config(tmp_path) -> None:
    world = ShapesWorld(0)
    with pytest.raises(ValueError, match="'depth'"):
        train_shapes_clip(world, cache_dir=tmp_path, depth=3)
    with pytest.raises(ValueError, match="colour_cfg"):
        train_shapes_clip(world, cache_dir=tmp_path, vision_cfg={"colour_cfg": 1})
    with pytest.raises(ValueError, match="context_length"):
        train_shapes_clip(
            world,
            n_scenes=8,
            epochs=1,
            cache_dir=tmp_path,
            progress=False,
            **{**TINY, "text_cfg": {**TINY["text_cfg"], "context_length": 12}},
        )
    with pytest.raises(ValueError, match="epochs"):
        train_shapes_clip(world, epochs=0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="seed"):
        ShapesWorld("0")


@pytest.mark.slow
def test_default_clip_retrieves_full_captions() -> None:
    """The issue's promise: P@1 among 100 >= 0.90 for full captions on scenes of another seed."""
    scorer = train_shapes_clip(ShapesWorld(0))  # cached under $CLIP_RL_TRL_CACHE, so CI may reuse it
    p1 = evaluate_shapes_clip(ShapesWorld(1), scorer, n=1000)
    assert p1["full"] >= 0.90
    assert p1["human"] < p1["full"] - 0.4
    assert p1["shape"] < p1["colour shape"] < p1["size colour shape on a background"] < p1["full"]


def test_cache_key_of_the_default_judges_is_pinned(tmp_path) -> None:
    """The folder names of judges already trained and of results recorded with them: they must never move."""
    default = {"n_scenes": 8000, "epochs": 20, "batch_size": 256, "lr": 2e-3, "partial_weight": 0.5, "seed": 0}
    world = ShapesWorld(0)
    negclip = judge._cache_settings(world, judge.DEFAULT_CLIP_CONFIG, {**default, "hard_negatives": True})
    plain = judge._cache_settings(world, judge.DEFAULT_CLIP_CONFIG, default)
    assert judge._cache_folder(negclip, tmp_path) == tmp_path / "shapes_clip" / "ac2884f99925c71a"
    assert judge._cache_folder(plain, tmp_path) == tmp_path / "shapes_clip" / "e1cde7b18b411005"


def test_example_is_the_dataset_row(ds) -> None:
    for i in (0, 17):
        scene, image, captions = ShapesWorld(0).example(i, "train")
        row = ds[i]
        assert (scene, captions) == (row["scene"], row["captions"])
        assert np.array_equal(np.asarray(image), np.asarray(row["image"]))
    with pytest.raises(ValueError, match="split"):
        ShapesWorld(0).example(0, "")


def test_evaluate_shapes_clip_levels(scorer) -> None:
    result = evaluate_shapes_clip(ShapesWorld(1), scorer, n=100)
    assert list(result) == ["full", "human", "size colour shape on a background", "colour shape", "shape"]
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result == evaluate_shapes_clip(ShapesWorld(1), scorer, n=100)


def test_shapes_package_imports_no_evaluation_or_demo() -> None:
    """data/ sits below the evaluation suite and the demo: importing it must not pull them in."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "clip_rl_trl"
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('clip_rl_trl'); pkg.__path__ = [{str(root)!r}]\n"
        "sys.modules['clip_rl_trl'] = pkg  # skip the top-level __init__, which imports everything\n"
        "import clip_rl_trl.data.shapes\n"
        "print(sorted(m for m in sys.modules if m.startswith('clip_rl_trl.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "clip_rl_trl.data.shapes.judge" in out
    for forbidden in ("clip_rl_trl.evaluation", "clip_rl_trl.demo", "clip_rl_trl.recipe", "clip_rl_trl.trainer"):
        assert forbidden not in out


def test_hard_negative_changes_one_binding() -> None:
    """A swap keeps the caption's words (a bag-of-words judge cannot tell it apart); a replacement changes one."""
    import random

    rng = random.Random(0)
    kinds = set()
    for scene in ShapesWorld(0).scenes(200, "train"):
        negative = ShapesWorld.hard_negative(scene, rng)
        assert negative != scene and negative["background"] == scene["background"]
        before, after = ShapesWorld.describe(scene), ShapesWorld.describe(negative)
        assert before != after and ShapesLanguage.parse(after) is not None
        changed = [(a, b) for a, b in zip(scene["objects"], negative["objects"], strict=True) if a != b]
        assert all(a["position"] == b["position"] for a, b in changed)
        if sorted(before.split()) == sorted(after.split()):
            kinds.add("swap")
            assert len(changed) == 2
        else:
            kinds.add("replace")
            assert len(changed) == 1 and sum(a[k] != b[k] for a, b in changed for k in a) == 1
    assert kinds == {"swap", "replace"}


def test_train_shapes_clip_with_hard_negatives_is_another_judge(tmp_path) -> None:
    world = ShapesWorld(0)
    settings = dict(n_scenes=64, epochs=1, batch_size=32, cache_dir=tmp_path, progress=False, **TINY)
    plain = train_shapes_clip(world, **settings, hard_negatives=False)
    negclip = train_shapes_clip(world, **settings)  # the default judge
    assert len(list((tmp_path / "shapes_clip").iterdir())) == 2  # its own cache entry
    texts = ["a red circle", world.describe(TWO)]
    assert not torch.allclose(plain.encode_texts(texts), negclip.encode_texts(texts))
