"""AGCN (docs/agcn.md): the label statistics and the graph against hand-computed cases, the GCN
classifiers' growth, the loss terms, the graph's survival through checkpoints and ``--resume``,
the dry run of every AGCN config, and a tiny real training run that must learn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mlcil.methods.agcn  # noqa: F401  (registers "agcn" whatever the package imports)
from mlcil.cli import main
from mlcil.config.schema import DataConfig, LossConfig, ModelConfig
from mlcil.data.catalog import build_sources
from mlcil.engine.checkpoint import load_network_weights
from mlcil.errors import ConfigError
from mlcil.experiment import load_config
from mlcil.losses import asymmetric_loss, sigmoid_distillation
from mlcil.methods import METHODS, Batch, SessionContext
from mlcil.methods.agcn import AGCN, AGCNParams, relation_preserving_loss
from mlcil.models import GCNNetwork, GCNParams, build_network
from mlcil.models.gcn import augmented_correlation, conditional_cooccurrence, reweighted_adjacency
from mlcil.protocol import sessions
from mlcil.runs import start_run
from tiny import REPO, in_memory_context, tiny_overrides

PROTOCOL = sessions(6, 2, 2)  # sessions of 2, 2, 2 classes
R = 3  # loss.reference_images
SMALL_GCN = GCNParams(embedding_dim=8, hidden_dim=16)


def gcn_network(params: GCNParams = SMALL_GCN) -> GCNNetwork:
    model = ModelConfig(backbone="resnet18", feature_stage=2, network="gcn", params=params)
    network = build_network(model, 32)
    assert isinstance(network, GCNNetwork)
    return network


# --- label statistics and the graph ---------------------------------------------------------


def test_correlation_is_binarised_with_tau_and_reweighted_with_p_as_ml_gcn_defines_it() -> None:
    labels = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float
    )
    # Counts N = (3, 3, 1, 1); co-occurrences N01 = 2, N02 = 1, none else: P(j | i) = Nij / Ni.
    expected = torch.tensor(
        [[1, 2 / 3, 1 / 3, 0], [2 / 3, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float
    )
    correlation = conditional_cooccurrence(labels, labels)
    torch.testing.assert_close(correlation, expected)
    # tau = 0.4 keeps 0->1, 1->0, 2->0 (1/3 is below it); each class with edges spreads p = 0.2
    # over them and keeps 0.8; class 3 has none, so its 0.8 self-loop normalises to 1.
    adjacency = reweighted_adjacency(correlation, 0.4, 0.2)
    torch.testing.assert_close(
        adjacency,
        torch.tensor(
            [[0.8, 0.2, 0, 0], [0.2, 0.8, 0, 0], [0.2, 0, 0.8, 0], [0, 0, 0, 1]], dtype=torch.float
        ),
    )
    # A lower tau lets 0->2 in: class 0 splits p between two neighbours.
    assert reweighted_adjacency(correlation, 0.3, 0.2)[0, 1:3].tolist() == pytest.approx([0.1, 0.1])


def test_inter_task_blocks_pair_old_soft_scores_with_new_labels_and_keep_the_old_block() -> None:
    previous = torch.tensor([[1.0, 0.5], [0.25, 1.0]])
    # Per image: the old model's scores on the 2 old classes, then the new class's label.
    evidence = torch.tensor([[0.8, 0.2, 1.0], [0.4, 0.0, 0.0], [0.0, 0.6, 1.0]])
    matrix = augmented_correlation(previous, evidence)
    # P(new | old0) = 0.8 / 1.2, P(new | old1) = 0.8 / 0.8; P(old0 | new) = 0.8 / 2,
    # P(old1 | new) = 0.8 / 2; P(new | new) = 1.
    expected = torch.tensor([[1.0, 0.5, 2 / 3], [0.25, 1.0, 1.0], [0.4, 0.4, 1.0]])
    torch.testing.assert_close(matrix, expected)


def test_thresholds_are_tau_within_a_session_and_the_inter_task_tau_across() -> None:
    network = gcn_network(GCNParams(embedding_dim=8, hidden_dim=16, tau=0.4, inter_task_tau=0.3))
    network.add_session(2)
    network.add_session(1)
    a, b = 0.4, 0.3
    expected = torch.tensor([[a, a, b], [a, a, b], [b, b, a]])
    torch.testing.assert_close(network.thresholds(), expected)


# --- the network ---------------------------------------------------------------------------


def test_gcn_classifiers_grow_with_the_graph_and_old_class_embeddings_freeze() -> None:
    torch.manual_seed(0)
    network = gcn_network()
    network.add_session(2)
    network.set_session_correlation(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    first_block = network.correlation.clone()
    images = torch.rand(3, 3, 32, 32)
    output = network(images)
    features = network.backbone.num_features
    assert output.classifiers is not None and output.classifiers.shape == (2, features)
    assert output.logits.shape == (3, 2)
    torch.testing.assert_close(output.logits, output.pooled @ output.classifiers.T)

    network.add_session(3)
    assert network.correlation.shape == (5, 5)
    assert torch.equal(network.correlation[:2, :2], first_block)  # grown, old block kept
    assert not network.correlation[2:].any() and not network.correlation[:, 2:].any()
    evidence = torch.tensor([[0.9, 0.1, 1.0, 0.0, 1.0], [0.2, 0.7, 0.0, 1.0, 1.0]])
    network.set_session_correlation(evidence)
    assert torch.equal(network.correlation[:2, :2], first_block)
    torch.testing.assert_close(network.correlation[2:, 2:], conditional_cooccurrence(
        evidence[:, 2:], evidence[:, 2:]))  # fmt: skip
    output = network(images)
    assert output.classifiers is not None and output.classifiers.shape == (5, features)
    assert output.logits.shape == (3, 5)
    assert not network.heads[0].weight.requires_grad and network.heads[1].weight.requires_grad
    assert network.gc1.weight.requires_grad and network.gc2.weight.requires_grad
    with pytest.raises(ValueError, match="evidence must be"):
        network.set_session_correlation(torch.zeros(2, 4))


def test_agcn_refuses_a_network_without_a_label_graph() -> None:
    linear = build_network(ModelConfig(backbone="resnet18", feature_stage=2, network="linear"), 32)
    with pytest.raises(ConfigError, match="model.network: gcn"):
        AGCN(AGCNParams(), linear, LossConfig())


# --- the method's session start and loss -----------------------------------------------------


def second_session_agcn(params: dict[str, Any]) -> tuple[AGCN, SessionContext]:
    """An AGCN method after the first session of :data:`PROTOCOL`, in the second, and the
    second session's context (in-memory images: no augmentation, so passes are repeatable)."""
    torch.manual_seed(0)
    method = AGCN(
        AGCNParams(**params), gcn_network(), LossConfig(gamma_neg=2.0, reference_images=R)
    )
    labels = np.zeros((8, 6), np.uint8)
    labels[:, :2] = [[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [1, 0], [1, 1], [0, 1]]
    labels[:, 2:4] = [[1, 0], [1, 1], [0, 1], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0]]
    first = in_memory_context(PROTOCOL[0], PROTOCOL, labels)
    method.begin_session(first)
    method.network.eval()  # batch norm in eval mode: repeated forwards give identical outputs
    method.end_session(first)
    second = in_memory_context(PROTOCOL[1], PROTOCOL, labels)
    method.begin_session(second)
    method.network.eval()
    return method, second


