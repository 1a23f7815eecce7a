"""A tiny run through the CLI with ``train.deterministic`` and the CSV and W&B (offline) trackers:
metrics.json records what the numbers depend on, the trackers' files exist, and the global step
runs on across sessions and across ``--resume``."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mlcil.cli import main
from tiny import REPO, TINY_ICA, tiny_overrides

TINY = [
    *tiny_overrides(train__batch_size="64", memory__per_class="2", train__base_epochs="1"),
    *TINY_ICA,
    "protocol=B0-C5",  # two sessions of five digits
    "train.deterministic=true",
    "train.trackers=[csv,wandb]",
]
CONFIG = str(REPO / "configs" / "digits_b0_c2.yaml")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B offline with its settings and caches in tmp_path; torch's global determinism flags
    put back afterwards (the run switches them on for this process)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    import wandb

    wandb.teardown()
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


def scalars(run: Path) -> list[tuple[int, str, float]]:
    with open(run / "tracking" / "scalars.csv", newline="") as handle:
        return [(int(r["step"]), r["tag"], float(r["value"])) for r in csv.DictReader(handle)]


def test_a_tiny_deterministic_run_records_its_setting_and_tracks_on_one_step(
    offline: None, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    base = ["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY]
    assert main([*base, "--max-sessions", "1"]) == 0
    assert main(["-q", "train", "--resume", str(run)]) == 0  # a second process, in effect

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["deterministic"] is True
    assert metrics["threads"] == torch.get_num_threads() >= 1
    assert metrics["torch_version"] == torch.__version__
    assert metrics["timm_version"].startswith("1.") and metrics["mlcil_version"]
    assert metrics["device"] == "cpu" and metrics["device_name"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["deterministic"] is True

    rows = scalars(run)
    lr_steps = [step for step, tag, _ in rows if tag == "train/lr"]
    # One optimiser step each, numbered on from session 0 into session 1 after the resume.
    assert lr_steps == list(range(1, len(lr_steps) + 1))
    session_ends = [step for step, tag, _ in rows if tag == "eval/seen_map"]
    assert len(session_ends) == 2 and session_ends[-1] == lr_steps[-1]
    assert 0 < session_ends[0] < session_ends[1]
    assert {tag for _, tag, _ in rows} >= {"train/loss", "train_epoch/loss", "eval/session"}

    # W&B offline: one local run directory per process, both continuing the same run id.
    folders = sorted((run / "tracking" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1
    assert not (run / "tensorboard").exists()  # not in train.trackers
