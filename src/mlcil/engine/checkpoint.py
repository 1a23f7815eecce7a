"""Atomic, pickle-free checkpoints.

One folder per finished session under ``<run>/checkpoints/``::

    session_00/
        model.safetensors   network weights (safetensors: plain tensors, no code)
        state.json          session index, network growth, method state, results so far
        memory.json         the exemplar memory (image references + labels)
    latest                  name of the newest complete folder

A folder is written under a temporary name and renamed into place, and ``latest`` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from mlcil.errors import WeightsError
from mlcil.fileio import write_text_atomic

CHECKPOINT_FORMAT = "mlcil-checkpoint"
CHECKPOINT_VERSION = 1


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
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsError(f"cannot read checkpoint state {path}: {error}") from error
    if state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not an mlcil checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: unsupported checkpoint version {state.get('version')}")
    return state


def load_network_weights(folder: Path, network: nn.Module) -> None:
    """Load ``model.safetensors`` into a network rebuilt with the same growth."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise WeightsError(f"checkpoint weights not found: {path}")
    tensors = load_file(str(path))
    missing, unexpected = network.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise WeightsError(
            f"{path} does not fit the network built from the run's config "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {example!r})"
        )
