"""DER++: its stored-logit error against a hand-computed case, its loss against the formula on a
batch mixing the session's own images with replayed exemplars, and what it stores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_loss_wiring import R, asl, batch, second_session_method

from mlcil.methods.base import Batch
from mlcil.methods.derpp import logit_replay_error

NAN = float("nan")


def test_logit_replay_error_is_a_per_row_mean_over_the_stored_columns() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    stored = torch.tensor([[0.0, 0.0], [2.0, NAN], [NAN, NAN]])
    # Row 0: ((1-0)^2 + (2-0)^2) / 2 = 2.5; row 1: (0-2)^2 / 1 = 4; row 2 stored nothing.
    assert float(logit_replay_error(logits, stored)) == pytest.approx(6.5)


def test_first_session_is_the_asl_over_seen_classes() -> None:
    method, data = second_session_method("derpp", {}), batch()
    expected = asl(method.network(data.images).logits, data.targets[:, :4])
    output = method.training_step(data)  # no exemplar data in the batch
    torch.testing.assert_close(output.loss, expected)
    assert set(output.parts) == {"asl"}


def test_loss_adds_alpha_logit_error_and_beta_bce_on_replayed_rows() -> None:
    method, data = second_session_method("derpp", {"alpha": 0.7, "beta": 1.3}), batch()
    # Rows 0, 1: the session's own images; rows 2, 3: exemplars stored with 2 and 1 logits.
    stored = torch.tensor([[NAN, NAN], [NAN, NAN], [0.5, -1.0], [2.0, NAN]])
    data = Batch(data.images, data.targets, stored)
    data.targets[2:, :2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the exemplars' old labels
    logits = method.network(data.images).logits
    targets = data.targets[:, :4]
    own = asl(logits[:2], targets[:2]) * 2 / 4  # R x the own rows' summed ASL / 4 images
    error = ((logits[2, 0] - 0.5) ** 2 + (logits[2, 1] + 1.0) ** 2) / 2 + (logits[3, 0] - 2) ** 2
    bce = F.binary_cross_entropy_with_logits(logits[2:], targets[2:], reduction="sum")
    expected = own + 0.7 * R * error / 4 + 1.3 * R * bce / 4
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.parts["logit_mse"], R * error / 4)
    torch.testing.assert_close(output.parts["replay_bce"], R * bce / 4)
    assert set(output.parts) == method.loss_parts


def test_alpha_zero_beta_one_replays_like_bce_replay() -> None:
    method, data = second_session_method("derpp", {"alpha": 0.0, "beta": 1.0}), batch()
    stored = torch.tensor([[NAN], [NAN], [NAN], [0.0]])
    data = Batch(data.images, data.targets, stored)
    logits = method.network(data.images).logits
    bce_row = F.binary_cross_entropy_with_logits(logits[3], data.targets[3, :4], reduction="sum")
    output = method.training_step(data)
    own = output.parts["asl"]
    torch.testing.assert_close(output.loss, own + R * bce_row / 4)


def test_stored_data_is_the_logits_over_the_seen_classes() -> None:
    method, data = second_session_method("derpp", {}), batch()
    stored = method.exemplar_data(data.images)
    assert stored.shape == (4, 4) and stored.dtype == torch.float32
    torch.testing.assert_close(stored, method.network(data.images).logits)
    assert all(math.isfinite(v) for v in stored.flatten().tolist())
