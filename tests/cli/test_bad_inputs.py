"""Bad input never costs work: each case is a mistake or a fault a user meets, given to the CLI.

For every case the CLI must print one ``error: ...`` line naming the file, line, key or value at
fault, exit non-zero without a traceback, and leave the earlier run byte-identical (its log may
grow). One tiny finished run (digits, two sessions) is trained per module and copied per test.

The faults whose right answer is not an error live with their subject, by their command: a report
of a class named like a path (tests/unit/test_report_html.py, the slug test), ``--overwrite``
killed at every rename of its set-aside and restore (tests/unit/test_rundir.py and
tests/cli/test_run_folder.py), Ctrl-C, SIGTERM and a killed parent on ``compare --jobs 2``
(tests/cli/test_grid_stop.py), and no network connection unless hub weights are named
(tests/cli/test_no_network.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
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
LINEAR_TINY = [t for t in TINY if t.split("=")[0] not in SKIP_FOR_LINEAR]
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


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished DER++ and iCaRL runs (the methods whose checkpoints hold their own tensors),
    trained when a case first needs them."""
    runs = {}
    for name in ("derpp", "icarl"):
        run = tmp_path_factory.mktemp(name) / "run"
        method = str(REPO / "configs" / "methods" / f"{name}.yaml")
        argv = ["-q", "train", "--config", CONFIG, "--config", method, "--run-dir", str(run)]
        assert main([*argv, *LINEAR_TINY]) == 0
        runs[name] = run
    return runs


@dataclass
class Workspace:
    """A copy of the finished run, a scratch folder, and the test's monkeypatch.

    ``extra_unchanged`` must keep their bytes, ``absent`` must hold no file afterwards, and
    ``forbidden`` must not appear in what the command prints (a secret it must not read out).
    """

    run: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    trained: Callable[[str], Path]
    extra_unchanged: list[Path] = field(default_factory=list)
    absent: list[Path] = field(default_factory=list)
    forbidden: list[str] = field(default_factory=list)

    def use(self, method: str) -> None:
        """Make ``run`` a copy of the finished run of ``method`` (derpp, icarl)."""
        shutil.rmtree(self.run)
        shutil.copytree(self.trained(method), self.run)

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


# --- issue 23: files the run owns, forged folders, bounds, method files, internal errors ------


def _victim(ws: Workspace) -> Path:
    victim = ws.tmp / "victim.txt"
    victim.write_text("precious\n")
    ws.extra_unchanged.append(victim)
    return victim


def _linked_lock(ws: Workspace) -> list[str]:
    (ws.run / ".mlcil-run.lock").unlink(missing_ok=True)
    (ws.run / ".mlcil-run.lock").symlink_to(_victim(ws))
    return ["train", "--resume", str(ws.run)]


def _linked_log(ws: Workspace) -> list[str]:
    (ws.run / "train.log").unlink()
    (ws.run / "train.log").symlink_to(_victim(ws))
    return ["train", "--resume", str(ws.run)]


def _linked_checkpoints(ws: Workspace) -> list[str]:
    other = ws.tmp / "other"
    shutil.copytree(ws.run, other)
    ws.extra_unchanged.append(other)
    shutil.rmtree(ws.run / "checkpoints")
    (ws.run / "checkpoints").symlink_to(other / "checkpoints")
    return ["train", "--resume", str(ws.run)]


def _linked_latest(ws: Workspace) -> list[str]:
    secret = ws.tmp / "secret.txt"
    secret.write_text("session_01 SECRET-TOKEN\n")
    (ws.run / "checkpoints" / "latest").unlink()
    (ws.run / "checkpoints" / "latest").symlink_to(secret)
    ws.forbidden.append("SECRET-TOKEN")
    return ["train", "--resume", str(ws.run)]


def _linked_session(ws: Workspace) -> list[str]:
    # The last session's folder replaced by a link: eval must not score an earlier session.
    moved = ws.tmp / "session_01"
    shutil.move(ws.run / "checkpoints" / "session_01", moved)
    (ws.run / "checkpoints" / "session_01").symlink_to(moved)
    return ["eval", "--run", str(ws.run)]


