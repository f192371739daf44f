"""Recipes: loading, the toy merge, overrides, validation errors, every reward, a 2-step train end to end."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from conftest import make_tiny_scorer
from datasets import DatasetDict
from transformers import GPT2Config

from clip_rl_trl import ClipCapConfig, ClipCapModel, ImageEmbeddingCache, ShapesWorld, similar_image_groups
from clip_rl_trl.recipe import (
    REWARD_KEYS,
    RecipeError,
    build,
    build_rewards,
    default_output_dir,
    evaluate,
    evaluate_saved,
    load_recipe,
    run,
    validate_recipe,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
TINY_CLIP = "clip-rl-trl-test-tiny"  # an open_clip architecture registered below (random weights, offline)


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def base_recipe(tmp_path: Path) -> dict:
    (tmp_path / "coco.json").write_text("{}")
    (tmp_path / "images").mkdir(exist_ok=True)
    return {
        "data": {
            "source": "karpathy",
            "karpathy_json": str(tmp_path / "coco.json"),
            "image_root": str(tmp_path / "images"),
        },
        "clip": {"model": "ViT-B-32-quickgelu", "pretrained": "openai"},
        "captioner": {"family": "clipcap", "name_or_path": "user/clipcap"},
        "rewards": [{"name": "bidirectional", "weight": 0.94}, {"name": "discriminator", "weight": 0.06}],
        "training": {"baseline": "loo", "learning_rate": 1.0e-6, "max_steps": 100},
        "toy": {
            "data": {"n_train": 200, "n_test": 100},
            "training": {"max_steps": 5, "learning_rate": 5.0e-4},
        },
    }


# ---------------------------------------------------------------------- loading and merging


def test_load_fills_defaults_and_keeps_values(tmp_path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", base_recipe(tmp_path)))
    assert "toy" not in recipe
    assert recipe["data"]["train_split"] == "train" and recipe["data"]["eval_split"] == "val"
    assert recipe["data"]["max_eval_images"] == 5000
    assert recipe["captioner"]["lora"] is False and recipe["captioner"]["name_or_path"] == "user/clipcap"
    assert recipe["clip"]["cache"] is None and recipe["clip"]["dtype"] == "float16"
    assert [r["weight"] for r in recipe["rewards"]] == [0.94, 0.06]
    assert recipe["training"] == {"baseline": "loo", "learning_rate": 1e-6, "max_steps": 100}


def test_toy_merges_over_the_recipe_on_the_shapes_world(tmp_path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", base_recipe(tmp_path)), toy=True)
    assert recipe["data"] == {"source": "shapes", "n_train": 200, "n_test": 100}
    assert "clip" not in recipe and "name_or_path" not in recipe["captioner"]
    # deep merge: the toy's training keys win, the others stay
    assert recipe["training"] == {"baseline": "loo", "learning_rate": 5e-4, "max_steps": 5}
    assert [r["name"] for r in recipe["rewards"]] == ["bidirectional", "discriminator"]


def test_overrides_are_yaml_typed_and_apply_last(tmp_path) -> None:
    path = write(tmp_path / "r.yaml", base_recipe(tmp_path))
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-5",
            "rewards.1.weight=0.5",
            "training.report_to=[none]",
            "captioner.lora=true",
            "toy.training.max_steps=3",
        ],
        toy=True,
    )
    assert recipe["training"]["learning_rate"] == 1e-5  # "1e-5" is a float here, not YAML 1.1's string
    assert recipe["rewards"][1]["weight"] == 0.5
    assert recipe["training"]["report_to"] == ["none"]
    assert recipe["captioner"]["lora"] is True
    assert recipe["training"]["max_steps"] == 3  # toy.* overrides change the toy section before the merge


def test_relative_paths_resolve_from_the_recipe_folder(tmp_path, monkeypatch) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"].update(karpathy_json="coco.json", image_root="images")
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_recipe(write(tmp_path / "r.yaml", recipe))
    assert loaded["data"]["karpathy_json"] == str(tmp_path / "coco.json")


@pytest.mark.parametrize("name", ["bidir_coco", "discritune_coco", "clip_s_coco", "geg_coco", "shapes_demo"])
def test_every_example_recipe_loads(name: str) -> None:
    toy = load_recipe(EXAMPLES / f"{name}.yaml", toy=True)
    assert toy["data"]["source"] == "shapes" and toy["training"]["max_steps"] <= 20
    if name != "shapes_demo":  # the COCO recipes name files this machine does not have
        with pytest.raises(RecipeError, match="data.karpathy_json"):
            load_recipe(EXAMPLES / f"{name}.yaml")


def test_example_recipes_follow_the_papers() -> None:
    def full(name: str) -> dict:
        return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())

    bidir, discritune, clip_s, geg = (
        full(n) for n in ("bidir_coco", "discritune_coco", "clip_s_coco", "geg_coco")
    )
    assert [(r["name"], r["weight"]) for r in bidir["rewards"]] == [
        ("bidirectional", 0.94),
        ("discriminator", 0.06),
    ]
    assert bidir["training"]["gt_loss_weight"] == 1.0
    assert [r["name"] for r in discritune["rewards"]] == ["retrieval"]
    t = discritune["training"]
    assert (t["baseline"], t["train_decoding"], t["num_generations"], t["per_device_train_batch_size"]) == (
        "running_mean",
        "greedy",
        1,
        100,
    )
    assert math.isclose(float(t["learning_rate"]), 1e-7)
    assert [r["name"] for r in clip_s["rewards"]] == ["clip_s"] and clip_s["training"]["baseline"] == "greedy"
    assert [(r["name"], r["weight"]) for r in geg["rewards"]] == [("cider", 0.1), ("group_gap", 10.0)]
    assert geg["rewards"][1]["k"] == 5 and geg["training"]["baseline"] == "greedy"


def test_default_output_dir() -> None:
    assert default_output_dir("examples/configs/geg_coco.yaml") == os.path.join("outputs", "geg_coco")
    assert default_output_dir("geg_coco.yaml", toy=True) == os.path.join("outputs", "geg_coco-toy")


# ---------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(modle={}), r"unknown section \['modle'\]"),
        (
            lambda r: r["data"].update(source="s3"),
            r"data.source: 's3'; one of \['karpathy', 'hub', 'shapes'\]",
        ),
        (
            lambda r: r["data"].update(n_train=5),
            r"data \(source karpathy\): unknown key \['n_train'\]; valid:",
        ),
        (
            lambda r: r["data"].update(karpathy_json="/nope.json"),
            "data.karpathy_json: '/nope.json': no such file",
        ),
        (lambda r: r["data"].update(max_eval_images=0), "data.max_eval_images: must be a positive integer"),
        (lambda r: r["clip"].pop("model"), "clip.model: required"),
        (lambda r: r["clip"].update(dtype="int8"), "clip.dtype"),
        (lambda r: r["captioner"].update(family="lstm"), r"captioner.family: 'lstm'; one of \['clipcap'"),
        (lambda r: r["captioner"].pop("name_or_path"), "captioner.name_or_path: required"),
        (
            lambda r: r["captioner"].update(name_or_path="./missing/model"),
            "captioner.name_or_path: .*no such folder",
        ),
        (lambda r: r["captioner"].update(prompt="a photo of"), "captioner.prompt: ClipCap captions have no"),
        (lambda r: r["captioner"].update(lora="yes"), "captioner.lora: must be true or false"),
        (lambda r: r.update(rewards=[]), "rewards: a non-empty list"),
        (lambda r: r["rewards"].append({"name": "bleu"}), r"rewards\[2\].name: 'bleu'; one of \['clip_s'"),
        (
            lambda r: r["rewards"][0].update(temprature=0.1),
            r"rewards\[0\] \(bidirectional\): unknown key \['temprature'\]",
        ),
        (
            lambda r: r["rewards"].append({"name": "bidirectional"}),
            r"rewards\[2\]: reward 'bidirectional' appears twice",
        ),
        (lambda r: r["rewards"][0].update(weight="high"), r"rewards\[0\].weight: must be a number"),
        (lambda r: r["rewards"][0].update(hard_negatives=[-1]), r"rewards\[0\].hard_negatives"),
        (
            lambda r: r["rewards"].append({"name": "group_gap", "similarity": "text"}),
            r"rewards\[2\].similarity",
        ),
        (lambda r: r["rewards"].append({"name": "discriminator2"}), r"rewards\[2\].name"),
        (lambda r: r["training"].update(lr=1e-3), r"training: unknown CaptionRLConfig field \['lr'\]"),
        (
            lambda r: r["training"].update(output_dir="x"),
            "training.output_dir: set by the recipe .pass --output-dir",
        ),
        (lambda r: r["training"].update(reward_weights=[1, 1]), "training.reward_weights: set by the recipe"),
        (
            lambda r: r["training"].update(resume_from_checkpoint="/no/ckpt"),
            "training.resume_from_checkpoint",
        ),
    ],
)
def test_errors_name_the_section_and_key(tmp_path, change, message: str) -> None:
    recipe = base_recipe(tmp_path)
    del recipe["toy"]
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path / "r.yaml", recipe))


def test_shapes_recipes_refuse_a_clip_section_and_other_families(tmp_path) -> None:
    shapes = {
        "data": {"source": "shapes", "n_test": 100},
        "captioner": {"family": "clipcap"},
        "rewards": [{"name": "clip_s"}],
    }
    assert validate_recipe(shapes)["data"]["n_test"] == 100
    with pytest.raises(
        RecipeError, match="clip: data.source shapes judges with the shapes world's tiny CLIP"
    ):
        validate_recipe({**shapes, "clip": {"model": "RN50"}})
    with pytest.raises(RecipeError, match="captioner.family blip: the shapes world"):
        validate_recipe({**shapes, "captioner": {"family": "blip"}})
    with pytest.raises(RecipeError, match=r"data \(source shapes\): n_test must be >= 100"):
        validate_recipe({**shapes, "data": {"source": "shapes", "n_test": 10}})
    recipe = base_recipe(tmp_path)
    recipe["captioner"]["family"] = "vlm"
    with pytest.raises(RecipeError, match="captioner.family vlm: the shapes world"):
        load_recipe(write(tmp_path / "r.yaml", recipe), toy=True)


def test_file_and_override_errors(tmp_path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    path = write(tmp_path / "r.yaml", base_recipe(tmp_path))
    with pytest.raises(RecipeError, match="--set training: expected KEY=VALUE"):
        load_recipe(path, ["training"])
    with pytest.raises(RecipeError, match=r"--set rewards.5.weight=1: 'rewards.5': the list has 2 entries"):
        load_recipe(path, ["rewards.5.weight=1"])
    with pytest.raises(RecipeError, match="--set optim.lr=1: unknown section 'optim'"):
        load_recipe(path, ["optim.lr=1"])
    with pytest.raises(RecipeError, match="training: unknown CaptionRLConfig field"):
        load_recipe(path, ["training.not_a_field=1"])


# ---------------------------------------------------------------------- rewards


@pytest.fixture(scope="module")
def world_data():
    data = ShapesWorld(seed=0).to_dataset(16, "train")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    return data.remove_columns(["image", "scene", "full_caption"]), scorer, cache


def test_every_reward_name_builds_and_scores(world_data, tmp_path) -> None:
    train, scorer, cache = world_data
    specs = [
        {"name": "clip_s", "weight": 2.0},
        {"name": "retrieval", "weight": 1.0, "hard_negatives": 2},
        {"name": "group_gap", "weight": 10.0, "k": 3, "similarity": "captions"},
        {"name": "bidirectional", "weight": 0.94, "ref_negatives": True, "hard_negatives": [1, 2]},
        {"name": "discriminator", "weight": 0.06, "lr": 1e-3},
        {"name": "cider", "weight": 0.1},
        {"name": "grammar", "weight": 1.0, "epochs": 1, "batch_size": 8, "path": str(tmp_path / "grammar")},
    ]
    assert {s["name"] for s in specs} == set(REWARD_KEYS)
    funcs, weights = build_rewards(
        validate_recipe({**minimal_shapes(), "rewards": specs})["rewards"],
        scorer,
        cache,
        train,
        output_dir=tmp_path,
        progress=False,
    )
    assert [f.__name__ for f in funcs] == [s["name"] for s in specs]
    assert weights == [2.0, 1.0, 10.0, 0.94, 0.06, 0.1, 1.0]
    # every CLIP reward reads the grammar-tuned text tower (Cho et al.); the judge itself is left untouched
    tuned = funcs[-1].scorer
    assert tuned is not scorer and all(f.scorer is tuned for f in funcs if hasattr(f, "cache"))
    rows = train.select(range(4))
    columns = {
        "image_id": [i for i in rows["image_id"] for _ in range(2)],
        "captions": [c for c in rows["captions"] for _ in range(2)],
    }
    completions = ["a red circle", "a large blue square on a white background"] * 4
    for func in funcs:
        values = func(prompts=[""] * 8, completions=completions, **columns)
        assert len(values) == 8 and all(math.isfinite(v) for v in values), func.__name__
    # the grammar head and its text tower were saved, and are loaded (not retrained) next time
    assert (tmp_path / "grammar" / "grammar_head.safetensors").is_file()
    again, _ = build_rewards([specs[-1]], scorer, cache, train, progress=False)
    torch.testing.assert_close(again[0].head.net[0].weight, funcs[-1].head.net[0].weight)


def test_group_gap_groups_stay_in_the_training_split(world_data) -> None:
    train, scorer, cache = world_data
    funcs, _ = build_rewards(
        [{"name": "group_gap", "weight": 1.0, "k": 5}], scorer, cache, train.select(range(8))
    )
    groups = funcs[0].groups
    ids = set(train.select(range(8))["image_id"])
    assert set(groups) == ids and all(len(g) == 5 and set(g) <= ids - {i} for i, g in groups.items())


def test_grammar_prompt_is_one_setting_for_training_and_scoring(world_data, tmp_path) -> None:
    train, scorer, cache = world_data
    spec = {"name": "grammar", "weight": 1.0, "epochs": 1, "batch_size": 8, "path": str(tmp_path / "grammar")}
    (reward,), _ = build_rewards(
        [{**spec, "prompt": "A photo depicts "}], scorer, cache, train, progress=False
    )
    assert reward.prompt == reward.head.prompt == "A photo depicts "
    # Loaded from `path`: without a prompt key the head's own applies; another prompt is refused.
    (again,), _ = build_rewards([spec], scorer, cache, train, progress=False)
    assert again.prompt == "A photo depicts "
    with pytest.raises(
        RecipeError, match="grammar prompt '' differs from 'A photo depicts ', the prompt the"
    ):
        build_rewards([{**spec, "prompt": ""}], scorer, cache, train, progress=False)


def minimal_shapes() -> dict:
    return {"data": {"source": "shapes", "n_test": 100}, "captioner": {"family": "clipcap"}}


# ---------------------------------------------------------------------- a real run, small and offline


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved caption dataset (train / test), a ClipCap folder, a registered tiny open_clip architecture."""
    root = tmp_path_factory.mktemp("recipe_run")
    config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    world = ShapesWorld(seed=0)
    data = DatasetDict({"train": world.to_dataset(12, "train"), "test": world.to_dataset(8, "test")})
    data.save_to_disk(str(root / "data"))
    tokenizer = world.word_tokenizer()
    torch.manual_seed(0)
    gpt = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=40,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = ClipCapModel(ClipCapConfig(prefix_dim=64, prefix_length=2, gpt2_config=gpt.to_dict()))
    model.save_pretrained(root / "clipcap")
    tokenizer.save_pretrained(root / "clipcap")
    recipe = {
        "data": {
            "source": "hub",
            "dataset": str(root / "data"),
            "train_split": "train",
            "eval_split": "test",
        },
        "clip": {"model": TINY_CLIP, "pretrained": None, "dtype": "float32"},
        "captioner": {"family": "clipcap", "name_or_path": str(root / "clipcap")},
        "rewards": [
            {"name": "bidirectional", "weight": 0.94, "hard_negatives": 1},
            {"name": "discriminator", "weight": 0.06},
        ],
        "training": {
            "baseline": "loo",
            "num_generations": 2,
            "per_device_train_batch_size": 8,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "max_completion_length": 8,
            "eval_num_beams": 1,
            "eval_coco_metrics": False,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
        },
    }
    return root, write(root / "recipe.yaml", recipe)


