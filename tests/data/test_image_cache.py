"""The image cache (decoded, resized images in memory-mapped shards) and the annotation cache.

The central claim: a cached image goes through every transform to the *same tensor* as the
decoded file, seeded alike; the cache is a speed-up, never a change of the data.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import mlcil.data.coco as coco_module
import mlcil.data.image_cache as image_cache
import mlcil.data.voc as voc_module
from mlcil.config.schema import DataConfig
from mlcil.data import build_image_cache, build_sources
from mlcil.data.base import ArrayImageSource, FileImageSource
from mlcil.data.coco import load_coco
from mlcil.data.image_cache import (
    PROVENANCE,
    CachedImageSource,
    ensure_image_cache,
    shard_name,
)
from mlcil.data.synthetic import write_synthetic_coco
from mlcil.data.transforms import build_transform
from mlcil.data.voc import load_voc
from mlcil.errors import ConfigError, DataError

SIZE = 64


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train and 4 test images at COCO's 640 x 480, in the published layout."""
    root = tmp_path_factory.mktemp("synthetic") / "coco"
    write_synthetic_coco(root, train_images=8, val_images=4, seed=0, image_size=(640, 480))
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every cache of these tests (annotations included) out of the user's cache folder."""
    folder = tmp_path / "mlcil-cache"
    monkeypatch.setenv("MLCIL_CACHE", str(folder))
    return folder


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three images per shard at SIZE, so that a split spans several shards."""
    monkeypatch.setattr(image_cache, "SHARD_BYTES", 3 * SIZE * SIZE * 3)


def coco_config(root: Path, cache: Path, **changes: object) -> DataConfig:
    fields: dict[str, object] = {
        "dataset": "coco",
        "root": str(root),
        "image_cache": True,
        "image_cache_dir": str(cache),
        "image_size": SIZE,
        "num_workers": 2,
    }
    return DataConfig(**{**fields, **changes})  # type: ignore[arg-type]


def copy_tree(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / root.name
    shutil.copytree(root, copy)
    return copy


def seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int):
    """``transform(image)`` with every generator a transform may draw from seeded."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return transform(image)


def original(cached: CachedImageSource) -> FileImageSource:
    return cached.original


# ---------------------------------------------------------------------------------------------
# identity of the tensors


TRAIN_PIPELINES = [
    pytest.param(("cutout", "randaugment"), "torchvision", id="default"),
    pytest.param(("hflip", "cutout", "randaugment"), "torchvision", id="hflip"),
    pytest.param(("cutout", "randaugment"), "released", id="released"),
]


@pytest.mark.parametrize(("augment", "randaugment"), TRAIN_PIPELINES)
def test_cached_images_give_the_same_tensors_as_decoded_files(
    synthetic_coco, tmp_path, small_shards, augment, randaugment
):
    train, test = build_sources(coco_config(synthetic_coco, tmp_path / "images"))
    assert isinstance(train, CachedImageSource) and isinstance(test, CachedImageSource)
    assert train.sizes == [3, 3, 2]  # the images span several shards
    train_transform = build_transform(SIZE, True, augment, randaugment)
    eval_transform = build_transform(SIZE, False)
    for source in (train, test):
        for index in range(len(source)):
            decoded, cached = original(source).load_image(index), source.load_image(index)
            assert decoded.size == (640, 480) and cached.size == (SIZE, SIZE)
            assert torch.equal(eval_transform(decoded), eval_transform(cached))
            for seed in (index, 1000 + index):
                expected = seeded(train_transform, decoded, seed)
                assert torch.equal(expected, seeded(train_transform, cached, seed))
    # Not vacuous: the images differ from one another, and the seeds change the augmentation.
    first, second = train.load_image(0), train.load_image(1)
    assert not torch.equal(eval_transform(first), eval_transform(second))
    assert not torch.equal(seeded(train_transform, first, 1), seeded(train_transform, first, 2))


