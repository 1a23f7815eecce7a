"""Speed benchmarks: print a table and write JSON.

Usage::

    python benchmarks/speed.py                 # CPU (or --device cuda on a GPU machine)
    python benchmarks/speed.py --heavy         # also a TResNet-M 224x224 training step
    python benchmarks/speed.py --output benchmarks/results/speed.json

Each entry is timed over several repetitions after a warm-up and reports the median. These are
the figures the README quotes; timed assertions never go in the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mlcil.config import LossConfig, ModelConfig
from mlcil.data.base import ArrayImageSource
from mlcil.data.sessions import session_train_set
from mlcil.data.transforms import to_unit_tensor
from mlcil.memory import herding
from mlcil.methods.base import Batch, SessionContext
from mlcil.methods.krt import KRT, KRTParams
from mlcil.metrics import average_precision
from mlcil.models import ClassAttentionBlock, ICAParams, build_network
from mlcil.protocol import Session, protocol_sessions
from mlcil.pseudo_labels import dpl_threshold
from mlcil.runtime import Runtime


def timed(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_ica(device: torch.device) -> list[dict]:
    """KRT's class attention for COCO B0-C10 at its last session: one pass vs one per session."""
    torch.manual_seed(0)
    block = ClassAttentionBlock(384, 8).to(device).eval()
    kt = torch.randn(384, device=device)
    kr = torch.randn(8, 384, device=device)
    patches = torch.randn(64, 49, 384, device=device)

    def one_pass() -> None:
        with torch.no_grad():
            block(kt, kr, patches)

    def loop() -> None:
        with torch.no_grad():
            for session in range(8):
                sequence = torch.cat(
                    [kt.expand(64, 1, 384), kr[session].expand(64, 1, 384), patches], dim=1
                )
                block.forward_sequence(sequence)

    fast, slow = timed(one_pass, 20), timed(loop, 20)
    return [
        {"name": "ICA 8 sessions, batch 64, one pass", "unit": "ms", "value": fast * 1e3},
        {"name": "ICA 8 sessions, batch 64, per-session loop", "unit": "ms", "value": slow * 1e3},
    ]


def _context(
    session: Session,
    protocol: list[Session],
    image_size: int,
    batch_size: int,
    device: torch.device,
) -> SessionContext:
    """A session over ``batch_size`` random in-memory images that show every class."""
    pixels = np.random.default_rng(0).integers(
        0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8
    )
    source = ArrayImageSource(
        dataset="bench",
        split="train",
        class_names=["a", "b", "c", "d"],
        images=pixels,
        labels=np.ones((batch_size, 4), dtype=np.uint8),
    )
    train_set = session_train_set(source, session, protocol, to_unit_tensor)
    runtime = Runtime(device=device, precision="fp32")
    return SessionContext(session, protocol, train_set, source, runtime, 0, batch_size)


def _krt_step_throughput(
    model: ModelConfig, image_size: int, batch_size: int, device: torch.device, repeats: int
) -> float:
    """Images per second of KRT training steps in a second session (teacher forward, DPL,
    token distillation, backward, Adam)."""
    torch.manual_seed(0)
    network = build_network(model, image_size).to(device)
    method = KRT(KRTParams(token_loss_weight=10.0, label_density=0.25), network, LossConfig())
    protocol = protocol_sessions("B0-C2", 4)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    targets = (torch.rand(batch_size, 4, device=device) > 0.6).float()
    for session in protocol[:2]:
        context = _context(session, protocol, image_size, batch_size, device)
        method.begin_session(context)
        if session.index == 0:
            method.end_session(context)
    optimizer = torch.optim.Adam(method.parameter_groups(), lr=1e-4)

    def step() -> None:
        output = method.training_step(Batch(images, targets))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return batch_size / timed(step, repeats, warmup=2)


def bench_training(device: torch.device, heavy: bool) -> list[dict]:
    demo = ModelConfig(
        backbone="resnet18", feature_stage=2, params=ICAParams(embed_dim=128, num_heads=8)
    )
    rows = [
        {
            "name": "KRT train step, demo net (ResNet-18/8, 48 px, batch 16)",
            "unit": "images/s",
            "value": _krt_step_throughput(demo, 48, 16, device, repeats=10),
        }
    ]
    if heavy:
        coco = ModelConfig(backbone="tresnet_m", params=ICAParams(embed_dim=384, num_heads=8))
        batch = 64 if device.type == "cuda" else 4
        rows.append(
            {
                "name": f"KRT train step, TResNet-M 224 px, batch {batch}",
                "unit": "images/s",
                "value": _krt_step_throughput(coco, 224, batch, device, repeats=3),
            }
        )
    return rows


