"""``mlcil compare`` runs a protocol x config x seed grid, reuses finished runs, and reports."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from mlcil.cli import main
from mlcil.compare import GridProgress
from tiny import REPO, tiny_overrides

TINY = tiny_overrides(train__batch_size="16", train__tensorboard="false")


def test_compare_then_report(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    methods = REPO / "configs" / "methods"
    args = [
        "-q",
        "compare",
        str(methods / "finetune.yaml"),
        f"{methods / 'lwf.yaml'}",
        "--base",
        str(REPO / "configs" / "coco_b40_c10.yaml"),
        "--seeds",
        "0",
        "1",
        "--protocols",
        "B40-C40",
        "--output",
        str(tmp_path / "cmp"),
        "--set",
        *TINY,
        f"root={root}",
    ]
    assert main([*args, "--jobs", "2"]) == 0  # two single-thread worker processes
    assert "### coco B40-C40" in capsys.readouterr().out
    summary = json.loads((tmp_path / "cmp" / "report.json").read_text())
    rows = {row["label"]: row for row in summary["coco B40-C40"]}
    assert set(rows) == {"finetune", "lwf"} and all(r["seeds"] == [0, 1] for r in rows.values())
    for row in rows.values():
        mean, std = row["last mAP"]
        assert 0.0 <= mean <= 100.0 and std >= 0.0
    runs = sorted(p.name for p in (tmp_path / "cmp" / "runs").iterdir())
    assert runs == [
        "coco_B40-C40_finetune_s0",
        "coco_B40-C40_finetune_s1",
        "coco_B40-C40_lwf_s0",
        "coco_B40-C40_lwf_s1",
    ]
    assert (tmp_path / "cmp" / "map_per_session_coco_B40-C40.png").is_file()
    # A second call reuses every finished run instead of training again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp" / "runs").glob("*/metrics.json")}
    assert main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    # ``report`` works on any finished runs.
    report_dir = tmp_path / "report"
    assert (
        main(
            [
                "-q",
                "report",
                *map(str, (tmp_path / "cmp" / "runs").iterdir()),
                "--output",
                str(report_dir),
            ]
        )
        == 0
    )
    assert (report_dir / "report.md").read_text().count("| ") >= 3


def test_compare_refuses_a_run_made_with_other_settings(
    coco_fixture: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = coco_fixture
    args = [
        "-q",
        "compare",
        str(REPO / "configs" / "methods" / "finetune.yaml"),
        "--base",
        str(REPO / "configs" / "coco_b40_c10.yaml"),
        "--protocols",
        "B40-C40",
        "--output",
        str(tmp_path / "cmp"),
        "--set",
        *TINY,
        f"root={root}",
    ]
    assert main(args) == 0
    assert main([*args, "train.lr=0.5"]) == 2
    assert "other settings (train.lr" in capsys.readouterr().err


def test_compare_starts_again_a_run_stopped_before_its_first_checkpoint(
    coco_fixture: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import errno

    from mlcil.engine import loop

    root, _ = coco_fixture
    args = [
        "-q",
        "compare",
        str(REPO / "configs" / "methods" / "finetune.yaml"),
        "--base",
        str(REPO / "configs" / "coco_b40_c10.yaml"),
        "--protocols",
        "B40-C40",
        "--output",
        str(tmp_path / "cmp"),
        "--set",
        *TINY,
        f"root={root}",
    ]

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk"))

    with monkeypatch.context() as patch:
        patch.setattr(loop, "fit_session", full_disk)
        assert main(args) == 2
    run = tmp_path / "cmp" / "runs" / "coco_B40-C40_finetune_s3407"
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    assert "stopped before its first checkpoint: starts again" in capsys.readouterr().out
    assert main(args) == 0
    assert (run / "metrics.json").is_file()


def test_compare_takes_patterns_of_shipped_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cmp"
    # The README's grid as a shell passes it on where configs/ is not (a wheel): the folder's
    # configs, by path pattern.
    pattern = "configs/digits_pretrained/*.yaml"
    assert main(["compare", pattern, "--seeds", "0", "--dry-run", "--output", str(output)]) == 0
    plan = capsys.readouterr().out
    expected = len(list((REPO / "configs" / "digits_pretrained").glob("*.yaml")))
    assert plan.startswith(f"plan: {expected} runs = {expected} configs x 1 protocol x 1 seed")
    # By name: two names of one config (digits-pretrained-b0-c2 is its krt run) run once, and
    # fragments (methods-*) are never planned on their own.
    assert main(["compare", "digits-pretrained-k*", "digits-pretrained-b0-c2", "--dry-run",
                 "--output", str(output)]) == 0  # fmt: skip
    plan = capsys.readouterr().out
    assert plan.count("digits_B0-C2_krt_s0 ") == 1 and "digits_B0-C2_krt-no-dpl_s0" in plan
    assert main(["compare", "methods-*", "--dry-run", "--output", str(output)]) == 2
    assert "no runnable shipped config matches this pattern" in capsys.readouterr().err
    assert not output.exists()


def test_compare_shows_its_progress_on_the_console(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny = tiny_overrides(train__batch_size="64", protocol="B0-C10")
    args = ["compare", "digits-finetune", "digits-lwf", "--output", str(tmp_path / "cmp"),
            "--set", *tiny]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mlcil.compare"):
        assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("runs: ")]
    assert [re.sub(r"\d+m\d\ds elapsed", "T", line) for line in lines] == [
        "runs: 0/2 done, 1 running, 1 left, T; starting digits_B0-C10_finetune_s0",
        "runs: 1/2 done, 1 running, 0 left, T; finished digits_B0-C10_finetune_s0",
        "runs: 1/2 done, 1 running, 0 left, T; starting digits_B0-C10_lwf_s0",
        "runs: 2/2 done, 0 running, 0 left, T; finished digits_B0-C10_lwf_s0",
    ]


def test_grid_progress_counts_runs_and_time() -> None:
    now = [100.0]
    progress = GridProgress(5, jobs=2, clock=lambda: now[0])
    assert progress.line() == "runs: 0/5 done, 2 running, 3 left, 0m00s elapsed"
    now[0] += 75
    progress.finished("runs/a")
    assert progress.line("x") == "runs: 1/5 done, 2 running, 2 left, 1m15s elapsed; x"
    for name in "bcd":
        progress.finished(name)
    now[0] += 3600
    assert progress.line() == "runs: 4/5 done, 1 running, 0 left, 1h01m elapsed"
