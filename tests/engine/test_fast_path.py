"""The GPU fast path, checked on the CPU: the seam that prepares a network (channels-last,
torch.compile) gives the same outputs and saves plain weights; the teacher's precision option;
deferred reads of loss values; persistent per-session loaders whose epochs do not depend on
earlier ones; phase timings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from mlcil.engine.callbacks import CallbackList
from mlcil.engine.fit import NonFiniteLossError, _SessionRun
from mlcil.engine.observers import Observer, PhaseTimer
from mlcil.experiment import load_config
from mlcil.methods import METHODS
from mlcil.methods.base import Batch, StepOutput
from mlcil.protocol import Session
from mlcil.runs import evaluate_run, start_run
from mlcil.runtime import Runtime, unwrap
from tiny import REPO, TINY_ICA, in_memory_context, tiny_overrides

CPU = torch.device("cpu")


def tiny_network(sessions: int = 2) -> torch.nn.Module:
    config = load_config(REPO / "configs" / "digits_b0_c2.yaml", [*tiny_overrides(), *TINY_ICA])
    torch.manual_seed(0)
    network = METHODS.get_class("krt").build_network(config.model, 32, load_weights=False)
    for _ in range(sessions):
        network.add_session(2)
    return network.eval()


def test_channels_last_and_compile_give_the_same_outputs_and_unwrap_to_the_network() -> None:
    network = tiny_network()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = network(images).logits
        runtime = Runtime(CPU, "fp32", channels_last=True, compile=True)
        prepared = runtime.prepare_for_training(network)
        assert unwrap(prepared) is network and prepared is not network
        # Attributes of the network stay reachable through the wrapper.
        assert prepared.num_sessions == 2  # type: ignore[attr-defined]
        output = prepared(runtime.images_to_device(images)).logits
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    weight = next(p for p in network.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_a_run_trained_with_compile_and_channels_last_loads_and_evaluates_without(
    coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    overrides = [
        *tiny_overrides(memory__per_class="2"),
        *TINY_ICA,
        f"root={root}",
        "protocol=B40-C20",
        "train.compile=true",
        "train.channels_last=true",
    ]
    config = load_config(REPO / "configs" / "coco_b40_c10.yaml", overrides)
    run = tmp_path / "run"
    assert start_run(config, run).run(max_sessions=1) is None  # one session: one compilation
    saved = load_file(str(run / "checkpoints" / "session_00" / "model.safetensors"))
    assert not [k for k in saved if k.startswith(("module.", "compiled."))]
    assert all(t.is_contiguous() for t in saved.values())
    # Evaluated again by the plain network (no compile, default memory format).
    result = evaluate_run(run)
    state = (run / "checkpoints" / "session_00" / "state.json").read_text()
    recorded = json.loads(state)
    assert result["seen_map"] == pytest.approx(recorded["results"][0]["seen_map"], abs=1e-3)


def krt_with_teacher(runtime: Runtime) -> object:
    config = load_config(REPO / "configs" / "digits_b0_c2.yaml", [*tiny_overrides(), *TINY_ICA])
    method = METHODS.get_class("krt")(config.method.params, tiny_network(1), config.loss)
    method.runtime = runtime
    method.old_network = tiny_network(1)
    return method


@pytest.mark.parametrize(("option", "expected"), [(False, torch.bfloat16), (True, torch.float32)])
def test_the_teacher_runs_in_the_precision_asked_for(option: bool, expected: torch.dtype) -> None:
    runtime = Runtime(CPU, "bf16", teacher_fp32=option)
    method = krt_with_teacher(runtime)
    seen: list[torch.dtype] = []
    method.old_network.register_forward_hook(  # type: ignore[attr-defined]
        lambda module, inputs, output: seen.append(output.logits.dtype)
    )
    images = torch.rand(2, 3, 32, 32)
    with runtime.autocast():  # as in a training step
        method.teacher(images)  # type: ignore[attr-defined]
    # The threshold pass runs through the one inference loop (inference mode, autocast).
    from mlcil.inference import infer

    infer([(images, None)], lambda x, _: {"s": method.teacher(x).logits}, runtime)  # type: ignore[attr-defined]
    assert seen == [expected, expected]


@dataclasses.dataclass
class Scripted:
    """A method stand-in whose loss is a linear model's squared error, NaN at chosen steps."""

    network: torch.nn.Module
    nan_at: int | None = None
    calls: int = 0

    def training_step(self, batch: Batch) -> StepOutput:
        self.calls += 1
        loss = ((self.network(batch.images.flatten(1)) - 1) ** 2).mean()
        if self.calls - 1 == self.nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, {"sq": loss.detach() * 2})


