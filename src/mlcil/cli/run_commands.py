"""The commands on runs: ``mlcil train`` (new, resumed, extended, dry run), ``eval``,
``predict``, ``compare`` and ``report``."""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlcil.errors import MlcilError

if TYPE_CHECKING:
    from mlcil.runs import Launch

# The run folder `mlcil train` works on once it is known (None before, and for other commands):
# a failure or Ctrl-C message (mlcil.cli.main) says what of that run is kept.
started_run: list[Path | None] = [None]


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
        started_run[0] = Path(args.resume)  # what an error or Ctrl-C message reports on
    launch = _resumed_launch(args, overrides) if args.resume else _new_launch(args, overrides)
    if launch is None:
        return 0
    trainer = launch.trainer
    started_run[0] = trainer.run_dir
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
    from mlcil.results import result_files

    metrics_file, plot_file = result_files(trainer.run_dir)
    print(f"results: {metrics_file}  plot: {plot_file}")
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


def cmd_report(args: argparse.Namespace) -> int:
    from mlcil.report import write_report

    paths = write_report(args.runs, args.output)
    print(Path(paths["markdown"]).read_text())
    print(
        f"report: {paths['html']} (tables also in {paths['markdown'].name}, {paths['json'].name})"
    )
    return 0


def _print_main(text: str) -> None:
    """Print on rank 0 only (every rank would print the same)."""
    from mlcil.runtime import environment_rank

    if environment_rank() == 0:
        print(text)
