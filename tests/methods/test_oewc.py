"""Online EWC: the penalty on a hand-computed case, the Fisher of the linear head against its
closed form, the running Fisher's decay, the loss against the formula, and the state a
checkpoint keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loss_wiring import PROTOCOL, asl, batch, second_session_method

from mlcil.methods.oewc import OnlineEWC, ewc_penalty
from tiny import in_memory_context

LABELS = np.ones((8, 6), dtype=np.uint8)


def test_penalty_by_hand() -> None:
    theta = torch.tensor([1.0, 2.0])
    fisher, anchor = torch.tensor([0.5, 2.0]), torch.tensor([0.0, 0.5])
    # 0.5 x 1^2 + 2 x 1.5^2 = 5.0
    assert float(ewc_penalty([(theta, fisher, anchor)])) == pytest.approx(5.0)


def oewc(**params: object) -> OnlineEWC:
    method = second_session_method("oewc", {"fisher_images": 8, **params})
    assert isinstance(method, OnlineEWC)
    return method


def test_head_fisher_is_the_mean_squared_bce_gradient_in_closed_form() -> None:
    method = oewc()
    # Session 0's head (frozen now, so unchanged since its Fisher was taken): for a linear head
    # the BCE gradient of one image is (sigmoid(z) - y) f^T, f its pooled features.
    context = in_memory_context(PROTOCOL[0], PROTOCOL, LABELS)
    images = torch.stack([context.train_set[i][0] for i in range(8)])
    with torch.no_grad():
        features = method.network.pooled_features(images)
        error = method.network(images).logits[:, :2].sigmoid() - 1.0  # every label is 1
    weight = (error[:, :, None] * features[:, None, :]).square().mean(dim=0)
    torch.testing.assert_close(method.fisher["heads.0.weight"], weight)
    torch.testing.assert_close(method.fisher["heads.0.bias"], error.square().mean(dim=0))
    assert all(bool((value >= 0).all()) for value in method.fisher.values())


def test_the_running_fisher_decays_by_gamma() -> None:
    method = oewc(gamma=0.5)
    first = {name: value.clone() for name, value in method.fisher.items()}
    context = in_memory_context(PROTOCOL[1], PROTOCOL, LABELS)
    session = method.estimate_fisher(context)
    method.end_session(context)
    for name, value in method.fisher.items():
        expected = 0.5 * first.get(name, torch.zeros_like(value)) + session.get(
            name, torch.zeros_like(value)
        )
        torch.testing.assert_close(value, expected, msg=name)
    assert "heads.1.weight" in method.fisher  # born in session 1, penalised from session 2


def test_loss_is_asl_plus_half_lambda_times_the_fisher_weighted_distance() -> None:
    method, data = oewc(penalty_weight=40.0), batch()
    with torch.no_grad():  # move the shared backbone away from its anchor
        for parameter in method.network.backbone.parameters():
            parameter.add_(0.01)
    logits = method.network(data.images).logits
    distance = sum(
        (method.fisher[name] * (parameter.detach() - method.anchor[name]).square()).sum()
        for name, parameter in method.network.named_parameters()
        if parameter.requires_grad and name in method.fisher
    )
    assert float(distance) > 0
    output = method.training_step(data)
    expected = asl(logits, data.targets[:, :4]) + 0.5 * 40.0 * distance
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.parts["ewc"], torch.as_tensor(distance).float())
    assert set(output.parts) == method.loss_parts


def test_new_heads_and_frozen_heads_are_not_penalised() -> None:
    method = oewc()
    names = {id(p): n for n, p in method.network.named_parameters()}
    penalised = {names[id(parameter)] for parameter, _, _ in method.penalised}
    assert not any(name.startswith("heads.") for name in penalised)
    assert any(name.startswith("backbone.") for name in penalised)


def test_state_tensors_round_trip() -> None:
    method = oewc()
    tensors = method.state_tensors()
    assert {k.split(".", 1)[0] for k in tensors} == {"fisher", "anchor"}
    again = oewc()
    again.load_state_tensors(tensors)
    assert again.fisher.keys() == method.fisher.keys()
    for name in method.fisher:
        assert torch.equal(again.fisher[name], method.fisher[name])
        assert torch.equal(again.anchor[name], method.anchor[name])
