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

With ``jobs > 1`` each run trains in its own process. Ctrl-C (SIGINT) or SIGTERM stops the
comparison and every worker: no new run starts, each worker is sent SIGTERM (a run inside an
epoch writes a checkpoint at the next step; elsewhere it keeps its last one), and a worker whose
comparison process dies stops too (``PR_SET_PDEATHSIG`` on Linux, a parent watchdog elsewhere).
The same command afterwards resumes the interrupted runs and skips the finished ones.

:func:`plan_comparison` checks the whole grid and says what each run will do; ``mlcil compare
--dry-run`` prints that plan (:func:`describe_plan`) and trains nothing. While the grid trains,
the console shows its progress (runs done, running, left, elapsed: :class:`GridProgress`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mlcil.config import RunConfig, flatten
from mlcil.config.packaged import expand_config_pattern
from mlcil.engine.checkpoint import latest_checkpoint
from mlcil.errors import ConfigError, MlcilError, shown
from mlcil.experiment import Experiment, build_config, load_config
from mlcil.plugins import load_plugins, loaded_plugins
from mlcil.report import write_report
from mlcil.requirements import check_run_requirements
from mlcil.results import run_finished
from mlcil.rundir import RunDir
from mlcil.runs import make_runtime, resume_run, start_run, with_recorded_plugins
from mlcil.safety import RESUME_SAFE_KEYS, result_changes

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
    _execute(todo, jobs, progress)
    return write_report([run.run_dir for run in plan], Path(output_dir))


class GridInterrupted(KeyboardInterrupt):
    """The comparison was stopped (Ctrl-C, SIGTERM): the message says what is kept."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"{reason}; every run in progress keeps its last checkpoint; the same command "
            "resumes the interrupted runs and skips the finished ones"
        )


class GridProgress:
    """The console's view of a grid being trained: runs done, running, left, time elapsed.

    Logged (``mlcil.compare``, INFO: on the console unless ``-q``) when a run starts and when
    one ends; with ``jobs`` processes, up to ``jobs`` runs are running at once.
    """

    def __init__(self, total: int, jobs: int = 1, clock: Any = time.monotonic) -> None:
        self.total = total
        self.jobs = max(1, jobs)
        self.done = 0
        self.clock = clock
        self.started_at = clock()

    @property
    def running(self) -> int:
        return min(self.jobs, self.total - self.done)

    def line(self, event: str = "") -> str:
        """``runs: 3/12 done, 2 running, 7 left, 4m05s elapsed`` (then ``; <event>``)."""
        left = self.total - self.done - self.running
        seconds = int(self.clock() - self.started_at)
        elapsed = f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
            f"{seconds // 60}m{seconds % 60:02d}s")  # fmt: skip
        text = (
            f"runs: {self.done}/{self.total} done, {self.running} running, {left} left, "
            f"{elapsed} elapsed"
        )
        return f"{text}; {event}" if event else text

    def starting(self, run_dir: str) -> None:
        logger.info("%s", self.line(f"starting {Path(run_dir).name}"))

    def finished(self, run_dir: str) -> None:
        self.done += 1
        logger.info("%s", self.line(f"finished {Path(run_dir).name}"))


def _run_one(config: dict, run_dir: str, resume: bool) -> None:
    if resume:
        # The run keeps its settings; where and how it computes are this comparison's.
        launch = resume_run(run_dir, _run_time_overrides(config))
    else:
        launch = start_run(build_config(config), run_dir)
    if launch.run() is None:  # SIGTERM inside an epoch: checkpointed, and the grid stops
        raise GridInterrupted(f"{run_dir} stopped {launch.trainer.stopped or 'on SIGTERM'}")


def _run_time_overrides(config: dict) -> list[str]:
    """``key=value`` overrides of the settings that never change results (device, progress...)."""
    settings = flatten(config)
    return [
        f"{key}={json.dumps(settings[key])}" for key in sorted(RESUME_SAFE_KEYS) if key in settings
    ]


def _start_worker(plugins: Sequence[str]) -> None:
    # Parallel jobs share the cores: one thread each avoids oversubscription (the thread count
    # changes float reduction order, so say so when comparing with a multi-threaded run).
    torch.set_num_threads(1)
    # A fresh process knows only the built-in methods, networks and datasets: the configs may
    # name ones that this process's plugins registered.
    load_plugins(plugins)


Job = tuple[dict, str, bool]  # (config, run folder, resume)

# How long stopped workers get to write their checkpoint before they are killed.
STOP_GRACE_S = 120.0


def _execute(todo: Sequence[Job], jobs: int, progress: GridProgress | None = None) -> None:
    """Run the planned trainings, ``jobs`` at a time in fresh processes (1: in this one); stop
    them all on SIGINT or SIGTERM (see the module docstring)."""
    progress = progress or GridProgress(len(todo), jobs)
    with _stopped_by_sigterm():
        try:
            if jobs <= 1:
                for job in todo:
                    progress.starting(job[1])
                    _run_one(*job)
                    progress.finished(job[1])
            else:
                _run_in_workers(todo, jobs, progress)
        except GridInterrupted:
            raise
        except KeyboardInterrupt:
            raise GridInterrupted("SIGINT (Ctrl-C)") from None


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`GridInterrupted` in this process while the grid runs (inside a
    run's epoch the fit's own handler takes it first: a checkpoint, then the grid stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        del frame
        raise GridInterrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    connection: multiprocessing.connection.Connection
    run_dir: str
    outcome: tuple[str, Any] | None = None  # what the worker reported, once it did

    def read(self) -> None:
        """Take the worker's report if it sent one (read before it exits: a large report
        would otherwise block it on a full pipe)."""
        if self.outcome is None and not self.connection.closed:
            try:
                if self.connection.poll():
                    self.outcome = self.connection.recv()
            except (EOFError, OSError):
                self.connection.close()


def _run_in_workers(todo: Sequence[Job], jobs: int, progress: GridProgress) -> None:
    """``jobs`` worker processes at a time, one run each; the first failure is raised once the
    runs in progress have ended (no new run starts after it)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    pending, running = list(todo), list[_Worker]()
    failure: BaseException | None = None
    try:
        while pending or running:
            while pending and len(running) < jobs and failure is None:
                job = pending.pop(0)
                progress.starting(job[1])
                running.append(_start(context, job))
            if not running:
                break
            waiting = [
                w.connection for w in running if w.outcome is None and not w.connection.closed
            ]
            multiprocessing.connection.wait([*waiting, *(w.process.sentinel for w in running)])
            for worker in running:
                worker.read()
            for worker in [w for w in running if not w.process.is_alive()]:
                running.remove(worker)
                error = _outcome(worker)
                if error is None:
                    progress.finished(worker.run_dir)
                if error is not None and failure is None:
                    failure = error
                    if running:
                        logger.error(
                            "%s; waiting for the %d run(s) in progress (Ctrl-C stops them)",
                            error,
                            len(running),
                        )
    except BaseException:
        _stop_workers(running)
        raise
    if failure is not None:
        raise failure


