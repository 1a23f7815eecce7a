"""Exact resume of CSC (its learnable, growing label graph lives in the weights) and TPCIL (its
elastic Hebbian graph lives in the method's tensors): a CPU run killed with SIGKILL inside the
third session and resumed writes the same ``metrics.json`` as an uninterrupted run.

The pattern of tests/methods/test_surface_resume.py: ``python -m mlcil.cli train`` in a
subprocess (single-threaded) on a small manifest dataset, ``train.checkpoint_every_epochs=1``,
SIGKILL once a chosen mid-session checkpoint is the newest; four one-class sessions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_surface_resume import comparable, kill_at, run

from mlcil.results import run_finished
from tiny import REPO, tiny_overrides, write_manifest_dataset

# Per method: its config and the overrides that keep its run small.
METHODS = {
    "csc": ("csc.yaml", ["model.node_dim=16"]),
    "tpcil": ("tpcil.yaml", ["method.vertices_per_class=2"]),
}
PREFIX = "session_02_epoch_001_"  # inside session 2, after two sessions' graphs were made


def command(method: str, run_dir: Path, data: list[str]) -> list[str]:
    config, extra = METHODS[method]
    overrides = tiny_overrides(
        train__batch_size="4",
        train__epochs="2",
        train__checkpoint_every_epochs="1",
        train__tensorboard="false",
        memory__per_class="3",
        loss__reference_images="4",
        data__augment="[cutout]",  # random draws: the resumed epoch must restore them exactly
        protocol="B0-C1",
    )
    configs = [REPO / "configs" / "manifest_example.yaml", REPO / "configs" / "methods" / config]
    files = [arg for path in configs for arg in ("--config", str(path))]
    return ["-m", "mlcil.cli", "-q", "train", *files, "--run-dir", str(run_dir), *data,
            *overrides, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_manifest_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_killed_mid_session_resumes_to_the_same_metrics(
    tmp_path: Path, dataset: list[str], method: str
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([sys.executable, *command(method, straight, dataset)])
    kill_at([sys.executable, *command(method, killed, dataset)], killed, PREFIX)
    assert not run_finished(killed)  # metrics.json is written after every session, unfinished
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith(PREFIX), latest
    folder = killed / "checkpoints" / latest
    if method == "csc":  # two sessions' heads, each with its blocks of the label graph
        weights = load_file(str(folder / "model.safetensors"))
        assert weights["heads.1.general_columns"].shape == (1, 1)
        assert weights["heads.2.general_rows"].shape == (1, 3)
    else:  # the graph of session 1's end: 2 vertices per class seen by then
        graph = load_file(str(folder / "method.safetensors"))
        assert graph["graph_vertices"].shape[0] == 4 and graph["graph_edges"].any()

    run([sys.executable, "-m", "mlcil.cli", "-q", "train", "--resume", str(killed)])
    expected = json.loads((straight / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert comparable(resumed) == comparable(expected)
    assert len(resumed["sessions"]) == 4
