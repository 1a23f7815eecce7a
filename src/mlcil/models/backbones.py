"""Backbones through timm, with weights read from local files (or from the Hugging Face cache, for
a ``model.pretrained`` that names hub weights: :mod:`mlcil.hub_weights`). Building a backbone
never reaches the network: timm is only ever asked for an architecture, and a hub name in
``model.backbone`` (which timm would resolve online) is refused.

Any timm CNN that implements ``forward_intermediates`` works. The feature map fed to the
classifier can be taken at an earlier stage (``feature_stage``), which truncates the network:
the embedded demo uses ``resnet18`` at stage 2 (stride 8) so a 48x48 input gives a 6x6 map.

Weight files (docs/method.md, network): a timm ``state_dict`` (``.pth``/``.bin``/``.safetensors``),
or the ASL/KRT checkpoint format, a dict with the weights under ``state_dict`` or ``model``, keys
prefixed ``body.`` (which is also timm's TResNet layout) and a classifier ``head.fc`` that is
dropped. ``torch.load`` always runs with ``weights_only=True``: a checkpoint can never execute code.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlcil import hub_weights
from mlcil.errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

COCO_CLASSES = 80


class Backbone(nn.Module):
    """A timm model reduced to its convolutional trunk.

    Args:
        name: timm architecture name, e.g. ``"tresnet_m"`` or ``"resnet18"``.
        feature_stage: index into timm's ``feature_info`` of the map to return; ``None`` for the
            last stage. Later stages are removed from the module.
        pretrained: optional path to a local weights file, loaded before truncation, or a hub
            name (``timm/<model>.<tag>``, ``hf-hub:...``) whose file is in the hub cache.
        input_normalisation: ``(mean, std)`` per RGB channel subtracted from and divided into
            the [0, 1] input before the first layer, as the weights were trained (ImageNet
            weights); None feeds the input unchanged. Held in non-persistent buffers: it is part
            of the architecture, not of the state_dict, so checkpoints hold the same tensors
            either way.
    """

    input_mean: torch.Tensor  # (1, 3, 1, 1) buffers, present when the input is normalised
    input_scale: torch.Tensor

    def __init__(
        self,
        name: str,
        feature_stage: int | None = None,
        pretrained: str | Path | None = None,
        input_normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        import timm

        body: Any  # a timm model: its attributes are timm's, not nn.Module's
        check_architecture_name(name)
        if pretrained is not None and hub_weights.is_hub_name(pretrained):
            pretrained = hub_weights.local_weights(str(pretrained))
        try:
            body = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as error:  # timm's "Unknown model" error
            raise WeightsError(f"model.backbone: unknown timm architecture {name!r}") from error
        if not hasattr(body, "forward_intermediates"):
            raise WeightsError(
                f"model.backbone: {name!r} has no forward_intermediates in this timm version"
            )
        classifier = body.pretrained_cfg.get("classifier") or "fc"
        num_stages = len(body.feature_info)
        stage = num_stages - 1 if feature_stage is None else feature_stage
        if not 0 <= stage < num_stages:
            raise WeightsError(
                f"model.feature_stage={feature_stage} is out of range for {name!r} "
                f"({num_stages} stages: 0..{num_stages - 1})"
            )
        full_keys = set(body.state_dict())
        if stage < num_stages - 1:
            body.prune_intermediate_layers(indices=[stage], prune_head=True, prune_norm=True)
        if pretrained is not None:
            # Pruning first lets a file hold either the whole network or only the stages kept
            # (a backbone pretrained truncated, e.g. by ``mlcil pretrain``).
            pruned = full_keys - set(body.state_dict())
            load_backbone_weights(body, pretrained, classifier_prefix=classifier, ignore=pruned)
        self.name = name
        self.body = body
        self.normalises_input = input_normalisation is not None
        if input_normalisation is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                         for v in input_normalisation)  # fmt: skip
            if not bool((std > 0).all()):
                raise WeightsError(f"input normalisation of {name!r}: std {std.flatten()} <= 0")
            self.register_buffer("input_mean", mean, persistent=False)
            self.register_buffer("input_scale", 1.0 / std, persistent=False)
        self.feature_stage = stage
        self.num_features: int = int(body.feature_info[stage]["num_chs"])
        self.reduction: int = int(body.feature_info[stage]["reduction"])
        # Output stride of every stage up to the feature stage (for methods that distil
        # intermediate maps and pick their own stages).
        self.stage_reductions: list[int] = [
            int(body.feature_info[i]["reduction"]) for i in range(stage + 1)
        ]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """The input as the first layer expects it (unchanged without input normalisation)."""
        if not self.normalises_input:
            return images
        return (images - self.input_mean) * self.input_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the feature map ``(B, C, H, W)`` of the feature stage."""
        return self.body.forward_intermediates(
            self.normalise(images), indices=[self.feature_stage], intermediates_only=True
        )[-1]

    def forward_stages(self, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The maps of the stages in ``indices`` followed by the feature map, in one pass.

        Returns:
            ``len(indices) + 1`` maps: the requested stages in ascending order, then the feature
            stage's map (so the last entry is always what ``forward`` returns).
        """
        wanted = sorted({*indices, self.feature_stage})
        maps = list(
            self.body.forward_intermediates(
                self.normalise(images), indices=wanted, intermediates_only=True
            )
        )
        by_stage = dict(zip(wanted, maps, strict=True))
        return [by_stage[i] for i in sorted(set(indices))] + [by_stage[self.feature_stage]]

    @torch.no_grad()
    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the feature map for a square input of ``image_size`` pixels."""
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            out = self(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            self.train(was_training)
        return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def check_architecture_name(name: str) -> None:
    """Refuse a ``model.backbone`` that is not a plain timm architecture name: timm resolves
    ``hf-hub:...`` and local-folder names itself, online, which a run never does unasked.

    Raises:
        ConfigError: naming ``model.backbone`` and where hub weights go instead.
    """
    if ":" not in name and "/" not in name:
        return
    try:
        weights = hub_weights.parse_hub_name(name)
    except ConfigError:
        weights = None
    if weights is None:
        suggestion = "model.backbone=resnet18 model.pretrained=hf-hub:timm/resnet18.a1_in1k"
    else:
        suggestion = f"model.backbone={weights.architecture or '<architecture>'} "
        suggestion += f"model.pretrained={weights.name}"
    raise ConfigError(
        f"model.backbone: {name!r} is not a timm architecture name (resnet18, tresnet_m, ...); "
        f"weights from the Hugging Face Hub go in model.pretrained: {suggestion}"
    )


def _read_weights_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise WeightsError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types
        raise WeightsError(
            f"cannot read weights file {path} with weights_only=True: {error}. "
            "Files that need arbitrary pickled objects are refused for safety; re-save the "
            "state_dict alone."
        ) from error


def extract_state_dict(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap the ASL/KRT format (``state_dict`` or ``model`` key) and DDP ``module.`` prefixes."""
    state = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: no state_dict of tensors found in this file")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def is_coco_trained(state: dict[str, torch.Tensor], path: Path, classifier_prefix: str) -> bool:
    """Whether a weights file was trained on MS-COCO (its classifier has 80 outputs, or its name
    says so), which leaks every future COCO class into class-incremental COCO results."""
    weight = state.get(f"{classifier_prefix}.weight")
    if weight is not None and weight.shape[0] == COCO_CLASSES:
        return True
    return bool(re.search(r"ms[-_]?coco", path.name, flags=re.IGNORECASE))


def load_backbone_weights(
    model: nn.Module,
    path: str | Path,
    classifier_prefix: str = "fc",
    ignore: Collection[str] = (),
) -> None:
    """Load a local weights file into a timm model, classifier dropped.

    ``ignore`` names tensors of the file to skip (those of stages pruned from the model).

    Raises:
        WeightsError: the file is missing, unreadable, or its tensors do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"pretrained weights file not found: {path}. Nothing is downloaded at run time: "
            "place the file there, point model.pretrained at it, or set model.pretrained=null "
            "to start from random weights."
        )
    state = extract_state_dict(_read_weights_file(path), path)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if broken:
        # Caught before training starts, so nothing of a run depends on these weights yet.
        raise WeightsError(
            f"{path}: {len(broken)} weight tensors are not finite (NaN or inf, e.g. "
            f"{broken[0]!r}): the file is damaged; restore or re-create it"
        )
    # timm ships converters for older layouts (e.g. the inplace-ABN TResNet keys of the ASL
    # model zoo); use the architecture's own converter when it has one.
    converter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if converter is not None:
        try:
            state = converter(state, model)
        except Exception as error:  # converters assume their own layout
            logger.debug("timm checkpoint converter skipped for %s: %s", path, error)
    if is_coco_trained(state, path, classifier_prefix):
        logger.warning(
            "%s looks COCO-trained: it has seen all 80 COCO classes, which leaks future classes "
            "into class-incremental COCO results (the KRT release uses such a file). Prefer "
            "ImageNet-21k weights (timm tresnet_m.miil_in21k) for honest numbers.",
            path,
        )
    state = {
        k: v
        for k, v in state.items()
        if not (k == classifier_prefix or k.startswith(f"{classifier_prefix}.") or k in ignore)
    }
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        key = mismatched[0]
        raise WeightsError(
            f"{path}: tensor {key!r} has shape {tuple(state[key].shape)} but the model expects "
            f"{tuple(own[key].shape)}: is this file for another architecture?"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Checkpoints from inplace-ABN models (the ASL zoo) carry no batch counters; those buffers
    # only matter for momentum-free batch norm and keep their initial value.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if unexpected:
        raise WeightsError(
            f"{path}: {len(unexpected)} tensors do not belong to this architecture, "
            f"e.g. {unexpected[0]!r}"
        )
    if missing:
        raise WeightsError(
            f"{path}: {len(missing)} tensors of the model are missing from the file, "
            f"e.g. {missing[0]!r}"
        )
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))
