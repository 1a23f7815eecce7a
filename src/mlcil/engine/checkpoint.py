"""Run state, and its atomic, pickle-free checkpoints.

One folder per finished session under ``<run>/checkpoints/``::

    session_00/
        model.safetensors   network weights (safetensors: plain tensors, no code)
        state.json          session index, network growth, method state, results so far
        memory.json         the exemplar memory (image references + labels)
        method.safetensors  the method's own tensors (Method.state_tensors), if it keeps any
        memory.safetensors  the rows a method stored with its exemplars, if any
    session_01_epoch_002_step_000000/   a mid-session checkpoint (train.checkpoint_every_epochs,
        model.safetensors                 or SIGTERM): also the teacher's weights, the optimiser's
        teacher.safetensors               tensors, and in state.json["in_session"] the position,
        optimizer.safetensors             optimiser/schedule/scaler settings and random states
        state.json
        memory.json
    latest                  name of the newest complete folder

A folder is written under a temporary name and renamed into place, and ``latest`` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and never a half one.
``restore_run`` is the one way back from a checkpoint to a live method: resume, ``eval`` and
``predict`` all use it.

``state.json["tensor_files"]`` lists every tensor of the files besides ``model.safetensors``
(``method``, ``memory``, ``teacher``, ``optimizer``) with its dtype and shape. A restore checks
each file against it before using it (a file missing, short, or holding other tensors is an error
naming it), and every tensor a method or the memory stores must be finite; the memory's rows
must also have the width the method gave them (DER++'s logits: the classes seen when the
exemplar was stored). The network's own weights are checked when loaded (names, shapes, finite).
Nothing inside a checkpoint folder may be a symbolic link.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mlcil.engine.fit import FitPosition, FitProgress, FitResume
from mlcil.errors import MlcilError, WeightsError
from mlcil.fileio import (
    make_temporary_folder,
    open_own_file,
    parse_json,
    use_umask,
    write_text_atomic,
    writing,
)
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import Method
from mlcil.protocol import Session
from mlcil.rundir import LATEST, MID_SESSION, RunDir, checkpoint_name, mid_session_name
from mlcil.runtime import unwrap

if TYPE_CHECKING:
    from mlcil.engine.inputs import RunInputs

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
    resume: FitResume | None = None  # set when restored from a mid-session checkpoint

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
    run: RunDir | Path,
    session_index: int,
    network: nn.Module,
    state: dict[str, Any],
    memory: dict[str, Any],
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``<run>/checkpoints/<name>`` (default ``session_XX``) atomically and point
    ``latest`` at it. ``extra_tensors`` maps file stems (``teacher``, ``optimizer``) to tensors
    saved next to the model. Older mid-session folders are removed once the new one is in place.
    A write that fails (a full disk) names its file, and the previous checkpoint stays latest.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    root = run.checkpoints_root()  # a link planted at checkpoints/ is refused, never written
    root.mkdir(parents=True, exist_ok=True)
    name = name or checkpoint_name(session_index)
    final = run.own_checkpoint(run.checkpoint(name))
    staging = make_temporary_folder(root, prefix=f".{name}.")  # mode from the umask
    try:
        _write_tensors(network.state_dict(), staging / "model.safetensors", final)
        for stem, tensors in (extra_tensors or {}).items():
            _write_tensors(tensors, staging / f"{stem}.safetensors", final)
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
        payload["tensor_files"] = tensor_manifest(extra_tensors or {})
        for file, content in (("state.json", payload), ("memory.json", memory)):
            with writing(final / file):
                (staging / file).write_text(json.dumps(content, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, name + "\n")
    for folder in root.iterdir():
        if folder.name != name and MID_SESSION.fullmatch(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
    return final


def _write_tensors(tensors: dict[str, torch.Tensor], staging: Path, final: Path) -> None:
    with writing(final / staging.name):
        save_file(_plain_tensors(tensors), str(staging))
        use_umask(staging)  # safetensors writes its files 0600


def _plain_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# torch dtypes as safetensors names them in a file's header.
_STORED_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_manifest(files: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``{stem: {tensor name: [dtype, shape]}}`` of the tensor files a checkpoint writes beside
    its weights (what a restore checks them against)."""
    return {
        stem: {
            key: [_STORED_DTYPES.get(value.dtype, str(value.dtype)), list(value.shape)]
            for key, value in tensors.items()
        }
        for stem, tensors in files.items()
    }


