"""The glyph scenes: a pretraining source whose classes are disjoint from the digits."""

from __future__ import annotations

import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mlcil.data import glyphs
from mlcil.data.classes import class_names
from mlcil.data.glyphs import (
    CACHE_VERSION,
    GLYPH_CLASSES,
    MAX_GLYPHS_PER_IMAGE,
    compose_glyph_scenes,
    glyph_fonts,
    load_glyphs,
    render_glyph,
)
from mlcil.errors import DataError

SIZE = 32  # small scenes keep these tests fast; the cell logic is the same as at 48


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the cache at a fresh folder and forget scenes built by other tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLCIL_CACHE", str(cache))
    glyphs._build.cache_clear()
    yield cache
    glyphs._build.cache_clear()


def test_classes_contain_no_digit() -> None:
    digit_names = [str(d) for d in range(10)]
    assert len(GLYPH_CLASSES) == len(set(GLYPH_CLASSES)) == 36
    assert not set(GLYPH_CLASSES) & set(digit_names)
    assert not set(GLYPH_CLASSES) & set(class_names("digits"))
    for name in GLYPH_CLASSES:
        # No character of any name is a digit in any script (isdigit covers superscripts too).
        assert not any(ch.isdigit() or unicodedata.category(ch) == "Nd" for ch in name), name
    assert list(GLYPH_CLASSES) == sorted(GLYPH_CLASSES)  # the package's code-point order
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") <= set(GLYPH_CLASSES)


def test_split_has_the_documented_shapes_and_labels(private_cache: Path) -> None:
    source = load_glyphs("train", num_images=60, seed=3, image_size=SIZE)
    assert source.dataset == "glyphs" and source.split == "train"
    assert source.class_names == list(GLYPH_CLASSES)
    assert source.images.shape == (60, SIZE, SIZE, 3) and source.images.dtype == np.uint8
    assert source.labels.shape == (60, len(GLYPH_CLASSES)) and source.labels.dtype == np.uint8
    counts = source.labels.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= MAX_GLYPHS_PER_IMAGE
    assert set(np.unique(source.labels)) <= {0, 1}
    assert source.image_refs[7] == "glyphs/train/00007"
    image = source.load_image(0)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"


def test_every_labelled_glyph_is_drawn_in_its_own_cell() -> None:
    # The background noise stays below 24; a glyph's core pixels are at least
    # 255 x 0.45 (tint) x 0.65 (texture) = 75. So a cell is bright exactly when it holds a glyph,
    # and the number of bright cells is the number of labels.
    images, labels = compose_glyph_scenes(40, np.random.default_rng(5), image_size=SIZE)
    half = SIZE // 2
    bright = [
        sum(
            int(images[i, r : r + half, c : c + half].max() > 60)
            for r in (0, half)
            for c in (0, half)
        )
        for i in range(len(images))
    ]
    assert bright == labels.sum(axis=1).tolist()
    # Empty cells hold the faint uniform noise of [0, 24): mean about 11.5 once truncated.
    dark = [
        images[i, r : r + half, c : c + half]
        for i in range(len(images))
        for r in (0, half)
        for c in (0, half)
        if images[i, r : r + half, c : c + half].max() <= 60
    ]
    assert 10.5 < np.mean(dark) < 12.5 and np.max(dark) < 24


def test_same_seed_gives_identical_scenes_and_another_seed_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_glyphs("train", num_images=12, seed=1, image_size=SIZE)
    # A fresh cache folder and an empty memo force a second, independent generation.
    monkeypatch.setenv("MLCIL_CACHE", str(tmp_path / "other"))
    glyphs._build.cache_clear()
    again = load_glyphs("train", num_images=12, seed=1, image_size=SIZE)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    other = load_glyphs("train", num_images=12, seed=2, image_size=SIZE)
    assert not np.array_equal(first.images, other.images)
    test = load_glyphs("test", num_images=12, seed=1, image_size=SIZE)
    assert not np.array_equal(first.images, test.images)  # another stream of the same seed


