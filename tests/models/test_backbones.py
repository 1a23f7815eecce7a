"""Backbones through timm with weights from local files only."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mlcil.errors import WeightsError
from mlcil.models import Backbone


def _reference_resnet18() -> torch.nn.Module:
    torch.manual_seed(123)
    return timm.create_model("resnet18", pretrained=False, num_classes=1000)


def test_timm_state_dict_loads_and_classifier_is_dropped(tmp_path: Path) -> None:
    reference = _reference_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", feature_stage=2, pretrained=path)
    torch.testing.assert_close(backbone.body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(
        backbone.body.layer2[0].conv1.weight, reference.layer2[0].conv1.weight
    )
    # Stages after the feature stage are removed, parameters included.
    assert not any(n.startswith(("layer3", "layer4")) for n, _ in backbone.body.named_parameters())
    assert backbone.num_features == 128 and backbone.reduction == 8


def test_safetensors_and_wrapped_checkpoints_load(tmp_path: Path) -> None:
    reference = _reference_resnet18()
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = Backbone("resnet18", pretrained=tmp_path / "w.safetensors")
    torch.testing.assert_close(loaded.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # ASL/KRT-style wrapping: {"state_dict": ...} with DDP "module." prefixes.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    again = Backbone("resnet18", pretrained=tmp_path / "wrapped.pth")
    torch.testing.assert_close(again.body.conv1.weight, reference.conv1.weight)


def test_asl_tresnet_checkpoint_with_coco_head_warns_about_leakage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("tresnet_m", pretrained=False, num_classes=80)
    state = reference.state_dict()
    assert any(k.startswith("body.") for k in state) and state["head.fc.weight"].shape[0] == 80
    path = tmp_path / "tresnet_m_224_21k.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING, logger="mlcil"):
        backbone = Backbone("tresnet_m", pretrained=path)
    assert "COCO-trained" in caplog.text and str(path) in caplog.text
    torch.testing.assert_close(
        backbone.body.body.conv1.conv.weight, reference.body.conv1.conv.weight
    )
    assert backbone.num_features == 2048


def test_coco_file_name_alone_triggers_the_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "Open_ImagesV6_TRresNet_MS_COCO_224.pth"
    torch.save(_reference_resnet18().state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="mlcil"):
        Backbone("resnet18", pretrained=path)
    assert "COCO-trained" in caplog.text
    caplog.clear()
    clean = tmp_path / "in21k.pth"
    torch.save(_reference_resnet18().state_dict(), clean)
    with caplog.at_level(logging.WARNING, logger="mlcil"):
        Backbone("resnet18", pretrained=clean)
    assert "COCO-trained" not in caplog.text


def test_missing_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "pretrained_models" / "tresnet_m_224_21k.pth"
    with pytest.raises(WeightsError, match="not found: .*tresnet_m_224_21k.pth"):
        Backbone("resnet18", pretrained=missing)


def test_wrong_architecture_and_unsafe_pickles_are_refused(tmp_path: Path) -> None:
    resnet34 = timm.create_model("resnet34", pretrained=False)
    torch.save(resnet34.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="r34.pth"):
        Backbone("resnet18", pretrained=tmp_path / "r34.pth")
    # A pickle holding an arbitrary object: weights_only=True refuses to execute it.
    torch.save(
        {"state_dict": _reference_resnet18().state_dict(), "extra": Path("x")}, tmp_path / "p.pth"
    )
    with pytest.raises(WeightsError, match="weights_only=True"):
        Backbone("resnet18", pretrained=tmp_path / "p.pth")


def test_feature_stage_truncates_and_bad_stage_is_an_error() -> None:
    backbone = Backbone("resnet18", feature_stage=2)
    assert backbone.feature_shape(48) == (128, 6, 6)
    assert backbone.stage_reductions == [2, 4, 8]
    stages = backbone.forward_stages(torch.rand(1, 3, 48, 48), [1])
    assert [s.shape[1] for s in stages] == [64, 128]  # stage 1, then the feature map
    with pytest.raises(WeightsError, match="out of range"):
        Backbone("resnet18", feature_stage=7)
    with pytest.raises(WeightsError, match="unknown timm architecture"):
        Backbone("not_a_model")


def test_inplace_abn_key_layout_of_the_asl_zoo_is_converted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("tresnet_m", pretrained=False, num_classes=80)
    old_style = {}
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # inplace-ABN checkpoints have no batch counters
        key = re.sub(r"(conv\d+|downsample\.\d+)\.conv\.", r"\1.0.", key)
        key = re.sub(r"(conv\d+|downsample\.\d+)\.bn\.", r"\1.1.", key)
        old_style[key] = value
    assert "body.conv1.0.weight" in old_style and "body.conv1.conv.weight" not in old_style
    torch.save({"state_dict": old_style}, tmp_path / "asl_tresnet_m.pth")
    backbone = Backbone("tresnet_m", pretrained=tmp_path / "asl_tresnet_m.pth")
    body, expected = backbone.body.body, reference.body
    torch.testing.assert_close(
        body.layer2[0].conv1.conv.weight, expected.layer2[0].conv1.conv.weight
    )
    # inplace-ABN stores signed scales; timm's converter makes them positive batch-norm weights.
    torch.testing.assert_close(body.conv1.bn.weight, expected.conv1.bn.weight.abs() + 1e-5)
