"""``metrics.json`` and ``metrics.csv`` are written after every session, marked unfinished until
the last: a run stopped early (``--max-sessions``, a crash) can be reported and evaluated, and
its record read by ``mlcil.load``; finishing it gives the same numbers as one straight run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import mlcil
from mlcil.cli import main
from tiny import REPO, tiny_overrides, write_manifest_dataset

# Four classes, B2-C1: three sessions (2, 1, 1 classes).
SETTINGS = tiny_overrides(
    model__embed_dim="16",
    model__num_heads="2",
    train__batch_size="8",
    train__tensorboard="false",
    memory__per_class="2",
    loss__reference_images="8",
    protocol="B2-C1",
)


CONFIG = str(REPO / "configs" / "manifest_example.yaml")


def train(run_dir: Path, data: list[str], *extra: str) -> int:
    return main(["-q", "train", "--config", CONFIG, "--run-dir", str(run_dir), *data,
                 *SETTINGS, *extra])  # fmt: skip


def saved(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    """The metric values: everything but the times."""
    sessions = [{k: v for k, v in s.items() if k != "train_time_s"} for s in metrics["sessions"]]
    return {**{k: v for k, v in metrics.items() if k != "wall_time_s"}, "sessions": sessions}


def test_a_run_stopped_early_has_its_results_and_can_be_reported_and_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlcil.compare import plan_comparison
    from mlcil.experiment import load_config

    data = write_manifest_dataset(tmp_path / "data")
    # The stopped run sits where `mlcil compare --output cmp` puts it, so the grid sees it.
    name = load_config(CONFIG, [*data, *SETTINGS]).run_name
    straight, stopped = tmp_path / "straight", tmp_path / "cmp" / "runs" / name
    assert train(straight, data) == 0
    assert train(stopped, data, "--max-sessions", "1") == 0

    early = saved(stopped)
    assert early["finished"] is False and early["planned_sessions"] == 3
    assert [s["index"] for s in early["sessions"]] == [0]
    assert early["last_map"] == early["sessions"][0]["seen_map"]
    with (stopped / "metrics.csv").open() as handle:
        assert [row["session"] for row in csv.DictReader(handle)] == ["0"]
    assert (stopped / "map_per_session.png").stat().st_size > 1000
    # The first session's numbers are the straight run's.
    full = saved(straight)
    assert full["finished"] is True and full["planned_sessions"] == 3
    assert comparable(early)["sessions"] == comparable(full)["sessions"][:1]
    # A comparison resumes it rather than reusing it as finished.
    (planned,) = plan_comparison(
        [CONFIG], overrides=[*data, *SETTINGS], output_dir=tmp_path / "cmp"
    )
    assert planned.run_dir == stopped and planned.status == "resume"

    capsys.readouterr()
    assert main(["report", str(stopped), str(straight), "--output", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert "krt (unfinished: 1 of 3)" in page and "unfinished: 1 of 3 sessions" in page
    assert main(["eval", "--run", str(stopped)]) == 0
    out = capsys.readouterr().out
    assert "recorded sessions[0].seen_map" in out and "reproduced" in out

    model = mlcil.load(stopped)
    assert model.metrics is not None and not model.metrics.finished
    assert model.metrics.sessions[0].seen_map == early["sessions"][0]["seen_map"]

    # Finished with --resume: the same numbers as the straight run, marked finished.
    assert main(["-q", "train", "--resume", str(stopped)]) == 0
    assert comparable(saved(stopped)) == comparable(full)
    assert main(["eval", "--run", str(stopped)]) == 0
    assert "recorded last_map" in capsys.readouterr().out
    (planned,) = plan_comparison(
        [CONFIG], overrides=[*data, *SETTINGS], output_dir=tmp_path / "cmp"
    )
    assert planned.status == "finished"


def test_a_crash_in_a_later_session_leaves_the_results_of_the_sessions_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlcil.engine.loop as loop

    data = write_manifest_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    fits = loop.fit_session
    calls = []

    def crashing(*args, **kwargs):  # the second session's fit dies (a bug, an OOM...)
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return fits(*args, **kwargs)

    monkeypatch.setattr(loop, "fit_session", crashing)
    assert train(run_dir, data) != 0
    early = saved(run_dir)
    assert early["finished"] is False and [s["index"] for s in early["sessions"]] == [0]
    monkeypatch.setattr(loop, "fit_session", fits)
    assert main(["report", str(run_dir), "--output", str(tmp_path / "r")]) == 0
    assert main(["-q", "train", "--resume", str(run_dir)]) == 0
    final = saved(run_dir)
    assert final["finished"] is True and len(final["sessions"]) == 3
