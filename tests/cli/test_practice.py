"""Using a trained run: ``mlcil.load`` / ``predict``, ``mlcil predict``, and ``--add-session``.

One tiny run on the embedded digits benchmark (B4-C2 stopped after 3 sessions: digits 0-7) is
trained per module; tests that change it work on a copy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mlcil
from mlcil.cli import main
from mlcil.data.manifest import new_labels_in_order
from tiny import REPO, TINY_ICA, tiny_overrides

TINY = [
    *tiny_overrides(
        train__batch_size="64",
        train__base_epochs="1",
        train__tensorboard="false",
        memory__per_class="2",
    ),
    *TINY_ICA,
]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run that learned digits 0-7, and new scenes (PNG + manifests) that bring 8 and 9."""
    root = tmp_path_factory.mktemp("practice")
    run = root / "run"
    config = str(REPO / "configs" / "digits_b4_c2.yaml")
    args = ["-q", "train", "--config", config, "--run-dir", str(run), *TINY, "--max-sessions", "3"]
    assert main(args) == 0
    scenes = root / "scenes"
    args = ["data", "export-digits", "--classes", "8", "9", "--train", "60", "--test", "30"]
    assert main([*args, "--output", str(scenes)]) == 0
    return {"run": run, "scenes": scenes}


def test_export_digits_writes_scenes_and_manifests(trained: dict[str, Path]) -> None:
    scenes = trained["scenes"]
    rows = list(csv.DictReader((scenes / "train.csv").open()))
    assert len(rows) == 60 and len(list((scenes / "test").glob("*.png"))) == 30
    assert all({"8", "9"} & set(row["labels"].split(";")) for row in rows)
    with Image.open(scenes / rows[0]["image"]) as image:
        assert image.size == (48, 48)


def test_load_and_predict_paths_folders_and_pil_images(trained: dict[str, Path]) -> None:
    model = mlcil.load(trained["run"], device="cpu")
    assert model.classes == [str(d) for d in range(8)]
    assert model.threshold == 0.8
    test = trained["scenes"] / "test"
    with Image.open(test / "00000.png") as opened:
        picture = opened.copy()
    predictions = model.predict([picture, test / "00001.png", test], batch_size=7)
    # The PIL image first, then the file, then the folder (its 00001.png is listed once).
    assert [p.image for p in predictions[:2]] == ["image[0]", str(test / "00001.png")]
    assert len(predictions) == 1 + 30
    first = predictions[0]
    assert list(first.scores) == model.classes
    assert all(0.0 <= s <= 1.0 for s in first.scores.values())
    assert first.labels == [c for c, s in first.scores.items() if s > 0.8]
    low = model.predict(test / "00000.png", threshold=0.01)[0]
    assert low.labels == model.classes
    assert low.scores == pytest.approx(first.scores, abs=1e-5)