def check_tensor_files(folder: Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensor files differ from what its ``state.json`` lists (a file
    missing, cut short, added, or holding other names, dtypes or shapes). Checkpoints written
    before the list existed are checked when their files are read."""
    listed = state.get("tensor_files")
    if listed is None:
        return
    if not isinstance(listed, dict):
        raise WeightsError(f"{folder / 'state.json'}: tensor_files is not a mapping")
    for stem in ("method", "memory", "teacher", "optimizer"):
        path = folder / f"{stem}.safetensors"
        expected = listed.get(stem)
        if expected is None:
            if path.exists():
                raise WeightsError(f"{path} was not written with this checkpoint (state.json)")
            continue
        if not path.is_file():
            raise WeightsError(
                f"{path} is missing: the checkpoint's state.json lists {len(expected)} tensors "
                "in it; restore the file from a copy"
            )
        found = _stored_layout(path)
        if found != expected:
            wrong = sorted(set(found) ^ set(expected)) or [
                key for key in sorted(expected) if found.get(key) != expected[key]
            ]
            first = wrong[0]
            raise WeightsError(
                f"{path} does not hold what the checkpoint wrote: tensor {first!r} is "
                f"{_layout(found.get(first))} there, {_layout(expected.get(first))} in "
                "state.json; restore the file from a copy"
            )


def _stored_layout(path: Path) -> dict[str, Any]:
    """``{name: [dtype, shape]}`` read from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(path), "pt") as handle:
            layout = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is no mapping)
                stored = handle.get_slice(key)
                layout[key] = [stored.get_dtype(), list(stored.get_shape())]
            return layout
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error


def _layout(entry: Any) -> str:
    return "absent" if entry is None else f"{entry[0]} of shape {tuple(entry[1])}"


def check_finite_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse stored tensors holding NaN or infinity: a method would train or predict on them."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise WeightsError(
                f"{path}: tensor {key!r} holds NaN or infinite values; the checkpoint is "
                "damaged: restore it from a copy"
            )


def check_checkpoint_folder(folder: Path) -> None:
    """Refuse a checkpoint folder holding a symbolic link (it would read another file)."""
    for entry in folder.iterdir() if folder.is_dir() else []:
        if entry.is_symlink():
            raise WeightsError(
                f"{entry} is a symbolic link: a checkpoint's files are its own and never "
                "followed; restore the file from a copy"
            )


