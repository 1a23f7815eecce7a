"""Diagnostics that explain a run's results, measured after every session for ``metrics.json``.

Three questions, each answered where the full labels of the data are known (every built-in
dataset and every manifest: the protocol hides labels from the learner, not from this module):

- **Knowledge restore**: of the old-class labels the protocol hid on a session's training
  images, how many did the method give back (recall), and how many of its restored labels are
  true (precision)? Asked through ``Method.restored_targets``; methods that restore no labels
  report nothing.
- **Old-knowledge drift**: on a fixed probe set of test images, how far did the embeddings of
  the old sessions (one per session for ICA, the shared pooled one for a linear network) and the
  old classes' scores move while the session was learned?
- **New classes**: the newest session's classes are scored in the session's ``ap`` and
  ``new_map`` already; nothing is added here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlcil.engine.checkpoint import restore_run
from mlcil.experiment import Experiment
from mlcil.inference import infer
from mlcil.methods.base import Method
from mlcil.metrics.diagnostics import embedding_drift, logit_drift, pseudo_label_quality
from mlcil.protocol import Session
from mlcil.rundir import RunDir, checkpoint_name

PROBE_IMAGES = 256  # fixed test images whose outputs are compared across sessions
RESTORE_IMAGES = 2000  # training images of a session on which restored labels are checked
_PROBE_SEED = 0  # the probe does not depend on the run's seed: every run sees the same images


class SessionDiagnostics:
    """Measures one session: call ``before`` as it starts and ``after`` once it is evaluated."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        test = experiment.test_source
        order = np.random.default_rng(_PROBE_SEED).permutation(len(test))
        self.probe = np.sort(order[:PROBE_IMAGES])
        self.earlier: tuple[torch.Tensor, torch.Tensor] | None = None

    def _loader(self, dataset: Dataset) -> DataLoader:
        # Every image on every process (no sharding): the diagnostics are cheap, and each rank
        # then holds the same values.
        batch, workers = self.experiment.eval_batch_size, self.experiment.runtime.num_workers
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)

    def _probe_outputs(self, method: Method) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, embeddings)`` of the probe images, un-augmented, in eval mode."""
        experiment = self.experiment
        dataset = experiment.plain_images(self.probe, experiment.test_source)
        network = method.network

        def step(images: torch.Tensor, _: object) -> dict[str, torch.Tensor]:
            output = network(images)
            return {"logits": output.logits, "embeddings": output.embeddings}

        rows = infer(self._loader(dataset), step, experiment.runtime, network)
        return torch.from_numpy(rows["logits"]), torch.from_numpy(rows["embeddings"])

    def before(
        self, method: Method, run_dir: Path | None = None, session: Session | None = None
    ) -> None:
        """Keep the probe outputs of the network as the session starts (if it has learned).

        A run resumed inside ``session`` passes its ``run_dir``: the network as the session
        started is then rebuilt from the previous session's checkpoint.
        """
        self.earlier = None
        if run_dir is not None and session is not None:
            if session.index == 0:
                return
            folder = RunDir(run_dir).checkpoint(checkpoint_name(session.index - 1))
            method = restore_run(self.experiment.inputs, folder).method
        if method.network.num_sessions == 0:
            return
        self.earlier = self._probe_outputs(method)

    def after(self, method: Method, session: Session, own: np.ndarray) -> dict[str, Any]:
        """Restore quality and drift of ``session``, before the method ends it."""
        result: dict[str, Any] = {"restore": None, "embedding_drift": None, "logit_drift": None}
        if session.num_old == 0:
            return result
        result["restore"] = self._restore(method, session, own)
        if self.earlier is not None:
            earlier_logits, earlier_embeddings = self.earlier
            logits, embeddings = self._probe_outputs(method)
            old_slots = earlier_embeddings.shape[1]  # the previous network's embedding slots
            result["embedding_drift"] = _rounded(
                embedding_drift(earlier_embeddings.numpy(), embeddings[:, :old_slots].numpy())
            )
            old = session.num_old
            result["logit_drift"] = _rounded(
                logit_drift(earlier_logits[:, :old].numpy(), logits[:, :old].numpy())
            )
        return result

    def _restore(self, method: Method, session: Session, own: np.ndarray) -> dict | None:
        rng = np.random.default_rng(_PROBE_SEED)
        sample = np.sort(rng.permutation(own)[:RESTORE_IMAGES])
        experiment = self.experiment
        restores: list[bool] = []

        def step(images: torch.Tensor, _: object) -> dict[str, torch.Tensor]:
            targets = method.restored_targets(images)
            restores.append(targets is not None)
            return {} if targets is None else {"restored": targets}

        rows = infer(self._loader(experiment.plain_images(sample)), step, experiment.runtime)
        if not all(restores) or "restored" not in rows:
            return None
        hidden = experiment.train_source.labels[sample][:, : session.num_old]
        return _rounded(pseudo_label_quality(rows["restored"] > 0.5, hidden))


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    return {key: rounded(value) for key, value in values.items()}
