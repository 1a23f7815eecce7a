"""Speed benchmarks: print a table and write JSON.

Usage::

    python benchmarks/speed.py                 # CPU (or --device cuda on a GPU machine)
    python benchmarks/speed.py --heavy         # also a TResNet-M 224x224 training step
    python benchmarks/speed.py --output benchmarks/results/speed.json
    python benchmarks/speed.py --only krt-step    # KRT's step vs fine-tuning's, taken apart
    python benchmarks/speed.py --only cpu-paths   # ImageNet regime's KRT step: fp32/bf16/compile

Each entry is timed over several repetitions after a warm-up and reports the median. These are
the figures the README quotes; timed assertions never go in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlcil.config import LossConfig, ModelConfig, RunConfig
from mlcil.data.base import ArrayImageSource
from mlcil.data.sessions import session_train_set
from mlcil.data.transforms import to_unit_tensor
from mlcil.engine.fit import train_step
from mlcil.experiment import load_config
from mlcil.losses import token_distillation
from mlcil.memory import herding
from mlcil.methods import METHODS
from mlcil.methods.base import Batch, Method, SessionContext
from mlcil.methods.krt import KRT, KRTParams
from mlcil.metrics import average_precision
from mlcil.models import ClassAttentionBlock, ICAParams, build_network
from mlcil.protocol import Session, protocol_sessions
from mlcil.pseudo_labels import apply_pseudo_labels, dpl_threshold, dpl_threshold_by_sort
from mlcil.runtime import Runtime


def timed(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    return statistics.median(_timed_samples(function, repeats, warmup))


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


def _timed_samples(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` warm-up calls."""
    for _ in range(warmup):
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
        selected, sorted_ = dpl_threshold(scores, target), dpl_threshold_by_sort(scores, target)
        if selected != sorted_:
            raise RuntimeError(f"DPL selection {selected!r} != sort {sorted_!r} on {label} scores")
        for method, function in (
            ("sort (former)", lambda s=scores: dpl_threshold_by_sort(s, target)),
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


# --- KRT's training step against fine-tuning's, on the demo network --------------------------

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = {
    # The pretrained-regime demo (make demo) with each method; the weights do not change the
    # speed, so they stay random (model.pretrained=null: no pretraining run is triggered).
    "finetune": REPO / "configs" / "digits_pretrained" / "finetune.yaml",
    "krt": REPO / "configs" / "digits_pretrained" / "krt.yaml",
    # The ImageNet regime (EfficientNet-Lite0 at 96 px, channels-last): the grid's slowest runs.
    "krt-imagenet": REPO / "configs" / "digits_imagenet" / "krt.yaml",
}


def _demo_method(
    name: str, device: torch.device, overrides: tuple[str, ...] = ()
) -> tuple[Method, SessionContext, RunConfig]:
    """The demo config's method in its second session on random in-memory images of the demo's
    size (one batch of them), the teacher and DPL threshold in place for KRT."""
    config = load_config(DEMO_CONFIGS[name], ["model.pretrained=null", *overrides])
    torch.manual_seed(0)
    method_class = METHODS.get_class(config.method.name)
    size, batch = config.data.image_size, config.train.batch_size
    network = method_class.build_network(config.model, size, load_weights=False).to(device)
    method = method_class(config.method.params, network, config.loss)
    protocol = protocol_sessions(config.protocol, 10)  # the digits: 10 classes
    rng = np.random.default_rng(0)
    source = ArrayImageSource(
        dataset="bench",
        split="train",
        class_names=[str(k) for k in range(10)],
        images=rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8),
        labels=(rng.random((batch, 10)) < 0.3).astype(np.uint8) | np.eye(batch, 10, dtype=np.uint8),
    )
    runtime = Runtime(
        device=device,
        precision="fp32" if config.train.precision == "auto" else config.train.precision,
        channels_last=config.train.channels_last is True,
        compile=config.train.compile,
    )
    context = None
    for session in protocol[:2]:
        train_set = session_train_set(source, session, protocol, to_unit_tensor)
        context = SessionContext(session, protocol, train_set, source, runtime, 0, batch)
        method.begin_session(context)
        method.network.to(device)
        if session.index == 0:
            method.end_session(context)
    assert context is not None
    return method, context, config


