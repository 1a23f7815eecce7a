"""Bad input never costs work: each case is a mistake or a fault a user meets, given to the CLI.

For every case the CLI must print one ``error: ...`` line naming the file, line, key or value at
fault, exit non-zero without a traceback, and leave the earlier run byte-identical (its log may
grow). One tiny finished run (digits, two sessions) is trained per module and copied per test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mlcil.cli import main
from tiny import REPO, TINY_ICA, tiny_overrides

TINY = [
    *tiny_overrides(
        train__batch_size="64",
        train__base_epochs="1",
        train__trackers="[]",  # no tracker writes in the folder (csv is the default)
        memory__per_class="2",
    ),
    *TINY_ICA,
    "protocol=B0-C5",
]
SKIP_FOR_LINEAR = ("model.embed_dim", "model.num_heads")  # the baselines' network has no ICA
CONFIG = str(REPO / "configs" / "digits_b0_c2.yaml")
# A log may record the failed attempt; the lock file names the process that last held it.
UNCHECKED = {"train.log", ".mlcil-run.lock"}


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in UNCHECKED
    }


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("bad") / "run"
    assert main(["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY]) == 0
    return run


@dataclass
class Workspace:
    """A copy of the finished run, a scratch folder, and the test's monkeypatch."""

    run: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    extra_unchanged: list[Path] = field(default_factory=list)

    def manifest(self, name: str, rows: list[tuple[str, str]]) -> Path:
        for image, _ in rows:
            target = (self.tmp / "scenes" / image).resolve()
            if target.is_relative_to(self.tmp) and not target.exists():
                write_png(target, len(image))
        path = self.tmp / "scenes" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("image,labels\n" + "".join(f"{i},{labels}\n" for i, labels in rows))
        return path


Setup = Callable[[Workspace], list[str]]


def _add(ws: Workspace, rows: list[tuple[str, str]], *extra: str) -> list[str]:
    train = ws.manifest("train.csv", rows)
    return ["train", "--resume", str(ws.run), "--add-session", str(train), *extra]


def _new_run(*overrides: str, overwrite: bool = True) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        flags = ["--overwrite"] if overwrite else []
        return ["train", "--config", CONFIG, "--run-dir", str(ws.run), *TINY, *overrides, *flags]

    return setup


def _dangling_latest(ws: Workspace) -> list[str]:
    (ws.run / "checkpoints" / "latest").write_text("session_07\n")
    return _new_run(overwrite=False)(ws)


def _checkpoints_gone(ws: Workspace) -> list[str]:
    shutil.rmtree(ws.run / "checkpoints")
    return _new_run(overwrite=False)(ws)


