"""Memory policies (memory.policy): each one's selection on small cases with a known answer,
PRS's and OCDM's class-balance targets, the budget rules they share with herding, and the
memory's plain-data persistence of what they add."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcil.errors import ConfigError, DataError
from mlcil.experiment import load_config
from mlcil.memory import ExemplarMemory, herding
from mlcil.memory_policies import (
    MEMORY_POLICIES,
    Candidates,
    get_policy,
    kl_to_target,
    power_targets,
    proportional_slots,
)
from mlcil.protocol import sessions

A, B, C = [1, 0, 0], [0, 1, 0], [0, 0, 1]


def candidates(rows: list[list[int]], slots: list[int], seed: int = 0) -> Candidates:
    return Candidates(np.array(rows, dtype=np.uint8), None, slots, seed)


def class_counts(rows: list[list[int]], picked: set[int]) -> list[int]:
    return [int(sum(rows[r][k] for r in picked)) for k in range(len(rows[0]))]


def test_the_registry_holds_the_four_policies_and_refuses_others() -> None:
    assert set(MEMORY_POLICIES) == {"herding", "random", "prs", "ocdm"}
    with pytest.raises(ConfigError, match="unknown memory policy 'fifo'; known: herding, ocdm"):
        get_policy("fifo")
    with pytest.raises(ConfigError, match="memory.policy"):
        load_config(None, ["memory.policy=fifo"])
    assert load_config(None, ["memory.policy=prs", "memory.rho=0.5"]).memory.rho == 0.5


def test_herding_policy_is_the_published_herding_per_class() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((12, 3)) < 0.5).astype(np.uint8)
    features = rng.normal(size=(12, 4))
    picks = get_policy("herding").select(Candidates(labels, features, [2, 3, 1], 0))
    for column, slots in enumerate([2, 3, 1]):
        rows = np.flatnonzero(labels[:, column])
        assert picks[column] == [int(rows[i]) for i in herding(features[rows], slots)]


def test_random_policy_is_a_seeded_sample_of_each_class() -> None:
    rows = [A, A, A, A, A, B, B, B]
    first = get_policy("random").select(candidates(rows, [2, 2], seed=5))
    assert first == get_policy("random").select(candidates(rows, [2, 2], seed=5))
    assert [len(p) for p in first] == [2, 2]
    assert set(first[0]) <= {0, 1, 2, 3, 4} and set(first[1]) <= {5, 6, 7}
    draws = {tuple(get_policy("random").select(candidates(rows, [2, 2], s))[0]) for s in range(8)}
    assert len(draws) > 1  # the seed matters


@pytest.mark.parametrize(
    ("rho", "expected"),
    [(0.0, [2, 2, 2]), (1.0, [4, 1, 1]), (0.5, [3, 2, 1])],
    ids=["balanced", "proportional", "square-root"],
)
def test_prs_slots_are_proportional_to_n_to_the_rho(rho: float, expected: list[int]) -> None:
    # counts 8, 2, 2 share 6 slots: n^rho = (1, 1, 1), (8, 2, 2), (2.83, 1.41, 1.41); the
    # square-root shares 3, 1.5, 1.5 round by largest remainder, the tie to the lower class.
    assert proportional_slots([8, 2, 2], 6, rho) == expected
    assert sum(expected) == 6
    assert get_policy("prs", rho).slots([8, 2, 2], quota=2) == expected


def test_power_targets_ignore_classes_without_images() -> None:
    np.testing.assert_allclose(power_targets([4, 0, 1], 0.0), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(power_targets([4, 0, 1], 1.0), [0.8, 0.0, 0.2])
    assert proportional_slots([4, 0, 1], 4, 0.0) == [2, 0, 2]


def test_prs_fills_each_class_to_its_slots_with_single_label_images() -> None:
    rows = [A] * 8 + [B] * 2 + [C] * 2
    for rho, slots in ((0.0, [2, 2, 2]), (1.0, [4, 1, 1])):
        picks = get_policy("prs", rho).select(candidates(rows, slots, seed=1))
        chosen = {r for p in picks for r in p}
        assert class_counts(rows, chosen) == slots, rho


def test_prs_prefers_images_that_do_not_overfill_a_full_class() -> None:
    # Class A is full after its one slot; B then takes its pure image, never the A+B one.
    rows = [A, [1, 1, 0], B]
    picks = get_policy("prs").select(candidates(rows, [1, 1, 0], seed=0))
    chosen = {r for p in picks for r in p}
    assert class_counts(rows, chosen) == [1, 1, 0]
    assert len(chosen) == 2


def test_kl_to_target_matches_the_formula() -> None:
    target = np.array([0.5, 0.5])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    np.testing.assert_allclose(kl_to_target(target, np.array([[1, 1], [3, 1]])), [0.0, expected])
    assert kl_to_target(target, np.array([[2, 0]]))[0] == math.inf


def brute_force_best(rows: list[list[int]], size: int) -> float:
    target = power_targets(np.array(rows).sum(axis=0), 0.0)
    return min(
        float(kl_to_target(target, np.array(rows)[list(subset)].sum(axis=0))[0])
        for subset in itertools.combinations(range(len(rows)), size)
    )


@pytest.mark.parametrize(
    "rows",
    [[A, A, A, A, B, C], [[1, 1, 0], A, A, A, B, C]],
    ids=["single-label", "multi-label"],
)
def test_ocdm_removes_towards_the_uniform_label_distribution(rows: list[list[int]]) -> None:
    picks = get_policy("ocdm").select(candidates(rows, [1, 1, 1], seed=2))  # budget: 3 images
    chosen = {r for p in picks for r in p}
    assert len(chosen) == 3
    assert class_counts(rows, chosen) == [1, 1, 1]  # exactly the uniform target
    assert brute_force_best(rows, 3) == 0.0


def test_ocdm_ranks_every_image_and_keeps_the_budget() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((30, 3)) < 0.4).astype(np.uint8)
    labels[np.arange(30), np.arange(30) % 3] = 1
    order = get_policy("ocdm").keep_order(labels.astype(bool), seed=4)  # type: ignore[attr-defined]
    assert sorted(order) == list(range(30))
    picks = get_policy("ocdm").select(Candidates(labels, None, [2, 2, 2], 4))
    assert len({r for p in picks for r in p}) == 6
    for column, rows in enumerate(picks):
        assert all(labels[r, column] for r in rows)
        assert rows == [r for r in order[:6] if labels[r, column]]  # in keeping priority


# 10 images of 4 classes: 4 of class 0, 2 of class 1, then classes 2 and 3 (one image with both).
LABELS = np.array(
    [[1, 0, 0, 0]] * 4
    + [[0, 1, 0, 0]] * 2
    + [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]],
    dtype=np.uint8,
)
REFS = [f"img{i}.jpg" for i in range(len(LABELS))]
PROTOCOL = sessions(4, 0, 2)


def test_prs_memory_shares_a_fixed_total_in_proportion_to_class_counts() -> None:
    # 6 images of class 0, then 2 of each other class, one label each; a total of 8, rho 1.
    labels = np.repeat(np.eye(4, dtype=np.uint8), [6, 2, 2, 2], axis=0)
    refs = [f"x{i}.jpg" for i in range(len(labels))]
    memory = ExemplarMemory(total=8)
    policy = get_policy("prs", rho=1.0)
    # Session 0: quota 4, 8 slots in proportion to 6 and 2 (herding would keep 4 and 2).
    memory.update(PROTOCOL[0], np.arange(8), None, labels, refs, policy, seed=0)
    assert [len(memory.selections[c]) for c in (0, 1)] == [6, 2]
    assert memory.class_counts == {0: 6, 1: 2}
    # Session 1: quota 2; the 8 slots of 4 classes in proportion to 6, 2, 2, 2 are
    # 4, 1.33, 1.33, 1.33: 4, 2, 1, 1 by largest remainder (herding: 2 each).
    memory.update(PROTOCOL[1], np.arange(8, 12), None, labels, refs, policy, seed=0)
    assert [len(memory.selections[c]) for c in range(4)] == [4, 2, 1, 1]
    assert memory.class_counts == {0: 6, 1: 2, 2: 2, 3: 2}
    assert len(memory) == 8


def test_herding_stays_the_default_of_a_memory_update() -> None:
    features = np.random.default_rng(1).normal(size=(6, 3))
    default, explicit = ExemplarMemory(per_class=2), ExemplarMemory(per_class=2)
    default.update(PROTOCOL[0], np.arange(6), features, LABELS, REFS)
    policy = get_policy("herding")
    explicit.update(PROTOCOL[0], np.arange(6), features, LABELS, REFS, policy, seed=9)
    assert default == explicit and "class_counts" not in default.to_dict()
    with pytest.raises(Exception, match="needs the candidates' features"):
        ExemplarMemory(per_class=2).update(PROTOCOL[0], np.arange(6), None, LABELS, REFS)


def test_per_class_budget_limits_each_policys_images() -> None:
    for name in ("random", "prs", "ocdm"):
        memory = ExemplarMemory(per_class=1)
        memory.update(PROTOCOL[0], np.arange(6), None, LABELS, REFS, get_policy(name), seed=3)
        assert len(memory) == 2, name  # one slot for each of the 2 single-label classes
        assert set(memory.selections) == {0, 1}, name


def test_memory_data_and_class_counts_round_trip(tmp_path: Path) -> None:
    memory = ExemplarMemory(per_class=2)
    memory.update(PROTOCOL[0], np.arange(6), None, LABELS, REFS, get_policy("prs"), seed=0)
    positions = memory.positions_without_data()
    rows = np.arange(len(positions) * 2, dtype=np.float32).reshape(-1, 2) / 3
    memory.set_data(positions, rows)
    assert not len(memory.positions_without_data())
    path = tmp_path / "memory.json"
    memory.save(path)
    again = ExemplarMemory.load(path)
    assert again.class_counts == memory.class_counts and not again.data
    again.load_data_tensors(memory.data_tensors())
    assert again == memory  # float32 rows come back bit for bit
    matrix = again.data_matrix(np.array([positions[0], 99]))
    assert matrix is not None
    np.testing.assert_array_equal(matrix[0], rows[0])
    assert np.isnan(matrix[1]).all()
    with pytest.raises(DataError, match="no exemplar's data row"):
        again.load_data_tensors({"99": torch.zeros(2)})


def test_a_fixed_total_drops_the_data_of_trimmed_images() -> None:
    memory = ExemplarMemory(total=4)
    features = np.random.default_rng(2).normal(size=(10, 3))
    memory.update(PROTOCOL[0], np.arange(6), features[:6], LABELS, REFS)
    memory.set_data(memory.positions_without_data(), np.ones((len(memory), 1)))
    memory.update(PROTOCOL[1], np.arange(6, 10), features[6:], LABELS, REFS)
    assert set(memory.data) <= set(memory.labels)
    assert memory.positions_without_data().tolist() == sorted(set(memory.labels) - set(memory.data))
