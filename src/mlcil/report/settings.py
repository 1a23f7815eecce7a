"""What each reported run was run with: its resolved settings, those that differ between the
runs, and paths as the report folder sees them (a report holds no absolute path: it can be
moved with its runs, or sent, without naming the machine's folders)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mlcil.report.loading import ReportedRun


def relative_path(path: str | Path, report_dir: Path) -> str:
    """``path`` relative to the report folder (``../runs/krt``), with ``/``; only its last part
    when no relative path exists (another drive)."""
    try:
        relative = os.path.relpath(Path(path).absolute(), report_dir.absolute())
    except ValueError:
        return Path(path).name
    return Path(relative).as_posix()


def is_absolute(text: str) -> bool:
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()


def shown(value: Any, report_dir: Path) -> str:
    """A setting's value as the page shows it: text as is, other values as JSON, absolute
    paths (also inside lists) relative to the report."""

    def local(item: Any) -> Any:
        if isinstance(item, str) and is_absolute(item):
            return relative_path(item, report_dir)
        if isinstance(item, list):
            return [local(part) for part in item]
        if isinstance(item, dict):
            return {key: local(part) for key, part in item.items()}
        return item

    value = local(value)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """One run's settings as the page lists them.

    Attributes:
        name: the run folder, relative to the report.
        label: the run's label.
        seed: its seed.
        settings: every setting (key -> shown value); empty when ``config.yaml`` is missing.
        differing: the keys of ``settings`` whose value is not the same in every run (a key
            that other runs lack, such as another method's parameter, included).
    """

    name: str
    label: str
    seed: int
    settings: dict[str, str]
    differing: list[str]


@dataclasses.dataclass(frozen=True)
class SettingsView:
    """The reported runs' settings: those every run shares, and each run's own."""

    common: list[tuple[str, str]]
    runs: list[RunSettings]
    differing: list[str]


def settings_view(runs: Sequence[ReportedRun], report_dir: Path) -> SettingsView:
    """Compare the runs' settings: a key differs when two runs that record settings hold
    different values for it, or one of them lacks it."""
    recorded = [run.settings for run in runs if run.settings is not None]
    keys = list(dict.fromkeys(key for settings in recorded for key in settings))
    differing = [
        key
        for key in keys
        if len({(key in s, json.dumps(s.get(key), default=repr)) for s in recorded}) > 1
    ]
    common = [(key, shown(recorded[0][key], report_dir)) for key in keys if key not in differing]
    listed = []
    for run in runs:
        settings = run.settings or {}
        values = {key: shown(value, report_dir) for key, value in settings.items()}
        own = [key for key in differing if key in values]
        name = relative_path(run.folder, report_dir)
        listed.append(RunSettings(name, run.label, run.metrics.seed, values, own))
    return SettingsView(common, listed, differing)
