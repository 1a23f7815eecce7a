"""Opening and starting runs: the layer above the engine that the CLI, ``mlcil.load`` and
``compare`` share.

- :func:`open_run` is the one way to open an existing run folder (``mlcil.load``, ``eval``,
  ``--resume``, ``--add-session``): its config (with run-time overrides), its plan with the
  sessions added to it, one experiment.
- :func:`start_run` starts a new run: what it needs installed and available is checked before
  any folder is touched or any weights are made (:mod:`mlcil.requirements`), then the folder is
  locked, every input check a run can make before training passes (:func:`preflight`), and only
  then is an earlier run set aside with ``--overwrite``; it is deleted once the new run's first
  checkpoint is written, and put back when the new run fails before that. The run records its
  plugins in its config (:func:`with_recorded_plugins`); opening a run imports them again.
- :func:`resume_run` continues a run, with one more session with ``--add-session``.
- The features above the engine join a run as session callbacks (diagnostics, the set-aside run,
  the provenance of ``pretrain:`` weights): :func:`standard_callbacks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mlcil.added_sessions import (
    AddedSession,
    learned_sessions,
    plan_added_session,
    read_added_sessions,
    recorded_until_learned,
    run_plan,
)
from mlcil.config.loading import flatten, parse_yaml, read_yaml
from mlcil.config.packaged import find_packaged
from mlcil.config.schema import ModelConfig, RunConfig
from mlcil.data import DATASETS
from mlcil.diagnostics import SessionDiagnostics
from mlcil.engine.callbacks import Callback, RunView
from mlcil.engine.checkpoint import RunState, restore_run
from mlcil.engine.evaluate import evaluate_session, session_result
from mlcil.engine.loop import Trainer
from mlcil.engine.observers import Observer
from mlcil.errors import ConfigError, DataError, MlcilError, shown
from mlcil.experiment import Experiment, load_config
from mlcil.hub_weights import download as download_hub_weights
from mlcil.hub_weights import is_hub_name
from mlcil.imagenet import SCHEME as IMAGENET_SCHEME
from mlcil.methods import METHODS
from mlcil.models import NETWORKS
from mlcil.plugins import import_recorded, plugins_to_record, recorded_plugins
from mlcil.pretrain import SCHEME as PRETRAIN_SCHEME
from mlcil.pretrain import cached_provenance, resolve_pretrained
from mlcil.protocol import Session
from mlcil.record import RunMetrics
from mlcil.requirements import check_run_requirements
from mlcil.results import read_metrics
from mlcil.rundir import RunDir
from mlcil.runtime import Runtime, environment_rank
from mlcil.safety import check_resume_config, result_changes
from mlcil.weights_cache import building

logger = logging.getLogger(__name__)


def make_runtime(config: RunConfig) -> Runtime:
    """The process's runtime (device, precision, process group): made once per entry point."""
    return Runtime.from_config(config.train, config.data.num_workers)


@dataclasses.dataclass(frozen=True)
class OpenedRun:
    """An existing run folder, opened: its folder and its experiment (config, plan, runtime)."""

    run: RunDir
    experiment: Experiment

    @property
    def config(self) -> RunConfig:
        return self.experiment.config

    def restore(self, session_end: bool = True) -> tuple[Path, RunState]:
        """The newest checkpoint and the run state restored from it.

        Args:
            session_end: the last *finished* session's checkpoint (what ``eval``, ``predict``
                and ``mlcil.load`` use); False: the newest one, mid-session ones included
                (what ``--resume`` continues from).
        """
        folder = self.run.latest(session_end=session_end)
        if folder is None:
            raise ConfigError(f"{self.run.path}: no checkpoint yet (has a session finished?)")
        return folder, restore_run(self.experiment.inputs, folder)


def load_run(run_dir: str | Path) -> tuple[RunConfig, RunMetrics | None]:
    """The resolved config and the record in ``metrics.json`` (None when no session is done
    yet) of a run folder; the record is checked (:func:`mlcil.results.read_metrics`)."""
    run = RunDir(run_dir)
    config_path = run.config_file
    if not config_path.is_file():
        raise ConfigError(f"{run.path} is not a run folder: {config_path} is missing")
    return _load_run_config(run), read_metrics(run.path)


