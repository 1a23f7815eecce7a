"""The training of a comparison grid (:mod:`mlcil.compare`): one run after another, or
``jobs`` at a time in worker processes, and its progress on the console.

With ``jobs > 1`` each run trains in its own process. Ctrl-C (SIGINT) or SIGTERM stops the
comparison and every worker: no new run starts, each worker is sent SIGTERM (a run inside an
epoch writes a checkpoint at the next step; elsewhere it keeps its last one), and a worker whose
comparison process dies stops too (``PR_SET_PDEATHSIG`` on Linux, a parent watchdog elsewhere).
The same command afterwards resumes the interrupted runs and skips the finished ones.
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

from mlcil.config import flatten
from mlcil.errors import MlcilError
from mlcil.experiment import build_config
from mlcil.plugins import load_plugins, loaded_plugins
from mlcil.runs import resume_run, start_run
from mlcil.safety import RESUME_SAFE_KEYS

# The comparison's log (progress lines included), whichever of its modules writes.
logger = logging.getLogger("mlcil.compare")


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


def start_worker(plugins: Sequence[str]) -> None:
    # Parallel jobs share the cores: one thread each avoids oversubscription (the thread count
    # changes float reduction order, so say so when comparing with a multi-threaded run).
    torch.set_num_threads(1)
    # A fresh process knows only the built-in methods, networks and datasets: the configs may
    # name ones that this process's plugins registered.
    load_plugins(plugins)


Job = tuple[dict, str, bool]  # (config, run folder, resume)

# How long stopped workers get to write their checkpoint before they are killed.
STOP_GRACE_S = 120.0


def execute(todo: Sequence[Job], jobs: int, progress: GridProgress | None = None) -> None:
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
    start_worker(plugins)
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
