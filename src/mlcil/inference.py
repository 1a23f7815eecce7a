"""The one inference loop: evaluation, herding features, diagnostics, the pseudo-label threshold
pass and ``predict`` all run their network through :func:`infer`.

It owns what every such pass must get right once: no gradients, the network in eval mode (and the
caller's mode put back, even on an error), inputs moved to the run's device, the run's autocast,
outputs as float32 on the CPU, and, over a sharded loader, rows gathered from every process into
dataset order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mlcil.runtime import Runtime

# Maps a batch (images on the device, targets as loaded) to named outputs of that batch.
Step = Callable[[torch.Tensor, Any], Mapping[str, torch.Tensor]]


@torch.inference_mode()  # no autograd bookkeeping at all, cheaper than no_grad
def infer(
    batches: Iterable[tuple[torch.Tensor, Any]],
    step: Step,
    runtime: Runtime,
    network: nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """Run ``step`` over ``batches`` and stack each named output over all of them.

    Args:
        batches: ``(images, targets)`` pairs, e.g. a :class:`DataLoader`; a loader built by
            ``runtime.loader`` over several processes has its rows gathered into dataset order.
        step: ``step(images, targets) -> {name: (B, ...) tensor}``; compute the final values
            inside it (e.g. the sigmoid), they are only converted to float32 on the CPU here.
        runtime: device, precision and process layout.
        network: put in eval mode for the pass (batch-norm statistics frozen, dropout off),
            then back in the mode it had; None: leave every module as it is (a frozen teacher).

    Returns:
        name -> ``(N, ...)`` float32 array (an empty dict when there was no batch).
    """
    was_training = network.training if network is not None else False
    if network is not None:
        network.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for images, targets in batches:
            with runtime.autocast():
                outputs = step(runtime.images_to_device(images), targets)
            for name, value in outputs.items():
                chunks.setdefault(name, []).append(value.detach().float().cpu())
    finally:
        if network is not None:
            network.train(was_training)
    rows = {name: torch.cat(values).numpy() for name, values in chunks.items()}
    if isinstance(batches, DataLoader):
        rows = {name: runtime.gather_loader_rows(batches, value) for name, value in rows.items()}
    return rows
