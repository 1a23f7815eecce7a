"""Pre-flight check of a dataset's image files: every image, cheaply, before anything is deleted."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlcil.data.base import ArrayImageSource, FileImageSource
from mlcil.data.preflight import check_image_files
from mlcil.errors import DataError

# Header and trailer only, or every image decoded in full.
MODES = [pytest.param(0, id="headers"), pytest.param(10**12, id="full-decode")]


def source_of(root: Path, refs: list[str], dataset: str = "photos") -> FileImageSource:
    return FileImageSource(
        dataset=dataset,
        split="train",
        root=root,
        class_names=["a"],
        image_refs=refs,
        labels=np.zeros((len(refs), 1), dtype=np.uint8),
    )


def write_images(root: Path) -> list[str]:
    """A few real images of several formats; returns their names."""
    rng = np.random.default_rng(0)
    names = []
    for index, suffix in enumerate([".jpg", ".png", ".gif", ".webp", ".bmp", ".jpg", ".png"]):
        pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        name = f"{index}{suffix}"
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    return names


def cut(path: Path, keep: float = 0.5) -> Path:
    """Truncate a file to a fraction of its length, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("limit", MODES)
def test_a_good_tree_passes(tmp_path: Path, limit: int) -> None:
    names = write_images(tmp_path)
    check_image_files(source_of(tmp_path, names), full_decode_limit=limit)


def test_a_truncated_jpeg_at_the_last_of_20000_positions_is_found(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    Image.new("RGB", (64, 48), (9, 99, 199)).save(tmp_path / "last.jpg", quality=90)
    cut(tmp_path / "last.jpg")
    # Every position is checked: 19,999 references to good files, then the damaged one.
    refs = [names[index % len(names)] for index in range(19_999)] + ["last.jpg"]
    pattern = (
        r"^photos/train: 1 of 20000 image files cannot be used: position 19999 \('last\.jpg', "
        + re.escape(str(tmp_path / "last.jpg"))
        + r"\): truncated JPEG: it does not end with the end-of-image marker FF D9"
    )
    with pytest.raises(DataError, match=pattern):
        check_image_files(source_of(tmp_path, refs), full_decode_limit=0)


@pytest.mark.parametrize("limit", MODES)
def test_a_truncated_png_is_found(tmp_path: Path, limit: int) -> None:
    names = write_images(tmp_path)
    cut(tmp_path / names[1], keep=0.6)
    with pytest.raises(DataError, match=rf"position 1 \('{names[1]}', .*\): truncated PNG"):
        check_image_files(source_of(tmp_path, names), full_decode_limit=limit)


@pytest.mark.parametrize("limit", MODES)
def test_a_jpeg_missing_only_its_end_marker_is_found(tmp_path: Path, limit: int) -> None:
    names = write_images(tmp_path)
    data = (tmp_path / names[0]).read_bytes()
    (tmp_path / names[0]).write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"position 0 .*truncated JPEG"):
        check_image_files(source_of(tmp_path, names), full_decode_limit=limit)


def test_zero_padding_and_data_after_a_complete_jpeg_are_accepted(tmp_path: Path) -> None:
    # Some writers pad with zeros, some cameras append their own data after the image.
    names = write_images(tmp_path)
    data = (tmp_path / names[0]).read_bytes()
    (tmp_path / "padded.jpg").write_bytes(data + b"\x00" * 64)
    (tmp_path / "appended.jpg").write_bytes(data + b"MOTION-PHOTO-TRAILER" * 10)
    check_image_files(source_of(tmp_path, ["padded.jpg", "appended.jpg"]), full_decode_limit=0)


def test_every_problem_is_counted_and_the_first_ones_named(tmp_path: Path) -> None:
    names = write_images(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    cut(tmp_path / names[5])
    os.mkfifo(tmp_path / "pipe.jpg")
    refs = [*names, "missing.jpg", "text.png", "pipe.jpg"]

    outcome: dict[str, BaseException] = {}

    def check() -> None:
        try:
            check_image_files(source_of(tmp_path, refs, "coco"), full_decode_limit=0)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "check_image_files blocked on a FIFO"
    error = outcome.get("error")
    assert isinstance(error, DataError)
    message = str(error)
    assert message.startswith("coco/train: 4 of 10 image files cannot be used: position 5 ")
    assert "truncated JPEG" in message
    assert f"position 7 ('missing.jpg', {tmp_path / 'missing.jpg'}): no such file" in message
    assert "position 8 ('text.png'" in message and "PIL cannot identify it as an image" in message
    assert message.count("position ") == 3 and "and 1 more" in message  # the FIFO is counted


def test_a_fifo_is_named(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match=r"position 0 .*it is a FIFO \(named pipe\)"):
        check_image_files(source_of(tmp_path, ["pipe.png"]))


def test_an_image_that_fails_only_to_decode_is_found_in_full_mode(tmp_path: Path) -> None:
    # A header and trailer that look right around damaged pixel data.
    names = write_images(tmp_path)
    data = bytearray((tmp_path / names[1]).read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = b"\xff" * 40
    (tmp_path / "damaged.png").write_bytes(bytes(data))
    source = source_of(tmp_path, ["damaged.png"])
    check_image_files(source, full_decode_limit=0)  # too costly to see without decoding
    with pytest.raises(DataError, match=r"position 0 .*cannot decode image"):
        check_image_files(source, full_decode_limit=10**12)


def test_in_memory_sources_have_nothing_to_check() -> None:
    source = ArrayImageSource(
        dataset="digits",
        split="train",
        class_names=["a"],
        images=np.zeros((2, 4, 4, 3), dtype=np.uint8),
        labels=np.zeros((2, 1), dtype=np.uint8),
    )
    assert check_image_files(source) is None