def bench_pure_functions() -> list[dict]:
    rng = np.random.default_rng(0)
    scores = rng.random((40_504, 80), dtype=np.float32)  # COCO val2014's size
    targets = (rng.random((40_504, 80)) < 2.9 / 80).astype(np.uint8)
    old_scores = torch.rand(82_783, 70)  # DPL before COCO B0-C10's last session
    features = rng.normal(size=(2_000, 2048)).astype(np.float32)
    labels = (rng.random((82_783, 80)) < 2.9 / 80).astype(np.uint8)
    protocol = protocol_sessions("B0-C10", 80)

    def split() -> None:
        for session in protocol:
            np.flatnonzero(labels[:, session.new_classes].any(axis=1))

    rows = []
    for name, function, repeats in (
        ("AP of 80 classes on 40,504 images", lambda: average_precision(scores, targets), 5),
        ("DPL exact threshold, 82,783 x 70 scores", lambda: dpl_threshold(old_scores, 2.5), 5),
        ("herding 20 of 2,000 x 2048 features", lambda: herding(features, 20), 5),
        ("session split, COCO-sized labels, 8 sessions", split, 5),
    ):
        seconds = timed(function, repeats)
        rows.append({"name": name, "unit": "ms", "value": seconds * 1e3})
    return rows


def _sorted_dpl_threshold(scores: np.ndarray, target_per_image: float) -> float:
    """The former dpl_threshold (one full sort), kept here to time the selection against it."""
    num_images, n = scores.shape[0], scores.size
    k = min(max(round(target_per_image * num_images), 0), n)
    s = np.sort(scores, axis=None)[::-1]  # (n,) descending
    reachable = np.concatenate(([0], np.flatnonzero(s[:-1] > s[1:]) + 1, [n]))  # ascending
    upper = int(np.searchsorted(reachable, k))
    if reachable[upper] == k or upper == 0:
        j = int(reachable[upper])
    else:
        below, above = int(reachable[upper - 1]), int(reachable[upper])
        j = below if k - below <= above - k else above
    if j == 0:
        return float(s[0])
    if j < n:
        return float(s[j])
    return float(np.nextafter(s[n - 1], np.float32(-np.inf), dtype=np.float32))


def _timed_samples(function: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return samples


def bench_dpl_selection(repeats: int = 7) -> list[dict]:
    """DPL exact threshold on 100,000 x 70 float32 scores: the former sort vs the selection.

    Both must return the same threshold (checked here); numpy's sort and partition are
    single-threaded, so the thread count does not change these figures.
    """
    rng = np.random.default_rng(0)
    target = 2.9 / 80 * 70  # COCO's prior with 70 old classes
    inputs = {
        "uniform": rng.random((100_000, 70), dtype=np.float32),
        "rounded to 1e-3": np.round(rng.random((100_000, 70)), 3).astype(np.float32),
    }
    rows = []
    for label, scores in inputs.items():
        selected, sorted_ = dpl_threshold(scores, target), _sorted_dpl_threshold(scores, target)
        if selected != sorted_:
            raise RuntimeError(f"DPL selection {selected!r} != sort {sorted_!r} on {label} scores")
        for method, function in (
            ("sort (former)", lambda s=scores: _sorted_dpl_threshold(s, target)),
            ("selection", lambda s=scores: dpl_threshold(s, target)),
        ):
            samples = _timed_samples(function, repeats)
            rows.append(
                {
                    "name": f"DPL threshold, 100,000 x 70 {label}, {method}",
                    "unit": "ms",
                    "value": statistics.median(samples) * 1e3,
                    "min": min(samples) * 1e3,
                    "agree": True,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heavy", action="store_true", help="include TResNet-M training")
    parser.add_argument("--output", default="benchmarks/results/speed.json")
    parser.add_argument(
        "--only", choices=["dpl"], help="run one group of benchmarks (dpl: DPL threshold)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.only == "dpl":
        rows = bench_dpl_selection()
    else:
        rows = bench_ica(device) + bench_training(device, args.heavy) + bench_pure_functions()
        rows += bench_dpl_selection()
    machine = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    width = max(len(row["name"]) for row in rows)
    print(f"{'benchmark':<{width}}  {'value':>10}  unit")
    for row in rows:
        print(f"{row['name']:<{width}}  {row['value']:>10.2f}  {row['unit']}")
    print(json.dumps(machine))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": machine, "results": rows}, indent=1))
    print(f"written: {output}")


if __name__ == "__main__":
    main()
