"""The training engine: one loop that runs a whole protocol for any registered method.

``Trainer`` keeps every piece of run state in one place (network and method state, exemplar
memory, results so far, the next session, elapsed time), checkpoints it after each session and
can rebuild itself from the latest checkpoint (``resume=True``). Randomness is re-seeded from
``(seed, session, epoch)`` at the start of every session and epoch, so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mlcil
from mlcil.config import RunConfig, load_config
from mlcil.data import build_sources, label_density
from mlcil.data.sessions import (
    TargetedImages,
    session_test_set,
    session_train_indices,
    session_train_set,
    test_indices,
)
from mlcil.data.transforms import build_transform
from mlcil.engine.checkpoint import (
    latest_checkpoint,
    load_network_weights,
    read_state,
    save_checkpoint,
)
from mlcil.engine.evaluate import predict_scores, session_result
from mlcil.engine.runtime import Runtime, derive_seed, seed_everything
from mlcil.errors import ConfigError, DataError, TrainingError
from mlcil.fileio import write_text_atomic
from mlcil.memory import ExemplarMemory
from mlcil.methods import Batch, Method, SessionContext, get_method
from mlcil.models import build_network
from mlcil.protocol import Session, protocol_sessions
from mlcil.results import summarize, write_results

logger = logging.getLogger(__name__)

# Offsets that keep the derived seeds of a session's phases apart from its epochs' seeds.
_GROWTH_SEED = 1_000_001
_THRESHOLD_PASS_SEED = 1_000_002


def plan_sessions(config: RunConfig, method: type[Method], num_classes: int) -> list[Session]:
    """The sessions a run learns: the protocol's, or one session of every class (joint)."""
    sessions = protocol_sessions(config.protocol, num_classes)  # validates the protocol
    if method.single_session:
        every = list(range(num_classes))
        return [Session(index=0, new_classes=every, seen_classes=every)]
    return sessions


