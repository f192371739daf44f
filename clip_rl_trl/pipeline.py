"""The pipeline: a parsed :class:`~clip_rl_trl.Recipe` -> data, judge, cache, captioner, rewards, trainer, report.

Data flows one way: the data source's splits -> the judge's cached image embeddings -> the captioner family's
policy -> the registry's rewards -> :class:`~clip_rl_trl.CaptionRLTrainer` -> the report. Every name a recipe
gives is resolved by :func:`check_recipe` before anything heavy runs.

- :func:`prepare` loads everything but the rewards and the trainer (a :class:`Run`);
- :func:`build_trainer` adds the rewards and the trainer;
- :func:`evaluate` captions and scores a split (the trainer's own evaluation path);
- :func:`train` is ``clip-rl-trl train``: evaluate the test split, train, save, evaluate again, write the report;
- :func:`evaluate_saved` scores a saved model or adapter on the recipe's test split;
- :func:`main` is the examples' command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_rl_trl.configs import ConfigError, Recipe, parse_recipe
from clip_rl_trl.credentials import redact
from clip_rl_trl.data.sources import DataSource, data_source, load_split
from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.models.families import CaptionerFamily, family
from clip_rl_trl.rewards.registry import RewardEnv, build_rewards, check_reward_options

__all__ = ["Run", "build_trainer", "check_recipe", "evaluate", "evaluate_saved", "main", "prepare", "train"]

# Training fields that carry secrets: never written into a report (the Hub token reaches TrainingArguments).
SECRET_FIELDS = ("hub_token",)


@dataclass
class Run:
    """What a recipe loads besides the rewards and the trainer."""

    recipe: Recipe
    source: DataSource
    family: CaptionerFamily
    train: Any  # datasets.Dataset: image_id, captions (+ image, scene)
    eval: Any  # evaluations during training and checkpoint selection
    test: Any  # the before/after report
    scorer: Any  # the frozen ClipScorer that judges every evaluation
    cache: ImageEmbeddingCache
    model: Any
    processing_class: Any
    policy: Any
    language: Any = None  # the source's caption parser (grammar_valid, attribute metrics), if it has one

    @property
    def dataset_label(self) -> str:
        return "shapes-world" if self.source.name == "shapes" else str(self.recipe.data.dataset_name)


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def _main_first():
    from accelerate import PartialState

    return PartialState().main_process_first()


def check_recipe(recipe: Recipe) -> tuple[DataSource, CaptionerFamily]:
    """Resolve every registry name and cross-field rule of ``recipe`` before any heavy work; ``ConfigError``."""
    try:
        source = data_source(recipe.data)
        fam = family(recipe.captioner.captioner_family)
        check_reward_options(recipe.rewards.reward_funcs, recipe.rewards.reward_kwargs or {})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    funcs, weights = recipe.rewards.reward_funcs, recipe.training.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise ConfigError(f"reward_weights: {len(weights)} weight(s) for {len(funcs)} reward_funcs {funcs}")
    if recipe.judge.clip_model is None and source.name != "shapes":
        raise ConfigError("clip_model: required (an open_clip architecture, e.g. ViT-B-32-quickgelu)")
    if recipe.captioner.model_name_or_path is None and not (fam.from_scratch and source.name == "shapes"):
        raise ConfigError(
            f"model_name_or_path: required (a saved model folder or a Hub name); captioner_family {fam.name} is "
            "not built from scratch, which only a ClipCap on the shapes world (--toy) is"
        )
    name = recipe.captioner.model_name_or_path
    if name is not None and _looks_local(name) and not Path(name).is_dir():
        raise ConfigError(f"model_name_or_path {name!r}: no such folder")
    if recipe.captioner.load_in_4bit or recipe.captioner.load_in_8bit:
        raise ConfigError("load_in_4bit / load_in_8bit: quantised captioners are not supported yet")
    if recipe.captioner.caption_prompt is not None and not fam.reads_pixels:
        raise ConfigError(f"caption_prompt: {fam.name} captions have no text prompt (BLIP and VLM only)")
    for reward, options in (recipe.rewards.reward_kwargs or {}).items():
        if options.get("weights") is not None and not Path(options["weights"]).is_file():
            raise ConfigError(f"reward_kwargs.{reward}.weights: {options['weights']!r}: no such file")
    resume = recipe.training.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() not in ("true", "false") and not Path(resume).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {resume!r}: no such checkpoint folder")
    return source, fam


def _looks_local(name: str) -> bool:
    """A path rather than a Hub name ("user/model"): absolute, explicitly relative, or with two slashes or more."""
    return Path(name).exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def check_output_dir(path: str | os.PathLike) -> None:
    """Create ``path`` and prove it writable (a probe file, flushed to disk), before any work is done."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {os.fspath(folder)!r}: exists and is not a folder")
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {os.fspath(folder)!r}: cannot write there ({err.strerror or err})") from None


