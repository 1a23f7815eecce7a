"""Comparison report: grouping by protocol, mean +- std over seeds, markdown and plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from mlcil.errors import ConfigError
from mlcil.record import RunMetrics
from mlcil.report import group_runs, load_runs, write_report
from mlcil.report.stats import mean_curves, mean_std
from mlcil.report.tables import comparison_markdown, session_breakdown_markdown


def fake_run(root: Path, label: str, protocol: str, seed: int, maps: list[float]) -> Path:
    """A metrics.json as the engine writes it (only the fields the report reads)."""
    run_dir = root / f"{label}_{protocol}_{seed}"
    run_dir.mkdir(parents=True)
    metrics = {
        "method": label.split("-")[0],
        "label": label,
        "dataset": "digits",
        "protocol": protocol,
        "seed": seed,
        "sessions": [
            {
                "index": i,
                "classes": [str(2 * i), str(2 * i + 1)],
                "num_seen": 2 * (i + 1),
                "seen_map": m,
            }
            for i, m in enumerate(maps)
        ],
        "avg_map": sum(maps) / len(maps),
        "last_map": maps[-1],
        "final": {"cf1": 10.0 + seed, "of1": 20.0 + seed},
        "forgetting": None if len(maps) == 1 else 5.0 * seed,
        "wall_time_s": 100.0,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_mean_std_matches_statistics() -> None:
    assert mean_std([1.0, 2.0, 4.0]) == (statistics.fmean([1, 2, 4]), statistics.stdev([1, 2, 4]))
    assert mean_std([3.0]) == (3.0, 0.0)
    assert mean_std([None, None]) == (None, None)
    assert mean_std([None, 2.0, 4.0]) == (3.0, statistics.stdev([2.0, 4.0]))


def test_runs_are_grouped_by_protocol_and_label(tmp_path: Path) -> None:
    dirs = [
        fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0]),
        fake_run(tmp_path, "krt", "B0-C2", 1, [92.0, 74.0]),
        fake_run(tmp_path, "finetune", "B0-C2", 0, [90.0, 40.0]),
        fake_run(tmp_path, "krt", "B4-C2", 0, [95.0, 80.0]),
    ]
    groups = group_runs(load_runs(dirs))
    assert set(groups) == {("digits", "B0-C2"), ("digits", "B4-C2")}
    assert {k: len(v) for k, v in groups[("digits", "B0-C2")].items()} == {"krt": 2, "finetune": 1}


def test_markdown_reports_mean_and_std_sorted_by_last_map(tmp_path: Path) -> None:
    dirs = [
        fake_run(tmp_path, "finetune", "B0-C2", 0, [90.0, 40.0]),
        fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0]),
        fake_run(tmp_path, "krt", "B0-C2", 1, [92.0, 74.0]),
    ]
    markdown = comparison_markdown(load_runs(dirs))
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "seeds" not in line]
    assert rows[0].startswith("| krt | 2 |") and rows[1].startswith("| finetune | 1 |")
    # krt: avg mAP mean of 80 and 83 = 81.5, std 2.1; last 72 +- 2.8; forgetting 0 and 5.
    assert "81.5 ± 2.1" in rows[0] and "72.0 ± 2.8" in rows[0] and "2.5 ± 3.5" in rows[0]
    assert "| 40.0 |" in rows[1]


def test_write_report_files_and_missing_metrics(tmp_path: Path) -> None:
    dirs = [
        fake_run(tmp_path / "runs", "krt", "B0-C2", 0, [90.0, 70.0]),
        fake_run(tmp_path / "runs", "joint", "B0-C2", 0, [95.0]),
        fake_run(tmp_path / "runs", "krt", "B4-C2", 0, [95.0, 80.0]),
    ]
    paths = write_report(dirs, tmp_path / "report")
    text = paths["markdown"].read_text()
    assert "### digits B0-C2" in text and "### digits B4-C2" in text
    assert (tmp_path / "report" / "map_per_session_digits_B0-C2.png").stat().st_size > 1000
    summary = json.loads(paths["json"].read_text())
    joint = next(r for r in summary["digits B0-C2"] if r["label"] == "joint")
    assert joint["forgetting"] == [None, None] and joint["last mAP"] == [95.0, 0.0]
    # Said plainly: a folder that is not there, and one that holds no result yet.
    with pytest.raises(ConfigError, match=r"report: run folder \S+nowhere does not exist$"):
        load_runs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty holds no metrics.json: not an mlcil run folder"):
        load_runs([tmp_path / "empty"])


def test_session_breakdown_averages_seen_base_new_over_seeds(tmp_path: Path) -> None:
    dirs = [
        fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0]),
        fake_run(tmp_path, "krt", "B0-C2", 1, [92.0, 74.0]),
        fake_run(tmp_path, "joint", "B0-C2", 0, [95.0]),
    ]
    runs = load_runs(dirs)
    for run, (base, new) in zip(runs[:2], [(80.0, 60.0), (84.0, 66.0)], strict=True):
        run.sessions[1].base_map, run.sessions[1].new_map = base, new
    markdown = session_breakdown_markdown(runs)
    lines = markdown.splitlines()
    assert "| method | session 0 | session 1 |" in lines
    # joint (95 last) is listed before krt (72 last); its second-session cell is empty.
    assert lines.index("| joint | 95.0 |  |") < lines.index("| krt | 91.0 | 72.0 / 82.0 / 63.0 |")


def rewrite(run_dir: Path, change) -> Path:
    """Apply ``change`` to the run's parsed metrics.json and write it back; a change that
    returns a list replaces the whole content with it."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    result = change(metrics)
    if isinstance(result, list):
        metrics = result
    path.write_text(json.dumps(metrics))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: [m], "expected a JSON object of run metrics, got a JSON list"),
        (lambda m: m.update(last_map="72.0"), "key 'last_map': must be a number, got '72.0'"),
        (lambda m: m.pop("avg_map"), "key 'avg_map' is missing"),
        (lambda m: m.update(avg_map=float("nan")), "invalid JSON: NaN is not a JSON number"),
        (lambda m: m.update(last_map=True), "key 'last_map': must be a number, got True"),
        (lambda m: m["sessions"][1].pop("seen_map"), "key 'sessions\\[1\\].seen_map' is missing"),
        (lambda m: m.update(sessions=[]), "key 'sessions': must be a non-empty list"),
        (lambda m: m.update(sessions=[5]), "key 'sessions\\[0\\]': must be a JSON object"),
        (lambda m: m["final"].update(cf1=None), "key 'final.cf1': must be a number, got None"),
        (lambda m: m.update(forgetting="-"), "key 'forgetting': must be a number, got '-'"),
        (lambda m: m.update(seed="0"), "key 'seed': must be an integer"),
        (lambda m: m.pop("protocol"), "key 'protocol' is missing"),
        (lambda m: m.pop("final"), "key 'final' is missing"),
        (lambda m: m.update(final=[1.0]), "key 'final': must be a JSON object"),
        (lambda m: m.update(version=3), "metrics format version 3 is newer than this mlcil reads"),
        (lambda m: m.update(format="other"), "format 'other' is not 'mlcil-metrics'"),
    ],
)
def test_bad_metrics_name_the_file_and_key(tmp_path: Path, change, message: str) -> None:
    run = fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0])
    path = rewrite(run, change)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + message):
        load_runs([run])