def test_scenes_are_cached_and_reread(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = load_glyphs("test", num_images=8, seed=4, image_size=SIZE)
    path = private_cache / f"glyphs-v{CACHE_VERSION}-test-8-{SIZE}-4.npz"
    assert [p.name for p in private_cache.iterdir()] == [path.name]  # no temporary left over
    glyphs._build.cache_clear()

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached scenes should have been read")

    monkeypatch.setattr(glyphs, "compose_glyph_scenes", no_generation)
    reread = load_glyphs("test", num_images=8, seed=4, image_size=SIZE)
    np.testing.assert_array_equal(reread.images, made.images)
    np.testing.assert_array_equal(reread.labels, made.labels)


@pytest.mark.parametrize("content", [b"not a zip file", b""])
def test_a_corrupt_cache_falls_back_to_generation(private_cache: Path, content: bytes) -> None:
    reference = load_glyphs("train", num_images=6, seed=0, image_size=SIZE)
    path = private_cache / f"glyphs-v{CACHE_VERSION}-train-6-{SIZE}-0.npz"
    path.write_bytes(content)
    glyphs._build.cache_clear()
    regenerated = load_glyphs("train", num_images=6, seed=0, image_size=SIZE)
    np.testing.assert_array_equal(regenerated.images, reference.images)
    with np.load(path) as repaired:  # and the cache was written again
        np.testing.assert_array_equal(repaired["labels"], reference.labels)


def test_a_cache_with_other_shapes_is_not_used(private_cache: Path) -> None:
    path = private_cache / f"glyphs-v{CACHE_VERSION}-train-5-{SIZE}-0.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.zeros((5, 3), np.uint8))
    source = load_glyphs("train", num_images=5, seed=0, image_size=SIZE)
    assert source.images.shape == (5, SIZE, SIZE, 3) and source.labels.sum() >= 5


def test_render_glyph_fits_the_box_at_a_random_size() -> None:
    rng = np.random.default_rng(0)
    sides = []
    for char in GLYPH_CLASSES:
        ink = render_glyph(char, rng, box=22)
        assert ink.dtype == np.float32 and ink.min() >= 0.0 and ink.max() <= 1.0
        assert ink.max() > 0.5  # the stroke core is drawn at full intensity before texture
        sides.append(max(ink.shape))
    assert min(sides) >= round(0.55 * 22) - 1 and max(sides) <= 22
    assert len(set(sides)) > 3  # sizes vary


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "val"}, "'val'"),
        ({"split": "train", "num_images": 0}, "num_images"),
        ({"split": "train", "seed": -1}, "seed"),
        ({"split": "train", "image_size": 31}, "31"),
        ({"split": "train", "image_size": 8}, "image_size"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_glyphs(**kwargs)


def test_unusable_fonts_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path(glyph_fonts()[0])
    shutil.copy(real, tmp_path / "Good.ttf")
    (tmp_path / "Broken.ttf").write_bytes(b"this is not a font")
    monkeypatch.setattr(glyphs, "_font_folder", lambda: tmp_path)
    monkeypatch.setattr(glyphs, "FONT_NAMES", ("Broken", "Absent", "Good"))
    glyph_fonts.cache_clear()
    try:
        assert glyph_fonts() == (str(tmp_path / "Good.ttf"),)
        monkeypatch.setattr(glyphs, "FONT_NAMES", ("Broken", "Absent"))
        glyph_fonts.cache_clear()
        with pytest.raises(DataError, match="Broken"):
            glyph_fonts()
    finally:
        glyph_fonts.cache_clear()


def test_default_count_and_numpy_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glyphs, "TEST_IMAGES", 5)
    assert len(load_glyphs("test", image_size=SIZE)) == 5
    by_numpy = load_glyphs("test", num_images=np.int64(5), seed=np.int32(0), image_size=SIZE)
    np.testing.assert_array_equal(by_numpy.images, load_glyphs("test", 5, 0, SIZE).images)
