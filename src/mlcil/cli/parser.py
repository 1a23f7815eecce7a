"""The ``mlcil`` argument parser: every command's options, with bounded values."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from mlcil.cli.run_commands import (
    cmd_compare,
    cmd_eval,
    cmd_predict,
    cmd_report,
    cmd_train,
)
from mlcil.cli.setup_commands import (
    cmd_cache,
    cmd_configs,
    cmd_export_digits,
    cmd_list,
    cmd_pretrain,
    cmd_synthesize,
    cmd_weights,
)
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

# The commands, in the order `mlcil --help` lists them (build_parser adds one parser each).
COMMANDS = ("train", "eval", "predict", "data", "list", "configs", "compare", "pretrain",
            "report", "weights", "torchrun")  # fmt: skip


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