def test_the_record_accepts_nulls_where_the_engine_writes_them(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "joint", "B0-C2", 0, [95.0])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["sessions"][0].update(base_map=95.0, new_map=None)
    metrics["label"] = None
    record = RunMetrics.from_data(metrics, "x.json")
    assert record.sessions[0].new_map is None and record.display_label == "joint"
    assert record.plain() == metrics  # nothing added, nothing lost


def test_unreadable_or_empty_inputs(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "krt", "B0-C2", 0, [90.0])
    (run / "metrics.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=re.escape(str(run / "metrics.json"))):
        load_runs([run])
    with pytest.raises(ConfigError, match="no run folder given"):
        load_runs([])
    with pytest.raises(ConfigError, match="is a file, not a run folder"):
        load_runs([run / "metrics.json"])


def test_report_output_that_is_a_file_is_refused_and_kept(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "runs", "krt", "B0-C2", 0, [90.0, 70.0])
    output = tmp_path / "report"
    output.write_text("my notes")
    with pytest.raises(ConfigError, match=re.escape(f"{output} exists and is a file")):
        write_report([run], output)
    assert output.read_text() == "my notes"
    # A file in the way higher up cannot become a folder either.
    with pytest.raises(ConfigError, match="cannot create output folder"):
        write_report([run], output / "inner")
    assert output.read_text() == "my notes"


def test_mean_curves_average_the_runs_that_reached_each_session(tmp_path: Path) -> None:
    dirs = [
        fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0]),
        fake_run(tmp_path, "krt", "B0-C2", 1, [92.0, 74.0, 60.0]),
    ]
    curve = mean_curves({"krt": load_runs(dirs)})["krt"]
    assert curve == [(2, 91.0), (4, 72.0), (6, 60.0)]