def test_the_gcn_learns_at_its_own_lower_rate_through_the_one_cycle() -> None:
    from mlcil.config.schema import TrainConfig

    method, second = second_session_agcn({"gcn_lr_scale": 0.25})
    train = TrainConfig(lr=1e-3, incremental_lr=2e-3, pct_start=0.2)
    optimization = method.configure_optimization(train, second.session, total_steps=50)
    network = method.network
    assert isinstance(network, GCNNetwork)
    rate_of = {
        id(p): group["lr"] for group in optimization.optimizer.param_groups for p in group["params"]
    }
    gcn = [network.gc1.weight, network.gc2.weight, network.heads[1].weight]
    trunk = [p for p in network.backbone.parameters() if p.requires_grad]
    assert id(network.heads[0].weight) not in rate_of  # the first session's embeddings: frozen
    # OneCycle starts every group at its own peak / 25; the GCN's peak is 0.25 x the session's.
    assert all(math.isclose(rate_of[id(p)], 2e-3 * 0.25 / 25) for p in gcn)
    assert all(math.isclose(rate_of[id(p)], 2e-3 / 25) for p in trunk)
    for _ in range(10):
        optimization.scheduler.step()
    peak = [group["lr"] for group in optimization.optimizer.param_groups]
    assert math.isclose(peak[0], 2e-3, rel_tol=0.01)  # near the peak after the warm-up
    assert math.isclose(peak[2] / peak[0], 0.25)


