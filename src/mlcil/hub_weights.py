"""Backbone weights from the Hugging Face Hub, read through huggingface_hub: opt-in, by name.

``model.pretrained`` may name hub weights in two ways:

- ``timm/<model>.<tag>``, timm's own name of a pretrained model (``timm/tresnet_m.miil_in21k``,
  the ImageNet-21k TResNet-M the KRT paper starts from); ``<model>`` must be ``model.backbone``;
- ``hf-hub:<owner>/<repo>``, any repository holding a timm state_dict (``hf-hub:timm/...``
  is the same as the form above).

Either may end in ``@<revision>`` (a branch, tag or commit) to pin the weights. Only these names
ever reach the network: a run, ``eval``, ``predict`` and ``mlcil.load`` of any other config touch
no network, and a run that names hub weights downloads them once, at its start, into the cache
huggingface_hub keeps (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), where timm
finds them too. With ``HF_HUB_OFFLINE=1`` nothing is downloaded: the weights must be cached
already (``mlcil weights fetch NAME`` on a machine with a network, e.g. a login node), and a
missing file stops the run before any work. ``eval``, ``predict``, ``mlcil.load`` and
``--resume`` never download: the checkpoint holds the weights.

The file read is ``model.safetensors`` (else ``pytorch_model.bin``, read with
``weights_only=True``); the repository's commit and the file's SHA-256 are recorded in the
run's ``metrics.json`` (``pretrained``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from mlcil import cache
from mlcil.errors import ConfigError, WeightsError

logger = logging.getLogger(__name__)

SCHEME = "hf-hub:"
TIMM_OWNER = "timm/"
# The files a timm repository holds its weights in, in the order timm itself tries them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_REVISION = re.compile(r"[\w./-]+")
# timm/<model>.<tag>: a name, not a local file (files end in a weights suffix).
_TIMM_NAME = re.compile(r"timm/([a-z0-9_]+)\.([A-Za-z0-9_-]+)")
_FILE_SUFFIXES = {"pth", "pt", "bin", "safetensors", "ckpt", "pkl", "tar", "npz", "h5"}
_TRUE = {"1", "on", "yes", "true"}


@dataclasses.dataclass(frozen=True)
class HubWeights:
    """A hub weights name, parsed.

    Attributes:
        name: as written in the config (``timm/tresnet_m.miil_in21k``).
        repo: the repository (``timm/tresnet_m.miil_in21k``).
        revision: the pinned revision, or None for the repository's default branch.
        architecture: the timm architecture the name implies (``tresnet_m``), None when the name
            does not say.
        timm_name: timm's ``<model>.<tag>`` name, whose pretrained config gives the input
            normalisation; None for repositories timm does not describe.
    """

    name: str
    repo: str
    revision: str | None
    architecture: str | None
    timm_name: str | None


def parse_hub_name(name: str | Path | None) -> HubWeights | None:
    """The hub weights ``name`` asks for, or None when it names something else (a file).

    Raises:
        ConfigError: an ``hf-hub:`` name that is not ``hf-hub:<owner>/<repo>[@<revision>]``.
    """
    if name is None:
        return None
    text = str(name)
    body, _, revision = text.partition("@")
    if body.startswith(SCHEME):
        repo = body[len(SCHEME) :]
        if not _REPO.fullmatch(repo) or (revision and not _REVISION.fullmatch(revision)):
            raise ConfigError(
                f"model.pretrained: {text!r} is not a hub name: write hf-hub:<owner>/<repo> "
                "(optionally @<revision>), e.g. hf-hub:timm/tresnet_m.miil_in21k"
            )
    else:
        match = _TIMM_NAME.fullmatch(body)
        if match is None or match.group(2) in _FILE_SUFFIXES:
            return None
        if revision and not _REVISION.fullmatch(revision):
            return None
        repo = body
    match = _TIMM_NAME.fullmatch(repo)
    architecture = match.group(1) if match else None
    timm_name = repo[len(TIMM_OWNER) :] if match else None
    return HubWeights(text, repo, revision or None, architecture, timm_name)


def is_hub_name(name: str | Path | None) -> bool:
    """Whether ``model.pretrained`` names hub weights (an invalid ``hf-hub:`` name counts)."""
    try:
        return parse_hub_name(name) is not None
    except ConfigError:
        return True


def _parsed(name: str) -> HubWeights:
    weights = parse_hub_name(name)
    if weights is None:
        raise ConfigError(f"{name!r} is not a hub weights name (hf-hub:<owner>/<repo>)")
    return weights


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (read now, not at import) forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_folder() -> Path | None:
    """The hub cache, from the environment as it is now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return None