def test_a_cache_made_with_another_resize_would_be_caught(synthetic_coco):
    # The identity test above can fail: pixels resized any other way give other tensors.
    source = load_coco(synthetic_coco, "train")
    eval_transform = build_transform(SIZE, False)
    decoded = source.load_image(0)
    nearest = Image.fromarray(np.asarray(decoded.resize((SIZE, SIZE), Image.Resampling.NEAREST)))
    assert not torch.equal(eval_transform(decoded), eval_transform(nearest))


def test_the_cached_pixels_are_the_transforms_own_resize(synthetic_coco, tmp_path):
    train, _ = build_sources(coco_config(synthetic_coco, tmp_path / "images"))
    resize = T.Resize((SIZE, SIZE))
    for index in range(len(train)):
        expected = np.asarray(resize(original(train).load_image(index)))
        assert np.array_equal(np.asarray(train.load_image(index)), expected)


def test_a_transform_that_does_not_start_with_a_plain_resize_is_refused(
    synthetic_coco, tmp_path, monkeypatch
):
    def cropping(image_size, train, augment=(), randaugment="torchvision"):
        return T.Compose([T.CenterCrop(image_size), T.PILToTensor()])

    monkeypatch.setattr("mlcil.data.transforms.build_transform", cropping)
    with pytest.raises(ConfigError, match=r"data.image_cache: .*Resize\(\(64, 64\)\)"):
        build_sources(coco_config(synthetic_coco, tmp_path / "images"))


# ---------------------------------------------------------------------------------------------
# reuse, staleness, atomic writes


def test_a_valid_cache_is_reused_without_decoding(synthetic_coco, tmp_path, monkeypatch, caplog):
    config = coco_config(synthetic_coco, tmp_path / "images")
    first = build_image_cache(config)
    assert first["images"] == 12 and first["bytes"] == 12 * SIZE * SIZE * 3
    assert all(split["built"] for split in first["splits"].values())
    expected = np.asarray(build_sources(config)[0].load_image(5))

    def no_decoding(self, index):
        raise AssertionError("a valid cache must not decode image files")

    monkeypatch.setattr(FileImageSource, "load_image", no_decoding)
    with caplog.at_level(logging.WARNING):
        second = build_image_cache(config)
        train, _ = build_sources(config)
    assert not any(split["built"] for split in second["splits"].values())
    assert second["path"] == str(tmp_path / "images")
    assert np.array_equal(np.asarray(train.load_image(5)), expected)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_changed_image_file_rebuilds_the_cache_with_a_warning(synthetic_coco, tmp_path, caplog):
    root = copy_tree(synthetic_coco, tmp_path)
    config = coco_config(root, tmp_path / "images")
    train, _ = build_sources(config)
    changed = original(train).image_path(2)
    Image.new("RGB", (320, 240), (10, 200, 30)).save(changed, quality=90)
    with caplog.at_level(logging.WARNING, logger="mlcil.data.image_cache"):
        rebuilt, _ = build_sources(config)
    assert isinstance(rebuilt, CachedImageSource)
    assert rebuilt.folder == train.folder  # the same folder, replaced in place
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "rebuilding" in warning and str(changed) in warning
    assert np.asarray(rebuilt.load_image(2))[0, 0].tolist() == [10, 200, 30]


def test_a_truncated_shard_rebuilds_the_cache_with_a_warning(
    synthetic_coco, tmp_path, small_shards, caplog
):
    config = coco_config(synthetic_coco, tmp_path / "images")
    train, _ = build_sources(config)
    expected = np.asarray(train.load_image(4))
    shard = train.folder / shard_name(1)
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="mlcil.data.image_cache"):
        rebuilt, _ = build_sources(config)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(shard) in warning and "rebuilding" in warning
    assert np.array_equal(np.asarray(rebuilt.load_image(4)), expected)


