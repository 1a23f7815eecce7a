"""Tests of the ``randaugment`` option of build_transform.

The released path is tested with a stand-in ``randaugment`` module put in ``sys.modules``, so the
tests neither need nor use the real package: they check the wiring (the policy gets the resized,
cut-out PIL image and its output becomes the tensor), the NumPy alias the real 1.0.2 package
needs, and the error when the package is missing.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from mlcil.data.transforms import Cutout, build_transform, to_unit_tensor
from mlcil.errors import ConfigError


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("seed", [0, 1, 3407])
def test_torchvision_option_is_bit_identical_to_the_previous_pipeline(seed: int) -> None:
    image = _image()
    previous = T.Compose([T.Resize((24, 24)), Cutout(0.5), T.RandAugment(), to_unit_tensor])
    outputs = []
    for transform in (
        previous,
        build_transform(24, train=True),
        build_transform(24, train=True, randaugment="torchvision"),
    ):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])


class _RecordingPolicy:
    """Stand-in for ``randaugment.RandAugment``: records its input and inverts the image."""

    calls: list[Image.Image] = []  # noqa: RUF012 - shared on purpose: the test reads it back

    def __call__(self, image: Image.Image) -> Image.Image:
        self.calls.append(image.copy())
        return ImageOps.invert(image)


@pytest.fixture
def fake_package(monkeypatch: pytest.MonkeyPatch) -> type[_RecordingPolicy]:
    module = types.ModuleType("randaugment")
    module.RandAugment = _RecordingPolicy
    monkeypatch.setitem(sys.modules, "randaugment", module)
    monkeypatch.setattr(_RecordingPolicy, "calls", [])
    return _RecordingPolicy


def test_released_option_applies_the_package_policy_after_cutout(
    fake_package: type[_RecordingPolicy],
) -> None:
    image = _image()
    transform = build_transform(16, train=True, randaugment="released")
    torch.manual_seed(5)
    output = transform(image)

    resized = T.Resize((16, 16))(image)
    torch.manual_seed(5)
    cut = Cutout(0.5)(resized)  # the same torch draws as inside the pipeline
    assert len(fake_package.calls) == 1
    received = fake_package.calls[0]
    assert isinstance(received, Image.Image) and received.size == (16, 16)
    assert np.array_equal(np.asarray(received), np.asarray(cut))
    # The policy's output is what becomes the tensor.
    assert torch.equal(output, to_unit_tensor(ImageOps.invert(cut)))
    assert output.shape == (3, 16, 16) and output.dtype == torch.float32
    assert output.min().item() >= 0.0 and output.max().item() <= 1.0
    assert not torch.equal(output, build_transform(16, train=False)(image))


def test_released_option_only_for_training_with_randaugment(
    fake_package: type[_RecordingPolicy],
) -> None:
    image = _image()
    evaluation = build_transform(16, train=False, randaugment="released")
    assert torch.equal(evaluation(image), to_unit_tensor(T.Resize((16, 16))(image)))
    build_transform(16, train=True, augment=("cutout",), randaugment="released")(image)
    assert fake_package.calls == []


_NEEDS_NP_INT = '''
import numpy as np


class RandAugment:
    """Like randaugment 1.0.2: converts with ``astype(np.int)`` on every call."""

    def __call__(self, image):
        shift = np.round(np.linspace(0, 40, 3)).astype(np.int)[1]
        return image.point(lambda value: min(value + shift, 255))
'''


def test_released_policy_gets_the_numpy_int_alias_numpy_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("randaugment")
    exec(compile(_NEEDS_NP_INT, "<fake randaugment>", "exec"), module.__dict__)
    module.RandAugment.__module__ = "randaugment"
    monkeypatch.setitem(sys.modules, "randaugment", module)

    image = Image.new("RGB", (4, 4), (10, 20, 250))
    output = build_transform(4, train=True, augment=("randaugment",), randaugment="released")(image)
    # The stand-in adds 20 (= round(linspace(0, 40, 3))[1]) to every channel, clipped at 255.
    assert torch.equal(output, to_unit_tensor(Image.new("RGB", (4, 4), (30, 40, 255))))
    assert not hasattr(np, "int")  # NumPy itself is left as it was (it has no np.int since 1.24)


def test_released_option_without_the_package_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "randaugment", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"data\.randaugment: released.*randaugment==1\.0\.2"):
        build_transform(16, train=True, randaugment="released")


def test_unknown_randaugment_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.randaugment: 'timm' is not one of"):
        build_transform(16, train=True, randaugment="timm")


def test_the_config_key_selects_the_released_policy_for_training(
    fake_package: type[_RecordingPolicy],
) -> None:
    from mlcil.experiment import Experiment, load_config
    from mlcil.runs import make_runtime

    config = load_config(
        None,
        [
            "data.dataset=digits",
            "data.image_size=16",
            "data.randaugment=released",
            "protocol=B0-C2",
            "model.pretrained=null",
        ],
    )
    experiment = Experiment(config, runtime=make_runtime(config))
    experiment.train_transform(_image())
    experiment.eval_transform(_image())
    assert len(fake_package.calls) == 1  # training only
    assert load_config(None, []).data.randaugment == "torchvision"  # the default