def check_architecture(weights: HubWeights, backbone: str) -> None:
    """Refuse weights whose name says they belong to another timm architecture."""
    if weights.architecture is not None and weights.architecture != backbone:
        raise ConfigError(
            f"model.pretrained: {weights.name} holds {weights.architecture} weights, but "
            f"model.backbone is {backbone}: set model.backbone={weights.architecture}"
        )


def cached_file(name: str) -> Path | None:
    """The cached weights file of a hub name, looked up on disk only (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    weights = _parsed(name)
    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(
            weights.repo, filename, cache_dir=cache_folder(), revision=weights.revision
        )
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _errors() -> Any:
    try:
        return importlib.import_module("huggingface_hub.errors")
    except ImportError:  # older huggingface_hub: the same classes live in utils
        return importlib.import_module("huggingface_hub.utils")


def download(name: str, backbone: str | None = None) -> Path:
    """The weights file of a hub name: from the cache, else downloaded into it (unless
    ``HF_HUB_OFFLINE`` is set). This is the only function of mlcil that reaches the network.

    Raises:
        WeightsError: offline and not cached, no weights file in the repository, or the hub
            could not be reached (one line, naming the repository).
    """
    weights = _parsed(name)
    if backbone is not None:
        check_architecture(weights, backbone)
    cached = cached_file(name)
    if cached is not None:
        return cached
    if offline():
        raise WeightsError(not_cached_message(weights))
    from huggingface_hub import hf_hub_download

    errors = _errors()
    for filename in WEIGHT_FILES:
        try:
            logger.info("downloading %s from %s (once; cached afterwards)", filename, weights.repo)
            path = hf_hub_download(
                weights.repo, filename, revision=weights.revision, cache_dir=cache_folder()
            )
        except Exception as error:  # not found, gated, no network: many types
            # A file the repository lacks: try the next name. (LocalEntryNotFoundError, a
            # subclass, means the hub could not be asked at all.)
            local = getattr(errors, "LocalEntryNotFoundError", ())
            if isinstance(error, errors.EntryNotFoundError) and not isinstance(error, local):
                continue
            text = " ".join(str(error).split())[:300]
            raise WeightsError(
                f"model.pretrained: {name}: could not download from the Hugging Face Hub: "
                f"{type(error).__name__}: {text}"
            ) from error
        return Path(path)
    raise WeightsError(
        f"model.pretrained: {name}: the repository {weights.repo} holds none of "
        f"{', '.join(WEIGHT_FILES)}"
    )


def not_cached_message(weights: HubWeights) -> str:
    where = cache_folder() or "huggingface_hub's cache"
    return (
        f"model.pretrained: {weights.name} is not in the Hugging Face cache ({where}) and "
        "HF_HUB_OFFLINE is set, so it cannot be downloaded: run `mlcil weights fetch "
        f"{weights.name}` where there is a network (same HF_HUB_CACHE), or unset HF_HUB_OFFLINE"
    )


def local_weights(name: str) -> Path:
    """The cached file of a hub name, for building a network (never downloads).

    Raises:
        WeightsError: not cached, naming the command that fetches it.
    """
    cached = cached_file(name)
    if cached is None:
        raise WeightsError(
            f"model.pretrained: {name} is not in the Hugging Face cache "
            f"({cache_folder() or 'the default one'}): `mlcil weights fetch {name}` downloads it"
        )
    return cached


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (kept per path, size and time for this process)."""
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = cache.file_sha256(path)
    return _DIGESTS[key]


def provenance(name: str, path: Path) -> dict[str, Any]:
    """What a run records of its hub weights: the repository, the commit the cached file
    belongs to, the file and its SHA-256."""
    weights = _parsed(name)
    # The cache keeps each commit's files under snapshots/<commit>/.
    in_snapshot = path.parent.parent.name == "snapshots"
    return {
        "source": name,
        "repo": weights.repo,
        "revision": path.parent.name if in_snapshot else weights.revision,
        "requested_revision": weights.revision,
        "file": path.name,
        "sha256": file_sha256(path),
    }


def cached_provenance(name: str) -> dict[str, Any] | None:
    """The provenance of the cached file of a hub name (None when not cached); no network."""
    path = cached_file(name)
    return provenance(name, path) if path is not None else None


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` the weights expect, from timm's own pretrained config of the name (no
    network); None for identity statistics and for repositories timm does not describe."""
    from timm.models import get_pretrained_cfg

    weights = _parsed(name)
    config = get_pretrained_cfg(weights.timm_name) if weights.timm_name else None
    if config is None:
        return None
    mean, std = tuple(config.mean), tuple(config.std)
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return None  # e.g. TResNet: [0, 1] pixels in, exactly as no normalisation
    return mean, std