def read_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's resolved settings as its ``config.yaml`` records them, flattened to dotted keys
    (``train.lr``), without checking them against this version's schema (a report shows old
    runs as they were made); None when the file is missing or unreadable (logged)."""
    path = RunDir(run_dir).config_file
    if not path.is_file():
        return None
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, MlcilError, yaml.YAMLError) as error:
        logger.warning("%s: settings not shown: %s", path, error)
        return None
    return flatten(raw) if isinstance(raw, dict) else None


def _run_config(run: RunDir, overrides: Sequence[str], resuming: bool) -> RunConfig:
    run.check_own_files()
    if os.path.lexists(run.aside) and not run.holds_lock:
        raise ConfigError(
            f"{run.path}: an --overwrite of this run was interrupted ({run.aside} holds the "
            f"earlier run): `mlcil train --resume {run.path}` finishes it first"
        )
    if not run.config_file.is_file():
        raise ConfigError(f"{run.path} is not a run folder (no {run.config_file.name})")
    config = _load_run_config(run, overrides)
    if resuming:
        check_resume_config(load_config(run.config_file), config, run.config_file)
    return config


# What loading a run's config says when a method, network or dataset is not registered.
_UNREGISTERED = re.compile(r"unknown (method|network)|data\.dataset")


def _load_run_config(run: RunDir, overrides: Sequence[str] = ()) -> RunConfig:
    """A run's ``config.yaml``, after importing the plugins it records."""
    plugins = recorded_plugins(read_yaml(run.config_file))
    import_recorded(plugins, f"the run {run.path}")
    try:
        return load_config(run.config_file, overrides)
    except ConfigError as error:
        if plugins or not _UNREGISTERED.search(str(error)):
            raise
        raise ConfigError(
            f"{error} (a run made with a plugin needs it again: pass --plugin MODULE or set "
            "MLCIL_PLUGINS)"
        ) from None


def import_config_plugins(specs: Sequence[str | Path]) -> None:
    """Import the plugins that config files record (the ``config.yaml`` of an earlier run given
    as a config), before they are read. A spec that names no file is left to the loader."""
    for spec in specs:
        path = Path(spec) if Path(spec).is_file() else find_packaged(spec)
        if path is not None:
            import_recorded(recorded_plugins(read_yaml(path)), f"the config {spec}")


def with_recorded_plugins(config: RunConfig) -> RunConfig:
    """``config`` with ``plugins`` listing what the run is made with: the plugins it records
    already, those this process imported, and the importable modules outside mlcil that define
    its method, network and dataset."""
    components: list[object] = [
        METHODS.get_class(config.method.name),
        NETWORKS.get_class(config.model.network),
    ]
    if config.data.dataset in DATASETS:
        components.append(DATASETS[config.data.dataset].load)
    plugins = plugins_to_record(config.plugins, components)
    return config if plugins == config.plugins else config.model_copy(update={"plugins": plugins})


def open_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    resuming: bool = False,
    add_session: str | Path | None = None,
    test_manifest: str | Path | None = None,
    runtime: Runtime | None = None,
) -> tuple[OpenedRun, list[AddedSession] | None]:
    """Open a run folder: its ``config.yaml`` with ``overrides``, its plan, one experiment.

    Args:
        run_dir: the run folder.
        overrides: ``key=value`` run-time overrides (``train.device=cpu``).
        resuming: refuse overrides that would change the run's results (``--resume``).
        add_session: a training manifest to plan one more session from (``--add-session``);
            the newest checkpoint must fit the extended plan.
        test_manifest: the added session's test manifest.
        runtime: the process's runtime (default: made from the config).

    Returns:
        The opened run, and with ``add_session`` every added session to record (else None).
    """
    run = RunDir(run_dir)
    config = _run_config(run, overrides, resuming)
    added: list[AddedSession] | None = None
    folder = None
    if add_session is None:
        plan = run_plan(run.path, config)
    else:
        folder = run.latest()
        if folder is None:
            raise DataError(f"--add-session: {run.path} has no checkpoint to continue from")
        learned = learned_sessions(folder)
        plan, added = plan_added_session(run.path, config, learned, add_session, test_manifest)
    experiment = Experiment(config, runtime=runtime or make_runtime(config), plan=plan)
    if folder is not None:
        restore_run(experiment.inputs, folder)  # the checkpoint must fit before anything is written
    return OpenedRun(run, experiment), added


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-evaluate the last finished session of a run (finished or not) on its test set.

    Returns:
        The session's result (maps in percent) plus ``session``, ``recorded_map`` (the seen
        mAP ``metrics.json`` records for that session, None when it holds none) and
        ``recorded_key`` (``last_map``, or ``sessions[i].seen_map`` for a run not finished).
    """
    _, metrics = load_run(run_dir)
    opened, _ = open_run(run_dir)
    experiment = opened.experiment
    _, state = opened.restore(session_end=True)
    session = experiment.sessions[state.next_session - 1]
    scores, targets = evaluate_session(experiment.data, experiment.runtime, state.method, session)
    base = experiment.sessions[0]
    result = session_result(scores, targets, session, base, experiment.class_names)
    recorded = [e for e in (metrics.sessions if metrics else []) if e.index == session.index]
    is_last = session.index == len(experiment.sessions) - 1
    value: float | None
    if metrics is not None and metrics.finished and is_last:
        key, value = "last_map", metrics.last_map
    else:
        # A session added by a killed --add-session, never learned, must not switch the check
        # off: the evaluated session's own recorded seen mAP is compared instead.
        key = f"sessions[{session.index}].seen_map"
        value = recorded[-1].seen_map if recorded else None
    unlearned = [item for item in read_added_sessions(run_dir) if item.index >= state.next_session]
    if unlearned:
        logger.warning(
            "%s records added session(s) %s that no finished checkpoint holds (an --add-session "
            "that did not finish); they are not evaluated: `mlcil train --resume %s` learns them",
            run_dir,
            ", ".join(str(item.index) for item in unlearned),
            run_dir,
        )
    return {**result.plain(), "session": session.index, "recorded_map": value, "recorded_key": key}


# --- callbacks of the features above the engine ----------------------------------------------


class DiagnosticsCallback(Callback):
    """Measures restore quality and drift per session into ``result["diagnostics"]``."""

    def __init__(self, experiment: Experiment) -> None:
        self.diagnostics = SessionDiagnostics(experiment)

    def on_session_start(self, run: RunView, session: Session, summary: str, resumed: bool) -> None:
        assert run.folder is not None and run.state is not None
        # Resumed inside the session: the network as the session started is on disk.
        self.diagnostics.before(run.state.method, run.folder.path if resumed else None, session)

    def on_session_evaluated(
        self, run: RunView, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        assert run.state is not None
        result["diagnostics"] = self.diagnostics.after(run.state.method, session, own)


class ReplaceEarlierRun(Callback):
    """Deletes the run that ``--overwrite`` set aside once the new run's first checkpoint is
    complete."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_checkpoint_saved(self, run: RunView, folder: Path) -> None:
        self.run.discard_aside()


