"""Image transforms (KRT-SPEC section 8).

Training: resize to a square, Cutout, RandAugment, tensor in [0, 1]. Evaluation: resize, tensor.
No mean/std normalisation (TResNet's convention). All randomness comes from torch's generator so
that seeding torch makes a whole epoch reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T
from torchvision.transforms import functional as TF


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


def build_transform(
    image_size: int, train: bool, augment: Sequence[str] = ("cutout", "randaugment")
) -> Callable[[Image.Image], torch.Tensor]:
    """The training (``train=True``) or evaluation transform."""
    steps: list[Callable] = [T.Resize((image_size, image_size))]
    if train:
        if "hflip" in augment:
            steps.append(T.RandomHorizontalFlip())
        if "cutout" in augment:
            steps.append(Cutout(0.5))
        if "randaugment" in augment:
            steps.append(T.RandAugment())
    steps.append(to_unit_tensor)
    return T.Compose(steps)
