"""End to end through the CLI: KRT on the COCO and VOC fixtures, eval, dry run, resume."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mlcil.cli import main
from mlcil.data.coco import load_coco
from mlcil.runs import evaluate_run
from tiny import REPO, TINY_ICA, tiny_overrides

TINY = [*tiny_overrides(memory__per_class="2"), *TINY_ICA]


def train(config: str, run_dir: Path, *overrides: str) -> None:
    code = main(
        [
            "-q",
            "train",
            "--config",
            str(REPO / "configs" / config),
            "--run-dir",
            str(run_dir),
            *TINY,
            *overrides,
        ]
    )
    assert code == 0


def check_run_files(run_dir: Path, sessions: int, class_names: list[str]) -> dict[str, Any]:
    for name in ("config.yaml", "metrics.json", "metrics.csv", "map_per_session.png", "train.log"):
        assert (run_dir / name).is_file(), name
    # The default tracker, csv, needs no package beyond the base install.
    assert (run_dir / "tracking" / "scalars.csv").is_file()
    assert not (run_dir / "tensorboard").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"session_{sessions - 1:02d}"
    for index in range(sessions):
        folder = run_dir / "checkpoints" / f"session_{index:02d}"
        assert {p.name for p in folder.iterdir()} == {
            "model.safetensors",
            "state.json",
            "memory.json",
        }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "method",
        "dataset",
        "protocol",
        "seed",
        "sessions",
        "avg_map",
        "last_map",
        "final",
        "forgetting",
        "wall_time_s",
    ):
        assert key in metrics, key
    assert metrics["method"] == "krt" and len(metrics["sessions"]) == sessions
    assert set(metrics["final"]) == {
        "cp",
        "cr",
        "cf1",
        "op",
        "or",
        "of1",
        "mean_class_f1",
        "threshold",
    }
    assert metrics["final"]["threshold"] == 0.8
    seen_maps = [s["seen_map"] for s in metrics["sessions"]]
    assert metrics["last_map"] == seen_maps[-1]
    assert metrics["avg_map"] == pytest.approx(sum(seen_maps) / len(seen_maps))
    last = metrics["sessions"][-1]
    assert list(last["ap"]) == class_names[: last["num_seen"]]
    assert all(0.0 <= ap <= 100.0 for ap in last["ap"].values())
    assert metrics["forgetting"] is not None
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["session"]) for r in rows] == list(range(sessions))
    assert float(rows[-1]["seen_map"]) == pytest.approx(metrics["last_map"], abs=1e-4)
    # Exemplar memory is plain JSON with image references.
    memory = json.loads(
        (run_dir / "checkpoints" / f"session_{sessions - 1:02d}" / "memory.json").read_text()
    )
    assert memory["exemplars"] and all(isinstance(e["image"], str) for e in memory["exemplars"])
    return metrics


def test_krt_on_the_coco_fixture_then_eval_reproduces_last_map(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    run_dir = tmp_path / "coco_run"
    train("coco_b40_c10.yaml", run_dir, f"root={root}", "protocol=B40-C20")
    from mlcil.data.classes import class_names

    metrics = check_run_files(run_dir, 3, class_names("coco"))
    assert metrics["dataset"] == "coco" and metrics["protocol"] == "B40-C20"
    # Classes without a positive val image are reported, not hidden.
    assert metrics["sessions"][-1]["classes_without_positives"]
    output = capsys.readouterr().out
    assert "last mAP" in output and "map_per_session.png" in output

    result = evaluate_run(run_dir)
    assert result["seen_map"] == pytest.approx(metrics["last_map"], abs=1e-6)
    assert main(["-q", "eval", "--run", str(run_dir)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_krt_on_the_voc_fixture(voc_fixture: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = voc_fixture
    run_dir = tmp_path / "voc_run"
    train("voc_b0_c4.yaml", run_dir, f"root={root}", "protocol=B10-C5", "memory.labels=official")
    from mlcil.data.classes import class_names

    metrics = check_run_files(run_dir, 3, class_names("voc"))
    assert [s["num_seen"] for s in metrics["sessions"]] == [10, 15, 20]
    assert metrics["sessions"][1]["method_state"]["pseudo_label_threshold"] is not None


def test_dry_run_on_the_coco_fixture_with_the_published_config(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    code = main(
        [
            "-q",
            "train",
            "--config",
            str(REPO / "configs" / "coco_b0_c10.yaml"),
            "--dry-run",
            f"root={root}",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "protocol B0-C10" in output
    # The session table: index, new-class count, names, train and test image counts.
    rows = [line.split() for line in output.splitlines() if re.match(r"^\s+\d+\s+10\s", line)]
    assert [int(row[0]) for row in rows] == list(range(8))
    assert rows[0][2] == "airplane,"  # class 0 first
    train = load_coco(root, "train")
    expected = [int(train.labels[:, 10 * i : 10 * i + 10].any(axis=1).sum()) for i in range(8)]
    assert [int(row[-2]) for row in rows] == expected
    assert (
        "tresnet_m" in output and "MISSING" in output and "exemplar memory: 20 per class" in output
    )
    assert "block" in output and "kr_tokens" in output
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_resume_continues_exactly_like_an_uninterrupted_run(
    coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    extra = (f"root={root}", "protocol=B40-C20", "train.tensorboard=false")
    train("coco_b40_c10.yaml", tmp_path / "straight", *extra)
    interrupted = tmp_path / "interrupted"
    train("coco_b40_c10.yaml", interrupted, *extra, "--max-sessions", "1")
    assert json.loads((interrupted / "metrics.json").read_text())["finished"] is False
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "session_00"
    assert main(["-q", "train", "--resume", str(interrupted)]) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert [s["ap"] for s in resumed["sessions"]] == [s["ap"] for s in straight["sessions"]]
    assert resumed["final"] == straight["final"]


def test_an_existing_run_is_not_overwritten(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    run_dir = tmp_path / "run"
    train("coco_b40_c10.yaml", run_dir, f"root={root}", "protocol=B40-C20", "--max-sessions", "1")
    code = main(
        [
            "-q",
            "train",
            "--config",
            str(REPO / "configs" / "coco_b40_c10.yaml"),
            "--run-dir",
            str(run_dir),
            *TINY,
            f"root={root}",
            "protocol=B40-C20",
        ]
    )
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "-q",
                "train",
                "--config",
                str(REPO / "configs" / "coco_b0_c10.yaml"),
                f"root={tmp_path}/nowhere",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "nowhere" in capsys.readouterr().err
    assert (
        main(
            [
                "-q",
                "train",
                "--config",
                str(REPO / "configs" / "digits_b0_c2.yaml"),
                "train.epoch=3",
            ]
        )
        == 2
    )
    assert "train.epoch" in capsys.readouterr().err
    assert (
        main(
            [
                "-q",
                "train",
                "--config",
                str(REPO / "configs" / "digits_b0_c2.yaml"),
                "protocol=B3-C2",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "left over" in capsys.readouterr().err
    assert main(["-q", "eval", "--run", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_list_names_methods_datasets_and_protocols(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    output = capsys.readouterr().out
    for word in (
        "krt",
        "finetune",
        "lwf",
        "replay",
        "podnet",
        "joint",
        "coco",
        "voc",
        "digits",
        "manifest",
        "B40-C10",
        "B10-C2",
    ):
        assert word in output


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_checkpoints(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    run_dir = tmp_path / "run"
    # An absurd learning rate in the second session makes the loss overflow to inf/NaN (set
    # from the start: --resume refuses overrides that change results).
    args = [f"root={root}", "protocol=B40-C20", "train.tensorboard=false"]
    train("coco_b40_c10.yaml", run_dir, *args, "train.incremental_lr=1e30", "--max-sessions", "1")
    code = main(["-q", "train", "--resume", str(run_dir)])
    assert code == 2
    error = capsys.readouterr().err
    assert "session 1" in error and "lower train.lr or train.incremental_lr" in error
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "session_00"
