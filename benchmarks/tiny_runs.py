"""Every method's tiny run on the COCO test fixture: the equality check of refactors.

Each shipped method config (``configs/methods/*.yaml``, the KRT ablations) trains for 2 epochs
per session of B40-C20 on the test suite's COCO tree (3 sessions, ResNet-18 at 32 px, 2
exemplars per class, 1 thread) and its ``metrics.json`` is kept with the fields that measure
time or name the machine removed. Run it before and after a change and compare the two JSON
files: equal files mean the change moved no result.

    python benchmarks/tiny_runs.py --output /tmp/before.json
    python benchmarks/tiny_runs.py --output /tmp/after.json --compare /tmp/before.json

Prints one row per run (last mAP and a digest of its metrics) and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# Fields that record when, where or how fast a run went, not what it learned.
VOLATILE = {
    "wall_time_s",
    "time_s",
    "train_time_s",
    "phase_times",
    "phases",
    "started",
    "finished",
    "host",
    "hostname",
    "device_name",
    "torch",
    "timm",
    "python",
    "mlcil_version",
    "version",
    "run_dir",
    "created",
    "threads",
    "load_average",
    "images_per_s",
}

# name -> (configs, overrides): 2 exemplars per class wherever the method replays.
MEMORY = ["memory.per_class=2"]
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "finetune": (["methods/finetune.yaml"], []),
    "joint": (["methods/joint.yaml"], []),
    "replay": (["methods/replay.yaml"], MEMORY),
    "lwf": (["methods/lwf.yaml"], []),
    "podnet": (["methods/podnet.yaml"], MEMORY),
    "krt": (["methods/krt.yaml"], MEMORY),
    "krt-no-ica": (["methods/krt.yaml", "ablations/krt_no_ica.yaml"], MEMORY),
    "krt-no-dpl": (["methods/krt.yaml", "ablations/krt_no_dpl.yaml"], MEMORY),
    "oewc": (["methods/oewc.yaml"], []),
    "icarl": (["methods/icarl.yaml"], MEMORY),
    "bic": (["methods/bic.yaml"], MEMORY),
    "derpp": (["methods/derpp.yaml"], MEMORY),
    "agcn": (["methods/agcn.yaml"], MEMORY),
    "csc": (["methods/csc.yaml"], ["model.node_dim=32"]),
    "tpcil": (["methods/tpcil.yaml"], MEMORY),
}

TINY = [
    "model.backbone=resnet18",
    "model.feature_stage=2",
    "model.pretrained=null",
    "data.image_size=32",
    "data.num_workers=0",
    "train.epochs=2",
    "train.batch_size=8",
    "train.progress=false",
    "train.trackers=[]",
    "protocol=B40-C20",
    "seed=0",
]


def strip(value: Any) -> Any:
    """``value`` without the fields that measure time or name the machine."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def run_one(name: str, configs: list[str], coco_root: Path, out: Path, extra: list[str]) -> Any:
    from mlcil.cli import main

    arguments = ["-q", "train"]
    for config in configs:
        arguments += ["--config", str(REPO / "configs" / config)]
    arguments += ["--run-dir", str(out / name), "data.dataset=coco", f"data.root={coco_root}"]
    network = []
    if name.startswith("krt") and name != "krt-no-ica":
        network = ["model.embed_dim=32", "model.num_heads=4"]
    code = main([*arguments, *TINY, *network, *extra])
    if code != 0:
        raise SystemExit(f"{name}: mlcil train exited {code}")
    return strip(json.loads((out / name / "metrics.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON of every run's metrics")
    parser.add_argument("--compare", type=Path, help="an earlier --output to compare with")
    parser.add_argument("--only", nargs="*", help="run these names only")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from fixtures_formats import write_coco_fixture

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_coco_fixture(root / "coco")
        for name, (configs, overrides) in RUNS.items():
            if args.only and name not in args.only:
                continue
            extra = [*overrides, *args.overrides]
            results[name] = run_one(name, configs, root / "coco", root / "runs", extra)
    args.output.write_text(json.dumps(results, indent=1, sort_keys=True))
    earlier = json.loads(args.compare.read_text()) if args.compare else {}
    print(f"| run | last mAP | digest | {'equal to --compare |' if earlier else ''}")
    print(f"|---|---|---|{'---|' if earlier else ''}")
    for name, metrics in results.items():
        digest = hashlib.sha1(json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:10]
        same = ""
        if earlier:
            same = " yes |" if earlier.get(name) == metrics else " NO |"
        print(f"| {name} | {metrics.get('last_map', float('nan')):.4f} | {digest} |{same}")


if __name__ == "__main__":
    main()
