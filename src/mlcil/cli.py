"""Command line: ``mlcil train | eval | predict | data | list | configs | compare | pretrain |
weights | report | torchrun`` (also ``python -m mlcil``)."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mlcil.errors import MlcilError, clip
from mlcil.safety import (
    MAX_BATCH_SIZE,
    MAX_JOBS,
    MAX_MAP_TOLERANCE,
    MAX_SEED,
    MAX_SYNTHETIC_IMAGES,
    bounded_int,
    finite_positive,
    map_tolerance,
    unit_interval,
)
from mlcil.version import __version__

if TYPE_CHECKING:
    from mlcil.runs import Launch

logger = logging.getLogger("mlcil.cli")

# The commands, in the order `mlcil --help` lists them (build_parser adds one parser each).
COMMANDS = ("train", "eval", "predict", "data", "list", "configs", "compare", "pretrain",
            "report", "weights", "torchrun")  # fmt: skip

# The console handler main() installs, if it installed one (a host that set up logging, such as
# pytest, keeps its own handlers untouched).
_console: logging.Handler | None = None

# The run folder `mlcil train` works on once it is known (None before, and for other commands):
# a failure or Ctrl-C message says what of that run is kept.
_started: list[Path | None] = [None]


def _split_overrides(values: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from config paths given positionally."""
    overrides = [v for v in values if "=" in v]
    paths = [v for v in values if "=" not in v]
    return paths, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from mlcil.report import session_table

    extra_paths, overrides = _split_overrides(args.overrides)
    if extra_paths:
        raise MlcilError(
            f"unexpected argument {extra_paths[0]!r}: overrides are key=value, configs go "
            "after --config"
        )
    if args.print_config:
        return _print_config(args, overrides)
    if args.quiet:  # no progress bars either (a run-time setting: --resume accepts it)
        overrides = ["train.progress=false", *overrides]
    if args.resume and not args.dry_run:
        _started[0] = Path(args.resume)  # what an error or Ctrl-C message reports on
    launch = _resumed_launch(args, overrides) if args.resume else _new_launch(args, overrides)
    if launch is None:
        return 0
    trainer = launch.trainer
    _started[0] = trainer.run_dir
    if not trainer.runtime.is_main:  # under torchrun, rank 0 logs progress
        logging.getLogger().setLevel(logging.WARNING)
    metrics = launch.run(max_sessions=args.max_sessions)
    if not trainer.runtime.is_main:  # under torchrun, rank 0 reports
        return 0
    if metrics is None:
        where = trainer.stopped or f"after session {trainer.next_session - 1}"
        print(f"stopped {where}; continue with:")
        print(f"  mlcil train --resume {trainer.run_dir}")
        return 0
    if args.resume:
        from mlcil.added_sessions import annotate_metrics

        annotate_metrics(trainer.run_dir, metrics)
    print(session_table(metrics))
    print(f"results: {trainer.run_dir}/metrics.json  plot: {trainer.run_dir}/map_per_session.png")
    return 0


def _print_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """``--print-config``: the resolved config as YAML (what config.yaml would hold)."""
    from mlcil.experiment import load_config

    if args.resume or not args.config:
        raise MlcilError(
            "--print-config goes with --config (a run's resolved config is its config.yaml)"
        )
    print(load_config(args.config, overrides).to_yaml(), end="")
    return 0


def _new_launch(args: argparse.Namespace, overrides: list[str]) -> Launch | None:
    """A new run, ready to train; None after a dry run. Nothing of an earlier run is touched
    before config, data, image files, image size and weights are all checked."""
    from mlcil.experiment import Experiment, load_config
    from mlcil.requirements import check_run_requirements
    from mlcil.rundir import RunDir
    from mlcil.runs import make_runtime, start_run

    if args.add_session or args.test_manifest:
        raise MlcilError("--add-session and --test-manifest extend a finished run: use --resume")
    if not args.config:
        raise MlcilError(
            "mlcil train needs --config FILE or NAME (`mlcil configs` lists the shipped ones), "
            "or --resume RUN_DIR"
        )
    config = load_config(args.config, overrides)
    if args.dry_run:  # what a run checks before any work (start_run does it otherwise)
        check_run_requirements(config, weights=False)  # the summary reports the weights
    runtime = make_runtime(config)
    if args.dry_run:
        from mlcil.report import dry_run_summary

        run = (
            RunDir(args.run_dir)
            if args.run_dir
            else RunDir.inside(config.output_dir, config.run_name)
        )
        _print_main(dry_run_summary(Experiment(config, runtime=runtime), run.path))
        return None
    return start_run(config, args.run_dir, overwrite=args.overwrite, runtime=runtime)


