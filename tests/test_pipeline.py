"""Recipes and the pipeline: TrlParser configs, the toy section, errors naming the field, the reward and captioner
registries (a user's reward by dotted path, a family registered from a test), a 2-step run end to end."""

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

from clip_rl_trl import (
    FAMILIES,
    BidirectionalReward,
    ClipCapConfig,
    ClipCapModel,
    ConfigError,
    ImageEmbeddingCache,
    RewardEnv,
    ShapesLanguage,
    ShapesWorld,
    parse_recipe,
    register_family,
    similar_image_groups,
)
from clip_rl_trl.credentials import find_credentials
from clip_rl_trl.models.families import ClipCapFamily
from clip_rl_trl.pipeline import build_trainer, check_recipe, evaluate_saved, prepare, train
from clip_rl_trl.rewards.registry import REWARDS, build_rewards, reward_options

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
TINY_CLIP = "clip-rl-trl-test-tiny"  # an open_clip architecture registered below (random weights, offline)


def write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def coco_recipe(tmp_path: Path) -> dict:
    (tmp_path / "coco.json").write_text("{}")
    return {
        "dataset_name": str(tmp_path / "coco.json"),
        "image_root": str(tmp_path),
        "clip_model": "ViT-B-32-quickgelu",
        "clip_pretrained": "openai",
        "model_name_or_path": "user/clipcap",
        "reward_funcs": ["bidirectional", "discriminator"],
        "reward_weights": [0.94, 0.06],
        "reward_kwargs": {"discriminator": {"lr": 7.0e-5}},
        "baseline": "loo",
        "learning_rate": 1.0e-6,
        "max_steps": 100,
        "toy": {"max_train_images": 200, "max_steps": 5, "learning_rate": 5.0e-4},
    }


# ---------------------------------------------------------------------- parsing


def test_a_flat_recipe_parses_into_the_five_configs_with_overrides(tmp_path) -> None:
    path = write(tmp_path / "r.yaml", coco_recipe(tmp_path))
    recipe = parse_recipe(
        ["--config", path, "--learning_rate", "1e-5", "--reward_kwargs", '{"bidirectional": {"temperature": 0.02}}']
    )
    assert recipe.data.dataset_name.endswith("coco.json") and recipe.data.dataset_eval_split == "val"
    assert recipe.judge.clip_model == "ViT-B-32-quickgelu" and recipe.captioner.captioner_family == "clipcap"
    assert recipe.training.learning_rate == 1e-5 and recipe.training.max_steps == 100
    assert recipe.training.reward_weights == [0.94, 0.06]
    assert recipe.rewards.reward_kwargs == {"bidirectional": {"temperature": 0.02}}
    assert recipe.training.output_dir == os.path.join("outputs", "r")
    assert parse_recipe(["--config", path]).rewards.options("discriminator") == {"lr": 7e-5}  # 7.0e-5: a float
    # 1e-3 in JSON on the command line is a number too (YAML 1.1 alone would read a string)
    over = parse_recipe(["--config", path, "--reward_kwargs", '{"discriminator": {"lr": 1e-3}}'])
    assert over.rewards.options("discriminator") == {"lr": 1e-3}


def test_toy_applies_its_section_on_the_shapes_world(tmp_path) -> None:
    recipe = parse_recipe(["--config", write(tmp_path / "r.yaml", coco_recipe(tmp_path)), "--toy", "--max_steps", "3"])
    assert recipe.data.dataset_name == "shapes" and recipe.data.toy and recipe.data.max_train_images == 200
    assert recipe.judge.clip_model is None and recipe.captioner.model_name_or_path is None
    assert recipe.training.learning_rate == 5e-4 and recipe.training.baseline == "loo"
    assert recipe.training.max_steps == 3  # the command line wins over the toy section
    assert recipe.training.output_dir == os.path.join("outputs", "r-toy")
    source, family = check_recipe(recipe)
    assert (source.name, family.name) == ("shapes", "clipcap")


@pytest.mark.parametrize("name", ["bidir_coco", "discritune_coco", "clip_s_coco", "geg_coco", "vlm_coco"])
def test_every_example_recipe_parses_and_its_toy_checks(name: str) -> None:
    toy = parse_recipe(["--config", str(EXAMPLES / f"{name}.yaml"), "--toy"])
    check_recipe(toy)
    assert toy.training.max_steps <= 20
    full = parse_recipe(["--config", str(EXAMPLES / f"{name}.yaml")])
    assert full.data.dataset_test_split == "test" and full.training.metric_for_best_model == "selection_score"
    with pytest.raises(ConfigError, match="image_root|no such file|dataset_coco"):
        prepare(full, progress=False)  # the COCO files are not on this machine


