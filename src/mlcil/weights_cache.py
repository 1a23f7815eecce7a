"""A cache of backbone weights made on this machine, each file kept with its provenance.

Pretraining a backbone (for example the digits benchmark's ResNet-18 on the glyph scenes of
:mod:`mlcil.data.glyphs`) takes minutes; the result is kept under ``cache_root() / "weights"``
(beside the embedded data cache) as a pair of files::

    <key>.safetensors   the tensors (safetensors: no pickle, no code)
    <key>.json          the provenance: what the weights were trained on and how

The provenance is a JSON object with at least ``source`` (e.g. ``"glyphs-v1"``), ``classes``,
``seed``, ``backbone``, ``feature_stage``, ``image_size``, ``recipe`` (training settings),
``command``, ``mlcil_version`` and ``created``. Every field except the bookkeeping ones
(``NON_DEFINING_FIELDS``: the command line, the creation time, the package version, the
checksum of the weights, the recorded training result and the machine it ran on) *defines* the
weights: ``key`` is a hash of those fields, and a cached file is reused only when its stored
provenance agrees with the requested one on all of them.
Values are compared as JSON, so ``5`` and ``5.0`` are different settings and a tuple equals the
list with the same items.

``store`` writes the weights first and the JSON last, each through a temporary file and
``os.replace``, so an interrupted write never leaves a pair that ``find_cached`` would accept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mlcil import cache
from mlcil.cache import cache_root, canonical_json, exclusive, file_sha256, stamped
from mlcil.errors import MlcilError, WeightsError
from mlcil.fileio import make_temporary_file, use_umask, write_text_atomic

logger = logging.getLogger(__name__)

REQUIRED_FIELDS: tuple[str, ...] = (
    "source",
    "classes",
    "seed",
    "backbone",
    "feature_stage",
    "image_size",
    "recipe",
)
# Bookkeeping that says how and when a file was made, not what it holds: two runs of the same
# recipe on the same data are interchangeable whatever their command line or date.
NON_DEFINING_FIELDS: frozenset[str] = frozenset(
    {"command", "created", "mlcil_version", "weights_sha256", "result", "environment"}
)


BUILD_LOCK = "build.lock"


def weights_dir() -> Path:
    """The default folder of the weights cache: ``cache_root() / "weights"``."""
    return cache_root() / "weights"


def defining_fields(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a provenance that define the weights (all but ``NON_DEFINING_FIELDS``).

    Args:
        provenance: a provenance mapping.

    Returns:
        The defining fields, normalised through JSON (tuples become lists).

    Raises:
        MlcilError: when a field of ``REQUIRED_FIELDS`` is missing or a value is not JSON.
    """
    if not isinstance(provenance, Mapping):
        raise MlcilError(f"provenance must be a mapping, got {type(provenance).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in provenance]
    if missing:
        raise MlcilError(f"provenance lacks the required field(s) {missing}")
    fields = {str(k): v for k, v in provenance.items() if k not in NON_DEFINING_FIELDS}
    return json.loads(canonical_json(fields, "provenance"))


def provenance_key(provenance: Mapping[str, Any]) -> str:
    """A stable name for the weights a provenance describes.

    Args:
        provenance: a provenance mapping with every field of ``REQUIRED_FIELDS``.

    Returns:
        The first 16 hex characters of the SHA-256 of the defining fields as canonical JSON
        (sorted keys, no spaces): independent of key order and of the bookkeeping fields.

    Raises:
        MlcilError: when a required field is missing or a value is not JSON.
    """
    return cache.provenance_key(defining_fields(provenance), "provenance")


def read_provenance(weights_path: str | Path) -> dict[str, Any]:
    """Read the provenance stored beside a cached weights file.

    Args:
        weights_path: the ``<key>.safetensors`` file.

    Returns:
        The JSON object of ``<key>.json``.

    Raises:
        WeightsError: when the JSON file is missing, unreadable or not an object.
    """
    path = Path(weights_path).with_suffix(".json")
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"cannot read the provenance file {path}: {error}") from error
    if not isinstance(provenance, dict):
        raise WeightsError(
            f"provenance file {path} holds a {type(provenance).__name__}, not an object"
        )
    return provenance


def building(cache: Path | None = None) -> contextlib.AbstractContextManager[None]:
    """The cache's build lock (``build.lock`` in it), held while weights are looked up and made:
    a second process waits, then finds them made (:func:`mlcil.cache.exclusive`)."""
    return exclusive(Path(cache if cache is not None else weights_dir()) / BUILD_LOCK)