def _demo_batch(config: RunConfig, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(1)
    size, batch = config.data.image_size, config.train.batch_size
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = (torch.rand(batch, 10, generator=generator) < 0.3).float()
    return Batch(images.to(device), targets.to(device))


class _BackboneClock:
    """Seconds spent inside a backbone's forward (a pair of forward hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._started = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_: Any) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def _clock(parts: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the seconds of the ``with`` block to ``parts[name]`` (device synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    parts[name] = parts.get(name, 0.0) + time.perf_counter() - started


def _step_parts(
    method: Method, batch: Batch, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    """One optimiser step taken apart: KRT.training_step's and Finetune.training_step's pieces,
    in their order, each timed (the composition is checked against the real step's time)."""
    parts: dict[str, float] = {}
    network = method.network
    student = _BackboneClock(network.backbone, device)
    teacher = None
    if isinstance(method, KRT):
        assert method.old_network is not None
        teacher_clock = _BackboneClock(method.old_network.backbone, device)
        with _clock(parts, "teacher forward", device):
            teacher = method.teacher(batch.images)
        teacher_clock.remove()
        backbone = teacher_clock.take()
        parts["teacher forward: backbone"] = backbone
        parts["teacher forward: after the backbone (ICA, heads)"] = (
            parts.pop("teacher forward") - backbone
        )
    with _clock(parts, "student forward", device):
        output = network(batch.images)
    backbone = student.take()
    student.remove()
    parts["student forward: backbone"] = backbone
    parts["student forward: after the backbone (ICA or pooling, heads)"] = (
        parts.pop("student forward") - backbone
    )
    with _clock(parts, "targets, losses", device):
        targets = batch.targets[:, : method.seen]
        if teacher is not None and isinstance(method, KRT):
            threshold = method.pseudo_label_threshold
            if threshold is not None:
                targets = apply_pseudo_labels(targets, teacher.logits.float().sigmoid(), threshold)
        loss = method.classification_loss(output.logits, targets)
        if teacher is not None and isinstance(method, KRT) and method.params.token_loss_weight:
            old = method.num_old_sessions
            distilled = token_distillation(
                method.old_network.retained_embedding(teacher, old),  # type: ignore[union-attr]
                network.retained_embedding(output, old),
            )
            loss = loss + method.incremental_weight(method.params.token_loss_weight) * distilled
    with _clock(parts, "backward", device):
        loss.backward()
    with _clock(parts, "optimizer (Adam)", device):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return parts


def _profile_top_ops(step: Callable[[], object], steps: int = 5, top: int = 12) -> list[dict]:
    """torch.profiler's heaviest operators (self CPU time) over ``steps`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": event.key,
            "self_cpu_ms_per_step": round(event.self_cpu_time_total / 1e3 / steps, 3),
            "calls_per_step": event.count / steps,
        }
        for event in events[:top]
    ]


def bench_krt_vs_finetune(device: torch.device, repeats: int = 30) -> tuple[list[dict], dict]:
    """KRT's optimiser step (second session: teacher, pseudo-labels, token distillation, ICA)
    against fine-tuning's (linear network) on the demo network and batch, both through the
    engine's ``train_step``; then each step taken apart, and KRT's profiled.

    Returns:
        Result rows, and the breakdown (median seconds of each part over ``repeats`` steps).
    """
    steps: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = {}
    profiles: dict[str, list[dict]] = {}
    shape = ""
    for name in ("finetune", "krt"):
        method, context, config = _demo_method(name, device)
        batch = _demo_batch(config, device)
        shape = (
            f"{config.model.backbone} to stage {config.model.feature_stage}, "
            f"{config.data.image_size} px, batch {config.train.batch_size}"
        )
        optimization = method.configure_optimization(config.train, context.session, 10_000)
        scaler = context.runtime.grad_scaler()

        def real_step(
            method: Method = method, optimization: Any = optimization, scaler: Any = scaler,
            context: SessionContext = context, batch: Batch = batch,
        ) -> None:  # fmt: skip
            method.network.train()
            train_step(method, [batch], optimization, scaler, context, len(batch.images))
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        steps[name] = timed(real_step, repeats, warmup=3)
        samples: list[dict[str, float]] = []
        for _ in range(repeats + 3):
            samples.append(_step_parts(method, batch, optimization.optimizer, device))
        samples = samples[3:]
        parts[name] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        if device.type == "cpu":
            profiles[name] = _profile_top_ops(real_step)
    ratio = steps["krt"] / steps["finetune"]
    rows = [
        {"name": f"fine-tuning train step, demo net ({shape})", "unit": "ms",
         "value": steps["finetune"] * 1e3},
        {"name": f"KRT train step, session 2, demo net ({shape})", "unit": "ms",
         "value": steps["krt"] * 1e3},
        {"name": "KRT step / fine-tuning step, demo net", "unit": "x", "value": ratio},
    ]  # fmt: skip
    breakdown = {
        "network": shape,
        "step_ms": {name: seconds * 1e3 for name, seconds in steps.items()},
        "ratio": ratio,
        "parts_ms": {
            name: {key: value * 1e3 for key, value in values.items()}
            for name, values in parts.items()
        },
        "parts_sum_ms": {name: sum(values.values()) * 1e3 for name, values in parts.items()},
        "profile_top_ops": profiles,
    }
    return rows, breakdown


def bench_cpu_paths(repeats: int = 10, with_compile: bool = False) -> list[dict]:
    """The ImageNet regime's KRT step (second session) on the CPU in fp32, under bf16 autocast
    (this CPU has avx512_bf16) and, with ``with_compile``, through ``torch.compile``: the
    options a CPU grid could run faster with. Timed in CPU seconds of this process (one thread),
    which other processes on the machine disturb far less than wall time."""
    rows = []
    variants = [("fp32", ()), ("bf16 autocast", ("train.precision=bf16",))]
    if with_compile:
        variants.append(("torch.compile (fp32)", ("train.compile=true",)))
    for label, overrides in variants:
        method, context, config = _demo_method("krt-imagenet", torch.device("cpu"), overrides)
        batch = _demo_batch(config, torch.device("cpu"))
        optimization = method.configure_optimization(config.train, context.session, 10_000)
        scaler = context.runtime.grad_scaler()
        network = method.network
        method.network = context.runtime.prepare_for_training(network)

        def step(
            method: Method = method, optimization: Any = optimization, scaler: Any = scaler,
            context: SessionContext = context, batch: Batch = batch,
        ) -> None:  # fmt: skip
            method.network.train()
            train_step(method, [batch], optimization, scaler, context, len(batch.images))

        started = time.process_time()
        step()  # the first step (torch.compile: the compilation)
        first = time.process_time() - started
        for _ in range(2):
            step()
        samples = []
        for _ in range(repeats):
            started = time.process_time()
            step()
            samples.append(time.process_time() - started)
        method.network = network
        shape = f"{config.model.backbone} at {config.data.image_size} px, batch {len(batch.images)}"
        rows.append({"name": f"KRT step, ImageNet regime ({shape}), {label}", "unit": "CPU ms",
                     "value": statistics.median(samples) * 1e3})  # fmt: skip
        rows.append({"name": f"  its first step, {label}", "unit": "CPU s", "value": first})
    return rows


def breakdown_table(breakdown: dict) -> str:
    """Each part's median milliseconds for fine-tuning and KRT, and KRT's extra."""
    finetune, krt = breakdown["parts_ms"]["finetune"], breakdown["parts_ms"]["krt"]
    names = [*krt, *(key for key in finetune if key not in krt)]
    width = max(len(name) for name in names)
    lines = [f"{'part (median ms)':<{width}}  {'finetune':>9}  {'KRT':>9}  {'KRT extra':>9}"]
    for name in names:
        a, b = finetune.get(name, 0.0), krt.get(name, 0.0)
        lines.append(f"{name:<{width}}  {a:>9.2f}  {b:>9.2f}  {b - a:>+9.2f}")
    a, b = breakdown["parts_sum_ms"]["finetune"], breakdown["parts_sum_ms"]["krt"]
    lines.append(f"{'sum of the parts':<{width}}  {a:>9.2f}  {b:>9.2f}  {b - a:>+9.2f}")
    a, b = breakdown["step_ms"]["finetune"], breakdown["step_ms"]["krt"]
    lines.append(f"{'engine train_step':<{width}}  {a:>9.2f}  {b:>9.2f}  {b - a:>+9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heavy", action="store_true", help="include TResNet-M training")
    parser.add_argument("--output", default="benchmarks/results/speed.json")
    parser.add_argument(
        "--only",
        choices=["dpl", "krt-step", "cpu-paths"],
        help="run one group of benchmarks (dpl: DPL threshold; krt-step: KRT's step against "
        "fine-tuning's on the demo network, with its breakdown; cpu-paths: the ImageNet "
        "regime's KRT step in fp32, bf16 and, with --compile, compiled)",
    )
    parser.add_argument("--compile", action="store_true", help="cpu-paths: also torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    breakdown = None
    if args.only == "dpl":
        rows = bench_dpl_selection()
    elif args.only == "krt-step":
        rows, breakdown = bench_krt_vs_finetune(device)
    elif args.only == "cpu-paths":
        torch.set_num_threads(1)  # the grid's setting: one thread per run, two runs at a time
        rows = bench_cpu_paths(with_compile=args.compile)
    else:
        rows = bench_ica(device) + bench_training(device, args.heavy) + bench_pure_functions()
        rows += bench_dpl_selection()
        krt_rows, breakdown = bench_krt_vs_finetune(device)
        rows += krt_rows
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
    document: dict[str, Any] = {"machine": machine, "results": rows}
    if breakdown is not None:
        print(breakdown_table(breakdown))
        for name, ops in breakdown["profile_top_ops"].items():
            print(f"{name}: heaviest operators (self CPU ms per step)")
            for op in ops[:8]:
                print(f"  {op['op']:<40} {op['self_cpu_ms_per_step']:>8.3f}")
        document["krt_vs_finetune"] = breakdown
    print(json.dumps(machine))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1))
    print(f"written: {output}")


if __name__ == "__main__":
    main()