def test_a_provenance_that_disagrees_rebuilds_the_cache(synthetic_coco, tmp_path, caplog):
    config = coco_config(synthetic_coco, tmp_path / "images")
    train, _ = build_sources(config)
    record_path = train.folder / PROVENANCE
    record = json.loads(record_path.read_text())
    record["identity"]["pillow"] = "0.0"
    record_path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="mlcil.data.image_cache"):
        build_sources(config)
    assert any("disagrees on ['pillow']" in r.getMessage() for r in caplog.records)
    assert json.loads(record_path.read_text())["identity"]["pillow"] != "0.0"


def test_a_missing_image_file_fails_the_rebuild_naming_it(synthetic_coco, tmp_path):
    root = copy_tree(synthetic_coco, tmp_path)
    config = coco_config(root, tmp_path / "images")
    train, _ = build_sources(config)
    missing = original(train).image_path(3)
    missing.unlink()
    with pytest.raises(DataError, match=f"image file not found: {missing}"):
        build_sources(config)


def test_an_interrupted_build_is_never_accepted(
    synthetic_coco, tmp_path, small_shards, monkeypatch
):
    config = coco_config(synthetic_coco, tmp_path / "images")
    decode = FileImageSource.load_image

    def failing(self, index):
        if self.split == "train" and index == 6:  # in the third shard: two are complete
            raise DataError("simulated failure")
        return decode(self, index)

    monkeypatch.setattr(FileImageSource, "load_image", failing)
    with pytest.raises(DataError, match="simulated failure"):
        build_sources(config)
    (folder,) = (tmp_path / "images").iterdir()
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["build.lock", shard_name(0), shard_name(1)]  # no record, no temp file
    monkeypatch.setattr(FileImageSource, "load_image", decode)
    train, _ = build_sources(config)
    assert isinstance(train, CachedImageSource) and (folder / PROVENANCE).is_file()
    expected = np.asarray(T.Resize((SIZE, SIZE))(original(train).load_image(6)))
    assert np.array_equal(np.asarray(train.load_image(6)), expected)