def check_free_space(recipe: Recipe, n_images: int) -> int:
    """Refuse to start when the output folder's disk cannot hold the run; returns the estimate in bytes.

    The estimate: the image embeddings (at most 1,024 float32 dimensions per image) when they are saved, plus the
    captioner's weights (its local weight files) once in the final model and three times (weights and Adam's two
    moments) in each kept checkpoint (``save_total_limit``, else every save, counted as 2, plus the one in progress).
    """
    name = recipe.captioner.model_name_or_path
    weights = (sum(p.stat().st_size for p in Path(name).glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
               if name and Path(name).is_dir() else 0)
    kept = (recipe.training.save_total_limit or 2) + 1 if recipe.training.save_strategy != "no" else 0
    estimate = n_images * 1024 * 4 + weights * (1 + 3 * kept)
    free = shutil.disk_usage(recipe.training.output_dir).free
    if free < estimate:
        raise ConfigError(
            f"output_dir {recipe.training.output_dir!r}: {free / 2**30:.2f} GiB free, but the run needs about "
            f"{estimate / 2**30:.2f} GiB (embeddings of {n_images} images, the model and {kept} checkpoints)"
        )
    return estimate


def _unique_images(*splits: Any) -> Any:
    import datasets

    joined = datasets.concatenate_datasets([d.select_columns(["image", "image_id"]) for d in splits])
    first: dict[Any, int] = {}
    for row, image_id in enumerate(joined["image_id"]):
        first.setdefault(image_id, row)
    return joined if len(first) == len(joined) else joined.select(sorted(first.values()))


def _image_cache(recipe: Recipe, source: DataSource, scorer: Any, splits: Sequence[Any], progress: bool):
    """Load ``embedding_cache`` (checking it covers the data and the judge) or build it, saved when persistent."""
    judge = recipe.judge
    dtype = {None: None, "float16": torch.float16, "float32": torch.float32}[judge.clip_dtype]
    default = Path(recipe.training.output_dir) / "image_embeddings.safetensors" if source.persist_embeddings else None
    path = Path(judge.embedding_cache) if judge.embedding_cache else default
    with _main_first():
        if path is not None and path.is_file():
            try:
                cache = ImageEmbeddingCache.load(path)
            except (ValueError, OSError) as err:
                raise ConfigError(f"embedding_cache {os.fspath(path)!r}: {err}") from err
        else:
            cache = ImageEmbeddingCache.build(_unique_images(*splits), scorer, dtype=dtype, progress=progress)
            from accelerate import PartialState

            if path is not None and PartialState().is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                cache.save(path)
    ids = dict.fromkeys(i for split in splits for i in split["image_id"])
    missing = [i for i in ids if i not in cache]
    if missing:
        raise ConfigError(
            f"embedding_cache {os.fspath(path)!r}: {len(missing)} image id(s) of the recipe's data are not in it, "
            f"e.g. {missing[:3]}; it was built for other data: delete it to rebuild, or point embedding_cache "
            "elsewhere"
        )
    if cache.dim != scorer.embed_dim:
        raise ConfigError(
            f"embedding_cache {os.fspath(path)!r}: embeddings of dimension {cache.dim}, but the judge "
            f"{judge.clip_model} embeds in {scorer.embed_dim}"
        )
    return cache


def _load_judge(recipe: Recipe, source: DataSource, progress: bool) -> Any:
    from clip_rl_trl.clip import ClipScorer

    judge = recipe.judge
    if judge.clip_model is None:
        scorer = source.judge(recipe.data, judge.clip_hard_negatives, progress)
    else:
        try:
            scorer = ClipScorer.from_open_clip(judge.clip_model, pretrained=judge.clip_pretrained, device=_device())
        except RuntimeError as err:
            raise ConfigError(f"clip_model {judge.clip_model} / clip_pretrained {judge.clip_pretrained}: {err}") from err
    if judge.clip_batch_size:
        scorer.batch_size = judge.clip_batch_size
    return scorer


def _load_captioner(run_parts: dict[str, Any], recipe: Recipe, fam: CaptionerFamily, source: DataSource,
                    adapter: str | None, progress: bool) -> tuple[Any, Any]:
    from clip_rl_trl.data.shapes import default_cache_dir

    config = recipe.captioner
    try:
        model, processing = fam.load(
            config, tokenizer=source.tokenizer(recipe.data), train=run_parts["train"], cache=run_parts["cache"],
            scorer=run_parts["scorer"], max_tokens=recipe.training.max_completion_length,
            seed=recipe.data.world_seed, cache_dir=default_cache_dir(), settings=source.cache_settings(recipe.data),
            progress=progress,
        )
        fam.check_judge(model, run_parts["scorer"])
    except OSError as err:
        raise ConfigError(
            f"model_name_or_path {config.model_name_or_path!r}: cannot load a {fam.name} captioner ({err})"
        ) from err
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, processing


def prepare(recipe: Recipe, progress: bool = True, adapter: str | None = None) -> Run:
    """Data, judge, image-embedding cache, captioner and its policy (``adapter``: a saved LoRA adapter)."""
    source, fam = check_recipe(recipe)
    data, args = recipe.data, recipe.training
    check_output_dir(args.output_dir)
    try:
        with _main_first():
            splits = {
                "train": load_split(data, data.dataset_train_split, data.max_train_images),
                "eval": load_split(data, data.dataset_eval_split, data.max_eval_images),
                "test": load_split(data, data.test_split, data.max_test_images),
            }
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_free_space(recipe, len({i for split in splits.values() for i in split["image_id"]}))
    parts: dict[str, Any] = dict(splits)
    with _main_first():
        parts["scorer"] = _load_judge(recipe, source, progress)
    parts["cache"] = _image_cache(recipe, source, parts["scorer"], list(splits.values()), progress)
    with _main_first():
        model, processing = _load_captioner(parts, recipe, fam, source, adapter, progress)
    try:
        policy = fam.policy(model, processing, cache=parts["cache"], id_column=args.image_id_column,
                            image_column=args.image_column, prompt=recipe.captioner.caption_prompt)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return Run(recipe=recipe, source=source, family=fam, model=model, processing_class=processing, policy=policy,
               language=source.language(data), **parts)


def _rows(run: Run, dataset: Any) -> Any:
    """ClipCap reads cached embeddings: its rows carry no image (an ``image`` column switches on TRL's VLM path).
    A pixel reader gets its images undecoded: the policy decodes each row and names the one that is corrupt,
    where ``datasets`` would fail in the data loader with a bare PIL error."""
    import datasets

    rows = dataset.select_columns(run.family.dataset_columns(dataset.column_names, run.recipe.training))
    column = run.recipe.training.image_column
    if isinstance(rows.features.get(column), datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


def build_trainer(recipe: Recipe, progress: bool = True, run: Run | None = None) -> tuple[Any, Run]:
    """The :class:`~clip_rl_trl.CaptionRLTrainer` of ``recipe`` and its :class:`Run`."""
    from clip_rl_trl.trainer.trainer import CaptionRLTrainer

    run = run or prepare(recipe, progress)
    args = recipe.training
    env = RewardEnv(run.scorer, run.cache, run.train, id_column=args.image_id_column,
                    captions_column=args.captions_column, output_dir=Path(args.output_dir), progress=progress)
    try:
        rewards = build_rewards(recipe.rewards.reward_funcs, recipe.rewards.reward_kwargs or {}, env)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    args.disable_tqdm = args.disable_tqdm or not progress
    try:
        trainer = CaptionRLTrainer(
            model=run.model,
            reward_funcs=rewards,
            args=args,
            train_dataset=_rows(run, run.train),
            eval_dataset=_rows(run, run.eval),
            processing_class=run.processing_class,
            image_cache=run.cache,
            scorer=run.scorer,
            policy=run.policy,
            peft_config=run.family.peft_config(recipe.captioner),
            world=run.language,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build the trainer: {err}") from err
    return trainer, run


def evaluate(run: Run, model: Any, dataset: Any = None, similarity: str = "captions",
             coco_metrics: bool = True) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Caption ``dataset`` (the test split by default) with beam search and score it with the whole suite."""
    from clip_rl_trl.evaluation.captioning import evaluate_policy
    from clip_rl_trl.models.policies import unwrap_peft

    args = run.recipe.training
    tokenizer = getattr(run.processing_class, "tokenizer", run.processing_class)
    return evaluate_policy(
        unwrap_peft(model), run.policy, run.test if dataset is None else dataset, tokenizer=tokenizer,
        scorer=run.scorer, cache=run.cache, id_column=args.image_id_column, captions_column=args.captions_column,
        batch_size=args.per_device_eval_batch_size, generation=args.generation_settings("eval"), language=run.language,
        train_captions=[c for caps in run.train[args.captions_column] for c in caps], similarity=similarity,
        coco_metrics=coco_metrics, seed=args.seed,
    )


def _grid_images(dataset: Any, ids: Sequence[Any], n: int = 16) -> list[Any] | None:
    from clip_rl_trl.clip import load_image

    if "image" not in dataset.column_names:
        return None
    return [load_image(row["image"]) for row in dataset.select(range(min(n, len(ids))))]


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON-able fields for the report: ``hub_token`` left out, any credential-shaped text redacted."""
    record = {}
    for name in ("data", "judge", "captioner", "rewards"):
        record[name] = dataclasses.asdict(getattr(recipe, name))
    record["training"] = {k: v for k, v in recipe.training.to_dict().items() if k not in SECRET_FIELDS}
    return redact(json.loads(json.dumps(record, default=str)))


def train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """``clip-rl-trl train``: evaluate the test split, train, save the model (or adapter) with its processing
    class and model card, evaluate again, and write ``report.json``, ``report.md``, ``captions.jsonl``,
    ``training.png`` (and ``captions.png`` when the images are at hand) into ``output_dir``.

    ``resume_from_checkpoint`` (a folder, or true for the latest in ``output_dir``) resumes; "before" is still
    the starting captioner. Returns ``{"before", "after", "files", "seconds", "output_dir"}``.
    """
    from accelerate import PartialState

    from clip_rl_trl.evaluation import headline_table, write_report

    start = time.perf_counter()
    output_dir = Path(recipe.training.output_dir)
    run = prepare(recipe, progress)
    state = PartialState()
    main = state.is_main_process
    before = before_captions = None
    if main:  # before the trainer switches on gradient checkpointing (no KV cache) and wraps the model
        run.model.to(_device())
        before, before_captions, ids = evaluate(run, run.model)
    trainer, run = build_trainer(recipe, progress, run=run)
    resume = recipe.training.resume_from_checkpoint
    trainer.train(resume_from_checkpoint={"true": True, "false": None}.get(str(resume).lower(), resume))
    state.wait_for_everyone()
    trainer.save_model(os.fspath(output_dir))
    files: dict[str, Path] = {}
    after = None
    if main:
        run.processing_class.save_pretrained(output_dir)  # BLIP / VLM: the processor, not only its tokenizer
        after, after_captions, ids = evaluate(run, trainer.model)
        trainer.last_eval_metrics = {k: v for k, v in after.items() if isinstance(v, (int, float))}
        trainer.create_model_card(dataset_name=run.dataset_label if run.source.name == "hub" else None)
        records = [{"image_id": i, "before": b, "after": a}
                   for i, b, a in zip(ids, before_captions, after_captions, strict=True)]
        files = write_report(
            output_dir, before=before, after=after, captions=records, history=trainer.state.log_history,
            images=_grid_images(run.test, ids),
            title=f"clip-rl-trl: {', '.join(recipe.rewards.reward_funcs)} on {run.dataset_label}",
            extra={"recipe": recipe_record(recipe), "seconds": round(time.perf_counter() - start, 1),
                   "steps": trainer.state.global_step},
        )
        if progress:
            print(headline_table({"before": before, "after": after}, style="plain"))
            print(f"model, model card and report written to {output_dir}")
    state.wait_for_everyone()
    return {"before": before, "after": after, "files": files, "seconds": time.perf_counter() - start,
            "output_dir": output_dir}


def evaluate_saved(recipe: Recipe, model_dir: str | os.PathLike, progress: bool = True,
                   similarity: str = "captions", coco_metrics: bool = True
                   ) -> tuple[dict[str, Any], list[str], list[Any]]:
    """Score a saved captioner (a model folder, or a LoRA adapter over the recipe's captioner) on the recipe's
    test split, without rewards or a trainer."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model folder {os.fspath(model_dir)!r}: no such folder")
    adapter = (model_dir / "adapter_config.json").is_file()
    if not adapter:
        recipe = dataclasses.replace(
            recipe, captioner=dataclasses.replace(recipe.captioner, model_name_or_path=os.fspath(model_dir))
        )
    run = prepare(recipe, progress, adapter=os.fspath(model_dir) if adapter else None)
    run.model.to(_device())
    return evaluate(run, run.model, similarity=similarity, coco_metrics=coco_metrics)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The examples' command line: ``--config recipe.yaml [--toy] [--field value ...]``; errors exit with 2."""
    try:
        return train(parse_recipe(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