def state_tensor_files(state: RunState) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a run state besides the network: the method's own (``method``) and the
    exemplars' data rows (``memory``), each only when there are some."""
    files = {"method": state.method.state_tensors(), "memory": state.memory.data_tensors()}
    return {stem: tensors for stem, tensors in files.items() if tensors}


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's optional safetensors file (an empty dict when it has none)."""
    if not path.is_file():
        return {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error
    check_finite_tensors(tensors, path)
    return tensors


def save_progress_checkpoint(
    run_dir: RunDir | Path, state: RunState, payload: dict[str, Any], progress: FitProgress
) -> Path:
    """A mid-session checkpoint: the run state plus the training position, the teacher, the
    optimiser (tensors in safetensors, the rest JSON), schedule, scaler and random states."""
    method, position = state.method, progress.position
    tensors, optimizer_json = flatten_optimizer(progress.optimization.optimizer.state_dict())
    extra = {"optimizer": tensors, **state_tensor_files(state)}
    teacher = method.old_network
    if teacher is not None:
        extra["teacher"] = teacher.state_dict()
    payload = dict(payload)
    payload["in_session"] = {
        "epoch": position.epoch,
        "step": position.step,
        "teacher_sizes": list(teacher.session_sizes) if teacher is not None else None,
        "optimizer": optimizer_json,
        "scheduler": progress.optimization.scheduler.state_dict(),
        "scaler": progress.scaler.state_dict(),
        "rng": progress.rng,
        "layout": progress.layout,
    }
    index = state.next_session
    name = mid_session_name(index, position.epoch, position.step)
    memory = state.memory.to_dict()
    network = unwrap(method.network)  # written inside the fit, where it may be DDP-wrapped
    return save_checkpoint(run_dir, index, network, payload, memory, extra, name)


def flatten_optimizer(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's ``state_dict`` as safetensors-ready tensors plus JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        plain[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def latest_checkpoint(run_dir: Path, session_end: bool = False) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (see :meth:`RunDir.latest`)."""
    return RunDir(run_dir).latest(session_end)


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        with os.fdopen(open_own_file(path, os.O_RDONLY), "rb") as handle:
            state = parse_json(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsError(f"cannot read checkpoint state {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not an mlcil checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path}: unsupported checkpoint version {state.get('version')}")
    return state


def load_network_weights(folder: Path, network: nn.Module, file: str = "model.safetensors") -> None:
    """Load ``model.safetensors`` (or ``file``) into a network rebuilt with the same growth."""
    path = Path(folder) / file
    if not path.is_file():
        raise WeightsError(f"checkpoint weights not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error
    check_finite_weights(tensors, path)
    try:
        missing, unexpected = network.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        reason = " ".join(str(error).split())
        raise WeightsError(
            f"{path} does not fit the network built from the run's config: {reason[:300]}"
        ) from None
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


def restore_run(run: RunInputs, folder: Path) -> RunState:
    """Rebuild a run's method, network and memory from one checkpoint folder.

    The network is built without reading ``model.pretrained`` (the checkpoint holds every
    weight), grown session by session as recorded, loaded, and the method re-enters the state
    right after the checkpoint's session (its teacher network included).
    """
    check_checkpoint_folder(folder)
    state = read_state(folder)
    check_tensor_files(folder, state)
    try:
        sizes = [int(size) for size in state["session_sizes"]]
        next_session = int(state["next_session"])
        results = list(state["results"])
        elapsed = float(state["elapsed_s"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{folder / 'state.json'}: malformed checkpoint state: {error!r}"
        ) from error
    in_session = state.get("in_session")
    low = 0 if in_session is not None else 1  # a mid-session checkpoint's session is unfinished
    sessions = run.data.sessions
    if not low <= next_session <= len(sessions) - 1 + low:
        raise WeightsError(
            f"{folder / 'state.json'}: next_session {next_session} does not fit the run's "
            f"{len(sessions)} sessions"
        )
    method = run.build_method(load_weights=False)
    for size in sizes:
        method.network.add_session(size)
    method.network.to(run.runtime.device)
    load_network_weights(folder, method.network)
    method.load_state_dict(state.get("method_state") or {})
    method_file = folder / "method.safetensors"
    try:
        method.load_state_tensors(read_tensor_file(method_file))
    except MlcilError as error:
        raise WeightsError(f"{method_file}: {error}") from None
    resume = None
    if in_session is None:
        method.restore(sessions[next_session - 1])
    else:
        session = sessions[next_session]
        resume = _restore_in_session(run, method, folder, in_session, session)
    memory_path = folder / "memory.json"
    memory = ExemplarMemory.load(memory_path)
    memory.check_against(run.data.train_source.image_refs, where=str(memory_path))
    data_path = folder / "memory.safetensors"
    memory.load_data_tensors(read_tensor_file(data_path), where=str(data_path))
    if method.stores_exemplar_data:
        # Each row as the method stored it: the width of the outputs at the exemplar's session.
        widths = [session.num_seen for session in sessions]
        memory.check_data_rows(widths, where=str(data_path))
    return RunState(method, memory, results, next_session, elapsed, resume)


def _restore_in_session(
    run: RunInputs,
    method: Method,
    folder: Path,
    in_session: dict[str, Any],
    session: Session,
) -> FitResume:
    """Re-enter a session mid-training: the teacher, then what ``fit_session`` resumes from."""
    teacher = None
    if in_session.get("teacher_sizes") is not None:
        teacher = run.build_method(load_weights=False).network
        for size in in_session["teacher_sizes"]:
            teacher.add_session(int(size))
        teacher.to(run.runtime.device)
        load_network_weights(folder, teacher, "teacher.safetensors")
        teacher.eval()
        teacher.requires_grad_(False)
    method.resume_session(session, teacher)
    try:
        tensors = read_tensor_file(folder / "optimizer.safetensors")
        optimizer = unflatten_optimizer(tensors, in_session["optimizer"])
        position = FitPosition(int(in_session["epoch"]), int(in_session["step"]))
        scheduler, scaler = dict(in_session["scheduler"]), dict(in_session["scaler"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{folder}: malformed mid-session checkpoint: {error!r}") from error
    rng, layout = in_session.get("rng"), in_session.get("layout")
    return FitResume(position, optimizer, scheduler, scaler, rng, layout)