def test_old_class_statistics_come_from_the_previous_models_predictions() -> None:
    method, context = second_session_agcn({})
    network, teacher = method.network, method.old_network
    assert isinstance(network, GCNNetwork) and isinstance(teacher, GCNNetwork)
    # The base block: P(j | i) of the base labels (class 0 in 5 images, class 1 in 5, both in 2).
    base = torch.tensor([[1.0, 0.4], [0.4, 1.0]])
    torch.testing.assert_close(teacher.correlation, base)
    assert torch.equal(network.correlation[:2, :2], teacher.correlation)
    # The new blocks: the old model's scores on the session's images beside the new labels.
    images = torch.stack([context.train_set[i][0] for i in range(len(context.train_set))])
    targets = torch.from_numpy(context.train_set.targets)
    assert len(images) == 8 and not targets[:, :2].any()  # old classes unlabelled
    with torch.no_grad():
        soft = teacher(images).logits.sigmoid()
    evidence = torch.cat([soft, targets[:, 2:4]], dim=1)
    expected = augmented_correlation(teacher.correlation, evidence)
    torch.testing.assert_close(network.correlation, expected, rtol=1e-5, atol=1e-6)
    assert 0 < float(network.correlation[:2, 2:].min()) < 1  # soft evidence, not 0/1 counts