def _nul_in_latest(ws: Workspace) -> list[str]:
    (ws.run / "checkpoints" / "latest").write_bytes(b"session_01\x00/../../etc\n")
    return ["train", "--resume", str(ws.run)]


def _user_folder(ws: Workspace, marker: bytes | None, state_only: bool = False) -> list[str]:
    """A user's folder with run-like files and a marker that is not one mlcil wrote for it."""
    mine = ws.tmp / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own settings\n")
    (mine / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    if marker is not None:
        (mine / ".mlcil-run").write_bytes(marker)
    if state_only:
        (mine / "checkpoints" / "x").mkdir(parents=True)
        (mine / "checkpoints" / "x" / "state.json").write_text('{"format": "mlcil-checkpoint"}')
    ws.extra_unchanged.append(mine)
    return ["train", "--config", CONFIG, "--run-dir", str(mine), *TINY, "--overwrite"]


def _copied_marker(ws: Workspace) -> list[str]:
    return _user_folder(ws, (ws.run / ".mlcil-run").read_bytes())


def _config_value(ws: Workspace, key: str, value: str) -> None:
    """Edit one ``data:`` value of the run's config.yaml (as a hand edit would)."""
    import yaml

    path = ws.run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    config[section][name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _huge_image_size(command: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        _config_value(ws, "data.image_size", "100000")
        if command == "eval":
            return ["eval", "--run", str(ws.run)]
        write_png(ws.tmp / "a.png", 1)
        return ["predict", "--run", str(ws.run), str(ws.tmp / "a.png")]

    return setup


def _deep_json(where: str, command: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        path = ws.run / where
        path.write_text("[" * 100_000 + "]" * 100_000)
        if command == "eval":
            return ["eval", "--run", str(ws.run)]
        return ["train", "--resume", str(ws.run)]

    return setup


def _deep_coco(ws: Workspace) -> list[str]:
    root = ws.tmp / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2014", "val2014"):
        (root / split).mkdir()
        text = '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}"
        (root / "annotations" / f"instances_{split}.json").write_text(text)
    config = str(REPO / "configs" / "coco_b40_c10.yaml")
    return ["train", "--config", config, f"root={root}", "data.annotation_cache=false", "--dry-run"]


def _alias_bomb(ws: Workspace) -> list[str]:
    # 470 KB: one 200 KB string repeated by 90,000 aliases (18 GB once expanded).
    path = ws.tmp / "bomb.yaml"
    path.write_text(f"a: &a {'x' * 200_000}\nname: [" + ", ".join(["*a"] * 90_000) + "]\n")
    return ["train", "--config", str(path), "--run-dir", str(ws.tmp / "new"), "--dry-run"]


def _long_value(ws: Workspace) -> list[str]:
    # A wrong value of 800 KB once expanded (under the bound): the message shows a few hundred.
    path = ws.tmp / "long.yaml"
    path.write_text(f"a: &a {'x' * 2_000}\nname: [" + ", ".join(["*a"] * 400) + "]\n")
    return ["train", "--config", str(path), "--run-dir", str(ws.tmp / "new"), "--dry-run"]


def _failing_tracker(ws: Workspace) -> list[str]:
    from mlcil import trackers

    def refuse(target: Any) -> Any:
        raise RuntimeError("the tracking server refused the login")

    ws.monkeypatch.setitem(trackers.TRACKERS, "boom", trackers.TrackerSpec(refuse))
    new = ws.tmp / "new"
    ws.absent.append(new / "checkpoints")
    return ["train", "--config", CONFIG, "--run-dir", str(new), *TINY, "train.trackers=[boom]"]


def _cache_is_a_file(ws: Workspace) -> list[str]:
    cache = ws.tmp / "cache"
    cache.write_text("not a folder\n")
    ws.extra_unchanged.append(cache)
    ws.monkeypatch.setenv("MLCIL_CACHE", str(cache))
    return ["pretrain", "--config", CONFIG, *TINY, "--epochs", "1"]


def _pretrain_stopped(ws: Workspace) -> list[str]:
    # SIGTERM at the first step of a pretraining, which writes no checkpoint.
    from mlcil.engine.observers import Observer

    class SigtermAtOnce(Observer):
        def step_finished(self, *args: Any) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    import mlcil.pretrain

    scenes = mlcil.pretrain.load_glyphs

    def few_scenes(split: str, count: int, seed: int, size: int) -> Any:
        return scenes(split, 16, seed, size)

    # An older Observer in place of the progress callback: adapted, it still hears every step.
    ws.monkeypatch.setattr("mlcil.pretrain.ProgressCallback", SigtermAtOnce)
    ws.monkeypatch.setattr("mlcil.pretrain.load_glyphs", few_scenes)
    ws.monkeypatch.setenv("MLCIL_CACHE", str(ws.tmp / "cache"))
    ws.absent.append(ws.tmp / "cache" / "weights")
    ws.forbidden.append("checkpoint written")
    return ["pretrain", "--config", CONFIG, *TINY, "--epochs", "1", "--batch-size", "8"]


def _oserror_in_dry_run(ws: Workspace) -> list[str]:
    def fail(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EIO, "Input/output error", str(ws.tmp / "disk"))

    ws.monkeypatch.setattr("mlcil.report.dry_run_summary", fail)
    ws.forbidden.append("checkpoint")  # nothing was run: no checkpoint to speak of
    return _new_run("--dry-run", overwrite=False)(ws)


def _typo_label(ws: Workspace) -> list[str]:
    rows = [(f"s{i:02d}.png", "cat" if i % 2 else "dog") for i in range(10)]
    train = ws.manifest("train.csv", [*rows, ("s99.png", "dogg")])
    test = ws.manifest("test.csv", rows[:4])
    data = [f"data.train_manifest={train}", f"data.test_manifest={test}", "data.class_list=null"]
    config = str(REPO / "configs" / "manifest_example.yaml")
    return ["train", "--config", config, *data, *TINY, "protocol=B0-C2", "--dry-run"]


def _export(*counts: str) -> Setup:
    def setup(ws: Workspace) -> list[str]:
        ws.absent.append(ws.tmp / "exported")
        return ["data", "export-digits", "--output", str(ws.tmp / "exported"), *counts]

    return setup


def _rows_of(
    method: str, file: str, change: Callable[[Any], Any], command: str, unlisted: bool = False
) -> Setup:
    """A finished DER++ or iCaRL run whose ``file`` in its last checkpoint is rewritten (with
    ``unlisted``, its state.json lists no tensors either, as before the list was written)."""

    def setup(ws: Workspace) -> list[str]:
        from safetensors.torch import load_file, save_file

        ws.use(method)
        path = ws.run / "checkpoints" / "session_01" / file
        if unlisted:
            state_path = path.parent / "state.json"
            state = json.loads(state_path.read_text())
            del state["tensor_files"]
            state_path.write_text(json.dumps(state))
        tensors = change(load_file(str(path)))
        if tensors is None:
            path.unlink()
        else:
            save_file(tensors, str(path))
        if command == "resume":
            return ["train", "--resume", str(ws.run)]
        if command == "eval":
            return ["eval", "--run", str(ws.run)]
        write_png(ws.tmp / "a.png", 1)
        return ["predict", "--run", str(ws.run), str(ws.tmp / "a.png")]

    return setup


def _narrow_rows(tensors: dict[str, Any]) -> dict[str, Any]:
    return {name: row[:3].clone() for name, row in tensors.items()}


def _nan_rows(tensors: dict[str, Any]) -> dict[str, Any]:
    return {name: row.clone().fill_(float("nan")) for name, row in tensors.items()}


def _short_means(tensors: dict[str, Any]) -> dict[str, Any]:
    return {name: value[:5].clone() for name, value in tensors.items()}


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
    # Issue 23, row 1: a link planted at the lock or the log is refused, its target untouched.
    "lock_file_is_a_link": (_linked_lock, ".mlcil-run.lock is a symbolic link"),
    "log_file_is_a_link": (_linked_log, "train.log is a symbolic link"),
    # Row 5: sizes bounded before anything is allocated, the bound named.
    "synth_coco_a_billion_images": (
        _const("data", "synth-coco", "--output", "TMP/sc", "--train", "1000000000"),
        "1,000,000",
    ),
    "synth_coco_negative_count": (
        _const("data", "synth-coco", "--output", "TMP/sc", "--train", "-5"),
        "'-5' must be from 1 to 1,000,000",
    ),
    "synth_coco_nothing_to_write": (
        _const("data", "synth-coco", "--output", "TMP/sc", "--train", "0", "--test", "0"),
        "'0' must be from 1 to 1,000,000",
    ),
    "synth_coco_a_million_jobs": (
        _const("data", "synth-coco", "--output", "TMP/sc", "--jobs", "1000000"),
        "256",
    ),
    "yaml_aliases_expand_to_gigabytes": (_alias_bomb, "1,000,000 characters"),
    "yaml_long_value_is_shown_short": (_long_value, "characters)"),
    # Row 6: method files checked on load.
    "derpp_logits_of_another_width": (
        _rows_of("derpp", "memory.safetensors", _narrow_rows, "resume"),
        "memory.safetensors",
    ),
    "derpp_logits_all_nan": (
        _rows_of("derpp", "memory.safetensors", _nan_rows, "eval"),
        "memory.safetensors",
    ),
    "derpp_logits_of_another_width_unlisted": (
        _rows_of("derpp", "memory.safetensors", _narrow_rows, "resume", unlisted=True),
        # 5 or 10 values, by the session that stored the damaged row (the herding's choice)
        "holds 3 values, expected",
    ),
    "derpp_logits_missing": (
        _rows_of("derpp", "memory.safetensors", lambda t: None, "resume"),
        "memory.safetensors is missing",
    ),
    "icarl_means_missing": (
        _rows_of("icarl", "method.safetensors", lambda t: None, "predict"),
        "method.safetensors is missing",
    ),
    "icarl_means_short": (
        _rows_of("icarl", "method.safetensors", _short_means, "eval"),
        "method.safetensors",
    ),
    # Row 7: forged and linked run folders.
    "overwrite_empty_marker": (lambda ws: _user_folder(ws, b""), "not an mlcil run"),
    "overwrite_checkpoint_state_only": (
        lambda ws: _user_folder(ws, None, state_only=True),
        "not an mlcil run",
    ),
    "overwrite_copied_marker": (_copied_marker, "does not name its config.yaml"),
    "resume_checkpoints_is_a_link": (_linked_checkpoints, "checkpoints is a symbolic link"),
    "resume_latest_is_a_link": (_linked_latest, "latest is a symbolic link"),
    "eval_session_folder_is_a_link": (_linked_session, "session_01 is a symbolic link"),
    # Row 8: no internal error.
    "image_size_huge_dry_run": (
        _new_run("data.image_size=100000", "--dry-run", overwrite=False),
        "less than or equal to 2048",
    ),
    "image_size_huge_eval": (_huge_image_size("eval"), "data.image_size"),
    "image_size_huge_predict": (_huge_image_size("predict"), "data.image_size"),
    "fixed_size_backbone_at_another_size": (
        _new_run("model.backbone=vit_tiny_patch16_224", "--dry-run", overwrite=False),
        "vit_tiny_patch16_224",
    ),
    "session_size_huge": (
        _new_run("protocol=B0-C99999999999999999999", "--dry-run", overwrite=False),
        "99999999999999999999",
    ),
    "seed_huge": (
        _new_run("seed=100000000000000000000", "--dry-run", overwrite=False),
        "4294967295",
    ),
    "batch_size_huge": (
        _new_run("train.batch_size=100000000000000", "--dry-run", overwrite=False),
        "65536",
    ),
    "eval_batch_size_huge": (
        _new_run("train.eval_batch_size=100000000000000", "--dry-run", overwrite=False),
        "65536",
    ),
    "predict_batch_size_huge": (
        _const("predict", "--run", "RUN", "--batch-size", "1000000000000", "TMP"),
        "65,536",
    ),
    "nul_byte_in_latest": (_nul_in_latest, "checkpoints/latest"),
    "deep_json_metrics_eval": (_deep_json("metrics.json", "eval"), "metrics.json"),
    "deep_json_state_eval": (
        _deep_json("checkpoints/session_01/state.json", "eval"),
        "state.json",
    ),
    "deep_json_state_resume": (
        _deep_json("checkpoints/session_01/state.json", "resume"),
        "state.json",
    ),
    "deep_json_coco_annotations": (_deep_coco, "nested too deeply"),
    "tracker_fails_to_start": (_failing_tracker, "train.trackers: 'boom' cannot start"),
    "pretrain_epochs_zero": (_const("pretrain", "--config", CONFIG, "--epochs", "0"), "--epochs"),
    # Row 10: every message says what is true.
    "pretrain_cache_is_a_file": (_cache_is_a_file, "weights cache"),
    "pretrain_stopped_by_sigterm": (_pretrain_stopped, "nothing saved"),
    "export_digits_negative_count": (_export("--train", "-5", "--test", "2"), "-5"),
    "export_digits_nothing_to_write": (_export("--train", "0", "--test", "0"), "both 0"),
    "eval_tolerance_huge": (_const("eval", "--run", "RUN", "--tolerance", "1e308"), "1e308"),
    "protocol_not_tiling_names_the_typo": (_typo_label, "'dogg' (1 image; like 'dog')"),
    "os_error_in_a_dry_run": (_oserror_in_dry_run, "Input/output error"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_and_costs_nothing(
    case: str,
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    setup, culprit = CASES[case]
    ws = Workspace(
        run=tmp_path / "run",
        tmp=tmp_path / "scratch",
        monkeypatch=monkeypatch,
        trained=lambda name: request.getfixturevalue("method_runs")[name],
    )
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
    assert "internal error" not in errors[0], errors[0]
    assert len(errors[0]) <= 2000, errors[0][:300]  # never a whole input read back
    assert not [text for text in ws.forbidden if text in err], err
    assert snapshot(ws.run) == before
    for path, content in others.items():
        assert (snapshot(path) if path.is_dir() else path.read_bytes()) == content, path
    left = [path for path in ws.absent if path.is_file() or any(path.rglob("*.*"))]
    assert not left, left
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


def test_a_failure_in_session_0_leaves_a_run_that_the_same_command_or_resume_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlcil.engine import loop

    real, calls = loop.fit_session, [0]

    def fails_once(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk"))
        real(*args, **kwargs)

    monkeypatch.setattr(loop, "fit_session", fails_once)
    for continued_by in ("same command", "--resume"):
        run = tmp_path / continued_by.strip("-")
        argv = ["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY]
        calls[0] = 0
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "no checkpoint was written yet" in err, err
        assert "checkpoint is kept" not in err, err
        again = argv if continued_by == "same command" else ["-q", "train", "--resume", str(run)]
        assert main([*again, "--max-sessions", "1"]) == 0, capsys.readouterr().err
        assert (run / "checkpoints" / "session_00" / "state.json").is_file()


def test_a_non_finite_loss_in_session_0_says_what_is_kept_and_what_helps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["-q", "train", "--config", CONFIG, "--run-dir", str(run), *TINY, "train.lr=1e30"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no checkpoint was written yet" in err and "--overwrite" in err, err
    assert "then resume" not in err, err


def test_an_add_session_killed_before_its_checkpoint_keeps_eval_s_check(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    rows = [(f"k{i}.png", "kayak") for i in range(8)]
    for image, _ in rows:
        write_png(tmp_path / image, len(image))
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,labels\n" + "".join(f"{i},{labels}\n" for i, labels in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "mlcil.cli", "-q", "train", "--resume", str(run)]
    process = subprocess.Popen([*command, "--add-session", str(manifest)], env=env)
    deadline = time.monotonic() + 240
    while not (run / "added_sessions.json").is_file() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert (run / "added_sessions.json").is_file()  # recorded, never learned
    capsys.readouterr()
    assert main(["-q", "eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    # The check compares the evaluated session's own recorded seen mAP: the added session,
    # never learned, does not switch it off.
    assert "recorded sessions[1].seen_map" in out and "reproduced" in out, out


def test_predict_from_python_refuses_a_batch_size_out_of_bounds(
    finished: Path, tmp_path: Path
) -> None:
    import mlcil
    from mlcil.errors import ConfigError

    write_png(tmp_path / "a.png", 1)
    model = mlcil.load(finished)
    for size in (0, -1, 10**12, True):
        with pytest.raises(ConfigError, match="batch_size must be an integer from 1 to 65,536"):
            model.predict([tmp_path / "a.png"], batch_size=size)
    assert len(model.predict([tmp_path / "a.png"], batch_size=1)) == 1