def test_diagnostics_tables_average_each_session_over_seeds(tmp_path: Path) -> None:
    from mlcil.report import ReportedRun, protocol_key
    from mlcil.report.tables import diagnostics_markdown

    def run(seed: int, precision: float, drift: float) -> ReportedRun:
        session = {"seen_map": 50.0, "num_seen": 4, "ap": {}, "index": 0, "classes": ["1"]}
        diagnostics = {
            "restore": {"precision": precision, "recall": 40.0},
            "embedding_drift": {"mean_cosine_distance": drift},
            "logit_drift": None,
        }
        metrics = {
            "dataset": "digits",
            "protocol": "B0-C2",
            "class_order": ["1", "0", "3", "2"],
            "label": "krt",
            "method": "krt",
            "seed": seed,
            "sessions": [{**session, "diagnostics": None}, {**session, "diagnostics": diagnostics}],
            "avg_map": 50.0,
            "last_map": 50.0,
            "final": {"cf1": 1.0, "of1": 1.0},
            "wall_time_s": 1.0,
        }
        return ReportedRun(RunMetrics.from_data(metrics, "x"), tmp_path)

    runs = [run(0, 80.0, 0.1), run(1, 60.0, 0.3)]
    assert protocol_key(runs[0].metrics) == "B0-C2@1-0-3-2"
    markdown = diagnostics_markdown(runs)
    assert "| krt | 70.0 / 40.0 |" in markdown  # precision averaged over the two seeds
    assert "| krt | 0.200 |" in markdown  # embedding drift averaged
    assert "scores on the probe images" not in markdown  # no run measured logit drift
    assert "### digits B0-C2@1-0-3-2:" in markdown


def test_the_report_also_shows_the_release_base_new_subset_maps(tmp_path: Path) -> None:
    from mlcil.report.tables import SUBSET_KEYS

    dirs = [fake_run(tmp_path, "krt", "B0-C2", 0, [90.0, 70.0])]
    runs = load_runs(dirs)
    second = runs[0].sessions[1]
    second.base_map, second.new_map = 80.0, 60.0
    second.base_map_subset, second.new_map_subset = 85.0, 65.0
    markdown = session_breakdown_markdown(runs, SUBSET_KEYS, "subset")
    assert "| krt | 90.0 | 70.0 / 85.0 / 65.0 |" in markdown.splitlines()
    # Runs written before the subset maps existed show "-" there.
    report = write_report(dirs, tmp_path / "report")["markdown"].read_text()
    assert "each on its own test subset" in report and "70.0 / - / -" in report


def test_session_results_carry_both_base_new_definitions() -> None:
    import numpy as np

    from mlcil.engine.evaluate import session_result
    from mlcil.metrics.multilabel import subset_maps
    from mlcil.protocol import sessions

    plan = sessions(4, 2, 2)
    rng = np.random.default_rng(0)
    scores = rng.random((12, 4))
    targets = (rng.random((12, 4)) < 0.4).astype(np.float32)
    targets[:4, :] = 0  # images without any class of a group: the two definitions differ
    targets[4:8, 0] = targets[8:, 2] = 1
    result = session_result(scores, targets, plan[1], plan[0], ["a", "b", "c", "d"])
    expected = subset_maps(scores, targets, [0, 1], [2, 3])
    assert result.base_map_subset == expected["base_map_subset"]
    assert result.new_map_subset == expected["new_map_subset"]
    assert result.base_map_subset != result.base_map
