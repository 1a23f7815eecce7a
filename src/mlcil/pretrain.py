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

import dataclasses
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
from mlcil.config.schema import LossConfig, ModelConfig, Params, TrainConfig
from mlcil.data.glyphs import CACHE_VERSION, GLYPH_CLASSES, TEST_IMAGES, TRAIN_IMAGES, load_glyphs
from mlcil.data.transforms import build_transform
from mlcil.engine.callbacks import CallbackList, RunView
from mlcil.engine.evaluate import evaluate_session
from mlcil.engine.fit import fit_session
from mlcil.engine.inputs import RunData
from mlcil.engine.observers import LogCallback, ProgressCallback
from mlcil.errors import ConfigError
from mlcil.memory import ExemplarMemory
from mlcil.methods import METHODS, Method
from mlcil.metrics import mean_average_precision
from mlcil.models import NETWORKS
from mlcil.protocol import Session
from mlcil.runtime import Runtime, seed_everything
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


def _glyph_data(image_size: int, recipe: PretrainRecipe) -> RunData:
    """The glyph scenes as the engine reads them: one session of every glyph class (joint
    training), the recipe's augmentation and batch."""
    train = load_glyphs("train", recipe.train_images, recipe.seed, image_size)
    test = load_glyphs("test", recipe.test_images, recipe.seed, image_size)
    every = list(range(len(train.class_names)))
    return RunData(
        train_source=train,
        test_source=test,
        class_names=tuple(train.class_names),
        sessions=(Session(index=0, new_classes=every, seen_classes=every),),
        seed=recipe.seed,
        train_transform=build_transform(image_size, True, list(recipe.augment), "torchvision"),
        eval_transform=build_transform(image_size, False),
        overlap="all",
        batch_size=recipe.batch_size,
        eval_batch_size=2 * recipe.batch_size,
    )


def _glyph_method(model: ModelConfig, image_size: int, recipe: PretrainRecipe) -> Method:
    """Joint training of the benchmark's backbone (no pretrained weights) under a linear head;
    the classification loss summed over each batch (R = the batch), as the recipe was set."""
    linear = ModelConfig(
        backbone=model.backbone,
        feature_stage=model.feature_stage,
        network="linear",
        pretrained=None,
        params=NETWORKS.get_class("linear").Params(),
    )
    joint = METHODS.get_class("joint")
    seed_everything(recipe.seed)  # the head's and trunk's initial weights
    network = joint.build_network(linear, image_size)
    return joint(joint.Params(), network, LossConfig(reference_images=recipe.batch_size))


def pretrain_backbone(
    model: ModelConfig,
    image_size: int,
    recipe: PretrainRecipe | None = None,
    cache: Path | None = None,
    command: str | None = None,
    *,
    runtime: Runtime,
) -> Path:
    """The cached glyph-pretrained weights of ``model``'s backbone, trained now if missing.

    Args:
        model: the benchmark's model section (backbone and feature stage matter).
        image_size: the benchmark's input size.
        recipe: training settings; None: the default recipe.
        cache: the weights cache folder; None: ``weights_dir()``.
        command: the command line recorded in the provenance; None: this process's.
        runtime: the entry point's runtime; the pretraining runs on its device, precision and
            processes, with the glyph scenes in memory (no loader workers) and uncompiled.

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
    runtime = dataclasses.replace(runtime, num_workers=0, persistent_loaders=False, compile=False)
    data = _glyph_data(image_size, recipe)
    method = _glyph_method(model, image_size, recipe)
    method.network.to(runtime.device)
    method.runtime = runtime
    session = data.sessions[0]  # joint training: one session of every glyph class
    train_set, _ = data.train_set(session, ExemplarMemory(per_class=0))
    context = data.context(session, train_set, runtime)
    method.begin_session(context)
    train = TrainConfig(
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, tensorboard=False
    )
    hooks = CallbackList(RunView(data, runtime), [LogCallback(), ProgressCallback()])
    try:
        fit_session(method, context, train, hooks)
    finally:
        hooks.teardown()
    scores, targets = evaluate_session(data, runtime, method, session)
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


def resolve_pretrained(
    model: ModelConfig, image_size: int, *, runtime: Runtime
) -> tuple[ModelConfig, dict | None]:
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
    path = pretrain_backbone(model, image_size, runtime=runtime)
    return model.model_copy(update={"pretrained": str(path)}), read_provenance(path)
