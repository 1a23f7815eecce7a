"""Leak-free pretraining: the glyph backbone is trained once, cached with its provenance, reused
only when the provenance matches, and loads into the truncated benchmark backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mlcil.pretrain as pretrain
from mlcil.config.schema import ModelConfig
from mlcil.data.classes import DIGIT_CLASSES
from mlcil.errors import ConfigError
from mlcil.models import Backbone
from mlcil.runtime import Runtime
from mlcil.weights_cache import defining_fields, load_cached, read_provenance, store

CPU = Runtime(torch.device("cpu"), "fp32")  # what an entry point makes on this machine

MODEL = ModelConfig(backbone="resnet18", feature_stage=2, pretrained="pretrain:glyphs")
TINY = pretrain.PretrainRecipe(epochs=1, batch_size=16, train_images=48, test_images=16)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "cache"))


def test_pretraining_is_cached_and_reused_only_for_the_same_provenance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = pretrain.pretrain_backbone(MODEL, 32, TINY, command="test", runtime=CPU)
    provenance = read_provenance(path)
    assert provenance["classes"] and not set(provenance["classes"]) & set(DIGIT_CLASSES)
    assert not any(ch.isdigit() for name in provenance["classes"] for ch in name)
    assert (provenance["backbone"], provenance["feature_stage"], provenance["image_size"]) == (
        "resnet18",
        2,
        32,
    )
    assert provenance["recipe"]["epochs"] == 1 and provenance["command"] == "test"
    assert 0.0 <= provenance["result"]["glyph_test_map"] <= 100.0
    # Where it ran, so a spread between machines can be traced: threads, cores and load.
    environment = provenance["environment"]
    assert environment["threads"] == torch.get_num_threads() >= 1
    assert environment["cpu_count"] == os.cpu_count()
    for moment in ("load_average_start", "load_average_end"):
        assert len(environment[moment]) == 3 and all(value >= 0 for value in environment[moment])
    assert environment["torch_version"] == torch.__version__
    assert "environment" not in defining_fields(provenance)  # never a reason to pretrain again

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached weights should have been reused")

    monkeypatch.setattr(pretrain, "fit_session", no_training)
    assert pretrain.pretrain_backbone(MODEL, 32, TINY, command="again", runtime=CPU) == path
    # Another seed (or image size) is another provenance: it must train, not reuse.
    with pytest.raises(AssertionError, match="reused"):
        pretrain.pretrain_backbone(MODEL, 32, TINY.model_copy(update={"seed": 1}), runtime=CPU)
    with pytest.raises(AssertionError, match="reused"):
        pretrain.pretrain_backbone(MODEL, 48, TINY, runtime=CPU)


def test_the_truncated_trunk_loads_into_the_benchmark_backbone() -> None:
    path = pretrain.pretrain_backbone(MODEL, 32, TINY, command="test", runtime=CPU)
    backbone = Backbone("resnet18", feature_stage=2, pretrained=path)
    stored = load_cached(path)
    assert set(stored) == set(backbone.body.state_dict())  # only the kept stages are stored
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, stored[key]), key


def test_pretrain_names_resolve_to_the_cached_file() -> None:
    # Store weights under the default recipe's provenance, as a finished pretraining would.
    trunk = Backbone("resnet18", feature_stage=2).body.state_dict()
    wanted = pretrain.provenance(MODEL, 48, pretrain.PretrainRecipe())
    path = store(trunk, {**wanted, "command": "test"})
    resolved, provenance = pretrain.resolve_pretrained(MODEL, 48, runtime=CPU)
    assert resolved.pretrained == str(path) and resolved.backbone == "resnet18"
    assert provenance is not None and provenance["source"].startswith("glyphs-v")
    plain = ModelConfig(backbone="resnet18", pretrained="weights/resnet18.pth")
    assert pretrain.resolve_pretrained(plain, 48, runtime=CPU) == (plain, None)
    with pytest.raises(ConfigError, match="pretrain:imagenet.*known: pretrain:glyphs"):
        pretrain.resolve_pretrained(
            MODEL.model_copy(update={"pretrained": "pretrain:imagenet"}), 48, runtime=CPU
        )


def test_the_provenance_of_cached_weights_is_read_without_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached_provenance must never train")

    monkeypatch.setattr(pretrain, "fit_session", no_training)
    assert pretrain.cached_provenance(MODEL, 48) is None  # nothing cached yet
    assert pretrain.cached_provenance(ModelConfig(backbone="resnet18"), 48) is None
    trunk = Backbone("resnet18", feature_stage=2).body.state_dict()
    store(trunk, {**pretrain.provenance(MODEL, 48, pretrain.PretrainRecipe()), "command": "t"})
    found = pretrain.cached_provenance(MODEL, 48)
    assert found is not None and found["command"] == "t" and found["image_size"] == 48


def test_corrupt_cached_weights_are_rebuilt_and_unreadable_weights_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlcil.errors import WeightsError

    trunk = Backbone("resnet18", feature_stage=2).body.state_dict()
    wanted = pretrain.provenance(MODEL, 48, pretrain.PretrainRecipe())
    path = store(trunk, {**wanted, "command": "test"})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a disk fault, a bad copy

    class RebuiltError(Exception):
        pass

    def training(*args: object, **kwargs: object) -> None:
        raise RebuiltError

    # The checksum in the provenance no longer matches: the weights are made again, never used.
    monkeypatch.setattr(pretrain, "fit_session", training)
    with pytest.raises(RebuiltError):
        pretrain.resolve_pretrained(MODEL, 48, runtime=CPU)
    # A damaged weights file named directly is refused naming the file.
    with pytest.raises(WeightsError, match=f"{path.name} is not a readable safetensors file"):
        Backbone("resnet18", feature_stage=2, pretrained=path)
    broken = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in trunk.items()}, str(broken))  # fmt: skip
    with pytest.raises(WeightsError, match="nan.safetensors: .* not finite"):
        Backbone("resnet18", feature_stage=2, pretrained=broken)