def _mismatch(stored: Mapping[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the defining fields on which a stored provenance differs from ``wanted``."""
    try:
        have = defining_fields(stored)
    except MlcilError:
        have = {k: v for k, v in stored.items() if k not in NON_DEFINING_FIELDS}
    names = sorted(set(have) | set(wanted))
    return [name for name in names if have.get(name, ...) != wanted.get(name, ...)]


def find_cached(provenance: Mapping[str, Any], cache: Path | None = None) -> Path | None:
    """The cached weights made exactly as ``provenance`` says, if there are any.

    A file is reused only when ``<key>.safetensors`` exists, its ``<key>.json`` is readable,
    agrees with ``provenance`` on every defining field, and (when it records one) carries the
    SHA-256 of the weights file as it is now. Every refusal is logged at INFO with its reason.

    Args:
        provenance: the provenance of the weights wanted (bookkeeping fields are ignored).
        cache: the cache folder; ``None`` for :func:`weights_dir`.

    Returns:
        The ``.safetensors`` path, or ``None``.

    Raises:
        MlcilError: when ``provenance`` lacks a required field or is not JSON.
    """
    wanted = defining_fields(provenance)
    key = provenance_key(provenance)
    path = Path(cache if cache is not None else weights_dir()) / f"{key}.safetensors"
    if not path.is_file():
        logger.info("no cached weights for key %s at %s", key, path)
        return None
    try:
        stored = read_provenance(path)
    except WeightsError as error:
        logger.info("not reusing %s: %s", path, error)
        return None
    differing = _mismatch(stored, wanted)
    if differing:
        logger.info("not reusing %s: its provenance differs in %s", path, differing)
        return None
    recorded = stored.get("weights_sha256")
    if recorded is not None and recorded != file_sha256(path):
        logger.info("not reusing %s: the file's SHA-256 does not match its provenance", path)
        return None
    logger.info("reusing cached weights %s (%s)", path, stored.get("command", "no command"))
    return path


def _write_weights_atomic(tensors: dict[str, torch.Tensor], path: Path, key: str) -> None:
    # safetensors opens the file by name; its mode comes from the umask, as open() would give.
    staging = str(make_temporary_file(path.parent, suffix=".safetensors.tmp"))
    try:
        save_file(tensors, staging, metadata={"provenance_key": key})
        use_umask(staging)  # safetensors writes its files 0600
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def store(
    state_dict: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any],
    cache: Path | None = None,
) -> Path:
    """Write weights and their provenance into the cache.

    ``created`` (UTC, ISO 8601) and ``mlcil_version`` are filled in when absent, and
    ``weights_sha256`` is always set to the checksum of the written file.

    Args:
        state_dict: name -> tensor (moved to the CPU and made contiguous before saving).
        provenance: the provenance; needs every field of ``REQUIRED_FIELDS`` and should carry
            ``command``.
        cache: the cache folder; ``None`` for :func:`weights_dir`.

    Returns:
        The path of the ``<key>.safetensors`` file.

    Raises:
        MlcilError: on an invalid provenance or a value of ``state_dict`` that is not a tensor.
    """
    key = provenance_key(provenance)
    bad = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise MlcilError(f"state_dict values must be tensors; {bad[0]!r} is not")
    if "command" not in provenance:
        logger.warning("storing weights %s without the command that made them", key)
    folder = Path(cache if cache is not None else weights_dir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    # Remove the old JSON first: between the two replaces below no reader may pair the new
    # tensors with an old provenance (or the other way round).
    path.with_suffix(".json").unlink(missing_ok=True)
    tensors = {name: value.detach().cpu().contiguous() for name, value in state_dict.items()}
    _write_weights_atomic(tensors, path, key)
    record = stamped(provenance)
    record["weights_sha256"] = file_sha256(path)
    write_text_atomic(
        path.with_suffix(".json"), json.dumps(record, indent=1, sort_keys=True) + "\n"
    )
    logger.info("stored weights %s (%d tensors)", path, len(tensors))
    return path


def load_cached(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a cached weights file onto the CPU.

    Raises:
        WeightsError: when the file is missing or is not a safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise WeightsError(f"cannot read cached weights {weights_path}: {error}") from error
