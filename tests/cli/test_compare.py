"""``mlcil compare`` runs a protocol x config x seed grid, reuses finished runs, and reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlcil.cli import main
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
    assert main(args) == 0
    output = capsys.readouterr().out
    assert "### coco B40-C40" in output
    method_rows = [line for line in output.splitlines() if line.startswith(("| finetune", "| lwf"))]
    # The summary table (mean ± std over seeds) comes first, then the per-session breakdown.
    summary_rows = [row for row in method_rows if "±" in row]
    breakdown_rows = [row for row in method_rows if "±" not in row]
    assert len(summary_rows) == 2 and all(" | 2 | " in row for row in summary_rows)  # two seeds
    # Two breakdowns: base/new over the whole seen test set, then on their own subsets.
    assert len(breakdown_rows) == 4 and all(row.count(" / ") == 2 for row in breakdown_rows)
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
