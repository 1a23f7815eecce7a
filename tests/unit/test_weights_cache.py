"""The cache of pretrained backbone weights and its provenance checks."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import mlcil
from mlcil import weights_cache
from mlcil.errors import MlcilError, WeightsError
from mlcil.weights_cache import find_cached, provenance_key, read_provenance, store


def make_provenance(**changes: Any) -> dict[str, Any]:
    provenance = {
        "source": "glyphs-v1",
        "classes": ["A", "B", "C"],
        "seed": 0,
        "backbone": "resnet18",
        "feature_stage": 2,
        "image_size": 48,
        "recipe": {"epochs": 10, "lr": 1e-3, "batch_size": 32},
        "command": "mlcil pretrain --seed 0",
    }
    provenance.update(changes)
    return provenance


def make_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn1.running_mean": torch.randn(4, generator=generator).to(torch.bfloat16),
        "bn1.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        # A non-contiguous view must be saved as its values, not rejected.
        "fc.weight": torch.randn(3, 5, generator=generator).t(),
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "mlcil-cache"))
    return tmp_path / "explicit"


def test_key_is_16_hex_and_ignores_bookkeeping_and_key_order() -> None:
    key = provenance_key(make_provenance())
    assert len(key) == 16 and int(key, 16) >= 0
    shuffled = dict(reversed(list(make_provenance().items())))
    assert provenance_key(shuffled) == key
    bookkeeping = make_provenance(
        command="other command", created="2020-01-01T00:00:00+00:00", mlcil_version="9.9"
    )
    assert provenance_key(bookkeeping) == key
    assert provenance_key(make_provenance(classes=("A", "B", "C"))) == key  # JSON: tuple == list


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"classes": ["A", "B"]},
        {"classes": ["B", "A", "C"]},
        {"recipe": {"epochs": 10, "lr": 2e-3, "batch_size": 32}},
        {"feature_stage": 3},
        {"source": "glyphs-v2"},
        {"extra_setting": True},  # an unknown field still defines the weights
    ],
)
def test_key_changes_with_every_defining_field(change: dict[str, Any]) -> None:
    assert provenance_key(make_provenance(**change)) != provenance_key(make_provenance())


def test_key_matches_a_hand_computed_hash() -> None:
    import hashlib

    canonical = (
        '{"backbone":"resnet18","classes":["A","B","C"],"feature_stage":2,"image_size":48,'
        '"recipe":{"batch_size":32,"epochs":10,"lr":0.001},"seed":0,"source":"glyphs-v1"}'
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert provenance_key(make_provenance()) == expected


def test_invalid_provenance_is_named() -> None:
    incomplete = make_provenance()
    del incomplete["seed"]
    with pytest.raises(MlcilError, match="seed"):
        provenance_key(incomplete)
    with pytest.raises(MlcilError, match="JSON"):
        provenance_key(make_provenance(recipe={"lr": float("nan")}))
    with pytest.raises(MlcilError, match="JSON"):
        provenance_key(make_provenance(classes={"A"}))


def test_store_then_find_round_trips_the_tensors_exactly(cache: Path) -> None:
    state = make_state()
    path = store(state, make_provenance(), cache=cache)
    key = provenance_key(make_provenance())
    assert path == cache / f"{key}.safetensors"
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.json", f"{key}.safetensors"]
    found = find_cached(make_provenance(command="a later command"), cache=cache)
    assert found == path
    loaded = weights_cache.load_cached(found)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"provenance_key": key}


def test_stored_provenance_is_completed(cache: Path) -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    path = store(make_state(), make_provenance(), cache=cache)
    stored = read_provenance(path)
    created = datetime.datetime.fromisoformat(stored["created"])
    assert created.utcoffset() == datetime.timedelta(0) and created >= before
    assert stored["mlcil_version"] == mlcil.__version__
    assert stored["command"] == "mlcil pretrain --seed 0"
    assert len(stored["weights_sha256"]) == 64
    assert {k: stored[k] for k in make_provenance()} == make_provenance()


def test_default_folder_is_beside_the_data_cache(cache: Path) -> None:
    path = store(make_state(), make_provenance())
    assert path.parent == cache.parent / "mlcil-cache" / "weights"
    assert find_cached(make_provenance()) == path


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"classes": ["A", "B", "C", "D"]},
        {"recipe": {"epochs": 11, "lr": 1e-3, "batch_size": 32}},
        {"image_size": 64},
    ],
)
def test_other_provenance_is_not_found(cache: Path, change: dict[str, Any]) -> None:
    store(make_state(), make_provenance(), cache=cache)
    assert find_cached(make_provenance(**change), cache=cache) is None


def _json_of(path: Path) -> Path:
    return path.with_suffix(".json")


def test_a_json_that_disagrees_is_not_reused(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = store(make_state(), make_provenance(), cache=cache)
    tampered = json.loads(_json_of(path).read_text())
    tampered["seed"] = 5  # same file name, but the weights were made with another seed
    _json_of(path).write_text(json.dumps(tampered))
    with caplog.at_level(logging.INFO, logger="mlcil.weights_cache"):
        assert find_cached(make_provenance(), cache=cache) is None
    assert "differs in ['seed']" in caplog.text


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]"])
def test_a_corrupt_json_is_not_reused(
    cache: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    path = store(make_state(), make_provenance(), cache=cache)
    _json_of(path).write_text(content)
    with caplog.at_level(logging.INFO, logger="mlcil.weights_cache"):
        assert find_cached(make_provenance(), cache=cache) is None
    assert "not reusing" in caplog.text and path.name in caplog.text
    with pytest.raises(WeightsError, match=_json_of(path).name):
        read_provenance(path)


def test_weights_without_json_are_not_reused(cache: Path) -> None:
    path = store(make_state(), make_provenance(), cache=cache)
    _json_of(path).unlink()
    assert find_cached(make_provenance(), cache=cache) is None


def test_changed_weights_are_not_reused(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = store(make_state(), make_provenance(), cache=cache)
    other = make_state()
    other["conv1.weight"] = other["conv1.weight"] + 1
    # Overwrite the tensors behind the cache's back: the recorded checksum no longer holds.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.items()}, str(path))
    with caplog.at_level(logging.INFO, logger="mlcil.weights_cache"):
        assert find_cached(make_provenance(), cache=cache) is None
    assert "SHA-256" in caplog.text


def test_storing_again_replaces_the_pair(cache: Path) -> None:
    store(make_state(), make_provenance(), cache=cache)
    newer = {"w": torch.arange(6.0)}
    path = store(newer, make_provenance(command="second run"), cache=cache)
    assert find_cached(make_provenance(), cache=cache) == path
    assert torch.equal(weights_cache.load_cached(path)["w"], torch.arange(6.0))
    assert read_provenance(path)["command"] == "second run"
    assert len(list(cache.iterdir())) == 2  # no temporary file left behind


def test_non_tensor_values_are_refused(cache: Path) -> None:
    with pytest.raises(MlcilError, match="'bad'"):
        store({"good": torch.zeros(1), "bad": [1.0]}, make_provenance(), cache=cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_missing_weights_file_reads_as_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing.safetensors"):
        weights_cache.load_cached(tmp_path / "missing.safetensors")