def test_a_build_that_does_not_fit_on_the_disk_is_refused(synthetic_coco, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(DataError, match=r"needs 0\.0 GB in .*images.*data\.image_cache_dir"):
        build_sources(coco_config(synthetic_coco, tmp_path / "images"))


# ---------------------------------------------------------------------------------------------
# the source itself, and which datasets are cached


def test_a_pickled_cached_source_carries_no_pixels(synthetic_coco, tmp_path):
    train, _ = build_sources(coco_config(synthetic_coco, tmp_path / "images", image_size=224))
    expected = np.asarray(train.load_image(7))  # opens the shard's memory map
    payload = pickle.dumps(train)
    assert len(payload) < 100_000 < train.nbytes  # what a DataLoader worker receives
    copy = pickle.loads(payload)
    assert np.array_equal(np.asarray(copy.load_image(7)), expected)
    with pytest.raises(IndexError):
        copy.load_image(len(copy))


def test_labels_refs_and_class_order_are_the_original_ones(synthetic_coco, tmp_path):
    plain_train, _ = build_sources(coco_config(synthetic_coco, tmp_path / "x", image_cache=False))
    order = list(reversed(plain_train.class_names))
    train, test = build_sources(coco_config(synthetic_coco, tmp_path / "images", class_order=order))
    reference, _ = build_sources(
        coco_config(synthetic_coco, tmp_path / "x", image_cache=False, class_order=order)
    )
    assert isinstance(train, CachedImageSource)
    assert train.class_names == reference.class_names == order
    assert np.array_equal(train.labels, reference.labels)
    assert train.image_refs == reference.image_refs
    assert (train.dataset, train.split, test.split) == ("coco", "train", "test")
    assert train.label_density == reference.label_density
    assert not (tmp_path / "x").exists()  # image_cache: false writes no image cache


@pytest.mark.parametrize("dataset", ["voc", "manifest"])
def test_voc_and_manifests_are_cached_too(dataset, voc_fixture, manifest_fixture, tmp_path):
    if dataset == "voc":
        root, _ = voc_fixture
        extra: dict[str, object] = {}
    else:
        root, info = manifest_fixture
        extra = {
            "train_manifest": str(info["files"]["train"]),
            "test_manifest": str(info["files"]["test"]),
            "class_list": str(info["files"]["classes"]),
        }
    config = coco_config(root, tmp_path / "images", dataset=dataset, **extra)
    eval_transform = build_transform(SIZE, False)
    for source in build_sources(config):
        assert isinstance(source, CachedImageSource) and source.dataset == dataset
        for index in range(len(source)):
            decoded = original(source).load_image(index)
            assert torch.equal(eval_transform(decoded), eval_transform(source.load_image(index)))


def test_in_memory_datasets_are_not_cached(tmp_path, monkeypatch):
    # The shared digits cache (as every other test uses it): generating the scenes takes seconds.
    monkeypatch.delenv("MLCIL_CACHE")
    config = DataConfig(dataset="digits", image_cache=True, image_cache_dir=str(tmp_path / "c"))
    train, test = build_sources(config)
    assert isinstance(train, ArrayImageSource) and isinstance(test, ArrayImageSource)
    assert not (tmp_path / "c").exists()
    with pytest.raises(DataError, match="'digits' is held in memory"):
        build_image_cache(config)


def test_the_default_folder_is_in_the_mlcil_cache(synthetic_coco, private_cache):
    config = coco_config(synthetic_coco, private_cache, image_cache_dir=None)
    train, _ = build_sources(config)
    assert isinstance(train, CachedImageSource)
    assert train.folder.parent == private_cache / "images"
    assert train.folder.name.startswith(f"coco-train-{SIZE}px-")


def test_ensure_image_cache_keys_each_image_size_apart(synthetic_coco, tmp_path):
    source = load_coco(synthetic_coco, "test")
    small = ensure_image_cache(source, 32, tmp_path)
    large = ensure_image_cache(source, 48, tmp_path)
    assert small.folder != large.folder
    assert small.load_image(0).size == (32, 32) and large.load_image(0).size == (48, 48)


# ---------------------------------------------------------------------------------------------
# the annotation cache


def age(root: Path, seconds: float = 100.0) -> None:
    """Set every file below ``root`` to ``seconds`` ago, as files of a downloaded dataset are."""
    when = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (when, when))


def same_source(a: FileImageSource, b: FileImageSource) -> bool:
    return (
        a.class_names == b.class_names
        and a.image_refs == b.image_refs
        and np.array_equal(a.labels, b.labels)
        and a.labels.dtype == b.labels.dtype
        and (a.dataset, a.split, a.root, a.label_density)
        == (b.dataset, b.split, b.root, b.label_density)
    )


