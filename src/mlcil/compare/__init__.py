"""``mlcil compare``: run several configurations over several seeds, then report.

The grid is protocols x configurations x seeds. Each configuration is one YAML file (or a shipped
config's name), or several stacked with ``+`` (``a.yaml+b.yaml``), with an optional ``--base`` file
stacked underneath every one. A pattern names a group of shipped configs (``digits-pretrained-*``,
``digits_pretrained/*``, fragments left out: :func:`mlcil.config.packaged.matching_configs`), so the
grids of the README run from a wheel too. Runs land in ``<output>/runs/<run name>``;
a finished run (its ``metrics.json`` says so) is reused and one with a checkpoint is resumed (one
stopped before its first checkpoint starts again), so an interrupted comparison continues where
it stopped. A finished or resumable run is reused only if it was made with the same settings,
run-time settings (device, progress bars, data root...) apart: those never change results
(``mlcil.safety.RESUME_SAFE_KEYS``).

The runs train in this process or, with ``jobs > 1``, in worker processes
(:mod:`mlcil.compare.workers`, which also says how Ctrl-C and SIGTERM stop them).

:func:`plan_comparison` checks the whole grid and says what each run will do; ``mlcil compare
--dry-run`` prints that plan (:func:`describe_plan`) and trains nothing. While the grid trains,
the console shows its progress (runs done, running, left, elapsed: :class:`GridProgress`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mlcil.compare.workers import GridInterrupted, GridProgress, execute
from mlcil.config import RunConfig
from mlcil.config.packaged import expand_config_pattern
from mlcil.engine.checkpoint import latest_checkpoint
from mlcil.errors import ConfigError, MlcilError, shown
from mlcil.experiment import Experiment, load_config
from mlcil.report import write_report
from mlcil.requirements import check_run_requirements
from mlcil.results import run_finished
from mlcil.rundir import RunDir
from mlcil.runs import make_runtime, with_recorded_plugins
from mlcil.safety import result_changes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison grid.

    Attributes:
        spec: the configuration as given (``a.yaml+b.yaml``).
        config: its resolved config (seed and protocol of this cell applied).
        run_dir: where the run lands.
        status: ``"new"``, ``"resume"`` (a checkpoint is there), ``"again"`` (the run stopped
            before its first checkpoint: it starts again) or ``"finished"`` (its
            ``metrics.json`` is there: reused, not trained again).
    """

    spec: str
    config: RunConfig
    run_dir: Path
    status: str


def plan_comparison(
    configs: Sequence[str],
    seeds: Sequence[int] | None = None,
    protocols: Sequence[str] | None = None,
    base: str | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | Path = "runs/compare",
) -> list[PlannedRun]:
    """Every (seed, protocol, config) of the grid, checked before anything is trained: configs,
    data, protocols and sessions, and any earlier run in a run folder (same settings).

    Raises:
        MlcilError: the first problem of any run, naming its configuration, seed and protocol.
    """
    output_dir = Path(output_dir)
    specs = [name for spec in configs for name in _expanded(spec)]
    plans: list[tuple[str, RunConfig]] = []
    # Seeds outermost: an interrupted comparison still holds complete tables for the first seeds.
    for seed in seeds if seeds else [None]:
        for protocol in protocols if protocols else [None]:
            for spec in specs:
                files = ([base] if base else []) + spec.split("+")
                extra = [] if seed is None else [f"seed={seed}"]
                if protocol is not None:
                    extra.append(f"protocol={protocol}")
                config = load_config(files, [*overrides, *extra])  # validate all up front
                config = with_recorded_plugins(config)
                if not _same_as_planned(spec, config, plans):
                    plans.append((spec, config))
    _check_requirements([config for _, config in plans])  # packages, trackers, weights
    _check_plans(plans, output_dir)  # every problem is found before any training starts
    planned = []
    for spec, config in plans:
        run_dir = output_dir / "runs" / config.run_name
        planned.append(PlannedRun(spec, config, run_dir, _status(RunDir(run_dir))))
    return planned


def _status(run: RunDir) -> str:
    if run_finished(run.path):
        return "finished"
    if latest_checkpoint(run.path) is not None:
        return "resume"
    return "again" if run.learned_nothing() else "new"


def _expanded(spec: str) -> list[str]:
    """A configuration as given, or the shipped configs a pattern names (a file wins)."""
    if "+" in spec:
        return [spec]
    return expand_config_pattern(spec)


def _same_as_planned(spec: str, config: RunConfig, plans: Sequence[tuple[str, RunConfig]]) -> bool:
    """Whether an identical run is planned already (two names of one config, e.g. through a
    pattern): it is planned once."""
    for other, planned in plans:
        if planned.run_name == config.run_name and planned.to_dict() == config.to_dict():
            logger.info("%s is the same run as %s: planned once", spec, other)
            return True
    return False