def test_two_step_run_writes_model_card_report_and_captions(tiny_setup) -> None:
    root, path = tiny_setup
    out = root / "run"
    result = run(load_recipe(path), out, progress=False)
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"p_at_1_100", "recall_at_1", "clip_s", "geg_avg", "distinct_2", "novelty"} <= set(
            report[side]
        )
        assert report[side] == pytest.approx({k: v for k, v in result[side].items() if k != "skipped"})
    assert report["steps"] == 2 and report["recipe"]["rewards"][0]["name"] == "bidirectional"
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in lines] == [f"test-{i:06d}" for i in range(8)]
    assert all({"before", "after"} <= set(r) for r in lines)
    card = (out / "README.md").read_text()
    assert "bidirectional" in card and "discriminator" in card and "p_at_1_100" in card
    assert (
        out / "image_embeddings.safetensors"
    ).is_file()  # clip.cache null: built once, kept beside the model
    assert (out / "training.png").is_file() and (out / "captions.png").is_file()
    # the saved model reloads and scores as the run's "after"
    metrics, captions, ids = evaluate_saved(load_recipe(path), out, out, progress=False)
    assert captions == [r["after"] for r in lines] and ids == [r["image_id"] for r in lines]
    assert metrics["p_at_1_100"] == pytest.approx(report["after"]["p_at_1_100"])