def test_example_recipes_follow_the_papers() -> None:
    def parsed(name: str):
        return parse_recipe(["--config", str(EXAMPLES / f"{name}.yaml")])

    bidir, discritune, clip_s, geg = (parsed(n) for n in ("bidir_coco", "discritune_coco", "clip_s_coco", "geg_coco"))
    assert bidir.rewards.reward_funcs == ["bidirectional", "discriminator"]
    assert bidir.training.reward_weights == [0.94, 0.06] and bidir.training.gt_loss_weight == 1.0
    assert bidir.rewards.options("bidirectional")["hard_negatives"] == [3, 4]
    t = discritune.training
    assert discritune.rewards.reward_funcs == ["retrieval"]
    assert (t.baseline, t.train_decoding, t.num_generations, t.per_device_train_batch_size) == (
        "running_mean", "greedy", 1, 100)
    assert math.isclose(t.learning_rate, 1e-7)
    assert clip_s.rewards.reward_funcs == ["clip_s"] and clip_s.training.baseline == "greedy"
    assert geg.rewards.reward_funcs == ["cider", "group_gap"] and geg.training.reward_weights == [0.1, 10.0]
    assert geg.rewards.options("group_gap")["k"] == 5 and geg.training.baseline == "greedy"


def test_the_packaged_demo_recipe_is_the_shapes_world() -> None:
    recipe = parse_recipe(["--config", "shapes_demo"])
    assert recipe.data.dataset_name == "shapes" and recipe.rewards.reward_funcs == ["bidirectional", "discriminator"]
    assert recipe.training.max_steps == 200 and recipe.training.gt_weighting == "reward"
    quick = parse_recipe(["--config", "shapes_demo", "--toy"])
    assert (quick.training.max_steps, quick.data.max_test_images) == (10, 100)


@pytest.mark.parametrize(
    ("change", "argv", "message"),
    [
        ({"modle": 1}, [], r"unknown field \['modle'\]"),
        ({"toy": {"lr": 1}}, [], r"unknown field \['toy.lr'\]"),
        ({"data": {"karpathy_json": "x"}}, [], "old sectioned format .*data.karpathy_json -> dataset_name"),
        ({"clip_dtype": "int8"}, [], "clip_dtype: 'int8'"),
        ({"max_eval_images": 0}, [], "max_eval_images: must be a positive integer"),
        ({"reward_funcs": []}, [], "reward_funcs: a non-empty list"),
        ({"reward_funcs": ["bidirectional", "bidirectional"]}, [], "appear more than once"),
        ({"reward_kwargs": {"bleu": {}}}, [], r"options for \['bleu'\], which are not in reward_funcs"),
        ({}, ["--reward_kwargs", "[1"], "reward_kwargs: not a JSON"),
        ({"toy": [1]}, [], "toy must be a mapping"),
    ],
)
def test_parse_errors_name_the_field(tmp_path, change, argv, message: str) -> None:
    recipe = {**coco_recipe(tmp_path), **change}
    with pytest.raises(ConfigError, match=message):
        parse_recipe(["--config", write(tmp_path / "r.yaml", recipe), *argv])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reward_funcs": ["bleu"], "reward_weights": [1.0], "reward_kwargs": None}, r"reward 'bleu': not a registered one \(\["),
        ({"reward_kwargs": {"bidirectional": {"temprature": 0.1}}}, r"reward_kwargs.bidirectional: unknown option\(s\) \['temprature'\]"),
        ({"reward_weights": [1.0]}, r"reward_weights: 1 weight\(s\) for 2 reward_funcs"),
        ({"captioner_family": "lstm"}, r"captioner_family: 'lstm'; registered families: \['blip', 'clipcap'"),
        ({"clip_model": None}, "clip_model: required"),
        ({"model_name_or_path": None}, "model_name_or_path: required"),
        ({"caption_prompt": "a photo of"}, "caption_prompt: clipcap captions have no text prompt"),
        ({"reward_funcs": ["nowhere.Reward", "discriminator"], "reward_kwargs": None}, "cannot import module 'nowhere'"),
        ({"dataset_source": "s3"}, r"dataset_source: 's3'; registered sources"),
        ({"model_name_or_path": "./no/such/model"}, "model_name_or_path './no/such/model': no such folder"),
        ({"load_in_4bit": True}, "quantised captioners are not supported"),
        ({"reward_kwargs": {"discriminator": {"weights": "/no/disc.safetensors"}}},
         "reward_kwargs.discriminator.weights: '/no/disc.safetensors': no such file"),
        ({"captioner_family": "json.JSONDecoder"}, "is not a CaptionerFamily subclass"),
    ],
)
def test_registry_names_are_checked_before_any_work(tmp_path, change, message: str) -> None:
    recipe = parse_recipe(["--config", write(tmp_path / "r.yaml", {**coco_recipe(tmp_path), **change})])
    with pytest.raises(ConfigError, match=message):
        check_recipe(recipe)