def _check_requirements(configs: Sequence[RunConfig]) -> None:
    """What every run needs installed (trackers, packages, weights), once per distinct need."""
    checked: set[str] = set()
    for config in configs:
        needs = {
            "backbone": config.model.backbone,
            "pretrained": config.model.pretrained,
            "trackers": config.train.trackers,
            "tensorboard": config.train.tensorboard,
            "data": [config.data.dataset, config.data.randaugment, config.data.augment],
        }
        key = json.dumps(needs, sort_keys=True)
        if key not in checked:
            checked.add(key)
            check_run_requirements(config)


def describe_plan(plan: Sequence[PlannedRun], output_dir: str | Path, jobs: int = 1) -> str:
    """The plan as ``mlcil compare --dry-run`` prints it: one line per run, then the totals."""
    specs = {run.spec for run in plan}
    seeds = {run.config.seed for run in plan}
    protocols = {run.config.protocol for run in plan}
    grid = " x ".join(
        _count(len(values), noun)
        for values, noun in ((specs, "config"), (protocols, "protocol"), (seeds, "seed"))
    )
    lines = [f"plan: {_count(len(plan), 'run')} = {grid}, into {Path(output_dir) / 'runs'}"]
    width = max((len(run.spec) for run in plan), default=0)
    notes = {
        "new": "new",
        "resume": "resume from its checkpoint",
        "again": "stopped before its first checkpoint: starts again",
        "finished": "finished: reused",
    }
    for position, run in enumerate(plan, 1):
        lines.append(
            f"  [{position}/{len(plan)}] {run.spec:<{width}}  {run.config.protocol:<8} seed "
            f"{run.config.seed:<5} -> {run.run_dir}  ({notes[run.status]})"
        )
    todo = sum(run.status != "finished" for run in plan)
    at_once = f", {jobs} at a time" if jobs > 1 else ""
    lines.append(
        f"{todo} to train{at_once}; the report goes to {output_dir} (dry run: nothing run)"
    )
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def run_comparison(
    configs: Sequence[str],
    seeds: Sequence[int] | None = None,
    protocols: Sequence[str] | None = None,
    base: str | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | Path = "runs/compare",
    jobs: int = 1,
    quiet: bool = False,
) -> dict[str, Path]:
    """Run every (protocol, config, seed) that has no result yet and write the report.

    Args:
        quiet: no progress bars (a run-time setting; runs made with and without them are the
            same run).
    """
    plan = plan_comparison(configs, seeds, protocols, base, overrides, output_dir)
    todo = []
    progress = GridProgress(sum(run.status != "finished" for run in plan), jobs)
    for position, run in enumerate(plan, 1):
        if run.status == "finished":
            logger.info("[%d/%d] %s: already finished", position, len(plan), run.run_dir)
            continue
        logger.info(
            "[%d/%d] %s %s seed %d -> %s%s",
            position,
            len(plan),
            run.spec,
            run.config.protocol,
            run.config.seed,
            run.run_dir,
            {"resume": " (resuming)", "again": " (starting again)"}.get(run.status, ""),
        )
        config = run.config.to_dict()
        if quiet:
            config["train"]["progress"] = False
        todo.append((config, str(run.run_dir), run.status in ("resume", "again")))
    execute(todo, jobs, progress)
    return write_report([run.run_dir for run in plan], Path(output_dir))


def _check_plans(plans: Sequence[tuple[str, RunConfig]], output_dir: Path) -> None:
    """Check every run of the grid before the first one starts: its data, protocol and sessions
    (by building its experiment), and any earlier run in its folder (same settings, or a
    complete run to resume)."""
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
            if run_finished(run_dir):
                continue
        elif latest_checkpoint(run_dir) is None and RunDir(run_dir).found_run_files():
            found = ", ".join(RunDir(run_dir).found_run_files())
            raise ConfigError(
                f"{run_dir} already holds files of another run ({found}): delete them or "
                "choose another --output"
            )
        try:
            Experiment(config, runtime=make_runtime(config))
        except MlcilError as error:
            raise type(error)(f"{spec} (seed {config.seed}, {config.protocol}): {error}") from None


def _check_same_config(run_dir: Path, config: RunConfig) -> None:
    """Refuse to reuse or resume a run that was made with other settings."""
    differences = result_changes(load_config(RunDir(run_dir).config_file), config)
    if differences:
        key, saved, planned = differences[0]
        raise ConfigError(
            f"{run_dir} holds a run made with other settings ({key}: {shown(saved)} there, "
            f"{shown(planned)} now; {len(differences)} keys differ): delete it or choose "
            "another --output"
        )


__all__ = [
    "GridInterrupted",
    "GridProgress",
    "PlannedRun",
    "describe_plan",
    "plan_comparison",
    "run_comparison",
]
