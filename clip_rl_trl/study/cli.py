"""``clip-rl-trl study``: create, serve, export, simulate and read a human discrimination study.

    clip-rl-trl study create --output DIR --system NAME=PATH[:COLUMN] [--system ...]
                             (--dataset shapes|DATASET [--split test] | --images FOLDER) [-k 4] [--n-images N]
                             [--seed 0] [--distractors random|similar] [--pairwise] [--fluency]
                             [--judge source | --clip ViT-B-32 --pretrained openai]
    clip-rl-trl study serve DIR [--host 127.0.0.1] [--port 8000] [--answers DIR/answers.jsonl]
    clip-rl-trl study export DIR --output BUNDLE [--zip]
    clip-rl-trl study simulate DIR [--annotators 3] [--error-rate 0.1] [--output DIR/simulated_answers.jsonl]
    clip-rl-trl study results DIR [--answers FILE ...] [--output DIR/results]

The parser and commands live here; ``clip_rl_trl.cli`` only hooks them in. Heavy imports (torch, datasets, the
web stack) happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["StudyError", "add_study_parser"]

INSTALL_HINT = "pip install 'clip-rl-trl[study]'"


class StudyError(Exception):
    """A user error of a study command: printed as one line, exit status 2 (as ``CliError``)."""


def _study(folder: str) -> Any:
    from clip_rl_trl.study.design import load_study

    try:
        return load_study(folder)
    except ValueError as err:
        raise StudyError(str(err)) from err


def cmd_create(args: argparse.Namespace) -> None:
    from clip_rl_trl.evaluation.captions_file import read_captions
    from clip_rl_trl.study.design import create_study, parse_system
    from clip_rl_trl.study.images import dataset_images, folder_images

    if (args.images is None) == (args.dataset is None):
        raise StudyError("give the images: --dataset (shapes, a dataset folder or name) or --images FOLDER")
    if args.judge == "source" and args.clip:
        raise StudyError("--judge source and --clip are two judges: pick one")
    try:
        specs = [parse_system(s) for s in args.system]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"--system names must be unique, got {names}")
        systems = {}
        for spec in specs:
            captions = read_captions(spec.path, spec.column)
            systems[spec.name] = {key: caption for key, (_, caption) in captions.items()}
        ids = sorted(set.intersection(*(set(c) for c in systems.values())))
        if args.images is not None:
            pool = folder_images(args.images, ids)
        else:
            pool = dataset_images(args.dataset, ids, args.split, image_root=args.image_root,
                                  world_seed=args.world_seed)
        judge, judge_name = _judge(args)
        study = create_study(
            args.output, systems, pool, specs=specs, k=args.k, n_images=args.n_images, seed=args.seed,
            distractors=args.distractors, pairwise=args.pairwise, fluency=args.fluency, judge=judge,
            judge_name=judge_name, title=args.title, image_format=args.image_format, max_side=args.max_side,
        )
    except ValueError as err:
        raise StudyError(str(err)) from err
    kinds: dict[str, int] = {}
    for trial in study.trials:
        kinds[trial["kind"]] = kinds.get(trial["kind"], 0) + 1
    print(f"wrote study {study.study_id} to {args.output}: {len(study.trials)} trials "
          f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), {len(study.image_files)} images, "
          f"systems {', '.join(study.systems)}")


def _judge(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The CLIP judge that records its own choice per trial: the data source's own (``--judge source``, the
    shapes world's tiny CLIP) or an open_clip model (``--clip``)."""
    if args.clip:
        from clip_rl_trl.clip import ClipScorer

        try:
            scorer = ClipScorer.from_open_clip(args.clip, pretrained=args.pretrained, device=args.device)
        except RuntimeError as err:
            raise StudyError(f"--clip {args.clip} --pretrained {args.pretrained}: {err}") from err
        return scorer, f"open_clip {args.clip} ({args.pretrained})"
    if args.judge == "source":
        if args.dataset is None:
            raise StudyError("--judge source needs --dataset (the source whose own judge to use)")
        from clip_rl_trl.configs import DataConfig
        from clip_rl_trl.data.sources import data_source

        config = DataConfig(dataset_name=args.dataset, image_root=args.image_root, world_seed=args.world_seed)
        scorer = data_source(config).judge(config, True, progress=True)
        if scorer is None:
            raise StudyError(f"--judge source: --dataset {args.dataset} has no judge of its own; use --clip")
        return scorer, f"{args.dataset} source judge"
    return None, None


def cmd_serve(args: argparse.Namespace) -> None:
    study = _study(args.study)
    try:
        from clip_rl_trl.study.server import serve
    except ImportError as err:
        raise StudyError(f"serving needs the web extra ({err.name} is missing): {INSTALL_HINT}") from err
    answers = Path(args.answers) if args.answers else study.folder / "answers.jsonl"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving study {study.study_id} ({len(study.trials)} trials) at http://{host}:{args.port}/ ; "
          f"answers are appended to {answers}; Ctrl-C stops")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {args.host} lets anyone who can reach this machine answer the study")
    try:
        serve(study, answers, args.host, args.port)
    except ValueError as err:  # the answers file belongs to another study, or is damaged
        raise StudyError(str(err)) from err


def cmd_export(args: argparse.Namespace) -> None:
    from clip_rl_trl.study.export import export_bundle

    study = _study(args.study)
    try:
        index = export_bundle(study, args.output, zip_file=args.zip)
    except ValueError as err:
        raise StudyError(str(err)) from err
    print(f"wrote the static bundle of study {study.study_id} to {index.parent} (open {index})"
          + (f" and {index.parent}.zip" if args.zip else ""))


