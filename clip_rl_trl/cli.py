"""The ``clip-rl-trl`` command: the offline demo, image-embedding caches and similar-image groups.

    clip-rl-trl demo [--output-dir DIR] [--quick]

    clip-rl-trl embed --dataset DATASET --output cache.safetensors [--clip ViT-B-32 --pretrained openai]
    clip-rl-trl neighbors --cache cache.safetensors --output groups.safetensors [-k 5 --exclude-above 0.8]

``DATASET`` is a folder written by ``datasets.Dataset.save_to_disk``, a Hub dataset name (``--split``), or
``shapes`` for the synthetic shapes world (``--shapes-n``, ``--split``; embedded with the world's tiny CLIP
unless ``--clip`` is given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _load_dataset(name: str, split: str, shapes_n: int):
    if name == "shapes":
        from clip_rl_trl.data.shapes import ShapesWorld

        return ShapesWorld(seed=0).to_dataset(shapes_n, split)
    import datasets

    if Path(name).exists():
        try:
            loaded = datasets.load_from_disk(name)
        except (FileNotFoundError, ValueError) as err:
            raise CliError(f"--dataset {name}: not a folder written by Dataset.save_to_disk ({err})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise CliError(f"--split {split}: the dataset has splits {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # the Hub's errors vary (offline, missing repo, bad split): report them in one line
        raise CliError(f"--dataset {name}: cannot load it ({type(err).__name__}: {err})") from err


def _scorer(args: argparse.Namespace):
    from clip_rl_trl.clip import ClipScorer

    if args.clip is None:
        if args.dataset != "shapes":
            raise CliError("--clip is required (e.g. --clip ViT-B-32 --pretrained openai) unless --dataset shapes")
        from clip_rl_trl.data.shapes import ShapesWorld

        scorer = ShapesWorld(seed=0).train_clip()
    else:
        try:
            scorer = ClipScorer.from_open_clip(args.clip, pretrained=args.pretrained, device=args.device)
        except RuntimeError as err:
            raise CliError(f"--clip {args.clip} --pretrained {args.pretrained}: {err}") from err
    if args.batch_size is not None:
        scorer.batch_size = args.batch_size
    return scorer


def cmd_embed(args: argparse.Namespace) -> None:
    from clip_rl_trl.embeddings import ImageEmbeddingCache

    dataset = _load_dataset(args.dataset, args.split, args.shapes_n)
    scorer = _scorer(args)
    dtype = {"float16": torch.float16, "float32": torch.float32}[args.dtype]
    try:
        cache = ImageEmbeddingCache.build(dataset, scorer, args.image_column, args.id_column, dtype=dtype)
    except ValueError as err:
        raise CliError(str(err)) from err
    path = cache.save(args.output)
    print(f"wrote {len(cache)} embeddings of dimension {cache.dim} to {path}")


def cmd_neighbors(args: argparse.Namespace) -> None:
    from clip_rl_trl.embeddings import ImageEmbeddingCache
    from clip_rl_trl.neighbors import similar_image_groups

    if not Path(args.cache).is_file():
        raise CliError(f"--cache {args.cache}: no such file")
    try:
        cache = ImageEmbeddingCache.load(args.cache)
        groups = similar_image_groups(cache.embeddings.float(), k=args.k, exclude_above=args.exclude_above)
    except ValueError as err:
        raise CliError(str(err)) from err
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({"groups": groups.contiguous()}, args.output, metadata={"cache": str(Path(args.cache).name)})
    print(f"wrote {tuple(groups.shape)} similar-image groups (rows of {args.cache}) to {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    from clip_rl_trl.demo import run_demo

    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output-dir {output}: exists and is not a folder")
    run_demo(output, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-rl-trl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="offline end-to-end demo on the shapes world (CPU, minutes)",
        description="Train the shapes world's tiny CLIP and an MLE ClipCap (cached), fine-tune with Chaffin et "
        "al.'s recipe, evaluate before and after, write report.json, captions.jsonl, report.md and plots.",
    )
    demo.add_argument("--output-dir", default="demo_output", help="folder for the report (default demo_output)")
    demo.add_argument("--quick", action="store_true", help="fewer scenes and steps: a first look, as CI runs it")
    demo.set_defaults(func=cmd_demo)

    embed = sub.add_parser("embed", help="build an ImageEmbeddingCache from a dataset")
    embed.add_argument("--dataset", required=True, help="save_to_disk folder, Hub dataset name, or 'shapes'")
    embed.add_argument("--split", default="train")
    embed.add_argument("--shapes-n", type=int, default=1000, help="number of scenes with --dataset shapes")
    embed.add_argument("--image-column", default="image")
    embed.add_argument("--id-column", default="image_id")
    embed.add_argument("--clip", default=None, help="open_clip architecture, e.g. ViT-B-32")
    embed.add_argument("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai")
    embed.add_argument("--device", default=None)
    embed.add_argument("--batch-size", type=int, default=None)
    embed.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    embed.add_argument("--output", required=True, help="cache file to write (.safetensors)")
    embed.set_defaults(func=cmd_embed)

    neighbors = sub.add_parser("neighbors", help="similar-image groups from an embedding cache")
    neighbors.add_argument("--cache", required=True, help="a cache written by 'clip-rl-trl embed'")
    neighbors.add_argument("-k", type=int, default=5, help="group size (Zhang et al.: 5)")
    neighbors.add_argument("--exclude-above", type=float, default=None, help="drop near-duplicates above this cosine")
    neighbors.add_argument("--output", required=True, help="file to write (.safetensors, tensor 'groups')")
    neighbors.set_defaults(func=cmd_neighbors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as err:
        print(f"clip-rl-trl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
