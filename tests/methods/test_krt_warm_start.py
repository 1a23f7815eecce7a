"""KRT's iterative threshold search (mlcil.old_classes) starts each session from the previous
session's threshold when ``threshold_warm_start`` is on (as the release does), and from 0.8
otherwise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mlcil import old_classes
from mlcil.config.schema import LossConfig, ModelConfig
from mlcil.methods import METHODS
from mlcil.models import build_network
from mlcil.protocol import sessions
from tiny import in_memory_context

PROTOCOL = sessions(6, 2, 2)


@pytest.mark.parametrize("warm", [True, False])
def test_iterative_search_warm_start(warm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[float] = []
    search = old_classes.iterative_dpl_threshold

    def recording(scores: Any, target: float, start: float = 0.8, **kwargs: Any) -> float:
        starts.append(start)
        return search(scores, target, start=start, **kwargs)

    monkeypatch.setattr(old_classes, "iterative_dpl_threshold", recording)
    torch.manual_seed(0)
    krt = METHODS["krt"]
    params = krt.Params(threshold_search="iterative", threshold_warm_start=warm)
    model = ModelConfig(backbone="resnet18", feature_stage=2, network="linear")
    method = krt(params, build_network(model, 32), LossConfig())
    labels = (np.random.default_rng(0).random((12, 6)) < 0.5).astype(np.uint8)
    thresholds = []
    for session in PROTOCOL:
        context = in_memory_context(session, PROTOCOL, labels)
        method.begin_session(context)
        thresholds.append(method.state_dict()["pseudo_label_threshold"])
        method.end_session(context)
    assert thresholds[0] is None and None not in thresholds[1:]
    assert starts == ([0.8, thresholds[1]] if warm else [0.8, 0.8])