def forbid(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    def parse_forbidden(*args, **kwargs):
        raise AssertionError(f"{name} called: the annotation cache was not used")

    monkeypatch.setattr(owner, name, parse_forbidden)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cached_coco_labels_equal_a_fresh_parse(coco_fixture, tmp_path, monkeypatch, split):
    root = copy_tree(coco_fixture[0], tmp_path)
    age(root)
    cache = tmp_path / "annotations"
    fresh = load_coco(root, split)
    stored = load_coco(root, split, cache=cache)
    assert len(list(cache.glob(f"coco-{split}-*.npy"))) == 1
    forbid(monkeypatch, coco_module, "COCO")  # pycocotools must not run again
    reused = load_coco(root, split, cache=cache)
    assert same_source(fresh, stored) and same_source(fresh, reused)


def test_a_changed_coco_file_is_parsed_again(coco_fixture, tmp_path, caplog):
    root = copy_tree(coco_fixture[0], tmp_path)
    age(root)
    cache = tmp_path / "annotations"
    before = load_coco(root, "train", cache=cache)
    path = root / "annotations" / "instances_train2014.json"
    document = json.loads(path.read_text())
    document["annotations"] = document["annotations"][: len(document["annotations"]) // 2]
    path.write_text(json.dumps(document))
    age(root, 50.0)
    with caplog.at_level(logging.INFO, logger="mlcil.data.annotation_cache"):
        after = load_coco(root, "train", cache=cache)
    assert any("changed since they were cached" in r.getMessage() for r in caplog.records)
    assert same_source(after, load_coco(root, "train"))
    assert after.labels.sum() < before.labels.sum()
    assert len(list(cache.glob("coco-train-*.json"))) == 1  # replaced, not added


def test_cached_voc_labels_equal_a_fresh_parse_and_follow_an_edit(
    voc_fixture, tmp_path, monkeypatch
):
    root = copy_tree(voc_fixture[0], tmp_path)
    age(root)
    cache = tmp_path / "annotations"
    fresh = load_voc(root, "train")
    assert same_source(fresh, load_voc(root, "train", cache=cache))
    with monkeypatch.context() as patch:
        forbid(patch, voc_module.ET, "parse")  # no XML is read again
        assert same_source(fresh, load_voc(root, "train", cache=cache))
    # One XML loses its objects: only the edited file differs, and it is noticed.
    ref = fresh.image_refs[int(np.flatnonzero(fresh.labels.any(axis=1))[0])]
    xml = fresh.root / "Annotations" / f"{Path(ref).stem}.xml"
    tree = voc_module.ET.parse(xml)
    for obj in tree.getroot().findall("object"):
        tree.getroot().remove(obj)
    tree.write(xml)
    age(root, 50.0)
    edited = load_voc(root, "train", cache=cache)
    assert same_source(edited, load_voc(root, "train"))
    assert not edited.labels[fresh.image_refs.index(ref)].any()


def test_damaged_or_fresh_entries_are_not_trusted(coco_fixture, tmp_path):
    root = copy_tree(coco_fixture[0], tmp_path)
    for path in root.rglob("*.json"):
        os.utime(path)  # written just now (the copy kept the fixture's older times)
    cache = tmp_path / "annotations"
    load_coco(root, "test", cache=cache)
    assert not cache.exists()  # files written just now: their mtime cannot be trusted yet
    age(root)
    fresh = load_coco(root, "test", cache=cache)
    (labels,) = cache.glob("coco-test-*.npy")
    labels.write_bytes(labels.read_bytes()[:-7])
    assert same_source(fresh, load_coco(root, "test", cache=cache))  # parsed again
    record = next(cache.glob("coco-test-*.json"))
    np.save(labels, np.zeros_like(fresh.labels))  # a well-formed file with other labels
    assert same_source(fresh, load_coco(root, "test", cache=cache))
    assert json.loads(record.read_text())["labels_sha256"]


def test_the_catalog_uses_the_annotation_cache_unless_it_is_off(
    coco_fixture, tmp_path, private_cache
):
    root = copy_tree(coco_fixture[0], tmp_path)
    age(root)
    off = DataConfig(dataset="coco", root=str(root), annotation_cache=False)
    build_sources(off)
    assert not (private_cache / "annotations").exists()
    build_sources(off.model_copy(update={"annotation_cache": True}))
    written = sorted(
        path.name.split("-")[1] for path in (private_cache / "annotations").glob("*.npy")
    )
    assert written == ["test", "train"]


def test_concurrent_builders_build_once(synthetic_coco, tmp_path):
    # Ranks of a distributed run all load the data: one builds, the others wait and reuse.
    from concurrent.futures import ThreadPoolExecutor

    source = load_coco(synthetic_coco, "train")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: ensure_image_cache(source, SIZE, tmp_path), range(3)))
    assert sorted(result.summary()["built"] for result in results) == [False, False, True]
    assert len({result.folder for result in results}) == 1
    for result in results:
        assert np.array_equal(
            np.asarray(result.load_image(7)), np.asarray(results[0].load_image(7))
        )