def test_evaluation_geg_groups_are_eq2_within_the_evaluation_split(tiny_setup, tmp_path, groups_spy) -> None:
    from clip_rl_trl.rewards.functional import group_embedding_gap

    root, path = tiny_setup
    calls = groups_spy
    metrics, captions, ids = evaluate_saved(load_recipe(path), root / "clipcap", tmp_path, progress=False)
    (call,) = calls
    refs = ShapesWorld(seed=0).to_dataset(8, "test")["captions"]
    # Zhang et al.: K = 5 within the evaluation split (8 test images, none of the 12 training images), Eq. 2
    # over its references encoded raw by the judge.
    assert call["k"] == 5 and call["similarity"] == "captions" and call["refs"] == refs
    assert len(call["img_emb"]) == len(ids) == 8
    judge = call["scorer"]
    owner = torch.arange(8).repeat_interleave(torch.tensor([len(r) for r in refs]))
    text_emb = judge.encode_texts([c for r in refs for c in r]).float()
    groups = similar_image_groups(call["img_emb"], 5, text_emb=text_emb, text_owner=owner)
    assert torch.equal(call["groups"], groups)
    img = call["img_emb"]
    gap = group_embedding_gap(judge.encode_texts(captions).float(), img, img[groups], reduce="avg")
    assert metrics["geg_avg"] == pytest.approx(float(gap.mean()), abs=1e-5)

    evaluate_saved(load_recipe(path), root / "clipcap", tmp_path, progress=False, similarity="image")
    assert calls[-1]["similarity"] == "image"


