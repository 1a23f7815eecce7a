"""Shared settings that shrink a published config to a seconds-long CPU run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

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