def test_a_bad_value_fails_at_parse_time_and_the_file_errors_are_named(tmp_path) -> None:
    with pytest.raises(SystemExit):  # argparse: "argument --learning_rate: invalid float value: 'fast'"
        parse_recipe(["--config", write(tmp_path / "r.yaml", {**coco_recipe(tmp_path), "learning_rate": "fast"})])
    with pytest.raises(ConfigError, match="no such file"):
        parse_recipe(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("dataset_name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_recipe(["--config", str(tmp_path / "bad.yaml")])


# ---------------------------------------------------------------------- rewards


@pytest.fixture(scope="module")
def world_data():
    data = ShapesWorld(seed=0).to_dataset(16, "train")
    scorer = make_tiny_scorer()
    cache = ImageEmbeddingCache.build(data, scorer, progress=False)
    return data.remove_columns(["image", "scene", "full_caption"]), scorer, cache


def test_reward_options_are_read_from_the_signatures() -> None:
    assert reward_options(BidirectionalReward) == {
        "temperature", "directions", "hard_negatives", "similarity", "exclude_above", "ref_negatives"}
    assert {"lr", "hidden_dims", "seed", "weights"} <= reward_options(REWARDS["discriminator"])
    assert reward_options(REWARDS["cider"]) == {"sigma", "normalize"}
    assert {"path", "epochs", "prompt", "grammar_weight"} <= reward_options(REWARDS["grammar"])


def test_every_registered_reward_builds_and_scores(world_data, tmp_path) -> None:
    train, scorer, cache = world_data
    names = ["clip_s", "retrieval", "group_gap", "bidirectional", "discriminator", "cider", "grammar"]
    assert set(names) <= set(REWARDS)
    kwargs = {
        "retrieval": {"hard_negatives": 2},
        "group_gap": {"k": 3, "similarity": "captions"},
        "bidirectional": {"ref_negatives": True, "hard_negatives": [1, 2]},
        "discriminator": {"lr": 1e-3, "seed": 0},
        "grammar": {"epochs": 1, "batch_size": 8, "path": str(tmp_path / "grammar")},
    }
    env = RewardEnv(scorer, cache, train, output_dir=tmp_path, progress=False)
    funcs = build_rewards(names, kwargs, env)
    assert [f.__name__ for f in funcs] == names
    # every CLIP reward reads the grammar-tuned text tower (Cho et al.); the judge itself is left untouched
    tuned = funcs[-1].scorer
    assert tuned is not scorer and all(f.scorer is tuned for f in funcs if hasattr(f, "cache"))
    rows = train.select(range(4))
    columns = {"image_id": [i for i in rows["image_id"] for _ in range(2)],
               "captions": [c for c in rows["captions"] for _ in range(2)]}
    completions = ["a red circle", "a large blue square on a white background"] * 4
    for func in funcs:
        values = func(prompts=[""] * 8, completions=completions, **columns)
        assert len(values) == 8 and all(math.isfinite(v) for v in values), func.__name__
    # groups come from the training split only
    groups = funcs[2].groups
    assert set(groups) == set(train["image_id"]) and all(i not in g for i, g in groups.items())
    # the grammar head was saved and is loaded next time; another prompt is refused
    again = build_rewards(["grammar"], {"grammar": {"path": str(tmp_path / "grammar")}}, RewardEnv(scorer, cache, train))
    torch.testing.assert_close(again[0].head.net[0].weight, funcs[-1].head.net[0].weight)
    with pytest.raises(ValueError, match="grammar prompt 'x' differs"):
        build_rewards(["grammar"], {"grammar": {"path": str(tmp_path / "grammar"), "prompt": "x"}},
                      RewardEnv(scorer, cache, train))


# ---------------------------------------------------------------------- a real run, small and offline


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A saved caption dataset (train / val / test), a ClipCap folder, a registered tiny open_clip architecture."""
    root = tmp_path_factory.mktemp("pipeline_run")
    config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 1},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    world = ShapesWorld(seed=0)
    data = DatasetDict({"train": world.to_dataset(12, "train"), "val": world.to_dataset(8, "val"),
                        "test": world.to_dataset(8, "test")})
    data.save_to_disk(str(root / "data"))
    tiny_clipcap(ShapesLanguage.word_tokenizer()).save_pretrained(root / "clipcap")
    ShapesLanguage.word_tokenizer().save_pretrained(root / "clipcap")
    recipe = {
        "dataset_name": str(root / "data"),
        "clip_model": TINY_CLIP,
        "model_name_or_path": str(root / "clipcap"),
        "reward_funcs": ["bidirectional", "discriminator"],
        "reward_weights": [0.94, 0.06],
        "reward_kwargs": {"bidirectional": {"hard_negatives": 1}},
        "baseline": "loo",
        "num_generations": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "max_completion_length": 8,
        "eval_num_beams": 1,
        "eval_coco_metrics": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    }
    return root, write(root / "recipe.yaml", recipe)


def tiny_clipcap(tokenizer, prefix_dim: int = 64) -> ClipCapModel:
    torch.manual_seed(0)
    gpt = GPT2Config(vocab_size=len(tokenizer), n_positions=40, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return ClipCapModel(ClipCapConfig(prefix_dim=prefix_dim, prefix_length=2, gpt2_config=gpt.to_dict()))


def test_two_step_run_writes_model_card_report_and_captions(tiny_setup) -> None:
    root, path = tiny_setup
    out = root / "run"
    fake = "hf_" + "FakeToken0" * 4  # shaped like a real Hugging Face token
    result = train(parse_recipe(["--config", path, "--output_dir", str(out), "--hub_token", fake, "--run_name",
                                 f"run-{fake}", "--save_strategy", "steps", "--save_steps", "1"]), progress=False)
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert {"p_at_1_100", "recall_at_1", "clip_s", "geg_avg", "distinct_2", "novelty"} <= set(report[side])
        assert report[side] == pytest.approx({k: v for k, v in result[side].items() if k != "skipped"})
    assert report["steps"] == 2 and report["recipe"]["rewards"]["reward_funcs"] == ["bidirectional", "discriminator"]
    # the token (given as hub_token, and pasted into run_name) is in no file of the run: reports, model card,
    # training_args.bin, checkpoints
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert find_credentials(out) == []
    assert not any(fake.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in lines] == [f"test-{i:06d}" for i in range(8)]  # the test split, not val
    card = (out / "README.md").read_text()
    assert "bidirectional" in card and "discriminator" in card and "p_at_1_100" in card
    assert (out / "image_embeddings.safetensors").is_file()  # no embedding_cache: built once, kept beside it
    assert (out / "training.png").is_file() and (out / "captions.png").is_file()
    # the saved model reloads and scores as the run's "after"
    recipe = parse_recipe(["--config", path, "--output_dir", str(out)])
    metrics, captions, ids = evaluate_saved(recipe, out, progress=False, coco_metrics=False)
    assert captions == [r["after"] for r in lines] and ids == [r["image_id"] for r in lines]
    assert metrics["p_at_1_100"] == pytest.approx(report["after"]["p_at_1_100"])


def test_evaluation_geg_groups_are_eq2_within_the_test_split(tiny_setup, tmp_path, groups_spy) -> None:
    from clip_rl_trl.rewards.functional import group_embedding_gap

    root, path = tiny_setup
    recipe = parse_recipe(["--config", path, "--output_dir", str(tmp_path)])
    metrics, captions, ids = evaluate_saved(recipe, root / "clipcap", progress=False, coco_metrics=False)
    (call,) = groups_spy
    refs = ShapesWorld(seed=0).to_dataset(8, "test")["captions"]
    assert call["k"] == 5 and call["similarity"] == "captions" and call["refs"] == refs and len(ids) == 8
    judge = call["scorer"]
    owner = torch.arange(8).repeat_interleave(torch.tensor([len(r) for r in refs]))
    text_emb = judge.encode_texts([c for r in refs for c in r]).float()
    groups = similar_image_groups(call["img_emb"], 5, text_emb=text_emb, text_owner=owner)
    assert torch.equal(call["groups"], groups)
    img = call["img_emb"]
    gap = group_embedding_gap(judge.encode_texts(captions).float(), img, img[groups], reduce="avg")
    assert metrics["geg_avg"] == pytest.approx(float(gap.mean()), abs=1e-5)


def test_a_full_disk_is_refused_before_any_work(tiny_setup, tmp_path, monkeypatch) -> None:
    import shutil

    root, path = tiny_setup
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    recipe = parse_recipe(["--config", path, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=r"0.00 GiB free, but the run needs about .* GiB \(embeddings of 28 images"):
        prepare(recipe, progress=False)
    assert not (tmp_path / "out" / "image_embeddings.safetensors").exists()  # nothing embedded


def test_a_cache_for_other_data_is_refused(tiny_setup, tmp_path) -> None:
    root, path = tiny_setup
    other = ImageEmbeddingCache(["x", "y"], torch.nn.functional.normalize(torch.randn(2, 64), dim=-1))
    other.save(tmp_path / "other.safetensors")
    recipe = parse_recipe(["--config", path, "--embedding_cache", str(tmp_path / "other.safetensors")])
    with pytest.raises(ConfigError, match="embedding_cache .*image id\\(s\\) of the recipe's data are not in it"):
        prepare(recipe, progress=False)


def test_a_users_reward_named_by_dotted_path_trains(tiny_setup, tmp_path, monkeypatch) -> None:
    root, path = tiny_setup
    (tmp_path / "my_rewards.py").write_text(
        "class LengthReward:\n"
        "    __name__ = 'length'\n"
        "    def __init__(self, target: int = 5):\n"
        "        self.target = target\n"
        "    def __call__(self, prompts, completions, **columns):\n"
        "        return [-abs(len(c.split()) - self.target) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {**yaml.safe_load(Path(path).read_text()), "reward_funcs": ["my_rewards.LengthReward", "bidirectional"],
              "reward_weights": [0.1, 1.0], "reward_kwargs": {"my_rewards.LengthReward": {"target": 3}}}
    recipe = parse_recipe(["--config", write(tmp_path / "r.yaml", config), "--output_dir", str(tmp_path / "out")])
    trainer, run = build_trainer(recipe, progress=False)
    assert trainer.reward_funcs[0].target == 3
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "rewards/length/mean" in logged
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    with pytest.raises(ConfigError, match=r"reward_kwargs.my_rewards.LengthReward: unknown option\(s\) \['tgt'\]"):
        check_recipe(parse_recipe(["--config", write(tmp_path / "r2.yaml", {
            **config, "reward_kwargs": {"my_rewards.LengthReward": {"tgt": 3}}})]))


def test_a_family_registered_from_a_test_is_loaded_and_trained_with_lora(tiny_setup, tmp_path) -> None:
    """A new captioner family is one registered class: here a ClipCap built from a config, not read from disk."""
    root, path = tiny_setup

    @register_family("toy_clipcap")
    class ToyFamily(ClipCapFamily):
        lora_targets = ["c_attn", "q_proj"]  # a one-item list would become a regex in trl.ModelConfig

        def load(self, config, **context):
            tokenizer = ShapesLanguage.word_tokenizer()
            return tiny_clipcap(tokenizer), tokenizer

    try:
        config = {**yaml.safe_load(Path(path).read_text()), "captioner_family": "toy_clipcap", "use_peft": True,
                  "lora_r": 4}
        recipe = parse_recipe(["--config", write(tmp_path / "r.yaml", config), "--output_dir", str(tmp_path / "o")])
        trainer, run = build_trainer(recipe, progress=False)
        assert run.family is FAMILIES["toy_clipcap"]
        trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        lora = [n for n in trainable if "lora_" in n]
        assert lora and all("c_attn" in n for n in lora)  # the family's targets
        assert all(n in lora or ".mapper." in n for n in trainable)  # the mapper trains in full
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    finally:
        FAMILIES.pop("toy_clipcap")


def test_a_blip_recipe_with_lora_builds_trains_and_evaluates(tiny_setup, tmp_path) -> None:
    """The pixel-reading family: a tiny BLIP and its processor saved locally, LoRA on the text decoder."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from clip_rl_trl.pipeline import evaluate

    root, path = tiny_setup
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + ShapesLanguage.vocabulary())},
                                  bos_token="[DEC]", eos_token="[SEP]")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=tokenizer.bos_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        tmp_path / "blip")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(tmp_path / "blip")
    recipe = parse_recipe(["--config", path, "--output_dir", str(tmp_path / "run"), "--captioner_family", "blip",
                           "--model_name_or_path", str(tmp_path / "blip"), "--use_peft", "true",
                           "--caption_prompt", "a"])
    trainer, run = build_trainer(recipe, progress=False)
    assert trainer.args.gradient_checkpointing is True  # TRL's default, kept with LoRA (issue 13)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "text_decoder" in n for n in trainable)
    metrics, captions, ids = evaluate(run, trainer.model, coco_metrics=False)
    assert len(captions) == len(ids) == 8 and "p_at_1_100" in metrics
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()  # the rows keep their images: BLIP reads pixels
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
