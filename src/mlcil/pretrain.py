"""Leak-free pretraining of a benchmark's backbone: glyph scenes in, cached weights out.

KRT, like every published MLCIL method, starts from a backbone pretrained on classes outside the
benchmark. For the embedded digits benchmark no such weights can be downloaded, and pretraining on
the digits themselves would leak every future class. ``pretrain_backbone`` therefore trains the
benchmark's backbone (jointly, every class at once, a linear head) on multi-label scenes of
letters and symbols (:mod:`mlcil.data.glyphs`, no digit among them) and caches the trunk's
weights with their provenance (:mod:`mlcil.weights_cache`). A config asks for them with
``model.pretrained: pretrain:glyphs``; the weights are made on first use and reused afterwards
only when the provenance (source, classes, seed, backbone, stage, image size, recipe) matches.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from mlcil import hub_weights, imagenet
from mlcil.config.schema import ModelConfig, Params
from mlcil.data.glyphs import CACHE_VERSION, GLYPH_CLASSES, TEST_IMAGES, TRAIN_IMAGES, load_glyphs
from mlcil.engine.evaluate import evaluate_session
from mlcil.engine.fit import fit_session
from mlcil.engine.observers import LogObserver, Observers, ProgressObserver
from mlcil.errors import ConfigError
from mlcil.experiment import Experiment, load_config
from mlcil.metrics import mean_average_precision
from mlcil.weights_cache import find_cached, read_provenance, store, weights_dir

logger = logging.getLogger(__name__)

SCHEME = "pretrain:"
SOURCES = ("glyphs",)


class PretrainRecipe(Params):
    """How the backbone is trained on the glyph scenes (part of the weights' provenance)."""

    # Fixed before any digits run (not tuned on the benchmark): twice the digits benchmark's
    # batch, its learning rate, and epochs enough for the loss to flatten on 5,000 scenes.
    epochs: Annotated[int, Field(gt=0)] = 16
    batch_size: Annotated[int, Field(gt=0)] = 32
    lr: Annotated[float, Field(gt=0)] = 1e-3
    seed: Annotated[int, Field(ge=0)] = 0
    augment: list[str] = Field(default_factory=lambda: ["cutout"])
    train_images: Annotated[int, Field(gt=0)] = TRAIN_IMAGES  # glyph scenes to train on
    test_images: Annotated[int, Field(gt=0)] = TEST_IMAGES  # held-out scenes (reported mAP)


def provenance(model: ModelConfig, image_size: int, recipe: PretrainRecipe) -> dict[str, Any]:
    """What defines the weights ``pretrain_backbone`` makes for this backbone and recipe."""
    return {
        "source": f"glyphs-v{CACHE_VERSION}",
        "classes": list(GLYPH_CLASSES),
        "seed": recipe.seed,
        "backbone": model.backbone,
        "feature_stage": model.feature_stage,
        "image_size": image_size,
        "recipe": recipe.model_dump(),
    }


def _training_overrides(model: ModelConfig, image_size: int, recipe: PretrainRecipe) -> list[str]:
    stage = "null" if model.feature_stage is None else str(model.feature_stage)
    return [
        "data.dataset=glyphs",
        f"data.image_size={image_size}",
        f"data.augment=[{', '.join(recipe.augment)}]",
        "data.num_workers=0",
        f"protocol=B{len(GLYPH_CLASSES)}-C1",
        "method.name=joint",
        "model.network=linear",
        f"model.backbone={model.backbone}",
        f"model.feature_stage={stage}",
        "model.pretrained=null",
        f"seed={recipe.seed}",
        f"train.epochs={recipe.epochs}",
        f"train.batch_size={recipe.batch_size}",
        f"train.lr={recipe.lr}",
        # The classification loss summed over each batch (R = the batch), as the recipe was set.
        f"loss.reference_images={recipe.batch_size}",
        "train.tensorboard=false",
    ]


def pretrain_backbone(
    model: ModelConfig,
    image_size: int,
    recipe: PretrainRecipe | None = None,
    cache: Path | None = None,
    command: str | None = None,
) -> Path:
    """The cached glyph-pretrained weights of ``model``'s backbone, trained now if missing.

    Args:
        model: the benchmark's model section (backbone and feature stage matter).
        image_size: the benchmark's input size.
        recipe: training settings; None: the default recipe.
        cache: the weights cache folder; None: ``weights_dir()``.
        command: the command line recorded in the provenance; None: this process's.

    Returns:
        The ``.safetensors`` file (the truncated trunk's tensors, timm key names).
    """
    recipe = recipe or PretrainRecipe()
    wanted = provenance(model, image_size, recipe)
    cached = find_cached(wanted, cache)
    if cached is not None:
        logger.info("using cached glyph-pretrained backbone %s", cached)
        return cached
    check_cache_folder(Path(cache) if cache is not None else weights_dir())
    logger.info("pretraining %s on glyph scenes (one-time; cached afterwards)", model.backbone)
    started = time.perf_counter()
    load_before = load_average()
    config = load_config(None, _training_overrides(model, image_size, recipe))
    sources = (
        load_glyphs("train", recipe.train_images, recipe.seed, image_size),
        load_glyphs("test", recipe.test_images, recipe.seed, image_size),
    )
    experiment = Experiment(config, sources)
    method = experiment.build_method()
    session = experiment.sessions[0]  # joint training: one session of every glyph class
    train_set, _ = experiment.train_set(session, experiment.new_memory())
    context = experiment.context(session, train_set)
    method.begin_session(context)
    observer = Observers([LogObserver(), ProgressObserver()])
    try:
        fit_session(method, context, experiment.config.train, observer)
    finally:
        observer.close()
    scores, targets = evaluate_session(experiment, method, session)
    test_map = mean_average_precision(scores, targets)
    record = {
        **wanted,
        "command": command if command is not None else " ".join(sys.argv),
        "result": {"glyph_test_map": test_map, "seconds": round(time.perf_counter() - started)},
        "environment": machine_record(load_before),
    }
    path = store(method.network.backbone.body.state_dict(), record, cache)
    logger.info("glyph pretraining: %.1f test mAP; weights %s", test_map, path)
    return path


def check_cache_folder(folder: Path) -> None:
    """Refuse to start a pretraining whose weights could not be stored: the cache folder is a
    file (or under one), or cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"the weights cache {folder} is not a folder mlcil can create ({error.strerror}): "
            "a pretraining would be lost; set MLCIL_CACHE to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"the weights cache {folder} is not writable: a pretraining would be lost; set "
            "MLCIL_CACHE to a writable folder"
        )


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_record(load_before: list[float] | None) -> dict[str, Any]:
    """Where and how the pretraining ran: float sums depend on the thread count and the CPU, and
    a loaded machine shows in the time, so the demo's spread between machines can be traced."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_before,
        "load_average_end": load_average(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "torch_version": torch.__version__,
    }


def cached_provenance(model: ModelConfig, image_size: int) -> dict[str, Any] | None:
    """The provenance of the cached file a ``pretrain:<source>``, ``imagenet:`` or hub name
    resolves to (None for other weights, or when no such file is cached); never trains and never
    reaches the network."""
    name = model.pretrained
    if hub_weights.is_hub_name(name):
        assert name is not None
        return hub_weights.cached_provenance(name)
    if imagenet.is_imagenet_name(name):
        assert name is not None
        return imagenet.cached_imagenet_provenance(name[len(imagenet.SCHEME) :])
    if name is None or not name.startswith(SCHEME) or name[len(SCHEME) :] not in SOURCES:
        return None
    path = find_cached(provenance(model, image_size, PretrainRecipe()))
    return read_provenance(path) if path is not None else None


def resolve_pretrained(model: ModelConfig, image_size: int) -> tuple[ModelConfig, dict | None]:
    """``model`` with a ``pretrain:<source>`` or ``imagenet:<name>`` weights name replaced by the
    cached file (made on first use), and that file's provenance. Hub weights are downloaded
    into the hub cache when missing (unless ``HF_HUB_OFFLINE``) and keep their name, which the
    network reads from the cache. Other models are returned unchanged with None."""
    name = model.pretrained
    if hub_weights.is_hub_name(name):
        assert name is not None
        path = hub_weights.download(name, model.backbone)
        return model, hub_weights.provenance(name, path)
    if imagenet.is_imagenet_name(name):
        assert name is not None
        path = imagenet.imagenet_weights(name[len(imagenet.SCHEME) :])
        # "auto" normalisation follows the weights' name, which the file path no longer shows.
        normalise = "imagenet" if model.input_normalisation == "auto" else model.input_normalisation
        update = {"pretrained": str(path), "input_normalisation": normalise}
        return model.model_copy(update=update), read_provenance(path)
    if name is None or not name.startswith(SCHEME):
        return model, None
    source = name[len(SCHEME) :]
    if source not in SOURCES:
        raise ConfigError(
            f"model.pretrained: {name!r} names no pretraining source; known: "
            + ", ".join(SCHEME + s for s in SOURCES)
        )
    path = pretrain_backbone(model, image_size)
    return model.model_copy(update={"pretrained": str(path)}), read_provenance(path)
