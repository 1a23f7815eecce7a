"""CSC (docs/csc.md): the max-entropy term against its formula, the learnable label graph's
assembly and growth against hand-made blocks, the network's forward pass against the paper's
equations, the loss composition under the paper's rule and another, and the dry run of every
CSC config."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional

from mlcil.cli import main
from mlcil.config.schema import LossConfig, ModelConfig
from mlcil.errors import ConfigError
from mlcil.experiment import load_config
from mlcil.losses import asymmetric_loss, sigmoid_distillation
from mlcil.methods import METHODS, Batch
from mlcil.methods.csc import CSC, CSCParams, sigmoid_entropy
from mlcil.models import CIGCNNetwork, CIGCNParams, build_network
from mlcil.models.cigcn import LEAKY_SLOPE, SessionGraphHead, assemble_general_graph
from mlcil.protocol import sessions
from tiny import REPO, in_memory_context

PROTOCOL = sessions(6, 2, 2)  # sessions of 2, 2, 2 classes
R = 3  # loss.reference_images


def cigcn_network(node_dim: int = 8) -> CIGCNNetwork:
    model = ModelConfig(
        backbone="resnet18", feature_stage=2, network="cigcn", params=CIGCNParams(node_dim=node_dim)
    )
    network = build_network(model, 32)
    assert isinstance(network, CIGCNNetwork)
    return network


# --- the max-entropy term ---------------------------------------------------------------------


def test_sigmoid_entropy_is_the_sum_of_minus_p_log_p_over_entries() -> None:
    # p = 1/2 everywhere: each of the 6 entries gives -(1/2) log(1/2) = log(2) / 2.
    assert float(sigmoid_entropy(torch.zeros(2, 3))) == pytest.approx(3 * math.log(2))
    # p = 1/e (logit -log(e - 1)) is the maximum, 1/e per entry; p = 0.9 gives -0.9 log 0.9.
    peak = -math.log(math.e - 1)
    logits = torch.tensor([[peak, math.log(9.0)]])
    expected = 1 / math.e - 0.9 * math.log(0.9)
    assert float(sigmoid_entropy(logits)) == pytest.approx(expected, rel=1e-6)
    # Confident scores carry almost no entropy, and stay finite.
    confident = sigmoid_entropy(torch.tensor([[60.0, -60.0]]))
    assert math.isfinite(float(confident)) and float(confident) < 1e-20


def test_max_entropy_gradient_vanishes_at_one_over_e_and_pulls_confident_scores_back() -> None:
    logits = torch.tensor([-math.log(math.e - 1), 3.0, -3.0], requires_grad=True)
    (-sigmoid_entropy(logits[None])).backward()  # the term the loss adds (minus the entropy)
    assert logits.grad is not None
    assert float(logits.grad[0]) == pytest.approx(0.0, abs=1e-6)
    # Descending the loss lowers a confident positive and raises a confident negative.
    assert float(logits.grad[1]) > 0 and float(logits.grad[2]) < 0


# --- the network ------------------------------------------------------------------------------


def test_the_general_graph_is_assembled_from_each_sessions_rows_and_columns() -> None:
    first, second = SessionGraphHead(4, 8, 0, 2), SessionGraphHead(4, 8, 2, 1)
    with torch.no_grad():
        first.general_rows.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        second.general_rows.copy_(torch.tensor([[7.0, 8.0, 9.0]]))
        second.general_columns.copy_(torch.tensor([[5.0], [6.0]]))
    assert first.general_columns.shape == (0, 2)
    expected = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0], [7.0, 8.0, 9.0]])
    assert torch.equal(assemble_general_graph([first, second]), expected)


def test_the_graph_grows_keeps_its_old_block_and_freezes_the_old_sessions_head() -> None:
    torch.manual_seed(0)
    network = cigcn_network()
    network.add_session(2)
    block = network.general_graph().detach().clone()
    network.add_session(3)
    graph = network.general_graph()
    assert graph.shape == (5, 5) and torch.equal(graph[:2, :2], block)
    old, new = network.heads[0], network.heads[1]
    assert not any(p.requires_grad for p in old.parameters())
    assert all(p.requires_grad for p in new.parameters())
    assert new.general_columns.shape == (2, 3) and new.general_rows.shape == (3, 5)
    assert network.projection.weight.requires_grad and network.general_weight.weight.requires_grad
    output = network(torch.rand(2, 3, 32, 32))
    assert output.logits.shape == (2, 5)
    assert output.embeddings.shape == (2, 1, network.backbone.num_features)


def test_forward_follows_the_papers_equations() -> None:
    torch.manual_seed(0)
    network = cigcn_network()
    network.add_session(2)
    network.add_session(1)
    network.eval()
    images = torch.rand(2, 3, 32, 32)
    feature_map = network.backbone(images)
    heads = network.session_heads()
    activation = torch.cat([head.activation(feature_map) for head in heads], dim=1)
    maps = activation.flatten(2).sigmoid()  # M: (B, 3, HW)
    projected = network.projection(feature_map).flatten(2).transpose(1, 2)  # F: (B, HW, D)
    v0 = maps @ projected / maps.shape[2]
    leaky = lambda x: functional.leaky_relu(x, LEAKY_SLOPE)  # noqa: E731
    v1 = leaky(network.general_graph() @ v0 @ network.general_weight.weight.T)
    g = leaky(network.global_map(v1.mean(dim=1)))
    generator = torch.cat([head.relation.weight for head in heads])  # (3, 2D)
    bias = torch.cat([head.relation.bias for head in heads])
    paired = torch.cat([v1, g[:, None].expand_as(v1)], dim=2)  # (B, nodes, 2D)
    specific = (paired @ generator.T + bias).transpose(1, 2).softmax(dim=2)  # rows: classes
    torch.testing.assert_close(specific.sum(dim=2), torch.ones(2, 3))
    v2 = leaky(specific @ v1 @ network.specific_weight.weight.T)
    weight = torch.cat([head.classifier_weight for head in heads])
    graph_logits = (v2 * weight).sum(dim=2) + torch.cat([h.classifier_bias for h in heads])
    expected = activation.mean(dim=(2, 3)) + graph_logits
    torch.testing.assert_close(network(images).logits, expected, rtol=1e-5, atol=1e-6)


def test_csc_refuses_a_network_without_its_graph() -> None:
    linear = build_network(ModelConfig(backbone="resnet18", feature_stage=2, network="linear"), 32)
    with pytest.raises(ConfigError, match="model.network: cigcn"):
        CSC(CSCParams(), linear, LossConfig())


# --- the loss --------------------------------------------------------------------------------


def second_session_csc(params: dict[str, Any]) -> CSC:
    torch.manual_seed(0)
    method = CSC(
        CSCParams(**params), cigcn_network(), LossConfig(gamma_neg=2.0, reference_images=R)
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
    summed = asymmetric_loss(logits, targets, gamma_neg=2.0, gamma_pos=0.0, clip=0.05)
    return R * summed / len(logits)


def test_loss_is_asl_on_new_classes_plus_distillation_minus_beta_entropy() -> None:
    method = second_session_csc({"distillation_weight": 2.5, "entropy_weight": 0.7})
    assert method.old_network is not None and method.params.old_classes == "distill"
    data = batch()
    logits = method.network(data.images).logits
    old_logits = method.old_network(data.images).logits
    kd = R * sigmoid_distillation(logits[:, :2], old_logits) / 4
    p = logits[:, :2].sigmoid()
    entropy = R * (-(p * p.log())).sum() / 4
    expected = asl(logits[:, 2:], data.targets[:, 2:4]) + 2.5 * kd - 0.7 * entropy
    output = method.training_step(data)
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.parts["entropy"], entropy)
    assert set(output.parts) == {"asl", "kd", "entropy"} == set(CSC.loss_parts)


def test_under_the_negative_rule_the_asl_covers_the_old_classes_too() -> None:
    method = second_session_csc({"old_classes": "negative", "entropy_weight": 0.0})
    data = batch()
    logits = method.network(data.images).logits
    output = method.training_step(data)
    torch.testing.assert_close(output.parts["asl"], asl(logits, data.targets[:, :4]))


def test_the_first_session_has_no_old_class_term() -> None:
    torch.manual_seed(0)
    method = CSC(CSCParams(), cigcn_network(), LossConfig(gamma_neg=2.0, reference_images=R))
    method.begin_session(in_memory_context(PROTOCOL[0], PROTOCOL, np.ones((8, 6), np.uint8)))
    data = batch()
    data.targets[:, :2] = 1.0
    output = method.training_step(data)
    assert set(output.parts) == {"asl"}


# --- configs ---------------------------------------------------------------------------------


def test_csc_is_registered_with_the_papers_rule() -> None:
    assert METHODS["csc"] is CSC and CSCParams().old_classes == "distill"


@pytest.mark.parametrize(
    ("name", "fixture", "protocol", "seed_config"),
    [
        ("csc_coco_b0_c10.yaml", "coco_fixture", "B0-C10", "coco_b0_c10.yaml"),
        ("csc_coco_b40_c10.yaml", "coco_fixture", "B40-C10", "coco_b40_c10.yaml"),
        ("csc_voc_b10_c2.yaml", "voc_fixture", "B10-C2", "voc_b10_c2.yaml"),
    ],
)
def test_published_configs_change_only_the_method_and_dry_run(
    name: str, fixture: str, protocol: str, seed_config: str, request: pytest.FixtureRequest
) -> None:
    root, _ = request.getfixturevalue(fixture)
    path = REPO / "configs" / "published" / name
    config = load_config(path, [f"root={root}"])
    krt = load_config(REPO / "configs" / seed_config, [f"root={root}"])
    assert config.method.name == "csc" and config.model.network == "cigcn"
    assert config.protocol == protocol and not config.memory.enabled
    assert config.model.backbone == krt.model.backbone and config.train == krt.train
    assert config.data == krt.data and config.loss == krt.loss
    assert main(["-q", "train", "--config", str(path), "--dry-run", f"root={root}"]) == 0


def test_dry_run_of_the_method_config(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs" / "methods" / "csc.yaml")
    assert main(["-q", "train", "--config", config, "--dry-run", "model.backbone=resnet18"]) == 0
    output = capsys.readouterr().out
    assert "'name': 'csc'" in output and "cigcn" in output and "projection" in output


def test_mlcil_list_shows_csc_with_its_paper_and_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    line = next(
        line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["csc"]
    )
    assert line.split()[1] == "[distill]" and "Confidence Self-Calibration" in line
