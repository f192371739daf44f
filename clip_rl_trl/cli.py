"""The ``clip-rl-trl`` command: the offline demo, training from a recipe, evaluation, the Hub, and the caches.

    clip-rl-trl demo [--output-dir DIR] [--quick]

    clip-rl-trl train --config recipe.yaml [--toy] [--output_dir DIR] [--<any recipe field> VALUE ...]
    clip-rl-trl eval --captions captions.jsonl --dataset DATASET [--column caption] [--clip ViT-B-32 ...]
    clip-rl-trl eval --model DIR --config recipe.yaml [--toy] [--<any recipe field> VALUE ...]
    clip-rl-trl push --model DIR --repo-id user/name [--private]

    clip-rl-trl embed --dataset DATASET --output cache.safetensors [--clip ViT-B-32 --pretrained openai]
    clip-rl-trl neighbors --cache cache.safetensors --output groups.safetensors [-k 5 --exclude-above 0.8]
                          [--dataset DATASET --split train [--similarity captions --clip ViT-B-32 ...]]

``DATASET`` is a folder written by ``datasets.Dataset.save_to_disk``, a Hub dataset name (``--split``), a
Karpathy-split JSON file (``dataset_coco.json`` with ``--image-root``), or ``shapes`` for the synthetic shapes
world (``--shapes-n``, ``--split``; embedded with the world's tiny CLIP unless ``--clip`` is given): the data
sources of :mod:`clip_rl_trl.data.sources`, as in a recipe. A recipe (``train``, ``eval --model``, ``demo``) is
parsed by :class:`~clip_rl_trl.RecipeParser`, TRL's ``TrlParser``: every field is a flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clip_rl_trl.neighbors import SIMILARITIES
from clip_rl_trl.study.cli import StudyError, add_study_parser


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _data_config(args: argparse.Namespace, captions_column: str | None = "captions") -> Any:
    from clip_rl_trl.configs import ConfigError, DataConfig

    try:
        return DataConfig(
            dataset_name=args.dataset, image_root=args.image_root, dataset_image_column=getattr(args, "image_column", None),
            dataset_captions_column=captions_column or "captions", dataset_id_column=args.id_column,
        )
    except ConfigError as err:
        raise CliError(f"--dataset: {err}") from err


def _load_dataset(args: argparse.Namespace, n: int | None, captions_column: str | None = None):
    """One split of ``--dataset`` through the data-source registry (``--shapes-n`` scenes of the shapes world);
    ``captions_column`` None: the images only."""
    from clip_rl_trl.data.sources import load_split

    config = _data_config(args, captions_column)
    try:
        return load_split(config, args.split, n if args.dataset == "shapes" else None,
                          captions=captions_column is not None)
    except ValueError as err:
        raise CliError(f"--dataset {args.dataset}: {err}") from err


def _scorer(args: argparse.Namespace):
    from clip_rl_trl.clip import ClipScorer

    if args.clip is None:
        if args.dataset != "shapes":
            raise CliError(
                "--clip is required (e.g. --clip ViT-B-32 --pretrained openai) unless --dataset shapes"
            )
        from clip_rl_trl.data.sources import data_source

        config = _data_config(args)
        scorer = data_source(config).judge(config, True, progress=True)
    else:
        try:
            scorer = ClipScorer.from_open_clip(args.clip, pretrained=args.pretrained, device=args.device)
        except RuntimeError as err:
            raise CliError(f"--clip {args.clip} --pretrained {args.pretrained}: {err}") from err
    if args.batch_size is not None:
        scorer.batch_size = args.batch_size
    return scorer


def cmd_embed(args: argparse.Namespace) -> None:
    from clip_rl_trl.embeddings import ImageEmbeddingCache, UnreadableImagesError

    dataset = _load_dataset(args, args.shapes_n)
    scorer = _scorer(args)
    dtype = {"float16": torch.float16, "float32": torch.float32}[args.dtype]
    try:
        cache = ImageEmbeddingCache.build(dataset, scorer, dtype=dtype, skip_bad_images=args.skip_bad_images)
    except UnreadableImagesError as err:
        hint = "no image is left to cache" if args.skip_bad_images else "--skip-bad-images caches the others"
        raise CliError(str(UnreadableImagesError(err.bad_images, err.total, hint))) from err
    except ValueError as err:
        raise CliError(str(err)) from err
    path = cache.save(args.output)
    print(f"wrote {len(cache)} embeddings of dimension {cache.dim} to {path}")
    if args.skip_bad_images:
        report = Path(f"{args.output}.bad_images.jsonl")
        report.write_text("".join(json.dumps(b._asdict()) + "\n" for b in cache.bad_images), encoding="utf-8")
        print(f"skipped {len(cache.bad_images)} unreadable image(s), listed in {report}")


def cmd_neighbors(args: argparse.Namespace) -> None:
    from clip_rl_trl.embeddings import ImageEmbeddingCache
    from clip_rl_trl.neighbors import groups_within_split

    if not Path(args.cache).is_file():
        raise CliError(f"--cache {args.cache}: no such file")
    if args.similarity == "captions" and args.dataset is None:
        raise CliError(
            "--similarity captions (Zhang et al. Eq. 2) needs --dataset: the split's reference captions"
        )
    try:
        cache = ImageEmbeddingCache.load(args.cache)
    except ValueError as err:
        raise CliError(f"--cache {args.cache}: {err}") from err
    rows = refs = scorer = None
    if args.dataset is not None:
        # The pool is the split's images only: a held-out image is never a training image's negative.
        dataset = _load_dataset(args, args.shapes_n, args.refs_column if args.similarity == "captions" else None)
        ids = dataset["image_id"]
        try:
            rows = cache.rows(ids)
        except KeyError as err:
            raise CliError(f"--cache {args.cache}: {err.args[0]} (split {args.split} of --dataset)") from err
        if args.similarity == "captions":
            refs = dataset["captions"]
            scorer = _scorer(args)
            if scorer.embed_dim != cache.dim:
                raise CliError(
                    f"--clip {args.clip}: embeds in {scorer.embed_dim} dimensions but --cache holds "
                    f"{cache.dim}: use the CLIP that built the cache"
                )
    emb = cache.embeddings if rows is None else cache.embeddings[rows]
    try:
        found = groups_within_split(
            emb.float(),
            args.k,
            similarity=args.similarity,
            scorer=scorer,
            refs=refs,
            exclude_above=args.exclude_above,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    if rows is None:
        groups = found
    else:  # rows of the cache; the images outside the split have no group (-1)
        groups = torch.full((len(cache), args.k), -1, dtype=torch.long).index_copy_(0, rows, rows[found])
    metadata = {"cache": Path(args.cache).name, "similarity": args.similarity, "k": str(args.k)}
    if args.dataset is not None:
        metadata["split"] = args.split
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({"groups": groups.contiguous()}, args.output, metadata=metadata)
    pool = (
        f"the {len(found)} images of split {args.split}" if rows is not None else f"all {len(cache)} images"
    )
    print(
        f"wrote {tuple(groups.shape)} similar-image groups (rows of {args.cache}, {args.similarity} "
        f"similarity, within {pool}) to {args.output}"
    )


def _parse_recipe(argv: Sequence[str], command: str = "train") -> Any:
    from clip_rl_trl.configs import ConfigError, parse_recipe

    if "--config" not in argv:
        raise CliError("--config is required (a recipe YAML, e.g. examples/configs/bidir_coco.yaml)")
    try:
        recipe = parse_recipe(argv, prog=f"clip-rl-trl {command}")
    except ConfigError as err:
        raise CliError(str(err)) from err
    return recipe


def _train(argv: Sequence[str]) -> None:
    from clip_rl_trl.configs import ConfigError
    from clip_rl_trl.pipeline import train

    recipe = _parse_recipe(argv)
    try:
        train(recipe)
    except ConfigError as err:
        raise CliError(str(err)) from err


def cmd_demo(args: argparse.Namespace) -> None:
    """The packaged shapes-world recipe (Chaffin et al.'s full method) through the pipeline; --quick: its toy."""
    _train(["--config", "shapes_demo", "--output_dir", args.output_dir, *(["--toy"] if args.quick else [])])


def _metric_table(metrics: dict[str, Any]) -> str:
    """One row per metric: the suite has too many metrics for one terminal-wide row."""
    from clip_rl_trl.evaluation import format_table

    rows = {
        k: {"value": v} for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return format_table(rows, ["value"], floatfmt=".4f", style="plain")


def _write_metrics(metrics: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(_metric_table(metrics))
    for key, reason in metrics.get("skipped", {}).items():
        print(f"not measured: {key}: {reason}")
    print(f"metrics written to {path}")


def cmd_train(args: argparse.Namespace) -> None:
    _train(args.recipe_args)


def _shapes_size(ids: Sequence[Any], split: str) -> int:
    """How many scenes of ``split`` cover the shapes-world ids (``"test-000123"``)."""
    indices = []
    for image_id in ids:
        prefix, _, number = str(image_id).rpartition("-")
        if prefix != split or not number.isdigit():
            raise CliError(
                f"--captions: image_id {image_id!r} is not a scene of the shapes world's split {split!r}"
            )
        indices.append(int(number))
    return max(indices) + 1


def _evaluate_file(args: argparse.Namespace) -> None:
    from clip_rl_trl.embeddings import ImageEmbeddingCache
    from clip_rl_trl.evaluation.captions_file import read_captions
    from clip_rl_trl.evaluation.evaluate import evaluate_captions
    from clip_rl_trl.neighbors import groups_within_split

    try:
        captions = read_captions(args.captions, args.column)
    except ValueError as err:
        raise CliError(f"--captions: {err} (--column {args.column})") from err
    shapes = args.dataset == "shapes"
    n = args.shapes_n or (_shapes_size([i for i, _ in captions.values()], args.split) if shapes else None)
    has_refs = True
    try:
        dataset = _load_dataset(args, n, args.refs_column)
    except CliError as err:  # references are optional here: without them, no reference-based metrics
        if f"no column {args.refs_column!r}" not in str(err):
            raise
        dataset, has_refs = _load_dataset(args, n), False
    position = {str(i): row for row, i in enumerate(dataset["image_id"])}
    missing = [image_id for key, (image_id, _) in captions.items() if key not in position]
    if missing:
        raise CliError(
            f"--captions {args.captions}: {len(missing)} image id(s) are not in --dataset {args.dataset} "
            f"(split {args.split}), e.g. {missing[:3]}"
        )
    rows = dataset.select([position[key] for key in captions])
    ids = rows["image_id"]
    scorer = _scorer(args)
    if args.cache is not None:
        if not Path(args.cache).is_file():
            raise CliError(f"--cache {args.cache}: no such file")
        cache = ImageEmbeddingCache.load(args.cache)
    else:
        cache = ImageEmbeddingCache.build(rows, scorer)
    try:
        image_emb = cache[ids].float()
    except KeyError as err:
        raise CliError(f"--cache {args.cache}: {err.args[0]}") from err
    refs = rows["captions"] if has_refs else None
    similarity = args.similarity
    if similarity == "captions" and refs is None:
        print(f"GEG groups by image cosine: no --refs-column {args.refs_column!r} for Zhang et al.'s Eq. 2")
        similarity = "image"
    try:
        # Within the scored images of --split (Zhang et al. build the groups within each split).
        groups = (
            groups_within_split(image_emb, args.k, similarity=similarity, scorer=scorer, refs=refs)
            if len(ids) > args.k
            else None
        )
    except ValueError as err:
        raise CliError(f"-k {args.k}: {err}") from err
    from clip_rl_trl.data.sources import data_source

    config = _data_config(args)
    world = data_source(config).language(config)
    scenes = rows["scene"] if world is not None else None
    try:
        metrics = evaluate_captions(
            [caption for _, caption in captions.values()],
            image_emb,
            scorer,
            refs=refs,
            groups=groups,
            world=world,
            scenes=scenes,
            coco_metrics=not args.no_coco_metrics,
        )
    except ValueError as err:
        raise CliError(f"--captions {args.captions}: {err}") from err
    output = Path(args.output) if args.output else Path(args.captions).with_suffix(".metrics.json")
    _write_metrics(metrics, output)


def _evaluate_model(args: argparse.Namespace) -> None:
    from clip_rl_trl.configs import ConfigError
    from clip_rl_trl.pipeline import evaluate_saved

    recipe = _parse_recipe(args.recipe_args, "eval")
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CliError(f"--model {args.model}: no such folder")
    try:
        metrics, captions, ids = evaluate_saved(recipe, model_dir, similarity=args.similarity,
                                                coco_metrics=not args.no_coco_metrics)
    except ConfigError as err:
        raise CliError(f"--config: {err}") from err
    output = Path(args.output) if args.output else model_dir / "eval_metrics.json"
    lines = [json.dumps({"image_id": i, "caption": c}, ensure_ascii=False) for i, c in zip(ids, captions, strict=True)]
    output.with_suffix(".captions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    _write_metrics(metrics, output)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.model is not None:
        _evaluate_model(args)
    else:
        if args.dataset is None:
            raise CliError("--captions needs --dataset (the images and references the captions describe)")
        if args.recipe_args:
            raise CliError(f"unrecognized arguments: {' '.join(args.recipe_args)} (recipe flags go with --model)")
        _evaluate_file(args)


PUSH_IGNORE = ("checkpoint-*", "checkpoint-*/**", "runs/**", "image_embeddings.safetensors", ".report-*")


def cmd_push(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from clip_rl_trl.credentials import find_credentials

    folder = Path(args.model)
    if not folder.is_dir():
        raise CliError(f"--model {args.model}: no such folder")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise CliError(
            f"--model {args.model}: no saved model in it (config.json or adapter_config.json); pass the "
            "output folder of 'clip-rl-trl train'"
        )
    if not (folder / "README.md").is_file():
        raise CliError(f"--model {args.model}: no README.md model card (CaptionRLTrainer.create_model_card writes it)")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as err:
        raise CliError(f"--repo-id {args.repo_id}: {err}") from err
    found = find_credentials(folder, PUSH_IGNORE)
    if found:
        raise CliError(f"--model {args.model}: refusing to upload what looks like a credential: "
                       + "; ".join(f"{kind} in {path}" for path, kind in found) + " (remove it, then push)")
    if constants.HF_HUB_OFFLINE:
        raise CliError("cannot push while HF_HUB_OFFLINE=1 is set: pushing needs the network (unset it, log in)")
    api = HfApi()
    try:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            commit_message=args.commit_message,
            ignore_patterns=list(PUSH_IGNORE),
        )
    except Exception as err:  # network, authentication, permission: the Hub's errors vary, report them in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"--repo-id {args.repo_id}: push failed ({type(err).__name__}: {reason})") from err
    print(f"pushed {folder} to {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-rl-trl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="offline end-to-end demo on the shapes world (CPU, minutes)",
        description="Train the shapes world's tiny CLIP and an MLE ClipCap (cached), fine-tune with "
        "Chaffin et al.'s recipe, evaluate before and after, write report.json, captions.jsonl, report.md "
        "and plots.",
    )
    demo.add_argument(
        "--output-dir", default="demo_output", help="folder for the report (default demo_output)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="fewer scenes and steps: a first look, as CI runs it"
    )
    demo.set_defaults(func=cmd_demo)

    embed = sub.add_parser("embed", help="build an ImageEmbeddingCache from a dataset")
    embed.add_argument(
        "--dataset",
        required=True,
        help="save_to_disk folder, Hub dataset name, Karpathy JSON file, or 'shapes'",
    )
    embed.add_argument("--split", default="train")
    embed.add_argument("--image-root", default=None, help="image folder of a Karpathy JSON --dataset")
    embed.add_argument("--shapes-n", type=int, default=1000, help="number of scenes with --dataset shapes")
    embed.add_argument("--image-column", default="image")
    embed.add_argument("--id-column", default="image_id")
    _add_clip_flags(embed)
    embed.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    embed.add_argument("--output", required=True, help="cache file to write (.safetensors)")
    embed.add_argument("--skip-bad-images", action="store_true", help="cache the readable images; list the "
                       "others in <output>.bad_images.jsonl (default: fail, listing every unreadable image)")
    embed.set_defaults(func=cmd_embed)

    neighbors = sub.add_parser(
        "neighbors",
        help="similar-image groups from an embedding cache",
        description="The k most similar other images of each image, as a (len(cache), k) tensor 'groups' of "
        "cache rows. With --dataset the candidates are the images of --split only (Zhang et al. build the "
        "groups within each split); the cache's other rows are -1. --similarity captions is Zhang et al.'s "
        "Eq. 2: an image is scored through the other image's reference captions, encoded by --clip.",
    )
    neighbors.add_argument("--cache", required=True, help="a cache written by 'clip-rl-trl embed'")
    neighbors.add_argument("-k", type=int, default=5, help="group size (Zhang et al.: 5)")
    neighbors.add_argument(
        "--exclude-above", type=float, default=None, help="drop near-duplicates above this similarity"
    )
    neighbors.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default="image",
        help="image: image cosine; captions: Zhang et al. Eq. 2, max cosine with the other image's "
        "references (needs --dataset)",
    )
    neighbors.add_argument(
        "--dataset",
        default=None,
        help="restrict the pool to one split of this dataset (save_to_disk folder, Hub dataset name, "
        "Karpathy JSON file, or 'shapes'); it also holds the references of --similarity captions",
    )
    neighbors.add_argument("--split", default="train")
    neighbors.add_argument("--image-root", default=None, help="image folder of a Karpathy JSON --dataset")
    neighbors.add_argument(
        "--shapes-n", type=int, default=1000, help="number of scenes with --dataset shapes"
    )
    neighbors.add_argument("--id-column", default="image_id")
    neighbors.add_argument("--refs-column", default="captions", help="reference captions of --dataset")
    _add_clip_flags(neighbors, "the CLIP that built --cache, to encode the references")
    neighbors.add_argument("--output", required=True, help="file to write (.safetensors, tensor 'groups')")
    neighbors.set_defaults(func=cmd_neighbors)

    _add_train(sub)
    _add_eval(sub)
    _add_push(sub)
    add_study_parser(sub)
    return parser


def _add_clip_flags(parser: argparse.ArgumentParser, what: str = "the CLIP judge") -> None:
    parser.add_argument("--clip", default=None, help=f"open_clip architecture of {what}, e.g. ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=None)


_RECIPE_HELP = (
    "--config RECIPE [--toy] [--output_dir DIR] [--FIELD VALUE ...]: a recipe (YAML, or a packaged name such "
    "as shapes_demo) and overrides of any of its fields, parsed by TrlParser (`clip-rl-trl train --config X "
    "--help` lists every field); --toy runs the recipe's toy section on the shapes world"
)


def _add_train(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune a captioner from a recipe",
        description="Train the recipe's captioner with its rewards and CaptionRLConfig settings; evaluate "
        "the test split before and after; write the model, its model card (README.md), report.json, "
        "report.md, captions.jsonl and training.png into output_dir. Recipes: docs/examples.md. "
        + _RECIPE_HELP,
        add_help=False,
    )
    train.add_argument("-h", "--help", action="store_true", help="this help; with --config, every recipe field")
    train.set_defaults(func=cmd_train)


def _add_eval(sub: Any) -> None:
    evaluate = sub.add_parser(
        "eval",
        help="every metric of a captions file, or of a saved model on a recipe's test split",
        description="Score captions with evaluate_captions (retrieval R@K and P@1/100, GEG, CLIP-S, "
        "RefCLIP-S, BLEU/METEOR/ROUGE-L/CIDEr/SPICE, diversity; grammar and attributes in the shapes "
        "world). Either --captions FILE --dataset DATASET, or --model DIR --config RECIPE.",
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--captions", help="JSON lines with image_id and a caption column, or a JSON list / map"
    )
    source.add_argument(
        "--model", help="a model folder written by 'clip-rl-trl train', scored on the test split of the recipe "
        "given after it: " + _RECIPE_HELP
    )
    evaluate.add_argument(
        "--column",
        default="caption",
        help="the caption field of --captions (the demo's captions.jsonl: before or after)",
    )
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="save_to_disk folder, Hub dataset name, Karpathy JSON file, or 'shapes'",
    )
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--image-root", default=None, help="image folder of a Karpathy JSON --dataset")
    evaluate.add_argument(
        "--shapes-n",
        type=int,
        default=None,
        help="scenes of --dataset shapes (default: enough for the captions' ids)",
    )
    evaluate.add_argument("--image-column", default="image")
    evaluate.add_argument("--id-column", default="image_id")
    evaluate.add_argument(
        "--refs-column", default="captions", help="reference captions (absent: no NLG metrics)"
    )
    _add_clip_flags(evaluate)
    evaluate.add_argument(
        "--cache", default=None, help="image embeddings from 'clip-rl-trl embed' (same CLIP)"
    )
    evaluate.add_argument("-k", type=int, default=5, help="similar-image group size of GEG (Zhang et al.: 5)")
    evaluate.add_argument(
        "--similarity",
        choices=SIMILARITIES,
        default="captions",
        help="how GEG's groups are found among the scored images: captions (default) is Zhang et al. Eq. 2 "
        "through the references (image cosine when there are none), image is image cosine",
    )
    evaluate.add_argument(
        "--no-coco-metrics", action="store_true", help="skip BLEU/METEOR/ROUGE-L/CIDEr/SPICE"
    )
    evaluate.add_argument(
        "--output",
        default=None,
        help="metrics JSON (default: <captions>.metrics.json, or <model>/eval_metrics.json)",
    )
    evaluate.set_defaults(func=cmd_eval)


def _add_push(sub: Any) -> None:
    push = sub.add_parser(
        "push",
        help="upload a trained model folder and its model card to the Hugging Face Hub",
        description="Create the Hub repository (if needed) and upload the folder written by "
        "'clip-rl-trl train' (model or LoRA adapter, tokenizer, README.md model card, report), without "
        "checkpoints. Needs the network and a token ('hf auth login' or HF_TOKEN).",
    )
    push.add_argument("--model", required=True, help="the output folder of 'clip-rl-trl train'")
    push.add_argument("--repo-id", required=True, help="user/name or org/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Upload captioner trained with clip-rl-trl")
    push.set_defaults(func=cmd_push)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train" and args.help:
        if "--config" not in rest:
            _print_train_help(parser)
            raise SystemExit(0)
        rest.append("--help")
    if rest and args.command not in ("train", "eval"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.recipe_args = rest
    try:
        args.func(args)
    except (CliError, StudyError) as err:
        print(f"clip-rl-trl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _print_train_help(parser: argparse.ArgumentParser) -> None:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    sub.choices["train"].print_help()


if __name__ == "__main__":
    sys.exit(main())