def run_steps(runtime: Runtime, nan_at: int | None = None) -> tuple[list[dict], torch.Tensor]:
    from mlcil.config.schema import TrainConfig
    from mlcil.engine.fit import BatchLayout, _StopSignal
    from mlcil.methods.base import Optimization

    torch.manual_seed(0)
    method = Scripted(torch.nn.Linear(12, 1), nan_at)
    optimizer = torch.optim.SGD(method.network.parameters(), lr=0.1)
    optimization = Optimization(
        optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1)
    )
    labels = np.ones((12, 2), dtype=np.uint8)
    session = Session(0, [0, 1], [0, 1])
    context = in_memory_context(session, [session], labels, image_size=2)
    context = dataclasses.replace(context, runtime=runtime)

    class Recorder(Observer):
        def __init__(self) -> None:
            self.steps: list[dict] = []

        def step_finished(self, session, epoch, step, parts, steps) -> None:  # type: ignore[no-untyped-def]
            self.steps.append({"step": step, **parts})

    recorder = Recorder()
    layout = BatchLayout.of(TrainConfig(batch_size=2), 1)
    hooks = CallbackList(None, [recorder])  # type: ignore[arg-type]  # an older observer
    session_run = _SessionRun(
        method, context, layout, optimization, runtime.grad_scaler(), hooks, 6
    )
    with _StopSignal() as stop:
        session_run.epoch(0, 1, 0, None, stop)
    return recorder.steps, method.network.weight.detach().clone()


def test_deferred_reads_report_every_step_and_train_the_same() -> None:
    now, now_weights = run_steps(Runtime(CPU, "fp32"))
    later, later_weights = run_steps(Runtime(CPU, "fp32", deferred_reads=True, log_every_steps=4))
    assert [s["step"] for s in later] == list(range(6)) == [s["step"] for s in now]
    for a, b in zip(now, later, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["sq"] == pytest.approx(
            b["sq"], rel=1e-6
        )
    assert torch.equal(now_weights, later_weights)


def test_a_non_finite_loss_read_later_still_stops_the_run() -> None:
    with pytest.raises(NonFiniteLossError, match="steps 4-5"):
        run_steps(Runtime(CPU, "fp32", deferred_reads=True, log_every_steps=4), nan_at=5)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        run_steps(Runtime(CPU, "fp32"), nan_at=5)


class Noisy(Dataset):
    """Each item is its index and a number drawn from torch's generator (an augmentation)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(torch.rand(()))


def epochs_of(loader: torch.utils.data.DataLoader, seeds: list[int]) -> list[list[tuple]]:
    epochs = []
    for seed in seeds:
        loader.sampler.set_seed(seed)  # type: ignore[attr-defined]
        epochs.append(
            [(int(i), float(x)) for idx, xs in loader for i, x in zip(idx, xs, strict=True)]
        )
    return epochs


def test_a_persistent_session_loader_draws_each_epoch_from_its_own_seed() -> None:
    runtime = Runtime(CPU, "fp32", num_workers=2, persistent_loaders=True)
    both = epochs_of(runtime.session_loader(Noisy(), 4), [11, 12])
    alone = epochs_of(runtime.session_loader(Noisy(), 4), [12])
    assert sorted(i for i, _ in both[0]) == list(range(16))  # every image once per epoch
    assert both[1] == alone[0]  # epoch 2 does not depend on epoch 1 having run in the workers
    assert both[0] != both[1]


def test_every_phase_of_a_run_is_timed(coco_fixture: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = coco_fixture
    overrides = [
        *tiny_overrides(memory__per_class="2"),
        *TINY_ICA,
        f"root={root}",
        "protocol=B40-C20",
    ]
    config = load_config(REPO / "configs" / "coco_b40_c10.yaml", overrides)
    timer = PhaseTimer()
    record = start_run(config, tmp_path / "run", observers=[timer]).run()
    assert record is not None
    metrics = record.plain()
    kinds = {(r["session"], r["phase"]) for r in timer.records}
    for session in (0, 1, 2):
        for phase in ("begin_session", "epoch", "evaluation", "herding", "checkpoint"):
            assert (session, phase) in kinds, (session, phase)
    evaluations = [r for r in timer.records if r["phase"] == "evaluation"]
    assert [r["images"] for r in evaluations] == [s["test_images"] for s in metrics["sessions"]]
    epochs = [r for r in timer.records if r["phase"] == "epoch"]
    assert [r["images"] for r in epochs] == [
        s["train_images"] + s["memory_images"] for s in metrics["sessions"]
    ]
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in epochs)
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in timer.records)
