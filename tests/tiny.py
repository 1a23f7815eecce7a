"""Shared settings that shrink a published config to a seconds-long CPU run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

_TINY = {
    "model.backbone": "resnet18",
    "model.feature_stage": "2",
    "model.pretrained": "null",
    "data.image_size": "32",
    "data.num_workers": "0",
    "train.epochs": "1",
    "train.batch_size": "8",
    "train.progress": "false",
}


# A narrow ICA for runs whose network is ICA (the linear network takes no such keys).
TINY_ICA = ["model.embed_dim=32", "model.num_heads=4"]


def tiny_overrides(**changes: str) -> list[str]:
    """``key=value`` overrides for a tiny run; keyword arguments replace or add settings, with
    ``__`` standing for the dot (``train__batch_size="16"``)."""
    settings = dict(_TINY)
    settings.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in settings.items()]


def in_memory_context(
    session: Any,
    sessions: Any,
    labels: np.ndarray,
    image_size: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> Any:
    """A ``SessionContext`` over random in-memory images with the given ``(N, C)`` labels."""
    from mlcil.data.base import ArrayImageSource
    from mlcil.data.sessions import session_train_set
    from mlcil.data.transforms import to_unit_tensor
    from mlcil.methods.base import SessionContext
    from mlcil.runtime import Runtime

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), image_size, image_size, 3), dtype=np.uint8)
    source = ArrayImageSource(
        dataset="memory",
        split="train",
        class_names=[f"c{i}" for i in range(labels.shape[1])],
        images=images,
        labels=labels.astype(np.uint8),
    )
    train_set = session_train_set(source, session, sessions, to_unit_tensor)
    runtime = Runtime(device=torch.device("cpu"), precision="fp32")
    return SessionContext(session, sessions, train_set, source, runtime, seed, batch_size)


MANIFEST_CLASSES = ["a", "b", "c", "d"]


def write_manifest_dataset(root: Path) -> list[str]:
    """56 training and 16 test images (16x16) of 4 classes as CSV manifests (the kill-and-resume
    tests' dataset); returns the data overrides that select it."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    for split, count in (("train", 56), ("test", 16)):
        rows = ["image,labels"]
        for i in range(count):
            ref = f"images/{split}{i:03d}.png"
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / ref)
            labels = {MANIFEST_CLASSES[i % 4]} | {c for c in MANIFEST_CLASSES if rng.random() < 0.3}
            rows.append(f"{ref},{';'.join(sorted(labels))}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(MANIFEST_CLASSES) + "\n")
    return [
        f"data.train_manifest={root / 'train.csv'}",
        f"data.test_manifest={root / 'test.csv'}",
        f"data.class_list={root / 'classes.txt'}",
    ]


def experiment_of(config: Any) -> Any:
    """The experiment of ``config`` with the runtime its entry point would make."""
    from mlcil.experiment import Experiment
    from mlcil.runs import make_runtime

    return Experiment(config, runtime=make_runtime(config))


def trainer_of(config: Any, *args: Any, **kwargs: Any) -> Any:
    """A ``Trainer`` of ``config`` (``Trainer``'s other arguments pass through)."""
    from mlcil.engine.loop import Trainer

    return Trainer(experiment_of(config).inputs, *args, **kwargs)