class PretrainedProvenance(Callback):
    """Records the provenance of ``pretrain:`` weights in ``metrics.json`` (None otherwise)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def on_metrics_header(self, run: RunView, header: dict[str, Any]) -> None:
        header["pretrained"] = cached_provenance(self.config.model, self.config.data.image_size)


def standard_callbacks(experiment: Experiment, run: RunDir) -> list[Callback]:
    """The callbacks every CLI run has: diagnostics (when on), the provenance, the replacement
    of a set-aside run."""
    callbacks: list[Callback] = []
    if experiment.config.train.diagnostics:
        callbacks.append(DiagnosticsCallback(experiment))
    callbacks += [PretrainedProvenance(experiment.config), ReplaceEarlierRun(run)]
    return callbacks


# --- starting and resuming -----------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """A trainer ready to run, and the context to run it in: it holds the folder's lock and
    puts a set-aside run back when training fails before the new run's first checkpoint."""

    trainer: Trainer
    guard: contextlib.ExitStack

    def run(self, max_sessions: int | None = None) -> RunMetrics | None:
        with self.guard:
            return self.trainer.run(max_sessions=max_sessions)


def check_image_size(experiment: Experiment, model: ModelConfig) -> None:
    """Refuse an input size smaller than the backbone's stride (its feature map would be
    padding only), naming ``data.image_size`` and the least size that works."""
    image_size = experiment.config.data.image_size
    network = experiment.method_class.build_network(model, image_size, load_weights=False)
    probe = 256
    try:
        _, height, _ = network.backbone.feature_shape(probe)
        stride = max(probe // max(height, 1), 1)
        if image_size >= stride:
            network.backbone.feature_shape(image_size)
    except (RuntimeError, AssertionError) as error:  # e.g. a backbone of one fixed input size
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"data.image_size={image_size}: the backbone fails on it: {reason}"
        ) from None
    if image_size < stride:
        raise ConfigError(
            f"data.image_size={image_size} is smaller than the stride of {model.backbone} at "
            f"feature stage {model.feature_stage} ({stride} px): use at least {stride}"
        )


def preflight(experiment: Experiment) -> None:
    """Every check a new run can make before it trains: image size, every image file's header
    (and trailer), the starting weights readable and finite. Nothing is written."""
    from mlcil.data.preflight import check_image_files

    check_image_size(experiment, experiment.starting_model)
    for source in (experiment.train_source, experiment.test_source):
        check_image_files(source)
    experiment.build_method()  # reads the weights file; damaged or non-finite weights stop here


