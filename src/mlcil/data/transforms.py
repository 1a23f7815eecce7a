"""Image transforms (docs/method.md, optimisation).

Training: resize to a square, Cutout, RandAugment, tensor in [0, 1]. Evaluation: resize, tensor.
No mean/std normalisation (TResNet's convention).

RandAugment comes in two flavours (``data.randaugment``):

- ``"torchvision"`` (default): ``torchvision.transforms.RandAugment`` (2 ops, magnitude 9). All
  randomness of the pipeline then comes from torch's generator, so seeding torch makes a whole
  epoch reproducible.
- ``"released"``: the policy of the PyPI package ``randaugment`` 1.0.2, which the KRT release
  uses (docs/distributed.md): one of 15 x 9 x 15 x 9 pairs of (operation, magnitude), each operation
  applied with probability 0.5. It draws from Python's ``random`` module (policy, coin flips,
  signs) and from NumPy's global generator (the centre of its own Cutout operation), not from
  torch. Runs stay reproducible because the engine re-seeds ``random``, NumPy and torch at every
  epoch and every loader worker seeds ``random`` and NumPy from torch's worker seed; anything
  else that draws from those global generators in between shifts the augmentations.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mlcil.errors import ConfigError

logger = logging.getLogger(__name__)

RANDAUGMENT_CHOICES = ("torchvision", "released")
RELEASED_RANDAUGMENT_VERSION = "1.0.2"


class Cutout:
    """Fill a square of ``fraction`` x the image side, at a random centre (clipped at the
    borders), with one random colour."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        half_w = int(width * self.fraction) // 2
        half_h = int(height * self.fraction) // 2
        centre_x = int(torch.randint(width, ()).item())
        centre_y = int(torch.randint(height, ()).item())
        colour = tuple(int(c) for c in torch.randint(256, (3,)).tolist())
        image = image.copy()
        ImageDraw.Draw(image).rectangle(
            (
                max(centre_x - half_w, 0),
                max(centre_y - half_h, 0),
                min(centre_x + half_w, width) - 1,
                min(centre_y + half_h, height) - 1,
            ),
            fill=colour,
        )
        return image

    def __repr__(self) -> str:
        return f"Cutout(fraction={self.fraction})"


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``(3, H, W)`` float32 in [0, 1]."""
    return TF.pil_to_tensor(image).float().div_(255.0)


class _NumpyWithIntAlias(types.ModuleType):
    """NumPy plus the ``np.int`` alias of the builtin ``int`` that NumPy 1.24 removed.

    randaugment 1.0.2 evaluates ``astype(np.int)`` on every call, so with the NumPy mlcil requires
    it fails with ``AttributeError``. Handing it this view of NumPy (and only it: NumPy itself is
    not modified) restores its behaviour on the NumPy it was written for, where ``np.int`` was
    ``int``.
    """

    def __init__(self) -> None:
        super().__init__("numpy")
        self.int = int

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _patch_numpy_alias(module: types.ModuleType) -> None:
    """Give ``module`` the NumPy view above when its NumPy lacks ``np.int``.

    Only modules of the ``randaugment`` package are touched, whoever defines the policy class.
    """
    in_package = module.__name__ == "randaugment" or module.__name__.startswith("randaugment.")
    if not in_package or getattr(module, "np", None) is not np or hasattr(np, "int"):
        return
    module.np = _NumpyWithIntAlias()  # type: ignore[attr-defined]
    logger.debug("gave %s a NumPy view with the np.int alias it needs", module.__name__)


class ReleasedRandAugment:
    """The KRT release's RandAugment: the ``randaugment`` package's policy on a PIL image.

    Args:
        policy: a ``randaugment.RandAugment()`` instance (PIL image in, PIL image out).
    """

    def __init__(self, policy: Callable[[Image.Image], Image.Image]) -> None:
        self.policy = policy

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.policy(image)

    def __repr__(self) -> str:
        return f"ReleasedRandAugment(randaugment=={RELEASED_RANDAUGMENT_VERSION})"


def released_randaugment() -> ReleasedRandAugment:
    """Import the ``randaugment`` package lazily and wrap its ``RandAugment`` policy.

    Returns:
        The policy, ready to use in a torchvision ``Compose``.

    Raises:
        ConfigError: when the package is not installed or has no ``RandAugment``.
    """
    install = f"pip install randaugment=={RELEASED_RANDAUGMENT_VERSION}"
    try:
        package = importlib.import_module("randaugment")
    except ImportError as error:
        raise ConfigError(
            f"data.randaugment: released needs the package randaugment "
            f"{RELEASED_RANDAUGMENT_VERSION} (the KRT release's RandAugment), which is not "
            f"installed: {install}"
        ) from error
    policy_class = getattr(package, "RandAugment", None)
    if policy_class is None:
        raise ConfigError(
            f"data.randaugment: released: the installed package randaugment has no RandAugment; "
            f"{install}"
        )
    try:
        version = importlib.metadata.version("randaugment")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None and version != RELEASED_RANDAUGMENT_VERSION:
        logger.warning(
            "randaugment %s is installed; the KRT release used %s (%s)",
            version,
            RELEASED_RANDAUGMENT_VERSION,
            install,
        )
    _patch_numpy_alias(importlib.import_module(policy_class.__module__))
    return ReleasedRandAugment(policy_class())


def build_transform(
    image_size: int,
    train: bool,
    augment: Sequence[str] = ("cutout", "randaugment"),
    randaugment: str = "torchvision",
) -> Callable[[Image.Image], torch.Tensor]:
    """The training (``train=True``) or evaluation transform.

    Args:
        image_size: side of the square the image is resized to.
        train: build the training pipeline (with the augmentations named in ``augment``).
        augment: any of ``"hflip"``, ``"cutout"``, ``"randaugment"``, applied in that order.
        randaugment: ``"torchvision"`` or ``"released"`` (the ``randaugment`` 1.0.2 package,
            imported only when a training pipeline uses it); see the module docstring.

    Returns:
        A callable from a PIL RGB image to a ``(3, image_size, image_size)`` float tensor in
        [0, 1].

    Raises:
        ConfigError: for an unknown ``randaugment`` value, or ``"released"`` without the package.
    """
    if randaugment not in RANDAUGMENT_CHOICES:
        raise ConfigError(
            f"data.randaugment: {randaugment!r} is not one of {', '.join(RANDAUGMENT_CHOICES)}"
        )
    steps: list[Callable] = [T.Resize((image_size, image_size))]
    if train:
        if "hflip" in augment:
            steps.append(T.RandomHorizontalFlip())
        if "cutout" in augment:
            steps.append(Cutout(0.5))
        if "randaugment" in augment:
            if randaugment == "released":
                steps.append(released_randaugment())
            else:
                steps.append(T.RandAugment())
    steps.append(to_unit_tensor)
    return T.Compose(steps)
