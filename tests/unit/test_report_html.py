"""The HTML report (pictures embedded, transfer tables) and the axis range of the mAP plots."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import matplotlib.image
import pytest

from mlcil.report import class_ap_table, class_forgetting, load_runs, write_report
from mlcil.results import percent_range, session_figure

CLASSES = [["0", "1"], ["2", "3"], ["4", "5"]]


def run_with_aps(
    root: Path, method: str, aps: list[dict[str, float]], seed: int = 0, classes: list | None = None
) -> Path:
    """A digits B0-C2 run whose sessions (``classes``, default three of two digits each)
    record per-class APs (percent)."""
    classes = classes or CLASSES
    folder = root / f"{method}_{seed}"
    folder.mkdir(parents=True)
    sessions = []
    for index, ap in enumerate(aps):
        seen = [c for group in classes[: index + 1] for c in group]
        new = [ap[c] for c in classes[index]]
        old = [ap[c] for c in classes[0]]
        sessions.append(
            {
                "index": index,
                "classes": classes[index],
                "num_seen": len(seen),
                "seen_map": sum(ap.values()) / len(ap),
                "base_map": sum(old) / len(old),
                "new_map": None if index == 0 else sum(new) / len(new),
                "ap": ap,
            }
        )
    maps = [s["seen_map"] for s in sessions]
    metrics = {
        "method": method,
        "label": method,
        "dataset": "digits",
        "protocol": "B0-C2",
        "seed": seed,
        "device": "cpu",
        "threads": 2,
        "deterministic": False,
        "sessions": sessions,
        "avg_map": sum(maps) / len(maps),
        "last_map": maps[-1],
        "final": {"cf1": 50.0, "of1": 60.0},
        "forgetting": 10.0,
        "wall_time_s": 12.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


KRT = [
    {"0": 90.0, "1": 80.0},  # R[0,0] = 85
    {"0": 80.0, "1": 70.0, "2": 90.0, "3": 70.0},  # R[1,0] = 75, R[1,1] = 80
    {"0": 70.0, "1": 60.0, "2": 80.0, "3": 60.0, "4": 60.0, "5": 40.0},  # 65, 70, 50
]
# Joint training learns every class in one session (what the joint method writes).
JOINT = [{"0": 90.0, "1": 80.0, "2": 95.0, "3": 85.0, "4": 80.0, "5": 60.0}]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    legacy = run_with_aps(tmp_path / "runs", "finetune", KRT)
    metrics = json.loads((legacy / "metrics.json").read_text())
    for session in metrics["sessions"]:
        del session["ap"]  # a run that recorded no per-class APs
    (legacy / "metrics.json").write_text(json.dumps(metrics))
    return [
        run_with_aps(tmp_path / "runs", "krt", KRT),
        run_with_aps(tmp_path / "runs", "joint", JOINT, classes=[["0", "1", "2", "3", "4", "5"]]),
        legacy,
    ]


def test_the_html_page_embeds_every_picture_and_the_transfer(
    runs: list[Path], tmp_path: Path
) -> None:
    paths = write_report(runs, tmp_path / "report")  # the call `mlcil report` makes
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing outside the page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    alts = [alt for alt, _ in images]
    # Curves, base/new, forgetting per class, and one heat map per run that has per-class APs.
    assert alts == [
        "digits B0-C2 seen mAP",
        "digits B0-C2 base and new mAP",
        "digits B0-C2 forgetting per class",
        "digits B0-C2: krt, AP per class (1 seed)",
        "digits B0-C2: joint, AP per class (1 seed)",
    ]
    for _, data in images:
        picture = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert picture.shape[0] > 200 and picture.shape[1] > 300
    # BWT krt: (65 - 85 + 70 - 80) / 2 = -15. FWT krt against joint's APs of classes 2, 3
    # (90) and 4, 5 (70): (80 - 90 + 50 - 70) / 2 = -15. Joint has one session: neither.
    assert "<tr><td>krt</td><td>-15.0</td><td>-15.0</td></tr>" in page
    assert "<tr><td>joint</td><td>-</td><td>-</td></tr>" in page
    assert "<tr><td>finetune</td><td>-</td><td>-</td></tr>" in page
    assert "<h3>digits B0-C2: seen / base / new mAP after each session</h3>" in page
    assert "backward / forward transfer" in paths["markdown"].read_text()


def test_per_class_tables_average_the_seeds(tmp_path: Path) -> None:
    second = [{k: v - 10.0 for k, v in ap.items()} for ap in KRT]
    runs = load_runs(
        [run_with_aps(tmp_path, "krt", KRT, 0), run_with_aps(tmp_path, "krt", second, 1)]
    )
    table = class_ap_table(runs)
    assert table is not None
    classes, ap = table
    assert classes == ["0", "1", "2", "3", "4", "5"]
    assert ap[0].tolist() == [85.0, 75.0, 65.0]  # class 0: means of 90/80, 80/70, 70/60
    assert ap[4, 2] == 55.0 and ap[4, :2].tolist() != ap[4, :2].tolist()  # NaN before seen
    # Forgetting: best before the last session minus the last; the same in both seeds.
    assert class_forgetting(runs) == pytest.approx({"0": 20.0, "1": 20.0, "2": 10.0, "3": 10.0})


def test_the_axis_shows_differences_and_the_legend_covers_no_point() -> None:
    sessions = [
        {"num_seen": 2 * (i + 1), "seen_map": m} for i, m in enumerate([100.0, 98.6, 96.7, 89.7])
    ]
    figure = session_figure({"krt": {"sessions": sessions, "dataset": "digits"}})
    (axis,) = figure.axes
    low, high = axis.get_ylim()
    assert 85.0 < low < 89.7 and 100.0 < high <= 104.0  # not 0-100: a 10-point span fills it
    assert max(axis.get_yticks()) <= 100.0  # headroom only, no 102 % tick
    (line,) = axis.get_lines()
    assert not line.get_clip_on()  # the point at 100 is drawn whole
    figure.canvas.draw()
    legend = figure.legends[0].get_window_extent()
    assert not legend.overlaps(axis.get_window_extent())
    assert [t.get_text() for t in axis.texts] == ["100.0", "98.6", "96.7", "89.7"]


def test_percent_range_keeps_a_margin_and_stays_in_bounds() -> None:
    assert percent_range([50.0, 50.0]) == (49.0, 51.0)  # a flat curve is not magnified
    assert percent_range([2.0, 5.0]) == (1.0, 6.0)
    low, high = percent_range([30.0, 100.0])
    assert low == pytest.approx(19.5) and high == 104.0
    assert percent_range([0.0, 10.0])[0] == 0.0
