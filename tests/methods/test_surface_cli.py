"""The new methods from the command line: ``mlcil list`` names them, each method config passes
``--dry-run``, and each published COCO/VOC config resolves to KRT's published setup with only
the method (and its memory) changed."""

from __future__ import annotations

import pytest

from mlcil.cli import main
from mlcil.experiment import load_config
from mlcil.memory_policies import MEMORY_POLICIES
from mlcil.methods import METHODS
from mlcil.old_classes import OLD_CLASS_RULES
from tiny import REPO

NEW_METHODS = ("oewc", "icarl", "bic", "derpp")
PAPERS = {"oewc": "Online EWC", "icarl": "iCaRL", "bic": "BiC", "derpp": "DER++"}


def test_list_names_the_new_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in NEW_METHODS:
        line = next(line for line in lines if line.split()[:1] == [name])
        assert PAPERS[name] in line, line
    # The memory policies follow their heading, each with its one-line summary.
    start = lines.index("memory policies (memory.policy):")
    listed = {line.split()[0] for line in lines[start + 1 : start + 1 + len(MEMORY_POLICIES)]}
    assert listed == set(MEMORY_POLICIES) == {"herding", "random", "prs", "ocdm"}


def test_list_shows_each_method_default_old_class_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {}
    for name in METHODS:
        line = next(line for line in lines if line.split()[:1] == [name])
        shown[name] = line.split()[1]
    assert shown["krt"] == "[pseudo]" and shown["lwf"] == "[distill]"
    assert shown["finetune"] == "[negative]" and shown["agcn"] == "[distill]"
    assert set(shown.values()) <= {f"[{rule}]" for rule in OLD_CLASS_RULES}
    start = lines.index("old-class rules (method.old_classes):")
    listed = [line.split()[0] for line in lines[start + 1 : start + 1 + len(OLD_CLASS_RULES)]]
    assert listed == list(OLD_CLASS_RULES)


def test_every_memory_policy_documents_itself_in_one_line() -> None:
    # What a listing of the policies prints: the name and the first docstring line.
    for name, policy in MEMORY_POLICIES.items():
        summary = (policy.__doc__ or "").strip().splitlines()
        assert summary and len(summary[0]) < 100, name


@pytest.mark.parametrize("name", NEW_METHODS)
def test_the_method_config_passes_a_dry_run(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(REPO / "configs" / "methods" / f"{name}.yaml")
    assert main(["-q", "train", "--config", config, "--dry-run", "model.backbone=resnet18"]) == 0
    assert f"'name': '{name}'" in capsys.readouterr().out


@pytest.mark.parametrize("name", NEW_METHODS)
@pytest.mark.parametrize(
    ("dataset", "fixture", "protocol", "per_class"),
    [("coco_b40_c10", "coco_fixture", "B40-C10", 20), ("voc_b10_c2", "voc_fixture", "B10-C2", 2)],
    ids=["coco", "voc"],
)
def test_published_configs_change_only_the_method(
    name: str,
    dataset: str,
    fixture: str,
    protocol: str,
    per_class: int,
    request: pytest.FixtureRequest,
) -> None:
    root, _ = request.getfixturevalue(fixture)
    path = REPO / "configs" / "published" / f"{name}_{dataset}.yaml"
    config = load_config(path, [f"root={root}"])
    krt = load_config(REPO / "configs" / f"{dataset}.yaml", [f"root={root}"])
    assert config.method.name == name and config.protocol == protocol
    assert config.data == krt.data and config.train == krt.train and config.loss == krt.loss
    assert config.model.backbone == krt.model.backbone and config.model.network == "linear"
    assert config.memory.per_class == (0 if name == "oewc" else per_class)
    assert config.memory.policy == "herding"
    assert main(["-q", "train", "--config", str(path), "--dry-run", f"root={root}"]) == 0