def test_relation_preserving_loss_is_the_mean_squared_classifier_distance() -> None:
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    new = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    assert float(relation_preserving_loss(old, new)) == pytest.approx((1 + 0 + 0 + 4) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        relation_preserving_loss(old, new[:1])


def test_loss_is_asl_on_new_classes_plus_prediction_and_relation_distillation() -> None:
    method, _ = second_session_agcn({"distillation_weight": 2.5, "relation_weight": 7.0})
    assert method.old_network is not None
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    targets = torch.zeros(4, 6)
    targets[:, 2:4] = (torch.rand(4, 2, generator=generator) > 0.5).float()
    new, old = method.network(images), method.old_network(images)
    assert new.classifiers is not None and old.classifiers is not None
    asl = R * asymmetric_loss(new.logits[:, 2:], targets[:, 2:4], gamma_neg=2.0) / 4
    kd = R * sigmoid_distillation(new.logits[:, :2], old.logits) / 4
    relation = (new.classifiers[:2] - old.classifiers).pow(2).mean()
    output = method.training_step(Batch(images, targets))
    torch.testing.assert_close(output.loss, asl + 2.5 * kd + 7.0 * relation)
    assert set(output.parts) == {"asl", "kd", "relation"} == set(AGCN.loss_parts)
    # The graph changed with the new classes, so the old classifiers moved: the term is live.
    assert float(output.parts["relation"]) > 0


# --- checkpoints and resume ------------------------------------------------------------------


def test_the_graph_round_trips_through_safetensors_exactly(tmp_path: Path) -> None:
    method, _ = second_session_agcn({})
    network = method.network
    assert isinstance(network, GCNNetwork)
    tensors = {k: v.contiguous() for k, v in network.state_dict().items()}
    assert tensors["correlation"].shape == (4, 4)  # a plain tensor in the weights file
    save_file(tensors, str(tmp_path / "model.safetensors"))
    rebuilt = gcn_network()
    for size in network.session_sizes:
        rebuilt.add_session(size)
    load_network_weights(tmp_path, rebuilt)
    rebuilt.eval()
    assert torch.equal(rebuilt.correlation, network.correlation)
    assert torch.equal(rebuilt.adjacency(), network.adjacency())
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(rebuilt(images).logits, network(images).logits)


def coco_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    config = REPO / "configs" / "published" / "agcn_coco_b40_c10.yaml"
    tiny = tiny_overrides(train__tensorboard="false", protocol="B40-C20")
    return ["-q", "train", "--config", str(config), "--run-dir", str(run_dir), *tiny,
            f"root={root}", "model.embedding_dim=16", "model.hidden_dim=32", *extra]  # fmt: skip


def test_resume_restores_the_graph_and_continues_like_an_uninterrupted_run(
    coco_fixture: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = coco_fixture
    assert main(coco_args(root, tmp_path / "straight")) == 0
    assert main(coco_args(root, tmp_path / "split", "--max-sessions", "1")) == 0
    state = json.loads((tmp_path / "split/checkpoints/session_00/state.json").read_text())
    assert state["method_state"] == {}  # the graph lives in the weights file, not in JSON
    assert main(["-q", "train", "--resume", str(tmp_path / "split")]) == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [s["ap"] for s in resumed["sessions"]] == [s["ap"] for s in straight["sessions"]]
    assert resumed["final"] == straight["final"]
    for session, seen in ((0, 40), (2, 80)):
        name = f"checkpoints/session_{session:02d}/model.safetensors"
        graph = load_file(str(tmp_path / "straight" / name))["correlation"]
        assert graph.shape == (seen, seen) and graph.any()
        assert torch.equal(load_file(str(tmp_path / "split" / name))["correlation"], graph)


# --- configs ---------------------------------------------------------------------------------


def test_dry_run_of_the_method_config(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs" / "methods" / "agcn.yaml")
    assert main(["-q", "train", "--config", config, "--dry-run", "model.backbone=resnet18"]) == 0
    output = capsys.readouterr().out
    assert "'name': 'agcn'" in output and "gcn" in output and "gc2" in output


@pytest.mark.parametrize(
    ("name", "fixture", "protocol", "seed_config"),
    [
        ("agcn_coco_b40_c10.yaml", "coco_fixture", "B40-C10", "coco_b40_c10.yaml"),
        ("agcn_voc_b10_c2.yaml", "voc_fixture", "B10-C2", "voc_b10_c2.yaml"),
    ],
)
def test_published_configs_change_only_the_method(
    name: str, fixture: str, protocol: str, seed_config: str, request: pytest.FixtureRequest
) -> None:
    root, _ = request.getfixturevalue(fixture)
    config = load_config(REPO / "configs" / "published" / name, [f"root={root}"])
    krt = load_config(REPO / "configs" / seed_config, [f"root={root}"])
    assert config.method.name == "agcn" and config.model.network == "gcn"
    assert config.protocol == protocol and not config.memory.enabled
    assert config.model.backbone == krt.model.backbone and config.train == krt.train
    assert config.data == krt.data and config.loss == krt.loss
    assert config.model.params.tau == 0.4 and config.model.params.reweight_p == 0.2
    assert main(["-q", "train", "--config", str(REPO / "configs" / "published" / name),
                 "--dry-run", f"root={root}"]) == 0  # fmt: skip


# --- a tiny real training run ----------------------------------------------------------------


def test_a_tiny_agcn_run_learns_the_base_session_and_keeps_finite_maps(tmp_path: Path) -> None:
    files = [REPO / "configs" / "digits_b0_c2.yaml", REPO / "configs" / "methods" / "agcn.yaml"]
    overrides = ["protocol=B4-C6", "data.image_size=32", "train.base_epochs=2", "train.epochs=1",
                 "train.progress=false", "train.tensorboard=false", "model.embedding_dim=32",
                 "model.hidden_dim=64"]  # fmt: skip
    config = load_config(files, overrides)
    assert METHODS[config.method.name] is AGCN
    record = start_run(config, tmp_path / "run").run()
    assert record is not None
    metrics = record.plain()
    assert [s["num_seen"] for s in metrics["sessions"]] == [4, 10]
    for entry in metrics["sessions"]:
        assert math.isfinite(entry["seen_map"]) and 0 <= entry["seen_map"] <= 100
    # Random scores give each class's AP about its share of the test images that show a base
    # class (about 35 on the digits); a model that learned must be far above that.
    _, test = build_sources(DataConfig(dataset="digits"))
    shown = test.labels[:, :4].any(axis=1)
    chance = 100 * float(test.labels[shown][:, :4].mean())
    assert metrics["sessions"][0]["seen_map"] > chance + 20
