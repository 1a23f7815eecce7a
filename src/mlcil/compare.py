"""``mlcil compare``: run several configurations over several seeds, then report.

The grid is protocols x configurations x seeds. Each configuration is one YAML file, or several
stacked with ``+`` (``a.yaml+b.yaml``), with an optional ``--base`` file stacked underneath every
one. Runs land in ``<output>/runs/<run name>``;
a run that already has ``metrics.json`` is reused and one with a checkpoint is resumed, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import torch

from mlcil.config import RunConfig, flatten
from mlcil.engine.checkpoint import latest_checkpoint
from mlcil.errors import ConfigError, MlcilError
from mlcil.experiment import Experiment, build_config, load_config
from mlcil.report import write_report
from mlcil.rundir import RunDir
from mlcil.runs import resume_run, start_run

logger = logging.getLogger(__name__)


def run_comparison(
    configs: Sequence[str],
    seeds: Sequence[int] | None = None,
    protocols: Sequence[str] | None = None,
    base: str | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | Path = "runs/compare",
    jobs: int = 1,
) -> dict[str, Path]:
    """Run every (protocol, config, seed) that has no result yet and write the report."""
    output_dir = Path(output_dir)
    plans = []
    # Seeds outermost: an interrupted comparison still holds complete tables for the first seeds.
    for seed in seeds if seeds else [None]:
        for protocol in protocols if protocols else [None]:
            for spec in configs:
                files = ([base] if base else []) + spec.split("+")
                extra = [] if seed is None else [f"seed={seed}"]
                if protocol is not None:
                    extra.append(f"protocol={protocol}")
                config = load_config(files, [*overrides, *extra])  # validate all up front
                plans.append((spec, config))
    _check_plans(plans, output_dir)  # every problem is found before any training starts
    run_dirs = [output_dir / "runs" / config.run_name for _, config in plans]
    todo = []
    for position, (run_dir, (spec, config)) in enumerate(zip(run_dirs, plans, strict=True), 1):
        if RunDir(run_dir).metrics_file.is_file():
            logger.info("[%d/%d] %s: already finished", position, len(plans), run_dir)
            continue
        resume = latest_checkpoint(run_dir) is not None
        logger.info(
            "[%d/%d] %s %s seed %d -> %s%s",
            position,
            len(plans),
            spec,
            config.protocol,
            config.seed,
            run_dir,
            " (resuming)" if resume else "",
        )
        todo.append((config.to_dict(), str(run_dir), resume))
    _execute(todo, jobs)
    return write_report(run_dirs, output_dir)


def _run_one(config: dict, run_dir: str, resume: bool) -> None:
    launch = resume_run(run_dir) if resume else start_run(build_config(config), run_dir)
    launch.run()


def _one_thread() -> None:
    # Parallel jobs share the cores: one thread each avoids oversubscription (the thread count
    # changes float reduction order, so say so when comparing with a multi-threaded run).
    torch.set_num_threads(1)


def _execute(todo: Sequence[tuple[dict, str, bool]], jobs: int) -> None:
    """Run the planned trainings, ``jobs`` at a time in fresh processes (1: in this one)."""
    if jobs <= 1:
        for config, run_dir, resume in todo:
            _run_one(config, run_dir, resume)
        return
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(jobs, context, initializer=_one_thread) as pool:
        futures = [pool.submit(_run_one, *job) for job in todo]
        for future in concurrent.futures.as_completed(futures):
            future.result()  # re-raise the first failure here


def _check_plans(
    plans: Sequence[tuple[str, RunConfig]], output_dir: Path
) -> list[Experiment | None]:
    """Check every run of the grid before the first one starts: its data, protocol and sessions
    (by building its experiment), and any earlier run in its folder (same settings, or a
    complete run to resume). Returns the experiments (None for runs already finished)."""
    experiments: list[Experiment | None] = []
    seen: dict[Path, str] = {}
    for spec, config in plans:
        run_dir = output_dir / "runs" / config.run_name
        if run_dir in seen:
            raise ConfigError(
                f"{spec} and {seen[run_dir]} both write {run_dir}: give them different "
                "'name' or 'label' settings"
            )
        seen[run_dir] = spec
        if RunDir(run_dir).config_file.is_file():
            _check_same_config(run_dir, config)
            if RunDir(run_dir).metrics_file.is_file():
                experiments.append(None)
                continue
        elif latest_checkpoint(run_dir) is None and RunDir(run_dir).found_run_files():
            found = ", ".join(RunDir(run_dir).found_run_files())
            raise ConfigError(
                f"{run_dir} already holds files of another run ({found}): delete them or "
                "choose another --output"
            )
        try:
            experiments.append(Experiment(config))
        except MlcilError as error:
            raise type(error)(f"{spec} (seed {config.seed}, {config.protocol}): {error}") from None
    return experiments


def _check_same_config(run_dir: Path, config: RunConfig) -> None:
    """Refuse to reuse or resume a run that was made with other settings."""
    saved = flatten(load_config(RunDir(run_dir).config_file).to_dict())
    planned = flatten(config.to_dict())
    differences = sorted(k for k in saved.keys() | planned.keys() if saved.get(k) != planned.get(k))
    if differences:
        key = differences[0]
        raise ConfigError(
            f"{run_dir} holds a run made with other settings ({key}: {saved.get(key)!r} there, "
            f"{planned.get(key)!r} now; {len(differences)} keys differ): delete it or choose "
            "another --output"
        )