def one_cycle(
    optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """OneCycle per session, stepped every batch (KRT-SPEC section 8).

    OneCycle needs a warm-up of at least two steps; a session too short for that (tiny data or
    a test run) trains at the constant ``max_lr`` instead of failing.
    """
    if pct_start * total_steps <= 2:
        logger.warning(
            "only %d steps in this session: too few for OneCycle, using a constant lr", total_steps
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start
    )


class Trainer:
    """Runs a protocol, writing ``runs/<name>/``.

    Args:
        config: the resolved run configuration.
        run_dir: output folder; default ``<output_dir>/<run name>``.
        resume: continue from the latest checkpoint in ``run_dir``.
    """

    def __init__(
        self, config: RunConfig, run_dir: str | Path | None = None, resume: bool = False
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir) if run_dir else Path(config.output_dir) / config.run_name
        self.resume = resume
        self.runtime = Runtime.from_config(config.train, config.data.num_workers)
        self.method_class = get_method(config.method.name)
        if self.method_class.needs_memory and not config.memory.enabled:
            raise ConfigError(
                f"method {config.method.name!r} replays exemplars: set memory.per_class > 0 "
                "or memory.total"
            )
        self.train_source, self.test_source = build_sources(config.data)
        self.class_names = self.train_source.class_names
        self.sessions = plan_sessions(config, self.method_class, len(self.class_names))
        self.label_density = label_density(config.data, self.train_source)
        self._check_sessions()
        image_size = config.data.image_size
        self.train_transform = build_transform(image_size, True, config.data.augment)
        self.eval_transform = build_transform(image_size, False)
        self.memory = ExemplarMemory(
            per_class=config.memory.per_class,
            total=config.memory.total,
            label_mode=config.memory.labels,
        )
        self.method: Method | None = None
        self.results: list[dict[str, Any]] = []
        self.next_session = 0
        self.elapsed_s = 0.0
        self._final_scores: tuple[np.ndarray, np.ndarray] | None = None
        self._writer = None

    def clear_run_dir(self) -> None:
        """Delete the result files and checkpoints of an earlier run in ``run_dir``."""
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        for name in ("config.yaml", "metrics.json", "metrics.csv", "map_per_session.png"):
            (self.run_dir / name).unlink(missing_ok=True)
        (self.run_dir / "train.log").unlink(missing_ok=True)

    # --- set-up --------------------------------------------------------------------------------

    def _check_sessions(self) -> None:
        """Fail before any training when a session would have no training or test image."""
        overlap = self.config.data.overlap
        for session in self.sessions:
            train = session_train_indices(self.train_source.labels, session, self.sessions, overlap)
            if len(train) == 0:
                names = ", ".join(self.class_names[c] for c in session.new_classes)
                raise DataError(
                    f"session {session.index} ({names}) has no training image in "
                    f"{self.config.data.dataset}/train"
                )
            if len(test_indices(self.test_source.labels, session.seen_classes)) == 0:
                raise DataError(
                    f"after session {session.index} no test image carries a seen class in "
                    f"{self.config.data.dataset}/test"
                )

    def build_method(self, load_weights: bool = True) -> Method:
        seed_everything(self.config.seed)
        network = build_network(
            self.config.model, self.config.data.image_size, load_weights=load_weights
        )
        network.to(self.runtime.device)
        return self.method_class(self.config.method.params, network, self.config.loss)

    def session_sizes(self) -> list[dict[str, int]]:
        """Training/test image counts per session (exemplars not included)."""
        overlap = self.config.data.overlap
        rows = []
        for session in self.sessions:
            train = session_train_indices(self.train_source.labels, session, self.sessions, overlap)
            test = test_indices(self.test_source.labels, session.seen_classes)
            rows.append(
                {
                    "session": session.index,
                    "new_classes": len(session.new_classes),
                    "train_images": len(train),
                    "test_images": len(test),
                }
            )
        return rows

    # --- the run -------------------------------------------------------------------------------

    def run(self, max_sessions: int | None = None) -> dict[str, Any] | None:
        """Learn the remaining sessions (at most ``max_sessions`` of them).

        Returns:
            The ``metrics.json`` content once every session is done, else None.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = self._attach_log_file()
        try:
            if self.resume:
                self._restore()
            else:
                if latest_checkpoint(self.run_dir) is not None:
                    raise ConfigError(
                        f"{self.run_dir} already holds a run: resume it with --resume, or "
                        "choose another name/output_dir"
                    )
                self.method = self.build_method()
                if self.runtime.is_main:
                    write_text_atomic(self.run_dir / "config.yaml", self.config.to_yaml())
            remaining = self.sessions[self.next_session :]
            if max_sessions is not None:
                remaining = remaining[:max_sessions]
            for session in remaining:
                self._run_session(session)
            if self.next_session < len(self.sessions):
                return None
            return self._finish()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            logging.getLogger("mlcil").removeHandler(handler)
            handler.close()

    def _run_session(self, session: Session) -> None:
        assert self.method is not None
        started = time.perf_counter()
        overlap = self.config.data.overlap
        exemplar_indices, exemplar_targets = self.memory.targets(
            self.train_source.labels, session, self.sessions
        )
        train_set = session_train_set(
            self.train_source,
            session,
            self.sessions,
            self.train_transform,
            overlap=overlap,
            extra_indices=exemplar_indices,
            extra_targets=exemplar_targets,
        )
        own_images = len(train_set) - len(exemplar_indices)
        logger.info(
            "session %d: classes %s, %d training images + %d exemplars",
            session.index,
            ", ".join(self.class_names[c] for c in session.new_classes),
            own_images,
            len(exemplar_indices),
        )
        context = self._learn(session, train_set)
        train_time = time.perf_counter() - started
        scores, targets = self._evaluate(session)
        result = session_result(scores, targets, session, self.sessions[0], self.class_names)
        result.update(
            train_images=own_images,
            memory_images=len(exemplar_indices),
            train_time_s=round(train_time, 3),
            method_state=self.method.state_dict(),
        )
        if self.memory.enabled:
            self._update_memory(session, train_set.indices[:own_images])
        self.method.end_session(context)
        self.results.append(result)
        self.next_session = session.index + 1
        self.elapsed_s += time.perf_counter() - started
        self._final_scores = (scores, targets)
        self._log_session(result)
        if self.runtime.is_main:
            save_checkpoint(
                self.run_dir,
                session.index,
                self.method.network,
                self._state(),
                self.memory.to_dict(),
            )

    def _learn(self, session: Session, train_set: TargetedImages) -> SessionContext:
        assert self.method is not None
        config = self.config.train
        runtime = self.runtime
        seed = self.config.seed

        def loader(phase_seed: int) -> torch.utils.data.DataLoader:
            return runtime.loader(train_set, config.batch_size, shuffle=True, seed=phase_seed)

        def threshold_pass() -> Iterator[Batch]:
            seed_everything(derive_seed(seed, session.index, _THRESHOLD_PASS_SEED))
            for images, targets in loader(derive_seed(seed, session.index, _THRESHOLD_PASS_SEED)):
                yield Batch(images, targets).to(runtime.device)

        context = SessionContext(
            session=session,
            train_batches=threshold_pass,
            device=runtime.device,
            autocast=runtime.autocast,
            label_density=self.label_density,
        )
        seed_everything(derive_seed(seed, session.index, _GROWTH_SEED))
        self.method.begin_session(context)
        network = self.method.network
        network.to(runtime.device)
        epochs = config.epochs_for(session.index)
        learning_rate = config.lr_for(session.index)
        optimizer = torch.optim.Adam(
            self.method.parameter_groups(), lr=learning_rate, weight_decay=config.weight_decay
        )
        steps_per_epoch = len(loader(0))
        scheduler = one_cycle(optimizer, learning_rate, epochs * steps_per_epoch, config.pct_start)
        scaler = runtime.grad_scaler()
        for epoch in range(epochs):
            epoch_seed = derive_seed(seed, session.index, epoch)
            seed_everything(epoch_seed)
            network.train()
            bar = tqdm(
                loader(epoch_seed),
                desc=f"session {session.index} epoch {epoch + 1}/{epochs}",
                # None lets tqdm hide itself when stderr is not a terminal (logs, CI).
                disable=None if config.progress and runtime.is_main else True,
                leave=False,
                dynamic_ncols=True,
            )
            totals: dict[str, float] = {}
            for step, (images, targets) in enumerate(bar):
                batch = Batch(images, targets).to(runtime.device)
                with runtime.autocast():
                    output = self.method.training_step(batch)
                if not torch.isfinite(output.loss):
                    # Stop before a NaN reaches the weights: the previous session's checkpoint
                    # stays the latest, so the run can resume with a smaller learning rate.
                    raise TrainingError(
                        f"session {session.index} epoch {epoch + 1} step {step}: the loss is "
                        f"{float(output.loss.detach())} (parts: "
                        + ", ".join(f"{k}={float(v):.4g}" for k, v in output.parts.items())
                        + f"); lower train.lr or train.incremental_lr and resume {self.run_dir}"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(output.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                parts = {"loss": output.loss.detach(), **output.parts}
                for name, value in parts.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                if step % 10 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix({k: f"{v / (step + 1):.3g}" for k, v in totals.items()})
                    self._scalar_group(
                        f"train/session_{session.index}",
                        {k: float(v) for k, v in parts.items()},
                        epoch * steps_per_epoch + step,
                    )
            means = {k: v / max(steps_per_epoch, 1) for k, v in totals.items()}
            logger.info(
                "session %d epoch %d/%d: %s",
                session.index,
                epoch + 1,
                epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in means.items()),
            )
            if config.eval_every_epoch and epoch < epochs - 1:
                scores, targets = self._evaluate(session)
                interim = session_result(
                    scores, targets, session, self.sessions[0], self.class_names
                )
                # Logged for curiosity only: the reported model is always the last epoch's.
                logger.info(
                    "session %d epoch %d: seen mAP %.2f (not used for selection)",
                    session.index,
                    epoch + 1,
                    interim["seen_map"],
                )
                self._scalar(
                    "eval/epoch_seen_map", interim["seen_map"], session.index * 1000 + epoch
                )
        return context

    def _evaluate(self, session: Session) -> tuple[np.ndarray, np.ndarray]:
        assert self.method is not None
        test_set = session_test_set(self.test_source, session.seen_classes, self.eval_transform)
        loader = self.runtime.loader(test_set, self._eval_batch_size(), shuffle=False)
        return predict_scores(self.method, loader, self.runtime, session.num_seen)

    def _eval_batch_size(self) -> int:
        return self.config.train.eval_batch_size or 2 * self.config.train.batch_size

    def _update_memory(self, session: Session, own_indices: np.ndarray) -> None:
        """Herd exemplars of the session's classes on un-augmented pooled features."""
        assert self.method is not None
        plain = TargetedImages(
            self.train_source,
            own_indices,
            np.zeros((len(own_indices), 1), dtype=np.float32),
            self.eval_transform,
        )
        network = self.method.network
        was_training = network.training
        network.eval()
        chunks = []
        with torch.no_grad():
            for images, _ in self.runtime.loader(plain, self._eval_batch_size(), shuffle=False):
                with self.runtime.autocast():
                    features = network.pooled_features(images.to(self.runtime.device))
                chunks.append(features.float().cpu())
        network.train(was_training)
        self.memory.update(
            session,
            own_indices,
            torch.cat(chunks),
            self.train_source.labels,
            self.train_source.image_refs,
        )

    # --- state ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        assert self.method is not None
        return {
            "run_name": self.config.run_name,
            "method": self.config.method.name,
            "next_session": self.next_session,
            "num_sessions": len(self.sessions),
            "session_sizes": list(self.method.network.session_sizes),
            "method_state": self.method.state_dict(),
            "results": self.results,
            "elapsed_s": self.elapsed_s,
        }

    def _restore(self) -> None:
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            raise ConfigError(f"--resume: no checkpoint found in {self.run_dir / 'checkpoints'}")
        state = read_state(folder)
        self.method = self.build_method(load_weights=False)
        for size in state["session_sizes"]:
            self.method.network.add_session(int(size))
        self.method.network.to(self.runtime.device)
        load_network_weights(folder, self.method.network)
        self.method.load_state_dict(state["method_state"])
        memory_path = folder / "memory.json"
        self.memory = ExemplarMemory.load(memory_path)
        self.memory.check_against(self.train_source.image_refs, where=str(memory_path))
        self.results = list(state["results"])
        self.next_session = int(state["next_session"])
        self.elapsed_s = float(state["elapsed_s"])
        if self.next_session > 0:
            self.method.restore(self.sessions[self.next_session - 1])
        logger.info("resumed %s after session %d", self.run_dir, self.next_session - 1)

    def _finish(self) -> dict[str, Any]:
        if self._final_scores is None:  # resumed after the last session: score again
            self._final_scores = self._evaluate(self.sessions[-1])
        scores, targets = self._final_scores
        config = self.config
        header = {
            "method": config.method.name,
            "label": config.display_label,
            "dataset": config.data.dataset,
            "protocol": config.protocol.upper().replace(" ", ""),
            "seed": config.seed,
            "run_name": config.run_name,
            "network": config.model.network,
            "backbone": config.model.backbone,
            "memory_per_class": config.memory.per_class,
            "memory_total": config.memory.total,
            "device": str(self.runtime.device),
            "machine": platform.machine(),
            "mlcil_version": mlcil.__version__,
            "torch_version": torch.__version__,
        }
        metrics = summarize(
            self.results, scores, targets, config.train.f1_threshold, header, self.elapsed_s
        )
        if self.runtime.is_main:
            write_results(self.run_dir, metrics)
        return metrics

    # --- logging -------------------------------------------------------------------------------

    def _attach_log_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("mlcil")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        return handler

    def _tensorboard(self) -> Any:
        if not (self.config.train.tensorboard and self.runtime.is_main):
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def _scalar(self, tag: str, value: float, step: int) -> None:
        writer = self._tensorboard()
        if writer is not None:
            writer.add_scalar(tag, value, step)

    def _scalar_group(self, prefix: str, values: dict[str, float], step: int) -> None:
        writer = self._tensorboard()
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(f"{prefix}/{name}", value, step)

    def _log_session(self, result: dict[str, Any]) -> None:
        def fmt(value: float | None) -> str:
            return "  -  " if value is None else f"{value:5.2f}"

        logger.info(
            "session %d done: seen mAP %s | base %s | new %s | %d test images | %.1f s",
            result["index"],
            fmt(result["seen_map"]),
            fmt(result["base_map"]),
            fmt(result["new_map"]),
            result["test_images"],
            result["train_time_s"],
        )
        if result["classes_without_positives"]:
            logger.warning(
                "session %d: classes without a positive test image (AP counted as 0): %s",
                result["index"],
                ", ".join(result["classes_without_positives"]),
            )
        self._scalar("eval/seen_map", result["seen_map"], result["index"])
        if result["base_map"] is not None:
            self._scalar("eval/base_map", result["base_map"], result["index"])
        if result["new_map"] is not None:
            self._scalar("eval/new_map", result["new_map"], result["index"])


def load_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The resolved config and ``metrics.json`` (if written) of a run folder."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {config_path} is missing")
    config = load_config(config_path)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return config, metrics


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-evaluate the latest checkpoint of a run on its last finished session's test set.

    Returns:
        The session's result (maps in percent) plus ``session`` and ``recorded_last_map`` (the
        ``last_map`` of ``metrics.json``, or None when the run is unfinished).
    """
    run_dir = Path(run_dir)
    config, metrics = load_run(run_dir)
    trainer = Trainer(config, run_dir=run_dir)
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ConfigError(f"{run_dir}: no checkpoint to evaluate")
    state = read_state(folder)
    method = trainer.build_method(load_weights=False)
    for size in state["session_sizes"]:
        method.network.add_session(int(size))
    method.network.to(trainer.runtime.device)
    load_network_weights(folder, method.network)
    session = trainer.sessions[int(state["next_session"]) - 1]
    method.session = session
    trainer.method = method
    scores, targets = trainer._evaluate(session)
    result = session_result(scores, targets, session, trainer.sessions[0], trainer.class_names)
    recorded = metrics.get("last_map") if session.index == len(trainer.sessions) - 1 else None
    return {**result, "session": session.index, "recorded_last_map": recorded}
