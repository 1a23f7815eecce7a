"""Run state, and its atomic, pickle-free checkpoints.

One folder per finished session under ``<run>/checkpoints/``::

    session_00/
        model.safetensors   network weights (safetensors: plain tensors, no code)
        state.json          session index, network growth, method state, results so far
        memory.json         the exemplar memory (image references + labels)
    latest                  name of the newest complete folder

A folder is written under a temporary name and renamed into place, and ``latest`` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and never a half one.
``restore_run`` is the one way back from a checkpoint to a live method: resume, ``eval`` and
``predict`` all use it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mlcil.errors import WeightsError
from mlcil.fileio import write_text_atomic
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import Method

if TYPE_CHECKING:
    from mlcil.experiment import Experiment

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mlcil-checkpoint"
CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class RunState:
    """Everything a run has learned so far: what a checkpoint captures.

    Attributes:
        method: the method with its network (and teacher) after ``next_session - 1``.
        memory: the exemplar memory.
        results: the ``metrics.json`` entries of the finished sessions.
        next_session: index of the next session to learn.
        elapsed_s: training and evaluation time spent so far.
    """

    method: Method
    memory: ExemplarMemory
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    next_session: int = 0
    elapsed_s: float = 0.0

    def to_json(self, run_name: str, method_name: str, num_sessions: int) -> dict[str, Any]:
        return {
            "run_name": run_name,
            "method": method_name,
            "next_session": self.next_session,
            "num_sessions": num_sessions,
            "session_sizes": list(self.method.network.session_sizes),
            "method_state": self.method.state_dict(),
            "results": self.results,
            "elapsed_s": self.elapsed_s,
        }


def save_checkpoint(
    run_dir: Path,
    session_index: int,
    network: nn.Module,
    state: dict[str, Any],
    memory: dict[str, Any],
) -> Path:
    """Write ``<run>/checkpoints/session_XX`` atomically and point ``latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"session_{session_index:02d}"
    final = root / name
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(tensors, str(staging / "model.safetensors"))
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
        (staging / "state.json").write_text(json.dumps(payload, indent=1))
        (staging / "memory.json").write_text(json.dumps(memory, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"cannot read checkpoint state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not an mlcil checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: unsupported checkpoint version {state.get('version')}")
    return state


def load_network_weights(folder: Path, network: nn.Module) -> None:
    """Load ``model.safetensors`` into a network rebuilt with the same growth."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise WeightsError(f"checkpoint weights not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error
    check_finite_weights(tensors, path)
    missing, unexpected = network.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise WeightsError(
            f"{path} does not fit the network built from the run's config "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {example!r})"
        )


def check_finite_weights(tensors: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint holding NaN or infinite weights (damaged, or saved after a blow-up
    that the finite-loss guard did not see): it would only give NaN scores later."""
    broken = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]
    if broken:
        raise WeightsError(
            f"{path}: {len(broken)} weight tensors are not finite (NaN or inf, e.g. "
            f"{broken[0]!r}); the checkpoint is damaged: restore it from a copy, or write an "
            "earlier session folder's name into checkpoints/latest"
        )


def restore_run(experiment: Experiment, folder: Path) -> RunState:
    """Rebuild a run's method, network and memory from one checkpoint folder.

    The network is built without reading ``model.pretrained`` (the checkpoint holds every
    weight), grown session by session as recorded, loaded, and the method re-enters the state
    right after the checkpoint's session (its teacher network included).
    """
    state = read_state(folder)
    try:
        sizes = [int(size) for size in state["session_sizes"]]
        next_session = int(state["next_session"])
        results = list(state["results"])
        elapsed = float(state["elapsed_s"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{folder / 'state.json'}: malformed checkpoint state: {error!r}"
        ) from error
    if not 0 < next_session <= len(experiment.sessions):
        raise WeightsError(
            f"{folder / 'state.json'}: next_session {next_session} does not fit the run's "
            f"{len(experiment.sessions)} sessions"
        )
    method = experiment.build_method(load_weights=False)
    for size in sizes:
        method.network.add_session(size)
    method.network.to(experiment.runtime.device)
    load_network_weights(folder, method.network)
    method.load_state_dict(state.get("method_state") or {})
    method.restore(experiment.sessions[next_session - 1])
    memory_path = folder / "memory.json"
    memory = ExemplarMemory.load(memory_path)
    memory.check_against(experiment.train_source.image_refs, where=str(memory_path))
    return RunState(method, memory, results, next_session, elapsed)
