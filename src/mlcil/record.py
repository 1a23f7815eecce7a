"""The typed result record of a run: ``metrics.json`` as pydantic models.

A run's results are built as these models where they are made (:class:`SessionResult` by
:func:`mlcil.engine.evaluate.session_result`, :class:`RunMetrics` by
:func:`mlcil.results.summarize`), written through :meth:`RunMetrics.to_json` and read back
through :meth:`RunMetrics.from_json`; the report, ``mlcil eval`` and ``mlcil.load`` read nothing
else. Features add typed extras: a session's ``diagnostics`` (:class:`SessionDiagnostics`), the
run's ``pretrained`` provenance and ``added_sessions``.

File format, version 2: the version 1 content (every key and value unchanged) plus ``format``
(``"mlcil-metrics"``), ``version`` (2), ``finished`` (false until the run's last session is
done: the file is written after every session) and ``planned_sessions``. A version 1 file (no
``format`` key) reads as a finished run. Keys this version does not know are kept as they are.

Numbers are checked as JSON numbers: a boolean or a string is refused, and the file's NaN and
infinity tokens (not JSON) too; a value that is not finite is written as ``null``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from mlcil.errors import ConfigError

FORMAT = "mlcil-metrics"
VERSION = 2


def _number(value: Any) -> float:
    # bool is an int subclass, but true/false in metrics.json is a corrupted value, not a number.
    if isinstance(value, bool | numpy.bool_) or not isinstance(value, numbers.Real):
        raise ValueError("must be a number")
    if isinstance(value, int | float):
        return value  # an int stays an int: the file keeps what the run wrote
    return int(value) if isinstance(value, numbers.Integral) else float(value)  # numpy scalars


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _count(value: Any) -> int:
    if isinstance(value, bool | numpy.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError("must be an integer")
    return value if isinstance(value, int) else int(value)


def _optional_count(value: Any) -> int | None:
    return None if value is None else _count(value)


Number = Annotated[float, PlainValidator(_number)]
OptionalNumber = Annotated[float | None, PlainValidator(_optional_number)]
Count = Annotated[int, PlainValidator(_count)]
OptionalCount = Annotated[int | None, PlainValidator(_optional_count)]


class Record(BaseModel):
    """A part of the record: typed fields, and any other key kept as written."""

    model_config = ConfigDict(extra="allow")

    def plain(self) -> dict[str, Any]:
        """The part as plain data, with what was set only (what the file holds)."""
        return self.model_dump(exclude_unset=True, by_alias=True)


class RestoreQuality(Record):
    """Old-class labels restored by a method (KRT's pseudo labels) against the hidden truth."""

    precision: OptionalNumber = None
    recall: OptionalNumber = None
    f1: OptionalNumber = None
    pseudo_positives: OptionalCount = None
    true_positives: OptionalCount = None
    hidden_positives: OptionalCount = None
    per_image: OptionalNumber = None
    hidden_per_image: OptionalNumber = None


class EmbeddingDrift(Record):
    """How far the old sessions' embeddings of the probe images moved."""

    cosine_distance: list[OptionalNumber] | None = None
    relative_l2: list[OptionalNumber] | None = None
    mean_cosine_distance: OptionalNumber = None
    mean_relative_l2: OptionalNumber = None
    num_images: OptionalCount = None
    num_slots: OptionalCount = None


class LogitDrift(Record):
    """How the old classes' scores and decisions on the probe images changed."""

    mean_abs_score_change: OptionalNumber = None
    flip_fraction: OptionalNumber = None
    flipped: OptionalCount = None
    turned_off: OptionalCount = None
    turned_on: OptionalCount = None
    num_pairs: OptionalCount = None


class SessionDiagnostics(Record):
    """The diagnostics of one session (:mod:`mlcil.diagnostics`); None before old classes."""

    restore: RestoreQuality | None = None
    embedding_drift: EmbeddingDrift | None = None
    logit_drift: LogitDrift | None = None


class SessionResult(Record):
    """One session's entry of ``metrics.json``: maps in percent, AP per class name.

    ``base_map`` / ``new_map`` rank the whole seen test set; ``base_map_subset`` /
    ``new_map_subset`` are the release's definition (each on its own test subset). The engine
    adds the image counts, the time and the method's state; features add ``diagnostics``.
    """

    index: Count
    classes: list[str]
    num_seen: Count
    seen_map: Number
    base_map: OptionalNumber = None
    new_map: OptionalNumber = None
    base_map_subset: OptionalNumber = None
    new_map_subset: OptionalNumber = None
    ap: dict[str, OptionalNumber] | None = None
    classes_without_positives: list[str] | None = None
    test_images: OptionalCount = None
    train_images: OptionalCount = None
    memory_images: OptionalCount = None
    train_time_s: OptionalNumber = None
    method_state: dict[str, Any] | None = None
    diagnostics: SessionDiagnostics | None = None


class FinalScores(Record):
    """F1 scores on the test set after the last session done, at ``threshold``."""

    cp: OptionalNumber = None
    cr: OptionalNumber = None
    cf1: Number
    op: OptionalNumber = None
    # "or" is a Python keyword: the field has another name, and the file's key as its alias.
    overall_recall: OptionalNumber = Field(default=None, alias="or")
    of1: Number
    mean_class_f1: OptionalNumber = None
    threshold: OptionalNumber = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class AddedSessionEntry(Record):
    """A session added to the run after it was trained (``--add-session``)."""

    index: Count
    classes: list[str]
    train_manifest: str | None = None
    test_manifest: str | None = None


class WeightsProvenance(Record):
    """Where the run's starting weights came from (``pretrain:`` and ``imagenet:`` weights)."""

    source: str | None = None


class RunMetrics(Record):
    """The whole ``metrics.json`` of a run: what was run, on what, and every session's result.

    Read it with :func:`mlcil.results.read_metrics`, or :meth:`from_json` for text.
    """

    format: str = FORMAT
    version: Count = 1  # a file without the key is a version-1 file
    finished: bool = True  # version 1 was written only when the last session was done
    planned_sessions: OptionalCount = None
    method: str
    label: str | None = None
    dataset: str
    protocol: str
    class_order: list[str] | None = None
    seed: Count
    run_name: str | None = None
    network: str | None = None
    backbone: str | None = None
    memory_per_class: OptionalCount = None
    memory_total: OptionalCount = None
    device: str | None = None
    machine: str | None = None
    mlcil_version: str | None = None
    torch_version: str | None = None
    timm_version: str | None = None
    device_name: str | None = None
    threads: OptionalCount = None
    deterministic: bool | None = None
    pretrained: WeightsProvenance | None = None
    sessions: list[SessionResult]
    avg_map: Number
    last_map: Number
    final: FinalScores
    forgetting: OptionalNumber = None
    wall_time_s: Number
    added_sessions: list[AddedSessionEntry] | None = None

    @field_validator("sessions")
    @classmethod
    def _some_session(cls, sessions: list[SessionResult]) -> list[SessionResult]:
        if not sessions:
            raise ValueError("must be a non-empty list of per-session results")
        return sessions

    @property
    def display_label(self) -> str:
        """The run's label, or its method when it has none."""
        return self.label or self.method

    @property
    def sessions_done(self) -> int:
        return len(self.sessions)

    def to_json(self) -> str:
        """The file's text: what was set, non-finite numbers as ``null``."""
        return json.dumps(_finite_or_null(self.plain()), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str | Path) -> RunMetrics:
        """Parse and check ``metrics.json`` text.

        Raises:
            ConfigError: naming ``source`` and the key at fault (``sessions[1].seen_map``):
                not JSON, not an object, another format or a newer version, a missing key, or
                a value of the wrong type.
        """
        try:
            data = json.loads(text, parse_constant=_not_json)
        except (json.JSONDecodeError, ValueError) as error:
            raise ConfigError(f"{source}: invalid JSON: {error}") from None
        except RecursionError:  # a few bytes of [[[[... must not crash the reader
            raise ConfigError(f"{source}: invalid JSON: nested too deeply") from None
        return cls.from_data(data, source)

    @classmethod
    def from_data(cls, data: Any, source: str | Path) -> RunMetrics:
        """Check parsed ``metrics.json`` content (see :meth:`from_json`)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a JSON object of run metrics, got a JSON "
                f"{_json_type(data)}; is this a metrics.json written by mlcil?"
            )
        if data.get("format", FORMAT) != FORMAT:
            raise ConfigError(f"{source}: format {data['format']!r} is not {FORMAT!r}")
        version = data.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
            raise ConfigError(
                f"{source}: metrics format version {version} is newer than this mlcil reads "
                f"({VERSION}): upgrade mlcil"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(f"{source}: {_first_problem(error)}") from None


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number (a finite value was expected)")


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _key_path(location: Sequence[int | str]) -> str:
    """``("sessions", 1, "seen_map")`` as ``sessions[1].seen_map``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _first_problem(error: ValidationError) -> str:
    """One line on the first problem pydantic found: the key, what it must be, what it is."""
    problem = error.errors(include_url=False)[0]
    key = _key_path(problem["loc"])
    if problem["type"] == "missing":
        return f"key '{key}' is missing"
    kind = problem["type"]
    message = _EXPECTED.get(kind) or str(problem["msg"]).removeprefix("Value error, ")
    value = problem.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"key '{key}': {message}, got {shown} ({type(value).__name__})"


_EXPECTED = {
    "model_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
}


def _finite_or_null(value: Any) -> Any:
    """JSON has no NaN: None instead, so every file parses with strict readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value