def test_predict_cli_table_json_and_csv(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = trained["scenes"] / "test"
    images = [str(test / f"0000{i}.png") for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    run = str(trained["run"])
    assert main(["-q", "predict", "--run", run, *images, str(broken)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["image", "labels", "top", "scores"] and len(lines) == 4
    assert f"skipped {broken}" in err and "3 images predicted; 1 skipped" in err
    assert main(["-q", "predict", "--run", run, "--json", "--threshold", "0.05", *images]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == images
    assert all(set(r["scores"]) == {str(d) for d in range(8)} for r in records)
    output = tmp_path / "preds.csv"
    assert main(["-q", "predict", "--run", run, "--output", str(output), str(test)]) == 0
    rows = list(csv.reader(output.open()))
    assert rows[0] == ["image", "labels", *[str(d) for d in range(8)]] and len(rows) == 31
    # Nothing readable: an error, non-zero exit.
    assert main(["-q", "predict", "--run", run, str(broken)]) == 2
    assert "error: no image could be predicted" in capsys.readouterr().err


def test_add_session_learns_the_new_labels(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = {k: v for k, v in digest(run / "checkpoints").items() if k != "latest"}
    scenes = trained["scenes"]
    args = ["-q", "train", "--resume", str(run), "--add-session", str(scenes / "train.csv")]
    assert main([*args, "--test-manifest", str(scenes / "test.csv")]) == 0
    # The new classes arrive in the order the manifest first names them.
    new = new_labels_in_order(scenes / "train.csv", [str(d) for d in range(8)])
    assert sorted(new) == ["8", "9"]
    assert ",".join(new) in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["classes"] for s in metrics["sessions"]] == [
        ["0", "1", "2", "3"],
        ["4", "5"],
        ["6", "7"],
        new,
    ]
    assert [a["classes"] for a in metrics["added_sessions"]] == [new]
    last = metrics["sessions"][-1]
    assert last["num_seen"] == 10 and last["memory_images"] > 0
    assert list(last["ap"]) == [str(d) for d in range(8)] + new
    # The added session's test set: the original test images plus the manifest's.
    assert (run / "checkpoints" / "latest").read_text().strip() == "session_03"
    after = digest(run / "checkpoints")
    assert all(after[name] == value for name, value in before.items())
    assert "3" in (run / "metrics.csv").read_text().splitlines()[-1].split(",")[0]
    model = mlcil.load(run)
    assert model.classes == [str(d) for d in range(8)] + new
    prediction = model.predict(scenes / "test" / "00000.png")[0]
    assert list(prediction.scores) == model.classes
    # eval re-scores the extended run and reproduces its last mAP.
    assert main(["-q", "eval", "--run", str(run)]) == 0
    assert "reproduced" in capsys.readouterr().out
    # A second add needs labels the run does not know yet.
    assert main([*args]) == 2
    assert "brings no label the run has not learned" in capsys.readouterr().err
    # A class the original data does not name: its images count as negatives for it.
    rows = list(csv.DictReader((scenes / "train.csv").open()))
    kayak = tmp_path / "kayak.csv"
    lines = [f"{scenes / r['image']},kayak;{r['labels']}" for r in rows[:12]]
    kayak.write_text("image,labels\n" + "\n".join(lines) + "\n")
    kayak_test = tmp_path / "kayak_test.csv"
    lines = [f"{scenes / r['image']},kayak" for r in rows[12:18]]
    kayak_test.write_text("image,labels\n" + "\n".join(lines) + "\n")
    add = ["-q", "train", "--resume", str(run), "--add-session", str(kayak)]
    assert main([*add, "--test-manifest", str(kayak_test)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["classes"] for s in metrics["sessions"]][-2:] == [new, ["kayak"]]
    assert metrics["sessions"][-1]["train_images"] == 12
    assert len(metrics["added_sessions"]) == 2
    assert mlcil.load(run).classes[-1] == "kayak"


def test_add_session_dry_run_shows_the_plan_and_writes_nothing(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = digest(run)
    train = str(trained["scenes"] / "train.csv")
    assert main(["-q", "train", "--resume", str(run), "--add-session", train, "--dry-run"]) == 0
    out = capsys.readouterr().out
    session_line = [line for line in out.splitlines() if line.strip().startswith("3 ")]
    assert session_line and "2" in session_line[0].split()[1]
    assert digest(run) == before


def test_export_digits_overwrites_only_an_earlier_export(tmp_path: Path) -> None:
    """The walk-through runs again: --overwrite replaces an earlier export, never other files."""
    scenes = tmp_path / "scenes"
    args = ["data", "export-digits", "--classes", "8", "--train", "4", "--test", "2"]
    assert main([*args, "--output", str(scenes)]) == 0
    assert main([*args, "--output", str(scenes)]) == 2  # refused without --overwrite
    assert main([*args, "--output", str(scenes), "--overwrite", "--test", "0"]) == 0
    assert sorted(p.name for p in scenes.iterdir()) == ["train", "train.csv"]
    (scenes / "notes.txt").write_text("mine")
    assert main([*args, "--output", str(scenes), "--overwrite"]) == 2
    assert (scenes / "notes.txt").read_text() == "mine" and (scenes / "train.csv").exists()
