"""iCaRL: the multi-label nearest-mean-of-exemplars rule on a hand-computed case, the rule used
for prediction once the memory exists, its state in checkpoints, and its loss (ASL on new
classes plus binary distillation on old ones) against the formula."""

from __future__ import annotations

import math

import numpy as np
import torch
from test_loss_wiring import R, asl, batch, second_session_method

from mlcil.losses import sigmoid_distillation
from mlcil.methods.base import ExemplarSet
from mlcil.methods.icarl import class_means, nme_logits

S = 1 / math.sqrt(2)


def test_class_means_and_nme_scores_by_hand() -> None:
    # Exemplar features (normalised first): (1, 0) labelled {0}, (0, 2) labelled {1},
    # (1, 1) labelled {0, 1}.
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positive, negative = class_means(features, targets)
    # Class 0: mean of (1, 0) and (S, S) -> direction (1 + S, S); not labelled 0: (0, 1).
    norm = math.hypot(1 + S, S)
    torch.testing.assert_close(positive[0], torch.tensor([(1 + S) / norm, S / norm]))
    torch.testing.assert_close(negative[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(positive[1], torch.tensor([S / norm, (1 + S) / norm]))
    torch.testing.assert_close(negative[1], torch.tensor([1.0, 0.0]))
    # A query along (3, 0): class 0 scores (cos to mu+ - cos to mu-) / T.
    scores = nme_logits(torch.tensor([[3.0, 0.0]]), positive, negative, temperature=0.5)
    expected = torch.tensor([[((1 + S) / norm - 0.0) / 0.5, (S / norm - 1.0) / 0.5]])
    torch.testing.assert_close(scores, expected)
    assert scores[0, 0] > 0 > scores[0, 1]  # nearer the class-0 exemplars, away from class 1


def test_a_class_without_negatives_gets_a_zero_negative_mean() -> None:
    _, negative = class_means(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]]))
    assert torch.equal(negative, torch.zeros(1, 2))


def exemplars_of(method_features: torch.Tensor, labels: list[list[float]]) -> ExemplarSet:
    targets = torch.tensor(labels)
    return ExemplarSet(np.arange(len(labels)), targets, lambda: method_features)


def test_prediction_is_nme_once_the_memory_exists_else_the_heads() -> None:
    method, data = second_session_method("icarl", {"nme_temperature": 0.2}), batch()
    heads = method.network(data.images).logits
    torch.testing.assert_close(method.predict(data.images), heads)  # no means yet
    features = method.network.pooled_features(data.images)
    labels = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    method.prepare_prediction(exemplars_of(features, labels))
    positive, negative = class_means(features, torch.tensor(labels, dtype=torch.float32))
    expected = nme_logits(features, positive, negative, 0.2)
    torch.testing.assert_close(method.predict(data.images), expected)
    assert not torch.allclose(expected, heads)

    tensors = method.state_tensors()
    assert set(tensors) == {"nme_positive", "nme_negative"}
    again = second_session_method("icarl", {"nme_temperature": 0.2})
    again.load_state_tensors(tensors)
    torch.testing.assert_close(again.predict(data.images), expected)


def test_a_checkpoint_without_class_means_scores_with_the_heads_and_says_so(caplog) -> None:
    # An older or damaged checkpoint loads no means: prediction falls back to the heads, and
    # the log says so once (not once per batch).
    method, data = second_session_method("icarl", {}), batch()
    method.load_state_tensors({})
    with caplog.at_level("WARNING", logger="mlcil.methods.icarl"):
        first = method.predict(data.images)
        method.predict(data.images)
    torch.testing.assert_close(first, method.network(data.images).logits)
    warnings = [r.getMessage() for r in caplog.records if "sigmoid heads" in r.getMessage()]
    assert warnings == ["iCaRL: class means for 0 of 4 classes: scoring with the sigmoid heads "
                        "until the session's memory gives them all"]  # fmt: skip


def test_the_heads_option_ignores_the_exemplars() -> None:
    method, data = second_session_method("icarl", {"prediction": "heads"}), batch()
    features = method.network.pooled_features(data.images)
    method.prepare_prediction(exemplars_of(features, [[1, 0, 1, 0]] * 4))
    assert method.state_tensors() == {}
    torch.testing.assert_close(method.predict(data.images), method.network(data.images).logits)


def test_loss_is_asl_on_new_classes_plus_binary_distillation_on_old() -> None:
    method, data = second_session_method("icarl", {"distillation_weight": 2.0}), batch()
    assert method.old_network is not None
    logits = method.network(data.images).logits
    old_logits = method.old_network(data.images).logits
    distillation = R * sigmoid_distillation(logits[:, :2], old_logits) / len(logits)
    expected = asl(logits[:, 2:], data.targets[:, 2:4]) + 2.0 * distillation
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    assert set(output.parts) == {"asl", "kd"} == method.loss_parts
