"""Each method's loss is the composition its docstring states, recomputed here from the pure
functions of ``mlcil.losses`` on the same batch (second session, so every term is active).

Sum-reduced terms (the ASL, LwF's distillation) enter as ``R x`` their per-image mean, R being
``loss.reference_images``; every other term is a per-image mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mlcil.config.schema import LossConfig, ModelConfig
from mlcil.losses import (
    asymmetric_loss,
    pod_flat,
    pod_spatial,
    sigmoid_distillation,
    token_distillation,
    token_distillation_weight,
)
from mlcil.methods import METHODS, Batch, Method
from mlcil.models import ICAParams, build_network
from mlcil.protocol import sessions
from mlcil.pseudo_labels import apply_pseudo_labels
from tiny import in_memory_context

PROTOCOL = sessions(6, 2, 2)  # sessions of 2, 2, 2 classes
R = 3  # loss.reference_images


def second_session_method(name: str, params: dict[str, Any], network: str = "linear") -> Method:
    torch.manual_seed(0)
    ica = ICAParams(embed_dim=16, num_heads=2)
    model = ModelConfig(backbone="resnet18", feature_stage=2, network=network)
    if network == "ica":
        model = ModelConfig(backbone="resnet18", feature_stage=2, network="ica", params=ica)
    method_class = METHODS[name]
    method = method_class(
        method_class.Params(**params),
        build_network(model, 32),
        LossConfig(gamma_neg=2.0, reference_images=R),
    )
    labels = np.ones((8, 6), dtype=np.uint8)
    first = in_memory_context(PROTOCOL[0], PROTOCOL, labels)
    method.begin_session(first)
    method.network.eval()  # batch norm in eval mode: repeated forwards give identical outputs
    method.end_session(first)
    method.begin_session(in_memory_context(PROTOCOL[1], PROTOCOL, labels))
    method.network.eval()
    return method


def batch() -> Batch:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    targets = torch.zeros(4, 6)
    targets[:, 2:4] = (torch.rand(4, 2, generator=generator) > 0.5).float()  # new classes only
    return Batch(images, targets)


def asl(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R x the per-image mean of the summed ASL."""
    summed = asymmetric_loss(logits, targets, gamma_neg=2.0, gamma_pos=0.0, clip=0.05)
    return R * summed / len(logits)


@pytest.mark.parametrize("name", ["finetune", "replay"])
def test_finetune_and_replay_are_the_asl_over_seen_classes(name: str) -> None:
    method, data = second_session_method(name, {}), batch()
    expected = asl(method.network(data.images).logits, data.targets[:, :4])
    torch.testing.assert_close(method.training_step(data).loss, expected)


def test_lwf_is_asl_on_new_classes_plus_weighted_sigmoid_distillation_on_old() -> None:
    method, data = second_session_method("lwf", {"distillation_weight": 2.5}), batch()
    assert method.old_network is not None
    logits = method.network(data.images).logits
    old_logits = method.old_network(data.images).logits
    distillation = R * sigmoid_distillation(logits[:, :2], old_logits) / len(logits)
    expected = asl(logits[:, 2:], data.targets[:, 2:4]) + 2.5 * distillation
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    assert set(output.parts) == {"asl", "kd"}


def test_podnet_adds_spatial_and_flat_distillation_with_adaptive_weights() -> None:
    params = {"spatial_weight": 3.0, "flat_weight": 5.0}
    method, data = second_session_method("podnet", params), batch()
    assert method.old_network is not None
    stages = [1]  # resnet18 cut at stage 2: stage 1 (stride 4) is distilled besides the map
    new = method.network(data.images, stage_indices=stages)
    old = method.old_network(data.images, stage_indices=stages)
    assert new.stages is not None and old.stages is not None and len(new.stages) == 2
    weight = token_distillation_weight(1.0, 4, 2)  # sqrt(seen / new) = sqrt(2)
    expected = (
        asl(new.logits, data.targets[:, :4])
        + 3.0 * weight * pod_spatial(old.stages, new.stages)
        + 5.0 * weight * pod_flat(old.pooled, new.pooled)
    )
    torch.testing.assert_close(method.training_step(data).loss, expected)


def test_krt_is_asl_on_pseudo_labelled_targets_plus_weighted_token_distillation() -> None:
    params = {"token_loss_weight": 7.0, "label_density": 0.25}
    method, data = second_session_method("krt", params, network="ica"), batch()
    assert method.old_network is not None and method.pseudo_label_threshold is not None
    new = method.network(data.images)
    old = method.old_network(data.images)
    targets = apply_pseudo_labels(
        data.targets[:, :4], old.logits.sigmoid(), method.pseudo_label_threshold
    )
    token = token_distillation(old.embeddings[:, :1].flatten(1), new.embeddings[:, :1].flatten(1))
    expected = asl(new.logits, targets) + 7.0 * token_distillation_weight(1.0, 4, 2) * token
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.parts["token"], token)
    assert float(output.parts["pseudo_pos"]) == pytest.approx(float(targets[:, :2].sum()) / 4)