def _start(context: Any, job: Job) -> _Worker:
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker_main,
        args=(job, loaded_plugins(), os.getpid(), sending),
        name=f"mlcil-compare {Path(job[1]).name}",
    )
    process.start()
    sending.close()  # the worker's end: this process keeps only the one it reads
    return _Worker(process, receiving, job[1])


def _outcome(worker: _Worker) -> BaseException | None:
    """The error a finished worker reported (None when its run ended well)."""
    worker.process.join()
    worker.read()
    worker.connection.close()
    kind, payload = worker.outcome or (None, None)
    if kind == "done":
        return None
    if kind == "stopped":
        return GridInterrupted(str(payload))
    if kind == "failed" and isinstance(payload, BaseException):
        return payload
    code = worker.process.exitcode
    how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
    return MlcilError(
        f"{worker.run_dir}: its worker process ended by {how} without a result; it keeps its "
        "last checkpoint, and the same command resumes it"
    )


def _stop_workers(running: Sequence[_Worker]) -> None:
    """SIGTERM to every worker (a run inside an epoch checkpoints at its next step), then wait;
    a worker still running after ``STOP_GRACE_S`` seconds, or a second Ctrl-C, kills them."""
    for worker in running:
        with contextlib.suppress(OSError):
            worker.process.terminate()
    try:
        for worker in running:
            worker.process.join(STOP_GRACE_S)
    except KeyboardInterrupt:
        pass
    for worker in running:
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()


def _worker_main(
    job: Job,
    plugins: Sequence[str],
    parent: int,
    connection: multiprocessing.connection.Connection,
) -> None:
    """A worker process: one run, its outcome sent to the comparison process."""
    _stop_with_parent(parent)
    # Ctrl-C reaches every process of the terminal's group: the comparison process stops the
    # workers itself, with SIGTERM, so that a run inside an epoch writes its checkpoint first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _start_worker(plugins)
    try:
        _run_one(*job)
        outcome: tuple[str, Any] = ("done", None)
    except GridInterrupted as stop:
        outcome = ("stopped", stop.reason)
    except BaseException as error:  # reported to the comparison process, which raises it
        outcome = ("failed", error)
    with contextlib.suppress(OSError, EOFError):
        try:
            connection.send(outcome)
        except Exception:  # an exception that cannot be pickled: its text
            failed = outcome[1]
            connection.send(("failed", RuntimeError(f"{type(failed).__name__}: {failed}")))


_PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """Get SIGTERM when the comparison process ``parent`` dies: the kernel's parent-death
    signal on Linux, else a thread watching the parent pid."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    stopped = threading.Event()
    while not stopped.wait(1.0):
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


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
            if run_finished(run_dir):
                experiments.append(None)
                continue
        elif latest_checkpoint(run_dir) is None and RunDir(run_dir).found_run_files():
            found = ", ".join(RunDir(run_dir).found_run_files())
            raise ConfigError(
                f"{run_dir} already holds files of another run ({found}): delete them or "
                "choose another --output"
            )
        try:
            experiments.append(Experiment(config, runtime=make_runtime(config)))
        except MlcilError as error:
            raise type(error)(f"{spec} (seed {config.seed}, {config.protocol}): {error}") from None
    return experiments


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
