"""BiC: the two-parameter correction and the balanced held-out split on hand-computed cases, the
first fit's loss and the bias phase's loss against their formulas, and what a session keeps."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from test_loss_wiring import PROTOCOL, R, asl, batch, second_session_method

from mlcil.config.schema import TrainConfig
from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import ExtraPhase
from mlcil.methods.bic import correct, validation_rows
from tiny import in_memory_context


def test_correct_scales_and_shifts_each_later_sessions_columns() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # Sessions of 2, 2 and 1 classes; a pair for session 1 only: session 2 stays raw.
    corrected = correct(logits, [2, 2, 1], [(2.0, 0.5)])
    torch.testing.assert_close(corrected, torch.tensor([[1.0, 2.0, 6.5, 8.5, 5.0]]))
    both = correct(logits, [2, 2, 1], [(2.0, 0.5), (-1.0, 1.0)])
    torch.testing.assert_close(both, torch.tensor([[1.0, 2.0, 6.5, 8.5, -4.0]]))


def test_validation_rows_are_balanced_over_old_and_new_classes() -> None:
    # 12 own rows (new classes 2 and 3, 6 each), then 20 exemplar rows (classes 0, 1: 10 each).
    own = np.zeros((12, 4))
    own[:6, 2] = own[6:, 3] = 1
    exemplars = np.zeros((20, 4))
    exemplars[:10, 0] = exemplars[10:, 1] = 1
    targets = np.vstack([own, exemplars])
    rows = validation_rows(targets, own_images=12, num_old=2, fraction=0.2, seed=0)
    # round(0.2 x 10 exemplars per old class) = 2 rows per class, old ones from the exemplars.
    held = targets[rows]
    assert held.sum(axis=0).tolist() == [2, 2, 2, 2]
    assert (rows[held[:, :2].any(axis=1)] >= 12).all()
    assert (rows[held[:, 2:].any(axis=1)] < 12).all()
    again = validation_rows(targets, own_images=12, num_old=2, fraction=0.2, seed=0)
    assert rows.tolist() == again.tolist()
    assert rows.tolist() != validation_rows(targets, 12, 2, 0.2, seed=1).tolist()


def test_a_multi_label_row_counts_for_every_class_it_shows() -> None:
    targets = np.array([[0, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    rows = validation_rows(targets, own_images=2, num_old=2, fraction=0.5, seed=3)
    held = targets[rows].sum(axis=0)
    assert (held >= 1).all() and len(rows) <= 4


def test_first_fit_balances_classification_and_distillation_by_old_over_seen() -> None:
    method, data = second_session_method("bic", {"temperature": 2.0}), batch()
    assert method.old_network is not None and method.bias is not None
    logits = method.network(data.images).logits
    old_logits = method.old_network(data.images).logits
    kd = R * sigmoid_distillation(logits[:, :2] / 2.0, old_logits / 2.0) / len(logits)
    weight = 2 / 4  # old / seen classes
    expected = (1 - weight) * asl(logits, data.targets[:, :4]) + weight * kd
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    assert set(output.parts) == method.loss_parts


def test_the_bias_phase_trains_alpha_and_beta_with_bce_on_corrected_logits() -> None:
    method, data = second_session_method("bic", {"bias_lr": 0.1}), batch()
    assert method.bias is not None
    method.bias.data = torch.tensor([1.5, -0.25])
    phase = ExtraPhase("bias", np.arange(4), epochs=2)
    logits = method.network(data.images).logits.detach()
    corrected = torch.cat([logits[:, :2], 1.5 * logits[:, 2:] - 0.25], dim=1)
    bce = F.binary_cross_entropy_with_logits(corrected, data.targets[:, :4], reduction="sum")
    output = method.phase_step(phase, data)
    torch.testing.assert_close(output.loss, R * bce / 4)
    optimization = method.configure_phase_optimization(phase, TrainConfig(), PROTOCOL[1], 2)
    optimization.optimizer.zero_grad()
    output.loss.backward()
    assert method.bias.grad is not None and method.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.network.parameters())  # the network is frozen
    params = [p for group in optimization.optimizer.param_groups for p in group["params"]]
    assert params == [method.bias]
    torch.testing.assert_close(method.predict(data.images), corrected)


def test_a_session_keeps_its_pair_and_later_predictions_use_it() -> None:
    method, data = second_session_method("bic", {}), batch()
    assert method.bias is not None
    method.bias.data = torch.tensor([0.5, 1.0])
    state = method.state_dict()
    assert state == {"corrections": [], "bias": [0.5, 1.0]}
    method.end_session(in_memory_context(PROTOCOL[1], PROTOCOL, np.ones((8, 6), dtype=np.uint8)))
    assert method.corrections == [[0.5, 1.0]] and method.bias is None
    logits = method.network(data.images).logits
    expected = torch.cat([logits[:, :2], 0.5 * logits[:, 2:] + 1.0], dim=1)
    torch.testing.assert_close(method.predict(data.images), expected)
    again = second_session_method("bic", {})
    again.load_state_dict(method.state_dict())
    assert again.corrections == [[0.5, 1.0]] and again.bias is None


def test_no_bias_phase_without_exemplars_or_old_classes() -> None:
    method = second_session_method("bic", {})
    context = in_memory_context(PROTOCOL[1], PROTOCOL, np.ones((8, 6), dtype=np.uint8))
    assert method.extra_phase(context) is None  # every row is the session's own
    context = dataclasses.replace(context, own_images=6)
    phase = method.extra_phase(context)
    assert phase is not None and phase.name == "bias" and not phase.trains_network
    assert len(phase.rows) and (phase.rows < 8).all()
    method.bias = None  # the first session has no old classes, hence no pair to learn
    assert method.extra_phase(context) is None
