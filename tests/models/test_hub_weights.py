"""Weights from the Hugging Face Hub, opt-in by name (``model.pretrained: timm/<model>.<tag>`` or
``hf-hub:<repo>``), read from the cache huggingface_hub keeps; tested offline against a hub cache
folder the test builds (the layout huggingface_hub writes: refs/main naming a snapshot)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mlcil import hub_weights
from mlcil.cli import main
from mlcil.config.schema import ModelConfig
from mlcil.errors import ConfigError, WeightsError
from mlcil.models import Backbone, input_normalisation
from tiny import tiny_overrides

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAME = "timm/resnet18.a1_in1k"


def build_hub_cache(root: Path, repo: str = NAME, seed: int = 0) -> Path:
    """A hub cache holding ``repo``'s model.safetensors (a seeded timm resnet18, classifier and
    all, as timm publishes it) at commit ``COMMIT``; returns the weights file."""
    torch.manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "mlcil-cache"))
    return cache


def test_hub_names_are_parsed_and_files_are_not_hub_names() -> None:
    weights = hub_weights.parse_hub_name("timm/tresnet_m.miil_in21k")
    assert weights is not None
    assert (weights.repo, weights.architecture, weights.revision) == (
        "timm/tresnet_m.miil_in21k", "tresnet_m", None
    )  # fmt: skip
    pinned = hub_weights.parse_hub_name(f"hf-hub:timm/resnet18.a1_in1k@{COMMIT}")
    assert pinned is not None and (pinned.repo, pinned.revision) == (NAME, COMMIT)
    other = hub_weights.parse_hub_name("hf-hub:someone/weights")
    assert other is not None and other.architecture is None and other.timm_name is None
    for local in ("timm/resnet18.pth", "weights/resnet18.a1_in1k", "./timm/resnet18.a1_in1k",
                  "pretrained_models/tresnet_m_224_21k.pth", None):  # fmt: skip
        assert hub_weights.parse_hub_name(local) is None, local
    with pytest.raises(ConfigError, match="is not a hub name: write hf-hub:<owner>/<repo>"):
        hub_weights.parse_hub_name("hf-hub:no-owner")


def test_the_cached_file_loads_into_the_backbone_offline(hub_cache: Path) -> None:
    path = build_hub_cache(hub_cache)
    assert hub_weights.cached_file(NAME) == path
    backbone = Backbone("resnet18", feature_stage=2, pretrained=NAME)
    torch.manual_seed(0)
    expected = timm.create_model("resnet18", pretrained=False).state_dict()
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # The input normalisation timm's pretrained config gives these weights (no network).
    assert input_normalisation(ModelConfig(backbone="resnet18", pretrained=NAME)) == (
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    tresnet = ModelConfig(backbone="tresnet_m", pretrained="timm/tresnet_m.miil_in21k")
    assert input_normalisation(tresnet) is None  # TResNet reads [0, 1] pixels as they are
    provenance = hub_weights.provenance(NAME, path)
    assert provenance == {
        "source": NAME,
        "repo": NAME,
        "revision": COMMIT,
        "requested_revision": None,
        "file": "model.safetensors",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def test_offline_and_not_cached_stops_before_any_work(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--config", "digits-b0-c2", f"model.pretrained={NAME}", "--run-dir",
            str(run_dir)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: model.pretrained: {NAME} is not in the Hugging Face cache ({hub_cache})" in err
    assert f"`mlcil weights fetch {NAME}`" in err
    assert not run_dir.exists()
    assert main([*args, "--dry-run"]) == 0  # the plan says so instead
    assert "[NOT CACHED, and HF_HUB_OFFLINE is set: training would stop here" in (
        capsys.readouterr().out
    )
    with pytest.raises(WeightsError, match="not in the Hugging Face cache"):
        hub_weights.download(NAME)
    assert main(["weights", "fetch", NAME]) == 2


def test_a_run_from_hub_weights_records_their_revision_and_hash(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = build_hub_cache(hub_cache)
    assert main(["weights", "fetch", NAME, "--backbone", "resnet18"]) == 0  # cached: offline ok
    fetched = capsys.readouterr().out
    assert json.loads(fetched[: fetched.rindex("}") + 1])["revision"] == COMMIT
    assert f"weights: {path}" in fetched
    assert main(["train", "--config", "digits-b0-c2", f"model.pretrained={NAME}", "--dry-run"]) == 0
    assert f"pretrained weights: {NAME} [cached: revision {COMMIT}, model.safetensors]" in (
        capsys.readouterr().out
    )
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(model__pretrained=NAME, protocol="B0-C10", train__batch_size="64")
    args = ["-q", "train", "--config", "digits-b0-c2", "--run-dir", str(run_dir), *overrides,
            "model.embed_dim=32", "model.num_heads=4"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pretrained"]["revision"] == COMMIT
    assert metrics["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"loaded backbone weights from {path}" in (run_dir / "train.log").read_text()
    assert f"pretrained: {NAME}" in (run_dir / "config.yaml").read_text()  # the name, kept
    # eval and predict read the checkpoint: the hub cache is not needed any more.
    (hub_cache / f"models--{NAME.replace('/', '--')}").rename(tmp_path / "moved")
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_weights_for_another_architecture_and_hub_backbones_are_refused(
    hub_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_hub_cache(hub_cache)
    assert main(["train", "--config", "digits-b0-c2", f"model.pretrained={NAME}",
                 "model.backbone=resnet34", "--dry-run"]) == 2  # fmt: skip
    assert (
        f"model.pretrained: {NAME} holds resnet18 weights, but model.backbone is resnet34"
        in capsys.readouterr().err
    )
    assert main(["train", "--config", "digits-b0-c2", f"model.backbone=hf-hub:{NAME}",
                 "--dry-run"]) == 2  # fmt: skip
    assert (
        f"model.backbone: 'hf-hub:{NAME}' is not a timm architecture name (resnet18, tresnet_m, "
        f"...); weights from the Hugging Face Hub go in model.pretrained: model.backbone=resnet18 "
        f"model.pretrained=hf-hub:{NAME}"
    ) in capsys.readouterr().err
