"""Command line: ``mlcil train | eval | list | compare | report``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlcil.errors import MlcilError

if TYPE_CHECKING:
    from mlcil.experiment import Experiment

logger = logging.getLogger("mlcil.cli")


def _split_overrides(values: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from config paths given positionally."""
    overrides = [v for v in values if "=" in v]
    paths = [v for v in values if "=" not in v]
    return paths, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from mlcil.engine.loop import Trainer
    from mlcil.experiment import load_config
    from mlcil.report import session_table

    extra_paths, overrides = _split_overrides(args.overrides)
    if extra_paths:
        raise MlcilError(
            f"unexpected argument {extra_paths[0]!r}: overrides are key=value, configs go "
            "after --config"
        )
    if args.resume:
        run_dir = Path(args.resume)
        config = load_config([run_dir / "config.yaml"], overrides)
        trainer = Trainer(config, run_dir=run_dir, resume=True)
    else:
        if not args.config:
            raise MlcilError("mlcil train needs --config FILE (or --resume RUN_DIR)")
        config = load_config(args.config, overrides)
        trainer = Trainer(config, run_dir=args.run_dir)
        if args.overwrite and not args.dry_run:
            trainer.clear_run_dir()
    if not trainer.experiment.runtime.is_main:  # under torchrun, rank 0 logs progress
        logging.getLogger().setLevel(logging.WARNING)
    if args.dry_run:
        print(dry_run_summary(trainer.experiment, trainer.run_dir))
        return 0
    metrics = trainer.run(max_sessions=args.max_sessions)
    if not trainer.experiment.runtime.is_main:  # under torchrun, rank 0 reports
        return 0
    if metrics is None:
        where = trainer.stopped or f"after session {trainer.next_session - 1}"
        print(f"stopped {where}; continue with:")
        print(f"  mlcil train --resume {trainer.run_dir}")
        return 0
    print(session_table(metrics))
    print(f"results: {trainer.run_dir}/metrics.json  plot: {trainer.run_dir}/map_per_session.png")
    return 0


def dry_run_summary(experiment: Experiment, run_dir: Path) -> str:
    """Sessions, set sizes, weights file status and a model summary, without training."""
    config = experiment.config
    lines = [
        f"run: {config.run_name} -> {run_dir}",
        f"method: {config.method.to_dict()}",
        f"dataset: {config.data.dataset} ({len(experiment.train_source)} train / "
        f"{len(experiment.test_source)} test images, {len(experiment.class_names)} classes), "
        f"protocol {config.protocol}, overlap {config.data.overlap}",
        f"device: {experiment.runtime.device} ({experiment.runtime.precision})",
        "",
        "session  new  classes                          train  test",
    ]
    for session, sizes in zip(experiment.sessions, experiment.session_sizes(), strict=True):
        names = ", ".join(experiment.class_names[c] for c in session.new_classes)
        if len(names) > 31:
            names = names[:28] + "..."
        lines.append(
            f"{session.index:>7}  {len(session.new_classes):>3}  {names:<31} "
            f"{sizes['train_images']:>6} {sizes['test_images']:>5}"
        )
    memory = config.memory
    if memory.enabled:
        budget = (
            f"{memory.per_class} per class" if memory.total is None else f"{memory.total} total"
        )
        lines.append(f"exemplar memory: {budget}, labels {memory.labels}")
    else:
        lines.append("exemplar memory: off")
    pretrained = config.model.pretrained
    if pretrained:
        status = "found" if Path(pretrained).is_file() else "MISSING (training would stop here)"
        lines.append(f"pretrained weights: {pretrained} [{status}]")
    else:
        lines.append("pretrained weights: none (random initialisation)")
    method = experiment.build_method(load_weights=False)
    for session in experiment.sessions:
        method.network.add_session(len(session.new_classes))
    lines.append("")
    lines.append(f"model after the last session ({config.model.backbone}, {config.model.network}):")
    total = trainable = 0
    for name, count, grad in method.network.summary():
        lines.append(f"  {name:<20} {count:>12,d} parameters ({grad:,d} trainable)")
        total += count
        trainable += grad
    lines.append(f"  {'total':<20} {total:>12,d} parameters ({trainable:,d} trainable)")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from mlcil.engine.evaluate import evaluate_run

    result = evaluate_run(args.run)
    recorded = result["recorded_last_map"]
    print(
        f"{args.run}: session {result['session']} seen mAP {result['seen_map']:.4f} "
        f"(base {result['base_map']:.4f})"
    )
    if recorded is None:
        print("metrics.json has no last_map to compare with")
        return 0
    difference = abs(result["seen_map"] - recorded)
    print(f"recorded last_map {recorded:.4f}: difference {difference:.2e}")
    if difference > args.tolerance:
        print(f"NOT reproduced (tolerance {args.tolerance})")
        return 1
    print("reproduced")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    del args
    from mlcil.data import DATASETS
    from mlcil.methods import METHODS
    from mlcil.models import NETWORKS

    print("methods:")
    for name, cls in sorted(METHODS.items()):
        summary = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        print(f"  {name:<10} {summary.splitlines()[0] if summary else ''}")
    print("networks:")
    for name, network in sorted(NETWORKS.items()):
        summary = (network.__doc__ or "").strip()
        print(f"  {name:<10} {summary.splitlines()[0] if summary else ''}")
    print("datasets (published protocols):")
    for name, spec in DATASETS.items():
        print(f"  {name:<10} {' '.join(spec.protocols)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mlcil.compare import run_comparison

    paths = run_comparison(
        args.configs,
        seeds=args.seeds,
        protocols=args.protocols,
        base=args.base,
        overrides=args.set,
        output_dir=args.output,
    )
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['markdown']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mlcil.report import write_report

    paths = write_report(args.runs, args.output)
    print(Path(paths["markdown"]).read_text())
    print(f"report: {paths['markdown']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlcil", description="Multi-label class-incremental learning (KRT and baselines)."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run a protocol from a config")
    train.add_argument(
        "--config", action="append", help="YAML config; repeat to stack (later wins)"
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    train.add_argument("--dry-run", action="store_true", help="print sessions, sizes and model")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    train.add_argument("--run-dir", help="output folder (default <output_dir>/<run name>)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing run in the output folder"
    )
    train.add_argument(
        "--max-sessions", type=int, help="stop after this many sessions (resume later)"
    )
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="re-evaluate a run's final checkpoint")
    evaluate.add_argument("--run", required=True, help="run folder, e.g. runs/<name>")
    evaluate.add_argument("--tolerance", type=float, default=1e-3, help="allowed mAP difference")
    evaluate.set_defaults(func=cmd_eval)

    listing = commands.add_parser("list", help="methods, datasets and protocols")
    listing.set_defaults(func=cmd_list)

    compare = commands.add_parser("compare", help="run several configs (and seeds), then report")
    compare.add_argument("configs", nargs="+", help="configs; 'a.yaml+b.yaml' stacks files")
    compare.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run")
    compare.add_argument("--protocols", nargs="+", help="protocols to run each config with")
    compare.add_argument("--base", help="config stacked under every CONFIG")
    compare.add_argument("--set", nargs="*", default=[], help="key=value overrides for all")
    compare.add_argument("--output", default="runs/compare", help="report and runs folder")
    compare.set_defaults(func=cmd_compare)

    report = commands.add_parser("report", help="markdown table and plot over finished runs")
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--output", default="runs/report", help="where report.md goes")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except MlcilError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished session's checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