def cmd_simulate(args: argparse.Namespace) -> None:
    from clip_rl_trl.study.answers import write_answers
    from clip_rl_trl.study.simulate import simulate_answers

    study = _study(args.study)
    output = Path(args.output) if args.output else study.folder / "simulated_answers.jsonl"
    try:
        records = simulate_answers(study, args.annotators, args.error_rate, args.seed)
    except ValueError as err:
        raise StudyError(str(err)) from err
    n = write_answers(output, records)
    print(f"wrote {n} simulated answers ({args.annotators} annotator(s), error rate {args.error_rate}) to {output}")


def cmd_results(args: argparse.Namespace) -> None:
    from clip_rl_trl.study.answers import read_answers
    from clip_rl_trl.study.results import format_results, plot_results, study_results

    study = _study(args.study)
    paths = args.answers or [study.folder / "answers.jsonl"]
    try:
        records = read_answers(study, paths)
    except ValueError as err:
        raise StudyError(str(err)) from err
    if not records:
        raise StudyError(f"no answers in {', '.join(map(str, paths))}")
    results = study_results(study, records)
    out = Path(args.output) if args.output else study.folder / "results"
    out.mkdir(parents=True, exist_ok=True)
    report = format_results(results)
    (out / "results.md").write_text(report, "utf-8")
    (out / "results.json").write_text(json.dumps(_json_ready(results), indent=2, ensure_ascii=False) + "\n", "utf-8")
    plot_results(results, out / "results.png")
    print(report)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")


def _json_ready(value: Any) -> Any:
    """NaN (an undefined kappa, an empty rate) as null: results.json stays standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def add_study_parser(sub: Any) -> None:
    """Add ``study`` and its sub-commands to the ``clip-rl-trl`` sub-parsers ``sub``."""
    study = sub.add_parser(
        "study", help="a human discrimination study in the browser: create, serve, export, simulate, results",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = study.add_subparsers(dest="study_command", required=True, metavar="STUDY_COMMAND")

    create = commands.add_parser("create", help="build a study folder from caption files and images",
                                 description="Build a study folder (study.json and images/) from caption files.")
    create.add_argument("--output", required=True, help="the new study folder")
    create.add_argument("--system", action="append", required=True, metavar="NAME=PATH[:COLUMN]",
                        help="a system: its captions file (JSONL from 'clip-rl-trl eval' or a report's "
                        "captions.jsonl) and caption column (default caption); repeat per system")
    create.add_argument("--dataset", default=None, help="where the images are: 'shapes' (rendered by the world), "
                        "a save_to_disk folder, a Hub dataset name or a Karpathy JSON file (with --image-root)")
    create.add_argument("--split", default="test", help="split of --dataset (default test)")
    create.add_argument("--image-root", default=None, help="image folder of a Karpathy JSON --dataset")
    create.add_argument("--world-seed", type=int, default=0, help="seed of the shapes world (default 0)")
    create.add_argument("--images", default=None, help="a folder of images named <image_id>[.png|.jpg|...]")
    create.add_argument("-k", type=int, default=4, help="candidate images per trial, target included (default 4)")
    create.add_argument("--n-images", type=int, default=None, help="target images drawn (default: all captioned)")
    create.add_argument("--seed", type=int, default=0, help="seed of the draws and of the trial order")
    create.add_argument("--distractors", choices=("random", "similar"), default="random",
                        help="random other images (default), or the target's CLIP nearest neighbours (needs a judge)")
    create.add_argument("--pairwise", action="store_true", help="add pairwise trials: two systems' captions")
    create.add_argument("--fluency", action="store_true", help="add a fluency rating (1-5) per caption")
    create.add_argument("--judge", choices=("none", "source"), default="none",
                        help="source: record the data source's own CLIP judge's choices (the shapes world's)")
    create.add_argument("--clip", default=None, help="record the choices of this open_clip model, e.g. ViT-B-32")
    create.add_argument("--pretrained", default=None, help="open_clip pretrained tag of --clip, e.g. openai")
    create.add_argument("--device", default=None, help="device of --clip")
    create.add_argument("--title", default="Caption study", help="the page's title (shown to annotators)")
    create.add_argument("--image-format", choices=("auto", "png", "jpeg"), default="auto",
                        help="auto: PNG up to 256 px a side, JPEG above")
    create.add_argument("--max-side", type=int, default=512, help="downscale larger images to this (pixels)")
    create.set_defaults(func=cmd_create)

    serve = commands.add_parser("serve", help="serve the study's page to annotators (needs the study extra)")
    serve.add_argument("study", help="a folder written by 'study create'")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--answers", default=None, help="answers JSONL (default <study>/answers.jsonl)")
    serve.set_defaults(func=cmd_serve)

    export = commands.add_parser("export", help="a static HTML bundle for a crowdsourcing platform")
    export.add_argument("study")
    export.add_argument("--output", required=True, help="the new bundle folder")
    export.add_argument("--zip", action="store_true", help="also write <output>.zip")
    export.set_defaults(func=cmd_export)

    simulate = commands.add_parser("simulate", help="answers of simulated annotators (shapes-world studies)")
    simulate.add_argument("study")
    simulate.add_argument("--annotators", type=int, default=3)
    simulate.add_argument("--error-rate", type=float, default=0.0, help="chance of a uniformly random answer")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--output", default=None, help="default <study>/simulated_answers.jsonl")
    simulate.set_defaults(func=cmd_simulate)

    results = commands.add_parser("results", help="accuracy, intervals, tests and agreement from the answers")
    results.add_argument("study")
    results.add_argument("--answers", nargs="+", default=None,
                         help="answers JSONL files (served, downloaded or simulated; default <study>/answers.jsonl)")
    results.add_argument("--output", default=None, help="folder for results.md/.json/.png (default <study>/results)")
    results.set_defaults(func=cmd_results)
