"""Shared settings that shrink a published config to a seconds-long CPU run."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

_TINY = {
    "model.backbone": "resnet18",
    "model.feature_stage": "2",
    "model.pretrained": "null",
    "model.embed_dim": "32",
    "model.num_heads": "4",
    "data.image_size": "32",
    "data.num_workers": "0",
    "train.epochs": "1",
    "train.batch_size": "8",
    "train.progress": "false",
}


def tiny_overrides(**changes: str) -> list[str]:
    """``key=value`` overrides for a tiny run; keyword arguments replace or add settings, with
    ``__`` standing for the dot (``train__batch_size="16"``)."""
    settings = dict(_TINY)
    settings.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in settings.items()]
