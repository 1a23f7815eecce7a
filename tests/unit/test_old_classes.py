"""The old-class rule (method.old_classes): targets, masks, thresholds and the loss they make, on
hand-made batches whose every expected value is written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcil.config.schema import LossConfig, ModelConfig
from mlcil.errors import ConfigError, MlcilError
from mlcil.experiment import load_config
from mlcil.losses import asymmetric_loss
from mlcil.methods import METHODS, Batch
from mlcil.methods.base import MethodParams
from mlcil.models import build_network
from mlcil.old_classes import (
    OLD_CLASS_RULES,
    PseudoLabelParams,
    Thresholds,
    choose_thresholds,
    old_class_targets,
)
from mlcil.protocol import Session
from tiny import CONFIGS

# 4 rows x (3 old + 2 new) columns. Rows 0-1 are the session's own images (old columns 0: their
# old labels are unknown); rows 2-3 are replayed exemplars with their stored labels (row 2 was
# stored with old class 1).
TARGETS = torch.tensor(
    [
        [0.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
EXEMPLAR = torch.tensor([False, False, True, True])
# Previous network's old-class scores (sigmoid of OLD_LOGITS): above 0.7 restored, at or below
# 0.2 confident negatives, in between undecided.
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.1],
        [0.3, 0.8, 0.2],
        [0.95, 0.1, 0.6],
        [0.05, 0.4, 0.75],
    ]
)
OLD_LOGITS = torch.log(SCORES / (1 - SCORES))
THRESHOLDS = Thresholds(positive=0.7, negative=0.2)
NUM_OLD = 3


def kept(rule: str) -> torch.Tensor:
    out = old_class_targets(rule, TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    return out.kept_mask()


def test_negative_keeps_every_entry_and_label() -> None:
    out = old_class_targets("negative", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    assert torch.equal(out.targets, TARGETS) and out.mask is None and out.soft_logits is None
    assert bool(out.kept_mask().all())


def test_ignore_leaves_out_own_old_columns_and_keeps_exemplar_labels() -> None:
    out = old_class_targets("ignore", TARGETS, NUM_OLD, EXEMPLAR, None, None)
    assert torch.equal(out.targets, TARGETS)  # exemplar row 2 keeps its stored old positive
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[:2, :3] = False
    assert torch.equal(out.kept_mask(), expected)
    # A batch without exemplars drops the old columns outright (the sliced arithmetic).
    alone = old_class_targets("ignore", TARGETS[:2], NUM_OLD, EXEMPLAR[:2])
    assert alone.first_column == 3 and alone.mask is None


def test_distill_takes_old_columns_out_of_every_row_with_the_previous_scores() -> None:
    out = old_class_targets("distill", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[:, :3] = False  # exemplars too: iCaRL replaces their old labels by the scores
    assert torch.equal(out.kept_mask(), expected)
    assert out.soft_logits is not None and torch.allclose(out.soft_logits.sigmoid(), SCORES)


def test_pseudo_restores_confident_old_classes_as_positives_on_every_row() -> None:
    out = old_class_targets("pseudo", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 1.0],
            [1.0, 1.0, 0.0, 0.0, 0.0],  # stored old positive kept, 0.95 restored
            [0.0, 0.0, 1.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(out.targets, expected) and out.mask is None


def test_pseudo_ignore_keeps_only_confident_negatives_on_own_images() -> None:
    out = old_class_targets("pseudo-ignore", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    assert torch.equal(
        out.targets[:, :3], torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1.0]])
    )
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[0, 1] = False  # 0.5: undecided
    expected[1, 0] = False  # 0.3: undecided; 0.2 is a confident negative (at the threshold)
    assert torch.equal(out.kept_mask(), expected)


def test_pseudo_soft_keeps_restored_positives_hard_and_the_rest_soft() -> None:
    out = old_class_targets("pseudo-soft", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    pseudo = old_class_targets("pseudo", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS, THRESHOLDS)
    assert torch.equal(out.targets, pseudo.targets)
    hard = torch.ones(4, 5, dtype=torch.bool)
    hard[0, 1:3] = False  # 0.5 and 0.1: not restored, soft
    hard[1, 0] = hard[1, 2] = False  # 0.3 and 0.2
    assert torch.equal(out.kept_mask(), hard)
    assert out.soft_mask is not None and torch.equal(out.soft_mask, ~hard[:, :3])
    assert out.soft_logits is not None


def test_first_session_and_bad_calls() -> None:
    for rule in OLD_CLASS_RULES:  # no old classes: every rule is "negative"
        out = old_class_targets(rule, TARGETS[:, 3:], 0, EXEMPLAR)
        assert out.mask is None and out.first_column == 0 and out.soft_logits is None
    with pytest.raises(MlcilError, match="unknown old-class rule"):
        old_class_targets("zero", TARGETS, NUM_OLD)
    with pytest.raises(MlcilError, match="previous network's outputs"):
        old_class_targets("distill", TARGETS, NUM_OLD, EXEMPLAR)
    with pytest.raises(MlcilError, match="DPL threshold"):
        old_class_targets("pseudo", TARGETS, NUM_OLD, EXEMPLAR, OLD_LOGITS)


def test_masked_asl_entries_give_zero_loss_and_zero_gradient() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 5) * 3).requires_grad_()
    mask = kept("pseudo-ignore")
    # Left-out entries may hold anything, even values whose loss is huge: they never count.
    with torch.no_grad():
        logits[~mask] = 1e4
    # No clip: every kept entry has a loss (a clipped easy negative would have none).
    loss = asymmetric_loss(logits, TARGETS, clip=0, mask=mask)
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum())))
    assert bool((logits.grad[mask] != 0).all())
    # Each kept entry contributes what it contributes alone (hand sum over single entries).
    one_by_one = sum(
        asymmetric_loss(
            logits[i : i + 1, j : j + 1].detach(), TARGETS[i : i + 1, j : j + 1], clip=0
        )
        for i, j in mask.nonzero().tolist()
    )
    assert float(loss.detach()) == pytest.approx(float(one_by_one), rel=1e-6)


def finetune(rule: str, **params: object) -> object:
    """A fine-tuning method in its second session (3 old + 2 new classes) with a previous
    network whose old logits are OLD_LOGITS, whatever the images."""
    model = ModelConfig(backbone="resnet18", feature_stage=2, network="linear", pretrained=None)
    method_class = METHODS["finetune"]
    method = method_class(
        method_class.Params(old_classes=rule, **params),
        build_network(model, 32, load_weights=False),
        LossConfig(reference_images=4),
    )
    method.session = Session(1, (3, 4), (0, 1, 2, 3, 4))
    method.old_network = object()  # type: ignore[assignment]  # only read through the stub
    method.previous_logits = lambda images: OLD_LOGITS[: len(images)]  # type: ignore[method-assign]
    method.thresholds = THRESHOLDS
    return method


@pytest.mark.parametrize("rule", OLD_CLASS_RULES)
def test_every_rule_through_a_method_zeroes_left_out_gradients(rule: str) -> None:
    method = finetune(rule)
    torch.manual_seed(1)
    logits = torch.randn(4, 5, requires_grad=True)
    batch = Batch(torch.zeros(4, 3, 8, 8), TARGETS, exemplar=EXEMPLAR)
    parts: dict[str, torch.Tensor] = {}
    targets = method.rule_targets(batch)  # type: ignore[attr-defined]
    loss = method.classification_term(logits, targets, parts)  # type: ignore[attr-defined]
    loss.backward()
    assert logits.grad is not None
    left_out = ~kept(rule)
    if rule in ("distill", "pseudo-soft"):
        soft = (
            torch.ones(4, 3, dtype=torch.bool) if targets.soft_mask is None else targets.soft_mask
        )
        # A soft entry learns from its soft target alone: d/dlogit = (s(new) - s(old)) R/B.
        expected = (logits.detach()[:, :3].sigmoid() - SCORES) * (4 / 4)
        assert torch.allclose(logits.grad[:, :3][soft], expected[soft], atol=1e-6)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.detach()[:, :3], SCORES, reduction="none"
        )
        assert float(parts["kd"]) == pytest.approx(float(bce[soft].sum()), rel=1e-5)
        neither = left_out[:, :3] & ~soft  # out of both losses: no gradient at all
        assert torch.equal(logits.grad[:, :3][neither], torch.zeros(int(neither.sum())))
    else:
        assert torch.equal(logits.grad[left_out], torch.zeros(int(left_out.sum())))
        assert "kd" not in parts
    hard = asymmetric_loss(logits.detach(), targets.targets, mask=kept(rule))
    assert float(parts["asl"]) == pytest.approx(float(hard), rel=1e-6)  # R/B = 1
    assert ("pseudo_pos" in parts) == (rule in {"pseudo", "pseudo-ignore", "pseudo-soft"})


def test_thresholds_by_order_statistics() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 0.05]])
    settings = PseudoLabelParams()
    # 1 positive per image: the 2 largest of 6 scores are above 0.5.
    assert choose_thresholds("pseudo", scores, 1.0, settings, 2.0) == Thresholds(0.5)
    # Margin 2: 2 entries per image stay above the negative threshold (0.9 0.8 0.5 0.3).
    both = choose_thresholds("pseudo-ignore", scores, 1.0, settings, 2.0)
    assert both.positive == 0.5 and both.negative == pytest.approx(0.1)
    # A margin that covers every old entry leaves no confident negative.
    wide = choose_thresholds("pseudo-ignore", scores, 1.0, settings, 3.0)
    assert wide.negative is not None and wide.negative < 0.05
    with pytest.raises(MlcilError, match="negative_margin"):
        choose_thresholds("pseudo-ignore", scores, 1.0, settings, 0.5)


def test_method_state_keeps_both_thresholds() -> None:
    method = finetune("pseudo-ignore")
    state = method.state_dict()  # type: ignore[attr-defined]
    assert state == {"pseudo_label_threshold": 0.7, "negative_threshold": 0.2}
    fresh = finetune("pseudo-ignore")
    fresh.thresholds = None  # type: ignore[attr-defined]
    fresh.load_state_dict(state)  # type: ignore[attr-defined]
    assert fresh.thresholds == THRESHOLDS  # type: ignore[attr-defined]
    assert finetune("negative").state_dict() == {}  # type: ignore[attr-defined]


def test_a_rule_that_reads_the_previous_network_keeps_it() -> None:
    assert not finetune("negative").keeps_teacher  # type: ignore[attr-defined]
    assert not finetune("ignore").keeps_teacher  # type: ignore[attr-defined]
    for rule in ("distill", "pseudo", "pseudo-ignore", "pseudo-soft"):
        assert finetune(rule).keeps_teacher  # type: ignore[attr-defined]


def test_joint_refuses_every_rule_but_negative_by_name() -> None:
    config = CONFIGS / "methods" / "joint.yaml"
    assert load_config(config, ["method.old_classes=negative"]).method.params.old_classes
    for rule in ("ignore", "distill", "pseudo", "pseudo-ignore", "pseudo-soft"):
        with pytest.raises(ConfigError, match=r"method\.old_classes: this method cannot honour"):
            load_config(config, [f"method.old_classes={rule}"])


def test_each_method_has_its_default_rule() -> None:
    defaults = {
        name: cls.Params.model_fields["old_classes"].default for name, cls in METHODS.items()
    }
    assert defaults["krt"] == "pseudo"
    assert {defaults[m] for m in ("lwf", "icarl", "agcn")} == {"distill"}
    for name in ("finetune", "replay", "joint", "podnet", "oewc", "bic", "derpp"):
        assert defaults[name] == "negative", name
    assert all(issubclass(cls.Params, MethodParams) for cls in METHODS.values())


def test_krt_reads_the_former_pseudo_labels_switch() -> None:
    params = METHODS["krt"].Params
    assert params(pseudo_labels=False).old_classes == "negative"  # type: ignore[call-arg]
    assert params(pseudo_labels=True).old_classes == "pseudo"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="disagree"):
        params(pseudo_labels=False, old_classes="pseudo")  # type: ignore[call-arg]


def test_training_rows_say_which_rows_are_exemplars() -> None:
    from mlcil.methods.base import TrainingRows

    class Rows:
        def __len__(self) -> int:
            return 5

        def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(1), torch.tensor([float(item)])

    rows = TrainingRows(Rows(), own_images=3)  # type: ignore[arg-type]
    assert [bool(rows[i][2]) for i in range(5)] == [False, False, False, True, True]
    data = np.arange(10, dtype=np.float32).reshape(5, 2)
    with_data = TrainingRows(Rows(), 3, data)  # type: ignore[arg-type]
    items = [with_data[i] for i in range(5)]
    batch = Batch.from_items([torch.stack(x) for x in zip(*items, strict=True)])
    assert batch.exemplar is not None and batch.exemplar.tolist() == [0, 0, 0, 1, 1]
    assert batch.exemplar_data is not None and math.isclose(float(batch.exemplar_data[4, 1]), 9)


@pytest.mark.parametrize("images", ["all", "own"])
def test_the_threshold_pass_scores_all_rows_or_the_sessions_own(
    images: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from mlcil.data.sessions import TargetedImages
    from mlcil.methods import base as base_module
    from mlcil.protocol import sessions
    from tiny import in_memory_context

    protocol = sessions(6, 3, 3)
    labels = (np.random.default_rng(0).random((12, 6)) < 0.5).astype(np.uint8)
    labels[:, 0] = 1  # every image shows an old class: all are exemplar candidates
    krt = METHODS["krt"]
    model = ModelConfig(backbone="resnet18", feature_stage=2, network="linear", pretrained=None)
    method = krt(krt.Params(threshold_images=images), build_network(model, 32, False), LossConfig())
    first = in_memory_context(protocol[0], protocol, labels)
    method.begin_session(first)
    method.end_session(first)
    second = in_memory_context(protocol[1], protocol, labels)
    own = len(second.train_set)
    exemplar_rows = np.arange(4)  # four stored images of the first session, appended
    full = TargetedImages(
        second.train_source,
        np.concatenate([second.train_set.indices, exemplar_rows]),
        np.concatenate([second.train_set.targets, labels[exemplar_rows].astype(np.float32)]),
        second.train_set.transform,
    )
    second = dataclasses.replace(second, train_set=full, own_images=own)
    scored: list[int] = []

    def spy(rule: str, old_scores: torch.Tensor, *args: object) -> Thresholds:
        scored.append(len(old_scores))
        return Thresholds(0.5)

    monkeypatch.setattr(base_module, "choose_thresholds", spy)
    method.begin_session(second)
    assert scored == [own + 4 if images == "all" else own]
    assert method.thresholds == Thresholds(0.5)