def test_a_cache_for_other_data_is_refused(tiny_setup, tmp_path) -> None:
    root, path = tiny_setup
    other = ImageEmbeddingCache(["x", "y"], torch.nn.functional.normalize(torch.randn(2, 64), dim=-1))
    other.save(tmp_path / "other.safetensors")
    recipe = load_recipe(path, [f"clip.cache={tmp_path / 'other.safetensors'}"])
    with pytest.raises(RecipeError, match="clip.cache .*image id\\(s\\) of the recipe's data are not in it"):
        run(recipe, tmp_path / "out", progress=False)


def test_a_blip_recipe_with_lora_builds_and_evaluates(tiny_setup) -> None:
    """The pixel-reading family: a tiny BLIP and its processor saved locally, LoRA on the text decoder."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    root, path = tiny_setup
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(specials + ShapesWorld.vocabulary())},
        bos_token="[DEC]",
        eos_token="[SEP]",
    )
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(root / "blip")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "blip")
    recipe = load_recipe(
        path,
        [
            "captioner.family=blip",
            f"captioner.name_or_path={root / 'blip'}",
            "captioner.lora=true",
            "captioner.prompt=a",
        ],
    )
    trainer, context = build(recipe, root / "blip_run", progress=False)
    assert trainer.args.gradient_checkpointing is False  # BLIP + LoRA: see recipe._training_config
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "text_decoder" in n for n in trainable)
    metrics, captions, ids = evaluate(context, trainer.model)
    assert len(captions) == len(ids) == 8 and "p_at_1_100" in metrics
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()  # the rows keep their images: BLIP reads pixels
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
