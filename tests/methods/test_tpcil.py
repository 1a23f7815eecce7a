"""TPCIL (docs/tpcil.md): the elastic Hebbian graph's neural gas step, its competitive Hebbian
edges with ageing and the topology-preserving loss against hand-computed cases; the graph a
session leaves, the loss composition, the graph's round trip through the method's tensors, and
the dry run of every TPCIL config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcil.cli import main
from mlcil.config.schema import LossConfig, ModelConfig
from mlcil.experiment import load_config
from mlcil.hebbian import (
    fit_neural_gas,
    hebbian_edges,
    nearest_vertices,
    neural_gas_step,
    topology_preserving_loss,
)
from mlcil.losses import asymmetric_loss
from mlcil.methods import METHODS, Batch
from mlcil.methods.tpcil import TPCIL, TPCILParams
from mlcil.models import build_network
from mlcil.protocol import sessions
from tiny import REPO, in_memory_context

PROTOCOL = sessions(6, 2, 2)  # sessions of 2, 2, 2 classes
R = 3  # loss.reference_images


# --- the graph -------------------------------------------------------------------------------


def test_a_neural_gas_step_moves_each_vertex_by_its_distance_rank() -> None:
    vertices = torch.tensor([[0.0], [2.0], [5.0]])
    moved = neural_gas_step(vertices, torch.tensor([0.5]), step_size=0.5, neighbourhood=1.0)
    # Ranks 0, 1, 2: factors 0.5, 0.5/e, 0.5/e^2 of the way towards the feature.
    expected = [0.25, 2 - 0.75 / math.e, 5 - 2.25 / math.e**2]
    assert moved[:, 0].tolist() == pytest.approx(expected)


def test_hebbian_edges_link_the_two_nearest_vertices_and_age_out_unrefreshed_ones() -> None:
    vertices = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    features = torch.tensor([[0.4], [1.6], [0.6], [0.9], [9.0]])
    # 0.4: link 0-1. 1.6: link 2-1. 0.6 and 0.9: vertex 1 wins twice, refreshing 0-1 and
    # ageing 1-2 to 2. 9.0: link 3-2 (vertex 3 wins; its runner-up is vertex 2).
    kept = hebbian_edges(vertices, features, max_age=2)
    assert torch.equal(kept, kept.T) and not kept.diagonal().any()
    assert {(i, j) for i, j in kept.nonzero().tolist() if i < j} == {(0, 1), (1, 2), (2, 3)}
    pruned = hebbian_edges(vertices, features, max_age=1)  # 1-2 is older than 1 when removed
    assert {(i, j) for i, j in pruned.nonzero().tolist() if i < j} == {(0, 1), (2, 3)}


def test_the_neural_gas_places_one_vertex_on_each_cluster() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(200, 2, generator=generator)
    features = torch.cat([torch.tensor([5.0, 0.0]) + noise[:100], torch.tensor([-5.0, 0.0]) +
                          noise[100:]])  # fmt: skip
    initial = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    vertices = fit_neural_gas(initial, features, 5, generator)
    # The vertices start between the clusters; as the neighbourhood shrinks each settles on one
    # (its distance to the other vertex's cluster no longer pulls it).
    centres = sorted(vertices[:, 0].tolist())
    assert centres == pytest.approx([-5.0, 5.0], abs=0.05)
    assert vertices[:, 1].abs().max() < 0.05


def test_topology_preserving_loss_is_the_squared_change_of_neighbour_cosines() -> None:
    edges = torch.tensor([[False, True, True], [True, False, False], [True, False, False]])
    cells = torch.tensor([0, 1, 1])  # vertex 2 holds no image: its edge 0-2 does not count
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    new = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    # Cells' means: before (1, 0) and (0, 2): cosine 0; after (2, 0) and (1, 1): 1/sqrt(2).
    loss = topology_preserving_loss(old, new, cells, edges)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    # Features that kept their relations give exactly 0, and so do cells without an edge.
    assert float(topology_preserving_loss(old, old * 3.0, cells, edges)) == 0.0
    lonely = topology_preserving_loss(old, new, torch.tensor([1, 2, 2]), edges)
    assert float(lonely.detach()) == 0.0 and lonely.requires_grad


def test_nearest_vertices_are_the_cells() -> None:
    vertices = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    cells = nearest_vertices(torch.tensor([[1.0, 1.0], [3.5, -1.0], [-2.0, 0.0]]), vertices)
    assert cells.tolist() == [0, 1, 0]


# --- the method ------------------------------------------------------------------------------


def second_session_tpcil(params: dict[str, object]) -> TPCIL:
    torch.manual_seed(0)
    model = ModelConfig(backbone="resnet18", feature_stage=2, network="linear")
    loss = LossConfig(gamma_neg=2.0, reference_images=R)
    method = TPCIL(TPCILParams(**params), build_network(model, 32), loss)
    labels = np.ones((8, 6), dtype=np.uint8)
    first = in_memory_context(PROTOCOL[0], PROTOCOL, labels)
    method.begin_session(first)
    method.network.eval()  # batch norm in eval mode: repeated forwards give identical outputs
    method.end_session(first)
    method.begin_session(in_memory_context(PROTOCOL[1], PROTOCOL, labels))
    method.network.eval()
    return method


def test_a_session_leaves_a_graph_of_its_vertex_budget_in_the_networks_space() -> None:
    method = second_session_tpcil({"vertices_per_class": 3})
    assert method.vertices is not None and method.edges is not None
    features = method.network.backbone.num_features
    assert method.vertices.shape == (6, features)  # 3 vertices x 2 classes of session 0
    assert torch.equal(method.edges, method.edges.T) and method.edges.any()
    assert method.state_dict()["graph"]["vertices"] == 6
    # Same seed, same session: the same graph (the pass and the neural gas are seeded).
    again = second_session_tpcil({"vertices_per_class": 3})
    assert again.vertices is not None and torch.equal(again.vertices, method.vertices)


def test_loss_is_the_asl_over_seen_classes_plus_lambda_times_the_tpl() -> None:
    method = second_session_tpcil({"topology_weight": 40.0})
    assert method.old_network is not None and method.vertices is not None
    assert method.edges is not None
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    targets = torch.zeros(4, 6)
    targets[:, 2:4] = (torch.rand(4, 2, generator=generator) > 0.5).float()
    with torch.no_grad():  # move the network so that the relations change
        for parameter in method.network.backbone.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    new, old = method.network(images), method.old_network(images)
    summed = asymmetric_loss(new.logits, targets[:, :4], gamma_neg=2.0, gamma_pos=0.0, clip=0.05)
    cells = nearest_vertices(old.pooled, method.vertices)
    tpl = topology_preserving_loss(old.pooled, new.pooled, cells, method.edges)
    output = method.training_step(Batch(images, targets))
    torch.testing.assert_close(output.loss, R * summed / 4 + 40.0 * tpl)
    assert set(output.parts) == {"asl", "tpl"} == set(TPCIL.loss_parts)


def test_the_graph_round_trips_through_the_method_tensors() -> None:
    method = second_session_tpcil({})
    tensors = method.state_tensors()
    assert set(tensors) == {"graph_vertices", "graph_edges"}
    assert tensors["graph_edges"].dtype == torch.uint8  # plain data for safetensors
    fresh = TPCIL(TPCILParams(), method.network, LossConfig())
    fresh.load_state_tensors(tensors)
    assert fresh.vertices is not None and fresh.edges is not None
    assert torch.equal(fresh.vertices, method.vertices) and torch.equal(fresh.edges, method.edges)
    fresh.load_state_tensors({})
    assert fresh.vertices is None and fresh.state_tensors() == {}


# --- configs ---------------------------------------------------------------------------------


def test_tpcil_is_registered_with_the_papers_rule() -> None:
    assert METHODS["tpcil"] is TPCIL and TPCILParams().old_classes == "negative"


@pytest.mark.parametrize(
    ("name", "fixture", "protocol", "seed_config", "budget"),
    [
        ("tpcil_coco_b40_c10.yaml", "coco_fixture", "B40-C10", "coco_b40_c10.yaml", 20),
        ("tpcil_voc_b10_c2.yaml", "voc_fixture", "B10-C2", "voc_b10_c2.yaml", 2),
    ],
)
def test_published_configs_change_only_the_method_and_dry_run(
    name: str,
    fixture: str,
    protocol: str,
    seed_config: str,
    budget: int,
    request: pytest.FixtureRequest,
) -> None:
    root, _ = request.getfixturevalue(fixture)
    path = REPO / "configs" / "published" / name
    config = load_config(path, [f"root={root}"])
    krt = load_config(REPO / "configs" / seed_config, [f"root={root}"])
    assert config.method.name == "tpcil" and config.model.network == "linear"
    assert config.protocol == protocol and config.memory.per_class == budget
    assert config.model.backbone == krt.model.backbone and config.train == krt.train
    assert config.data == krt.data and config.loss == krt.loss
    assert main(["-q", "train", "--config", str(path), "--dry-run", f"root={root}"]) == 0


def test_mlcil_list_shows_tpcil_with_its_paper_and_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.split()[:1] == ["tpcil"])
    assert line.split()[1] == "[negative]" and "elastic Hebbian graph" in line
