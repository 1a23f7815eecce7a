"""No network unless asked: a run, ``eval``, ``predict`` and ``mlcil.load`` never open a network
connection unless the config names hub weights, with the offline variables (``HF_HUB_OFFLINE``...)
unset. Watched in an empty network namespace (``unshare -n``) under ``strace -f -e
trace=connect``: every connect() any process makes is logged, whether or not it could succeed.
A run that names hub weights that are not cached is the control: its connects are seen."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tiny import TINY_ICA, tiny_overrides

SCRIPT = """
import sys
import mlcil
from mlcil.cli import main

run_dir, images, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
run = mlcil.train("digits-b0-c2", overrides=overrides, run_dir=run_dir)
assert main(["-q", "eval", "--run", run_dir]) in (0, 1)
assert main(["-q", "predict", "--run", run_dir, images]) == 0
model = mlcil.load(run_dir)
model.predict(images)
# A hub name where a timm architecture goes is refused, never looked up online.
assert main(["train", "--config", "digits-b0-c2", "model.backbone=hf-hub:timm/resnet18.a1_in1k",
             "--dry-run"]) == 2
print("done")
"""

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def traced(tmp_path: Path, args: list[str], name: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``python args`` in an empty network namespace under strace; returns the result and
    the internet connects (AF_INET / AF_INET6) of every process."""
    log = tmp_path / f"{name}.strace"
    environment = {key: value for key, value in os.environ.items() if key not in OFFLINE_VARIABLES}
    environment.update(
        OMP_NUM_THREADS="1",
        MLCIL_CACHE=str(tmp_path / "cache"),
        HF_HUB_CACHE=str(tmp_path / "hub"),  # empty: nothing can come from a cache
        HF_HOME=str(tmp_path / "hf-home"),
    )
    command = ["unshare", "-n", "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(log),
               sys.executable, *args]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, check=False
    )
    lines = log.read_text().splitlines()
    assert lines or result.returncode == 0, result.stderr  # strace ran
    return result, [line for line in lines if re.search(r"sa_family=AF_INET6?\b", line)]


def test_run_eval_predict_and_load_open_no_connection(tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 48), (30, 200, 40)).save(images / "green.png")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    overrides = [*tiny_overrides(protocol="B0-C10", train__batch_size="64"), *TINY_ICA]
    result, connects = traced(
        tmp_path, [str(script), str(tmp_path / "run"), str(images), *overrides], "local"
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("done"), result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert connects == []  # not one attempt, not even a DNS lookup


def test_hub_weights_are_the_one_opt_in_and_their_connects_are_seen(tmp_path: Path) -> None:
    # The control: naming hub weights that are not cached does reach out (and, with no network
    # here, stops with one line before any folder is written).
    run_dir = tmp_path / "run"
    args = ["-m", "mlcil", "-q", "train", "--config", "digits-b0-c2", "--run-dir", str(run_dir),
            "model.pretrained=timm/resnet18.a1_in1k"]  # fmt: skip
    result, connects = traced(tmp_path, args, "hub")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: model.pretrained: timm/resnet18.a1_in1k: could not download from the Hugging "
        "Face Hub"
    )
    assert "Traceback" not in result.stderr
    assert connects, "the test should see the download's connects"
    assert not run_dir.exists()