def _resume_with(*extra: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        return ["train", "--resume", str(ws.run), *extra]

    return setup


def _config_file(content: bytes) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        path = ws.tmp / "bad.yaml"
        path.write_bytes(content)
        return ["train", "--config", str(path), "--run-dir", str(ws.tmp / "new"), "--dry-run"]

    return setup


def _damaged_weights(content: Callable[[bytes], bytes], command: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        path = ws.run / "checkpoints" / "session_01" / "model.safetensors"
        path.write_bytes(content(path.read_bytes()))
        if command == "eval":
            return ["eval", "--run", str(ws.run)]
        if command == "predict":
            write_png(ws.tmp / "a.png", 1)
            return ["predict", "--run", str(ws.run), str(ws.tmp / "a.png")]
        return ["train", "--resume", str(ws.run)]

    return setup


def _metrics(content: Any, command: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        path = ws.run / "metrics.json"
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps(content(metrics)))
        if command == "eval":
            return ["eval", "--run", str(ws.run)]
        return ["report", str(ws.run), "--output", str(ws.tmp / "report")]

    return setup


def _report_on_file(ws: Workspace) -> list[str]:
    target = ws.tmp / "report.md"
    target.write_text("my notes\n")
    ws.extra_unchanged.append(target)
    return ["report", str(ws.run), "--output", str(target)]


def _predict_output_exists(ws: Workspace) -> list[str]:
    target = ws.tmp / "preds.csv"
    target.write_text("earlier predictions\n")
    ws.extra_unchanged.append(target)
    write_png(ws.tmp / "a.png", 1)
    return ["predict", "--run", str(ws.run), "--output", str(target), str(ws.tmp / "a.png")]


def _fault(target: str, code: int, message: str) -> Setup:
    """An OSError raised by a write inside the run (disk full, read-only folder)."""

    def setup(ws: Workspace) -> list[str]:
        def fail(*args: Any, **kwargs: Any) -> None:
            paths = [a for a in args if isinstance(a, Path)] or [
                a for a in args if isinstance(a, str)
            ]
            raise OSError(code, message, str(paths[0]))

        ws.monkeypatch.setattr(target, fail)
        return _add(ws, [("k1.png", "kayak"), ("k2.png", "kayak;3")])

    return setup


def _compare(protocols: list[str], conflicting: bool = False) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        output = ws.tmp / "cmp"
        methods = REPO / "configs" / "methods"
        if conflicting:
            other = output / "runs" / "digits_B0-C5_lwf_s0"
            other.mkdir(parents=True)
            (other / "config.yaml").write_text(
                "seed: 0\nprotocol: B0-C5\ndata: {dataset: digits}\n"
            )
            ws.extra_unchanged.append(other / "config.yaml")
        return [
            "compare",
            str(methods / "finetune.yaml"),
            str(methods / "lwf.yaml"),
            "--base",
            CONFIG,
            "--seeds",
            "0",
            "--protocols",
            *protocols,
            "--output",
            str(output),
            "--set",
            *[t for t in TINY if t.split("=")[0] not in ("protocol", *SKIP_FOR_LINEAR)],
        ]

    return setup


def _missing_image(ws: Workspace) -> list[str]:
    argv = _add(ws, [("a.png", "kayak"), ("b.png", "kayak")])
    (ws.tmp / "scenes" / "a.png").unlink()
    return argv


def _no_checkpoint(ws: Workspace) -> list[str]:
    shutil.rmtree(ws.run / "checkpoints")
    return ["predict", "--run", str(ws.run), str(ws.tmp)]


def _malformed_added(ws: Workspace) -> list[str]:
    (ws.run / "added_sessions.json").write_text("[1, 2]")
    return ["eval", "--run", str(ws.run)]


def _nan_weights(ws: Workspace) -> list[str]:
    from safetensors.torch import load_file, save_file

    path = ws.run / "checkpoints" / "session_01" / "model.safetensors"
    tensors = {
        k: v.float().fill_(float("nan")) if v.is_floating_point() else v
        for k, v in load_file(str(path)).items()
    }
    save_file(tensors, str(path))
    return _add(ws, [("k1.png", "kayak"), ("k2.png", "kayak;3")])


def _new_data_with_truncated_jpeg(ws: Workspace) -> list[str]:
    # 20 good scenes, then one JPEG cut short at the last row: found before anything is moved.
    rows = [(f"s{i:02d}.png", "a" if i % 2 else "b") for i in range(20)]
    train = ws.manifest("train.csv", [*rows, ("last.jpg", "a")])
    jpeg = ws.tmp / "scenes" / "last.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    test = ws.manifest("test.csv", rows[:6])
    data = [f"data.train_manifest={train}", f"data.test_manifest={test}", "protocol=B0-C1"]
    return _new_run("data.dataset=manifest", *data)(ws)


def _new_nan_weights(ws: Workspace) -> list[str]:
    import torch
    from safetensors.torch import save_file

    path = ws.tmp / "nan_backbone.safetensors"
    save_file({"conv1.weight": torch.full((64, 3, 7, 7), float("nan"))}, str(path))
    return _new_run(f"model.pretrained={path}")(ws)


def _overwrite_user_folder(ws: Workspace) -> list[str]:
    mine = ws.tmp / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "best.pt").write_bytes(b"user weights")
    (mine / "tensorboard").mkdir()
    (mine / "tensorboard" / "events").write_bytes(b"user events")
    (mine / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    ws.extra_unchanged.append(mine)
    return ["train", "--config", CONFIG, "--run-dir", str(mine), *TINY, "--overwrite"]


def _fails_in_first_session(ws: Workspace) -> list[str]:
    # A fault no pre-flight check can see: the earlier run must come back as it was.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(ws.run / "checkpoints"))

    ws.monkeypatch.setattr("mlcil.engine.loop.fit_session", fail)
    return _new_run()(ws)


def _latest_outside(ws: Workspace) -> list[str]:
    other = ws.tmp / "other" / "checkpoints" / "session_01"
    shutil.copytree(ws.run / "checkpoints" / "session_01", other)
    (ws.run / "checkpoints" / "latest").write_text("../../other/checkpoints/session_01\n")
    return ["train", "--resume", str(ws.run)]


def _escaping_name(name: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        output = f"output_dir={ws.tmp / 'out'}"
        return ["train", "--config", CONFIG, *TINY, f"name={name}", output]

    return setup


def _const(*argv: str) -> Setup:
    return lambda ws: [a.replace("RUN", str(ws.run)).replace("TMP", str(ws.tmp)) for a in argv]


CASES: dict[str, tuple[Setup, str]] = {
    # --overwrite checks everything before deleting the old run.
    "overwrite_missing_weights": (_new_run("model.pretrained=/no/such.safetensors"), "such"),
    "overwrite_lr_nan": (_new_run("train.lr=nan"), "train.lr"),
    "overwrite_bad_protocol": (_new_run("protocol=B0-C3"), "B0-C3"),
    "overwrite_truncated_jpeg_in_new_data": (_new_data_with_truncated_jpeg, "last.jpg"),
    "overwrite_nan_weights": (_new_nan_weights, "not finite"),
    "overwrite_image_size_1": (_new_run("data.image_size=1"), "data.image_size=1"),
    "overwrite_not_an_mlcil_run": (_overwrite_user_folder, "not an mlcil run"),
    "overwrite_fails_in_first_session": (_fails_in_first_session, "No space left on device"),
    # The run folder's name and checkpoint pointer stay inside it.
    "latest_points_outside": (_latest_outside, "not a checkpoint folder of this run"),
    "name_escapes_output_dir": (_escaping_name("../../escaped"), "name"),
    "name_is_absolute": (_escaping_name("/etc"), "name"),
    # A run folder is never reused without --overwrite, whatever state its checkpoints are in.
    "existing_run_without_overwrite": (_new_run(overwrite=False), "already holds a run"),
    "dangling_latest": (_dangling_latest, "already holds a run"),
    "checkpoints_gone": (_checkpoints_gone, "config.yaml"),
    # --resume keeps the run's settings.
    "resume_protocol": (_resume_with("protocol=B0-C2"), "protocol"),
    "resume_short_key": (_resume_with("epochs=3"), "train.epochs"),
    "resume_seed": (_resume_with("seed=1"), "seed"),
    "resume_memory": (_resume_with("memory.per_class=5"), "memory.per_class"),
    "resume_with_config": (_resume_with("--config", CONFIG), "--config"),
    "resume_with_run_dir": (_resume_with("--run-dir", "/tmp/x"), "--run-dir"),
    "resume_with_overwrite": (_resume_with("--overwrite"), "--overwrite"),
    "resume_not_a_run": (_const("train", "--resume", "TMP"), "no config.yaml"),
    # Damaged checkpoints.
    "truncated_weights_eval": (_damaged_weights(lambda b: b[: len(b) // 2], "eval"), "safetensors"),
    "text_weights_resume": (_damaged_weights(lambda b: b"hello", "resume"), "model.safetensors"),
    "truncated_weights_predict": (_damaged_weights(lambda b: b[:100], "predict"), "safetensors"),
    # Config files and values.
    "config_not_utf8": (_config_file(b"seed: 1\nname: caf\xe9\n"), "UTF-8"),
    "config_empty": (_config_file(b""), "empty"),
    "lr_nan": (_new_run("train.lr=nan", overwrite=False), "train.lr"),
    "weight_decay_negative": (_new_run("train.weight_decay=-1", "--dry-run"), "weight_decay"),
    "seed_negative": (_new_run("seed=-1", "--dry-run"), "seed"),
    "max_sessions_zero": (_new_run("--max-sessions", "0"), "--max-sessions"),
    "max_sessions_negative": (_new_run("--max-sessions", "-1"), "--max-sessions"),
    "eval_tolerance_nan": (_const("eval", "--run", "RUN", "--tolerance", "nan"), "nan"),
    # metrics.json written by something else.
    "metrics_list_eval": (_metrics(lambda m: [m], "eval"), "metrics.json"),
    "metrics_string_last_map_eval": (
        _metrics(lambda m: {**m, "last_map": "40"}, "eval"),
        "last_map",
    ),
    "metrics_string_last_map_report": (
        _metrics(lambda m: {**m, "last_map": "40"}, "report"),
        "last_map",
    ),
    "report_output_is_a_file": (_report_on_file, "report.md"),
    # Faults while writing: the latest checkpoint and the results stay as they were.
    "disk_full_during_checkpoint": (
        _fault("mlcil.engine.checkpoint.save_file", errno.ENOSPC, "No space left on device"),
        "No space left on device",
    ),
    "read_only_run_folder": (
        _fault("mlcil.added_sessions.write_text_atomic", errno.EROFS, "Read-only file system"),
        "Read-only file system",
    ),
    # Manifests of an added session.
    "manifest_duplicate_rows": (
        lambda ws: _add(ws, [("a.png", "kayak"), ("a.png", "kayak")]),
        "line 3",
    ),
    "manifest_conflicting_labels": (
        lambda ws: _add(ws, [("a.png", "kayak"), ("./a.png", "sled")]),
        "a.png",
    ),
    "manifest_escapes_root": (lambda ws: _add(ws, [("../outside.png", "kayak")]), "outside.png"),
    "manifest_no_new_label": (lambda ws: _add(ws, [("a.png", "3;4")]), "brings no label"),
    "manifest_missing": (_resume_with("--add-session", "/no/such.csv"), "/no/such.csv"),
    "test_manifest_unknown_label": (
        lambda ws: _add(
            ws,
            [("a.png", "kayak")],
            "--test-manifest",
            str(ws.manifest("t.csv", [("b.png", "sled")])),
        ),
        "sled",
    ),
    "add_session_without_resume": (
        _const("train", "--config", CONFIG, "--add-session", "x.csv"),
        "--add-session",
    ),
    "added_sessions_malformed": (_malformed_added, "added_sessions.json"),
    "manifest_image_missing": (_missing_image, "a.png"),
    "nan_weights_in_checkpoint": (_nan_weights, "model.safetensors"),
    # Prediction.
    "predict_output_exists": (_predict_output_exists, "preds.csv"),
    "predict_threshold_out_of_range": (
        _const("predict", "--run", "RUN", "--threshold", "1.5", "TMP"),
        "1.5",
    ),
    "predict_without_checkpoint": (_no_checkpoint, "no checkpoint"),
    "predict_output_folder_missing": (
        _const("predict", "--run", "RUN", "--output", "TMP/no/preds.csv", "TMP"),
        "no/preds.csv",
    ),
    "predict_nothing_readable": (_const("predict", "--run", "RUN", "TMP/none.png"), "none.png"),
    # compare checks every run before the first one starts.
    "compare_bad_protocol": (_compare(["B0-C5", "B0-C3"]), "B0-C3"),
    "compare_conflicting_run": (_compare(["B0-C5"], conflicting=True), "other settings"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_and_costs_nothing(
    case: str,
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup, culprit = CASES[case]
    ws = Workspace(run=tmp_path / "run", tmp=tmp_path / "scratch", monkeypatch=monkeypatch)
    shutil.copytree(finished, ws.run)
    ws.tmp.mkdir()
    argv = setup(ws)
    before = snapshot(ws.run)
    others = {
        path: snapshot(path) if path.is_dir() else path.read_bytes() for path in ws.extra_unchanged
    }
    capsys.readouterr()
    try:
        code = main(["-q", *argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert culprit in errors[0], errors[0]
    assert snapshot(ws.run) == before
    for path, content in others.items():
        assert (snapshot(path) if path.is_dir() else path.read_bytes()) == content, path
    if case.startswith("compare"):
        assert not list((ws.tmp / "cmp").rglob("checkpoints"))
        assert not list((ws.tmp / "cmp").rglob("train.log"))


def test_debug_shows_the_traceback(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "-q", "train", "--resume", str(finished), "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --resume")


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_resume_accepts_overrides_that_cannot_change_results(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run / "checkpoints")
    # Short keys resolve as in any override; repeating a saved value changes nothing.
    argv = ["train", "--resume", str(run), "device=cpu", "data.num_workers=0", "seed=0"]
    assert main(["-q", *argv, "train.eval_batch_size=7", "progress=false"]) == 0
    assert snapshot(run / "checkpoints") == before
    assert "last mAP" in capsys.readouterr().out