def _resumed_launch(args: argparse.Namespace, overrides: list[str]) -> Launch | None:
    """A launch that continues ``--resume RUN``, with one more session with ``--add-session``.
    With ``--dry-run``, prints the plan (the added session included) and returns None."""
    from mlcil.requirements import check_run_requirements
    from mlcil.runs import open_run, resume_run

    for flag, value in (("--config", args.config), ("--run-dir", args.run_dir)):
        if value:
            raise MlcilError(f"{flag} cannot be combined with --resume (the run keeps its own)")
    if args.overwrite:
        raise MlcilError("--overwrite cannot be combined with --resume")
    if args.test_manifest and not args.add_session:
        raise MlcilError("--test-manifest goes with --add-session TRAIN_MANIFEST")
    manifests = {"add_session": args.add_session, "test_manifest": args.test_manifest}
    if args.dry_run:
        from mlcil.report import dry_run_summary

        opened, _ = open_run(args.resume, overrides, resuming=True, **manifests)
        check_run_requirements(opened.config, weights=False)
        _print_main(dry_run_summary(opened.experiment, opened.run.path))
        return None
    return resume_run(args.resume, overrides, **manifests)


def cmd_eval(args: argparse.Namespace) -> int:
    from mlcil.runs import evaluate_run

    result = evaluate_run(args.run)
    recorded = result["recorded_map"]
    print(
        f"{args.run}: session {result['session']} seen mAP {result['seen_map']:.4f} "
        f"(base {result['base_map']:.4f})"
    )
    if recorded is None:
        print(f"metrics.json has no {result['recorded_key']} to compare with")
        return 0
    difference = abs(result["seen_map"] - recorded)
    print(f"recorded {result['recorded_key']} {recorded:.4f}: difference {difference:.2e}")
    if not difference <= args.tolerance:
        print(
            f"NOT reproduced: the checkpoint scores {difference:.2g} mAP points away from "
            f"metrics.json (tolerance {args.tolerance:g}): one of its weights, the test images, "
            "the device or the thread count differs from the run's"
        )
        return 1
    print(f"reproduced (within {args.tolerance:g} mAP points)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mlcil.api import load
    from mlcil.fileio import write_text_atomic
    from mlcil.predict import write_csv, write_jsonl, write_table
    from mlcil.rundir import RunDir

    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise MlcilError(f"--output {output} already exists; choose another file or delete it")
    if output is not None and not output.parent.is_dir():
        raise MlcilError(f"--output {output}: folder {output.parent} does not exist")
    model = load(args.run, device=args.device)
    where = RunDir(model.run_dir).checkpoint(model.checkpoint)
    print(f"model: {where} (the run's last finished session)", file=sys.stderr)
    predictions = model.predict(
        args.images,
        threshold=args.threshold,
        thresholds_file=args.thresholds,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    for path, reason in model.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not predictions:
        first = f": {model.skipped[0][0]}: {model.skipped[0][1]}" if model.skipped else ""
        raise MlcilError(
            f"no image could be predicted{first} ({len(model.skipped)} inputs skipped)"
        )
    if output is not None:
        buffer = io.StringIO()
        write_csv(predictions, buffer, model.classes)
        write_text_atomic(output, buffer.getvalue())
    if args.json:
        write_jsonl(predictions, sys.stdout)
    elif output is None:
        write_table(predictions, sys.stdout)
    done = f"{len(predictions)} images predicted"
    if output is not None:
        done += f", written to {output}"
    if model.skipped:
        done += f"; {len(model.skipped)} skipped (unreadable or missing)"
    print(done, file=sys.stderr)
    return 0


def cmd_export_digits(args: argparse.Namespace) -> int:
    from mlcil.data.export import export_digit_scenes

    written = export_digit_scenes(
        args.output,
        classes=args.classes or (),
        train=args.train,
        test=args.test,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    import json

    from mlcil.data.synthetic import write_synthetic_coco, write_synthetic_voc

    sizes = {"image_size": tuple(args.image_size)} if args.image_size else {}
    if args.action == "synth-coco":
        summary = write_synthetic_coco(
            args.output, args.train, args.test, seed=args.seed, jobs=args.jobs, **sizes
        )
    else:
        summary = write_synthetic_voc(
            args.output, args.train, args.test, seed=args.seed, jobs=args.jobs, **sizes
        )
    print(json.dumps(summary, indent=1))
    print(f"written: {args.output} (data.root={args.output})")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    import json

    from mlcil.data import build_image_cache
    from mlcil.experiment import load_config

    config = load_config(args.config, args.overrides)
    summary = build_image_cache(config.data)
    print(json.dumps(summary, indent=1))
    print(f"image cache: {summary['path']} (used by runs with data.image_cache=true)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    del args
    from mlcil.data import DATASETS
    from mlcil.memory_policies import MEMORY_POLICIES
    from mlcil.methods import METHODS
    from mlcil.models import NETWORKS
    from mlcil.old_classes import RULE_SUMMARIES

    # Plugins may register longer names than the built-in ones: the column fits them all.
    names = (*METHODS, *NETWORKS, *DATASETS, *RULE_SUMMARIES)
    width = max(10, *(len(name) for name in names))
    print("methods (default old-class rule, method.old_classes, in brackets):")
    for name, cls in sorted(METHODS.items()):
        summary = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        rule = cls.Params.model_fields.get("old_classes")
        tag = f"[{rule.default}] " if rule is not None else "[its own] "
        print(f"  {name:<{width}} {tag}{summary.splitlines()[0] if summary else ''}")
    print("networks:")
    for name, network in sorted(NETWORKS.items()):
        summary = (network.__doc__ or "").strip()
        print(f"  {name:<{width}} {summary.splitlines()[0] if summary else ''}")
    print("old-class rules (method.old_classes):")
    for name, summary in RULE_SUMMARIES.items():
        print(f"  {name:<{width}} {summary}")
    print("memory policies (memory.policy):")
    for name, policy in sorted(MEMORY_POLICIES.items()):
        summary = (policy.__doc__ or "").strip()
        print(f"  {name:<{width}} {summary.splitlines()[0] if summary else ''}")
    print("datasets (published protocols):")
    for name, spec in DATASETS.items():
        print(f"  {name:<{width}} {' '.join(spec.protocols)}".rstrip())
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    import shutil
    import textwrap

    from mlcil.config.packaged import is_fragment, matching_configs, packaged_root, summary

    configs = matching_configs(args.pattern)
    if not configs:
        if args.pattern is None:
            raise MlcilError("no packaged configs found (this installation was built without them)")
        raise MlcilError(f"no shipped config matches {args.pattern!r} (`mlcil configs` lists all)")
    fragments = {name: path for name, path in configs.items() if is_fragment(path)}
    runnable = {name: path for name, path in configs.items() if name not in fragments}
    width = max(len(name) for name in configs)
    columns = max(shutil.get_terminal_size((100, 24)).columns, width + 40)
    # Never break inside a hyphenated word: a wrapped "method-neutral" would read back as two.
    wrap = textwrap.TextWrapper(
        width=columns - 1,
        initial_indent="",
        subsequent_indent=" " * (width + 4),
        break_on_hyphens=False,
    )
    print(f"shipped configs ({packaged_root()}); use one with: mlcil train --config NAME")
    for name, path in runnable.items():
        print(wrap.fill(f"  {name:<{width}}  {summary(path)}".rstrip()))
    if fragments:
        print(
            "fragments (partial configs: stack one on a config above, e.g. "
            "--config digits-b0-c2 --config methods-lwf):"
        )
        for name, path in fragments.items():
            print(wrap.fill(f"  {name:<{width}}  {summary(path)}".rstrip()))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """``mlcil weights fetch NAME``: hub weights downloaded into the hub cache now (for a
    machine without a network later), or ``imagenet:`` weights converted into mlcil's cache."""
    import json

    from mlcil import hub_weights, imagenet
    from mlcil.weights_cache import read_provenance

    name = args.name
    if hub_weights.is_hub_name(name):
        path = hub_weights.download(name, args.backbone)
        record = hub_weights.provenance(name, path)
    elif imagenet.is_imagenet_name(name):
        path = imagenet.imagenet_weights(name[len(imagenet.SCHEME) :])
        record = read_provenance(path)
    else:
        raise MlcilError(
            f"mlcil weights fetch: {name!r} names no weights to fetch: give timm/<model>.<tag>, "
            "hf-hub:<owner>/<repo> or imagenet:<name> (glyph weights: mlcil pretrain)"
        )
    print(json.dumps(record, indent=1))
    print(f"weights: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mlcil.compare import describe_plan, plan_comparison, run_comparison

    grid = {
        "seeds": args.seeds,
        "protocols": args.protocols,
        "base": args.base,
        "overrides": args.set,
        "output_dir": args.output,
    }
    if args.dry_run:
        print(describe_plan(plan_comparison(args.configs, **grid), args.output, args.jobs))
        return 0
    paths = run_comparison(args.configs, **grid, jobs=args.jobs, quiet=args.quiet)
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['markdown']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import json

    from mlcil.experiment import load_config
    from mlcil.pretrain import PretrainRecipe, pretrain_backbone
    from mlcil.runs import make_runtime
    from mlcil.weights_cache import read_provenance

    config = load_config(args.config, args.overrides)
    changes = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    recipe = PretrainRecipe(**{k: v for k, v in changes.items() if v is not None})
    runtime = make_runtime(config)
    path = pretrain_backbone(config.model, config.data.image_size, recipe, runtime=runtime)
    print(json.dumps(read_provenance(path), indent=1))
    print(f"weights: {path}")
    if recipe != PretrainRecipe():
        print(f"(not the default recipe: point model.pretrained at {path} to use these weights)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mlcil.report import write_report

    paths = write_report(args.runs, args.output)
    print(Path(paths["markdown"]).read_text())
    print(
        f"report: {paths['html']} (tables also in {paths['markdown'].name}, {paths['json'].name})"
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: ...`` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _train_parser(commands: Any) -> None:
    train = commands.add_parser("train", help="run a protocol from a config")
    train.add_argument(
        "--config",
        action="append",
        help="YAML file, or a shipped config's name (mlcil configs); repeat to stack (later wins)",
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    train.add_argument("--dry-run", action="store_true", help="print sessions, sizes and model")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML) and exit"
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    train.add_argument("--run-dir", help="output folder (default <output_dir>/<run name>)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in the output folder"
    )
    train.add_argument(
        "--max-sessions",
        type=bounded_int(1, 1_000_000),
        help="stop after this many sessions (resume later)",
    )
    train.add_argument(
        "--add-session",
        metavar="TRAIN_MANIFEST",
        help="with --resume: learn one more session, whose classes are the manifest's labels "
        "the run has not seen",
    )
    train.add_argument(
        "--test-manifest", help="with --add-session: test images of the added session"
    )
    _plugin_option(train)
    train.set_defaults(func=cmd_train)


def _predict_parser(commands: Any) -> None:
    predict = commands.add_parser("predict", help="label images with a trained run")
    predict.add_argument("--run", required=True, help="run folder, e.g. runs/<name>")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, folders")
    predict.add_argument(
        "--threshold", type=unit_interval, help="decision threshold (default train.f1_threshold)"
    )
    predict.add_argument("--thresholds", metavar="FILE", help="per-class thresholds, CSV/JSON")
    predict.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    predict.add_argument("--output", help="write the predictions to this CSV file")
    predict.add_argument(
        "--batch-size", type=_BATCH, default=32, help=f"images per batch (1 to {MAX_BATCH_SIZE:,})"
    )
    predict.add_argument("--device", help="cpu, cuda, cuda:1... (default: the run's)")
    _plugin_option(predict)
    predict.set_defaults(func=cmd_predict)


def _data_parser(commands: Any) -> None:
    data = commands.add_parser("data", help="data helpers")
    actions = data.add_subparsers(dest="action", required=True)
    export = actions.add_parser(
        "export-digits", help="new digit scenes as PNG files plus train/test manifests"
    )
    export.add_argument("--output", required=True, help="new (or empty) folder")
    export.add_argument("--classes", type=int, nargs="+", help="every scene shows one of these")
    export.add_argument("--train", type=_SCENES, default=200, help="training scenes (0: none)")
    export.add_argument("--test", type=_SCENES, default=100, help="test scenes (0: none)")
    export.add_argument("--seed", type=_SEED, default=1, help="random seed of the scenes")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --output"
    )
    export.set_defaults(func=cmd_export_digits)
    cache = actions.add_parser(
        "cache",
        help="decode and resize a config's images once into the image cache (data.image_cache)",
    )
    cache.add_argument("--config", action="append", required=True, help="YAML config(s)")
    cache.add_argument("overrides", nargs="*", help="key=value overrides, e.g. root=/data/coco")
    _plugin_option(cache)
    cache.set_defaults(func=cmd_cache)
    published = {
        "synth-coco": (82_783, 40_504, "COCO 2014"),
        "synth-voc": (5_011, 4_952, "VOC 2007"),
    }
    for action, (train, test, name) in published.items():
        synth = actions.add_parser(
            action, help=f"a synthetic {name} tree in the published layout (no download)"
        )
        synth.add_argument("--output", required=True, help="new (or empty) folder")
        synth.add_argument(
            "--train", type=_IMAGES, default=train, help=f"training images ({train})"
        )
        synth.add_argument("--test", type=_IMAGES, default=test, help=f"test images ({test})")
        synth.add_argument("--seed", type=_SEED, default=0, help="random seed")
        synth.add_argument(
            "--image-size",
            type=bounded_int(32, 8192, "pixels"),
            nargs=2,
            metavar=("W", "H"),
            help="image size",
        )
        synth.add_argument("--jobs", type=_JOBS, default=1, help="encoding processes")
        synth.set_defaults(func=cmd_synthesize)


# Bounded argument types (mlcil.safety): a typo is an error naming the bound, not an attempt to
# allocate or start that much.
_BATCH = bounded_int(1, MAX_BATCH_SIZE, "images per batch")
_SEED = bounded_int(0, MAX_SEED, "seeds")
_JOBS = bounded_int(1, MAX_JOBS, "processes")
_IMAGES = bounded_int(1, MAX_SYNTHETIC_IMAGES, "images per split")
_SCENES = bounded_int(0, MAX_SYNTHETIC_IMAGES, "scenes per split")

_PLUGIN_HELP = (
    "import this module (or .py file) first, so configs can name the methods, networks and "
    "datasets it registers; repeatable (also: MLCIL_PLUGINS=mod1,mod2)"
)


def _plugin_option(parser: argparse.ArgumentParser) -> None:
    # A dest apart from the top-level option's: a subcommand's default would replace its value.
    parser.add_argument(
        "--plugin", action="append", dest="command_plugins", metavar="MODULE", help=_PLUGIN_HELP
    )


def _report_parser(commands: Any) -> None:
    report = commands.add_parser(
        "report",
        help="an HTML page comparing runs (tables, curves, per-class charts, each run's settings "
        "with those that differ highlighted), with report.md and report.json",
    )
    report.add_argument("runs", nargs="+", help="run folders, finished or not")
    report.add_argument(
        "--output",
        default="runs/report",
        help="the report folder: report.html, report.md, report.json and one curve PNG per "
        "dataset and protocol (nothing is written elsewhere)",
    )
    report.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlcil", description="Multi-label class-incremental learning (KRT and baselines)."
    )
    parser.add_argument("--version", action="version", version=f"mlcil {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and results (no progress bars)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument(
        "--plugin", action="append", dest="plugins", metavar="MODULE", help=_PLUGIN_HELP
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands)

    evaluate = commands.add_parser("eval", help="re-evaluate a run's final checkpoint")
    evaluate.add_argument("--run", required=True, help="run folder, e.g. runs/<name>")
    evaluate.add_argument(
        "--tolerance",
        type=map_tolerance,
        default=1e-3,
        help=f"allowed mAP difference, 0 to {MAX_MAP_TOLERANCE:g} points",
    )
    _plugin_option(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    _predict_parser(commands)
    _data_parser(commands)

    listing = commands.add_parser("list", help="methods, datasets and protocols")
    _plugin_option(listing)
    listing.set_defaults(func=cmd_list)

    configs = commands.add_parser(
        "configs", help="the shipped configs by name, with their descriptions; fragments apart"
    )
    configs.add_argument(
        "pattern",
        nargs="?",
        metavar="PATTERN",
        help="only these: a glob over names or paths (digits-pretrained-*, digits_pretrained/*) "
        "or a part of the name (coco)",
    )
    configs.set_defaults(func=cmd_configs)

    _compare_parser(commands)
    _pretrain_parser(commands)

    _weights_parser(commands)
    commands.add_parser(
        "torchrun",
        help="torchrun with mlcil as its program: mlcil torchrun [torchrun options] COMMAND ... "
        "(errors once, no torchrun traceback)",
        add_help=False,
    )

    _report_parser(commands)
    return parser


def _compare_parser(commands: Any) -> None:
    compare = commands.add_parser("compare", help="run several configs (and seeds), then report")
    compare.add_argument(
        "configs", nargs="+", help="config files or shipped names; 'a.yaml+b.yaml' stacks them"
    )
    compare.add_argument("--seeds", type=_SEED, nargs="+", default=None, help="seeds to run")
    compare.add_argument("--protocols", nargs="+", help="protocols to run each config with")
    compare.add_argument("--base", help="config stacked under every CONFIG")
    compare.add_argument("--set", nargs="*", default=[], help="key=value overrides for all")
    compare.add_argument("--output", default="runs/compare", help="report and runs folder")
    compare.add_argument(
        "--jobs", type=_JOBS, default=1, help="runs at once, each in its own single-thread process"
    )
    compare.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (config x protocol x seed, run folders) and check it; train nothing",
    )
    _plugin_option(compare)
    compare.set_defaults(func=cmd_compare)


def _weights_parser(commands: Any) -> None:
    weights = commands.add_parser("weights", help="starting weights: fetch them ahead of time")
    actions = weights.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser(
        "fetch",
        help="download hub weights into the Hugging Face cache (or convert imagenet: weights) "
        "now, e.g. on a login node, so runs later need no network",
    )
    fetch.add_argument("name", help="timm/<model>.<tag>, hf-hub:<owner>/<repo>[@rev], imagenet:..")
    fetch.add_argument("--backbone", help="check that the weights are for this timm architecture")
    fetch.set_defaults(func=cmd_weights)


def _pretrain_parser(commands: Any) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="pretrain a config's backbone on glyph scenes (cached with provenance)"
    )
    pretrain.add_argument("--config", action="append", required=True, help="YAML config(s)")
    pretrain.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    pretrain.add_argument(
        "--epochs", type=bounded_int(1, 10_000), help="epochs (default: the recipe's 16)"
    )
    pretrain.add_argument("--lr", type=finite_positive, help="learning rate (default 1e-3)")
    pretrain.add_argument("--batch-size", type=_BATCH, help="batch size (default 32)")
    pretrain.add_argument("--seed", type=_SEED, help="data and training seed (default 0)")
    _plugin_option(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _configure_logging(quiet: bool) -> None:
    """Log lines on stderr: INFO and up, or with ``-q`` warnings and errors only.

    The run's ``train.log`` raises the ``mlcil`` logger to INFO, and a record reaches every
    handler above its logger whatever those loggers' levels, so ``-q`` sets the level of the
    console handler itself (a root logger level alone would let every training line through).
    """
    global _console
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )
        _console = root.handlers[0]
    if _console is not None and _console in root.handlers:
        _console.setLevel(level)


def _load_plugins(args: argparse.Namespace) -> None:
    """The plugins of ``--plugin`` and ``MLCIL_PLUGINS``, then those a ``--config`` records (the
    ``config.yaml`` of an earlier run given as a config)."""
    from mlcil.plugins import load_plugins, plugin_names

    given = [*(args.plugins or []), *(getattr(args, "command_plugins", None) or [])]
    load_plugins(plugin_names(given))
    configs = list(getattr(args, "config", None) or [])
    configs += [part for spec in getattr(args, "configs", None) or [] for part in spec.split("+")]
    if configs:
        from mlcil.runs import import_config_plugins

        import_config_plugins(configs)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mlcil`` command; returns the exit status (0 done, 1 internal error, 2 bad input or
    a file error, 130 interrupted).

    Under torchrun, a clean error, an interruption and the dry run's summary are printed by
    rank 0 only (every rank meets the same config); other errors by every rank, named."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["torchrun"]:
        return _torchrun(arguments[1:])
    args = build_parser().parse_args(arguments)
    _configure_logging(args.quiet or _rank() != 0)
    try:
        _load_plugins(args)  # before any config is read: configs may name what they register
        return int(args.func(args))
    except KeyboardInterrupt as interrupt:
        if _rank() == 0:
            print(f"interrupted: {_after_interrupt(interrupt)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left early (`mlcil predict ... | head`): not an error of this command. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        clean = isinstance(error, MlcilError)
        if not clean or _rank() == 0:
            where = f"rank {_rank()}: " if not clean and _world_size() > 1 else ""
            print(f"error: {where}{_describe(error, _started[0])}", file=sys.stderr)
        return 2 if isinstance(error, MlcilError | OSError) else 1
    finally:
        _started[0] = None


def _after_interrupt(interrupt: KeyboardInterrupt) -> str:
    """What is kept after Ctrl-C: the comparison says it itself; a run says its checkpoint."""
    if str(interrupt):
        return _one_line(interrupt)
    if _started[0] is None:
        return "nothing was written"
    from mlcil.rundir import RunDir

    return RunDir(_started[0]).describe_kept()


def _rank() -> int:
    from mlcil.runtime import environment_rank

    return environment_rank()


def _world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def _print_main(text: str) -> None:
    """Print on rank 0 only (every rank would print the same)."""
    if _rank() == 0:
        print(text)


def _torchrun(arguments: list[str]) -> int:
    """``mlcil torchrun ...`` (mlcil.launch): torchrun with mlcil as its program."""
    from mlcil.launch import launch

    try:
        return launch(arguments, [name for name in COMMANDS if name != "torchrun"])
    except MlcilError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2


def _describe(error: Exception, run: Path | None = None) -> str:
    """One line naming what went wrong (and, for a file error, the file, and what of the run
    ``run`` is kept). At most ``_MESSAGE_CHARACTERS`` long."""
    if isinstance(error, MlcilError):
        return clip(_one_line(error), _MESSAGE_CHARACTERS)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        reason = f"{where}{error.strerror or _one_line(error)} (errno {error.errno})"
        if run is not None:
            from mlcil.rundir import RunDir

            reason += f"; {RunDir(run).describe_kept()}"
        return clip(reason, _MESSAGE_CHARACTERS)
    return clip(
        f"internal error {type(error).__name__}: {_one_line(error)} (run with --debug for the "
        "traceback)",
        _MESSAGE_CHARACTERS,
    )


# No message line is longer: a value quoted from an input is cut well before (mlcil.errors).
_MESSAGE_CHARACTERS = 2000


if __name__ == "__main__":
    sys.exit(main())