def start_run(
    config: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    runtime: Runtime | None = None,
    observers: Sequence[Callback | Observer] = (),
) -> Launch:
    """A new run, checked and ready: nothing of an earlier run is touched before every check
    passed, and with ``overwrite`` it is only set aside until the new run's first checkpoint.
    What the run needs installed (trackers, dataset packages, weights) is checked before any
    folder is written or any weights are made."""
    config = with_recorded_plugins(config)
    run = RunDir(run_dir) if run_dir else RunDir.inside(config.output_dir, config.run_name)
    check_run_requirements(config)  # before any folder is written, download or pretraining
    weights = config.model.pretrained
    if weights is not None and is_hub_name(weights) and environment_rank() == 0:
        download_hub_weights(weights, config.model.backbone)  # nor any download
    runtime = runtime or make_runtime(config)
    # The data, class list and sessions too: a typo costs no pretraining and leaves no folder.
    plan = Experiment(config, runtime=runtime).plan
    names = plan.class_names
    logger.info("classes (%d): %s", len(names), ", ".join(names))  # a typo shows here
    guard = contextlib.ExitStack()
    again = False  # the same run, stopped before its first checkpoint: started again
    try:
        if runtime.is_main:
            run.check_own_files()
            guard.enter_context(run.locked())
            run.recover()
            if overwrite:
                run.check_overwritable()
            else:
                again = _check_fresh(run, config)
        again = runtime.broadcast(again) if runtime.world_size > 1 else again
        model = resolve_starting_weights(config.model, config.data.image_size, runtime)
        experiment = Experiment(config, runtime=runtime, plan=plan, starting_model=model)
        preflight(experiment)
        if overwrite and runtime.is_main:
            run.set_aside()
            guard.enter_context(_restored_on_failure(run))
        runtime.barrier()
    except BaseException:
        guard.close()
        raise
    callbacks = standard_callbacks(experiment, run)
    trainer = Trainer(
        experiment.inputs, run, resume=again, observers=observers, callbacks=callbacks
    )
    return Launch(trainer, guard)


def resolve_starting_weights(model: ModelConfig, image_size: int, runtime: Runtime) -> ModelConfig:
    """``model`` with its ``pretrain:``/``imagenet:`` weights resolved to the cached file, made
    once per machine: local rank 0 looks them up (and makes them on first use) under the weights
    cache's build lock while the other ranks wait at a barrier; then they find them made. The
    lock also keeps another run on the machine from making the same file at the same time."""
    name = model.pretrained or ""
    if not name.startswith((PRETRAIN_SCHEME, IMAGENET_SCHEME)):
        return resolve_pretrained(model, image_size, runtime=runtime)[0]

    def resolve() -> ModelConfig:
        with building():
            return resolve_pretrained(model, image_size, runtime=runtime)[0]

    resolved = resolve() if runtime.local_rank == 0 else None
    runtime.barrier()
    return resolved if resolved is not None else resolve()


def _check_fresh(run: RunDir, config: RunConfig) -> bool:
    """Refuse a folder that holds a run, unless it is this very run stopped before its first
    checkpoint (then it starts again: True)."""

    def same_settings(config_file: Path) -> None:
        changes = result_changes(load_config(config_file), config)
        if changes:
            key, before, after = changes[0]
            raise ConfigError(
                f"{run.path} holds a run that stopped before its first checkpoint, made with "
                f"other settings ({key}: {shown(before)} there, {shown(after)} now): start it "
                "again with its settings or --resume, replace it with --overwrite, or choose "
                "another --run-dir"
            )

    return run.check_fresh(same_settings=same_settings)


@contextlib.contextmanager
def _restored_on_failure(run: RunDir) -> Iterator[None]:
    try:
        yield
    except BaseException:
        run.restore_aside()  # a no-op once the first checkpoint has replaced the earlier run
        raise


def resume_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    add_session: str | Path | None = None,
    test_manifest: str | Path | None = None,
    observers: Sequence[Callback | Observer] = (),
) -> Launch:
    """Continue a run from its newest checkpoint; with ``add_session``, learn one more session
    whose classes are the manifest's labels the run has not seen (recorded in the folder, and
    forgotten again when it fails before its checkpoint)."""
    run = RunDir(run_dir)
    guard = contextlib.ExitStack()
    try:
        if environment_rank() == 0:  # before the config is read: recover() may change it
            run.check_own_files()
            guard.enter_context(run.locked())
            run.recover()  # an --overwrite killed half-way is finished first
        config = _run_config(run, overrides, resuming=True)
        check_run_requirements(config, weights=False)  # the checkpoint holds the weights
        runtime = make_runtime(config)
        opened, added = open_run(
            run.path,
            overrides,
            resuming=True,
            add_session=add_session,
            test_manifest=test_manifest,
            runtime=runtime,
        )
        if added is not None:
            logger.info(
                "adding session %d with classes %s", added[-1].index, ", ".join(added[-1].classes)
            )
            guard.enter_context(recorded_until_learned(run.path, added))
    except BaseException:
        guard.close()
        raise
    experiment = opened.experiment
    callbacks = standard_callbacks(experiment, run)
    trainer = Trainer(experiment.inputs, run, resume=True, observers=observers, callbacks=callbacks)
    return Launch(trainer, guard)
