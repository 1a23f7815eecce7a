"""The HTML report (pictures embedded, transfer tables) and the axis range of the mAP plots."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import matplotlib.text
import pytest

from mlcil.experiment import load_config
from mlcil.plots import percent_range, session_figure
from mlcil.report import load_runs, write_report
from mlcil.report.stats import class_ap_table, class_forgetting

CLASSES = [["0", "1"], ["2", "3"], ["4", "5"]]


def run_with_aps(
    root: Path,
    method: str,
    aps: list[dict[str, float]],
    seed: int = 0,
    classes: list | None = None,
    overrides: Sequence[str] | None = None,
) -> Path:
    """A digits B0-C2 run whose sessions (``classes``, default three of two digits each)
    record per-class APs (percent); with ``overrides``, also the ``config.yaml`` of a digits
    config with them."""
    classes = classes or CLASSES
    folder = root / f"{method}_{seed}"
    folder.mkdir(parents=True)
    if overrides is not None:
        config = load_config("digits-b0-c2", [f"seed={seed}", *overrides])
        (folder / "config.yaml").write_text(config.to_yaml())
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
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)  # nothing outside the page
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
    points = [(2 * (i + 1), m) for i, m in enumerate([100.0, 98.6, 96.7, 89.7])]
    figure = session_figure({"krt": points}, "digits B0-C2")
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


def test_the_page_shows_each_runs_settings_with_the_differences_marked_and_no_absolute_path(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    data = tmp_path / "data" / "digits"  # an absolute path in the settings of every run
    dirs = [
        run_with_aps(runs, "krt", KRT, 0, overrides=[f"data.root={data}", "train.lr=0.001"]),
        run_with_aps(runs, "krt", KRT, 1, overrides=[f"data.root={data}", "train.lr=0.01"]),
    ]
    page = write_report(dirs, tmp_path / "out" / "report")["html"].read_text()
    assert str(tmp_path) not in page and "/tmp/" not in page
    assert not re.search(r"(?<![\w.])/(home|root|tmp|Users|data)/", page)
    # The settings that differ (seed, train.lr), highlighted with each run's value.
    differing = page.split("Settings that differ between the runs")[1].split("</table>")[0]
    assert "<mark><code>train.lr</code></mark> = <code>0.001</code>" in differing
    assert "<mark><code>train.lr</code></mark> = <code>0.01</code>" in differing
    assert "<mark><code>seed</code></mark> = <code>1</code>" in differing
    assert "data.root" not in differing and "train.epochs" not in differing
    # What every run shares is shown once; paths as the report folder sees them.
    common = page.split("Settings common to every run")[1].split("</div>\n")[0]
    assert "<code>data.root</code> = <code>../../data/digits</code>" in common
    assert "<code>train.epochs</code> = <code>4</code>" in common
    # Each run's full settings, its differing keys marked; folders relative to the report.
    assert page.count("<details>") == 2 and "<summary>../../runs/krt_1: krt, seed 1" in page
    assert "<td>../../runs/krt_0</td>" in page


def test_every_method_gets_its_own_colour_and_marker_at_any_count() -> None:
    from mlcil.plots import MARKERS, method_styles

    for count in (1, 2, 10, 11, 12, 20, 21, 40):
        styles = method_styles([f"m{i}" for i in range(count)])
        colours = [style.color for style in styles.values()]
        assert len(set(colours)) == count, count
        assert len(set(styles.values())) == count
        markers = [style.marker for style in styles.values()]
        assert len(set(markers)) == min(count, len(MARKERS))


def twelve_methods(root: Path) -> list[Path]:
    """12 methods of long names on a B0-C2 protocol of 10 classes (5 sessions)."""
    classes = [[str(2 * i), str(2 * i + 1)] for i in range(5)]
    names = ["krt", "finetune", "joint-upper-bound", "replay", "lwf", "podnet", "oewc", "icarl",
             "bic", "derpp", "agcn", "krt-no-token-no-dpl"]  # fmt: skip
    dirs = []
    for position, name in enumerate(names):
        aps = []
        for session in range(5):
            seen = [c for group in classes[: session + 1] for c in group]
            aps.append({c: 90.0 - 4 * session - position + int(c) % 3 for c in seen})
        dirs.append(run_with_aps(root, name, aps, classes=classes))
    return dirs


def test_twelve_methods_fit_the_page_in_their_own_styles_with_readable_labels(
    tmp_path: Path,
) -> None:
    from matplotlib.colors import to_hex

    from mlcil.plots import DPI, PAGE_WIDTH_IN, SMALL_FONT_SIZE, method_styles
    from mlcil.report import group_runs
    from mlcil.report.figures import curves_figure, forgetting_figure

    dirs = twelve_methods(tmp_path / "runs")
    page = write_report(dirs, tmp_path / "report")["html"].read_text()
    # Every picture is at most the page's width: the browser never scales its text down.
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        picture = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert picture.shape[1] <= PAGE_WIDTH_IN * DPI
    assert f"max-width: {round(PAGE_WIDTH_IN * DPI)}px" in page

    (label_runs,) = group_runs(load_runs(dirs)).values()
    styles = method_styles(list(label_runs))
    curves = curves_figure(label_runs, "curves", styles)
    lines = curves.axes[0].get_lines()
    assert len({to_hex(line.get_color()) for line in lines}) == 12
    assert len({(to_hex(line.get_color()), line.get_marker()) for line in lines}) == 12
    forgetting = forgetting_figure(label_runs, "forgetting per class")
    assert forgetting is not None
    for figure in (curves, forgetting):
        figure.canvas.draw()
        assert figure.get_figwidth() <= PAGE_WIDTH_IN
        texts = [t for t in figure.findobj(matplotlib.text.Text) if t.get_text().strip()]
        small = [t.get_text() for t in texts if t.get_fontsize() < SMALL_FONT_SIZE - 1]
        assert not small, small  # cell values (8 pt) are the smallest text
    # The forgetting grid names every method and every class seen before the last session.
    axis = forgetting.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == list(label_runs)
    assert [t.get_text() for t in axis.get_yticklabels()] == [str(c) for c in range(8)]
    legend_texts = [t.get_text() for t in curves.legends[0].get_texts()]
    assert len(legend_texts) == 12 and all(t.endswith("(1 seed)") for t in legend_texts)


def test_report_files_are_named_from_slugs_never_paths(tmp_path: Path) -> None:
    from mlcil.report.naming import slug

    classes = [["../../../x/pwned", "a/b"], ["c\\d", ".hidden"]]
    folder = run_with_aps(
        tmp_path / "runs", "krt", [{"../../../x/pwned": 80.0, "a/b": 70.0}], classes=classes
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["class_order"] = [name for group in classes for name in group]
    metrics["dataset"] = "../../evil"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    before = {p for p in tmp_path.rglob("*")}
    output = tmp_path / "deep" / "out"
    paths = write_report([folder], output)
    written = {p for p in tmp_path.rglob("*")} - before
    # Only the report folder (and its parent) and files directly inside it.
    assert {p for p in written if p.is_dir()} == {output, output.parent}
    assert all(p.parent == output for p in written if p.is_file())
    assert len([p for p in written if p.suffix == ".png"]) == 1
    (png,) = [p for key, p in paths.items() if key not in ("html", "markdown", "json")]
    assert png.parent == output and png.name.startswith("map_per_session_evil-")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    # The slug: safe characters only, never hidden, short, distinct for distinct texts.
    for text in ("../../../x/pwned", "a/b", "a_b", "c\\d", ".hidden", "..", "", "é" * 200):
        name = slug(text)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) and len(name) <= 80, name
    assert slug("a/b") != slug("a_b") and slug("B0-C2") == "B0-C2" and slug("digits") == "digits"


def test_an_unfinished_run_is_reported_on_its_own(tmp_path: Path) -> None:
    done = run_with_aps(tmp_path / "runs", "krt", KRT)
    stopped = run_with_aps(tmp_path / "runs", "krt", KRT[:2], seed=1)
    metrics = json.loads((stopped / "metrics.json").read_text())
    metrics.update(format="mlcil-metrics", version=2, finished=False, planned_sessions=3)
    (stopped / "metrics.json").write_text(json.dumps(metrics))
    paths = write_report([done, stopped], tmp_path / "report")
    page = paths["html"].read_text()
    assert "<tr><td>krt</td><td>1</td>" in page
    assert "<tr><td>krt (unfinished: 2 of 3)</td><td>1</td>" in page
    assert "<td>unfinished: 2 of 3 sessions</td>" in page and "1 run is not finished" in page
    assert "| krt (unfinished: 2 of 3) | 1 |" in paths["markdown"].read_text()
