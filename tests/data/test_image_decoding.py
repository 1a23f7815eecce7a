"""Decoding image files: 16-bit samples, EXIF orientation, and files that are not regular files."""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mlcil.data.base import FileImageSource, decode_image_file, file_problem
from mlcil.data.manifest import load_manifest
from mlcil.errors import DataError
from mlcil.predict import gather_images, load_images

# A FIFO opened for reading waits for a writer; every call that might touch one runs under this
# limit, so a regression fails the test instead of hanging the suite.
TIMEOUT_S = 5.0


def within_timeout(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, failing the test when it has not returned after ``TIMEOUT_S``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"{function.__name__} blocked (it opened a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG written by hand: grayscale for (H, W), RGB for (H, W, 3) samples."""
    height, width = samples.shape[:2]
    color_type = 2 if samples.ndim == 3 else 0
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def source_of(root: Path, refs: list[str]) -> FileImageSource:
    return FileImageSource(
        dataset="files",
        split="train",
        root=root,
        class_names=["a"],
        image_refs=refs,
        labels=np.zeros((len(refs), 1), dtype=np.uint8),
    )


# ---------------------------------------------------------------------------------------------
# 16-bit images


def gradient16() -> np.ndarray:
    return (np.arange(16 * 64, dtype=np.uint32).reshape(16, 64) * 64).astype(np.uint16)


def test_a_16_bit_grayscale_png_keeps_its_gradient(tmp_path: Path) -> None:
    samples = gradient16()
    path = tmp_path / "gray16.png"
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL does give 16-bit samples here
    expected = (samples >> 8).astype(np.int64)
    decoded = decode_image_file(path)
    assert decoded.mode == "RGB" and decoded.size == (64, 16)
    values = np.asarray(decoded).astype(np.int64)
    for channel in range(3):
        assert np.abs(values[..., channel] - expected).max() <= 1
    assert 100 < values.mean() < 155  # clipping made nearly every pixel 255


def test_a_hand_written_16_bit_grayscale_png(tmp_path: Path) -> None:
    samples = (np.arange(8 * 32, dtype=np.uint32).reshape(8, 32) * 257).astype(np.uint16)
    values = np.asarray(decode_image_file(write_png16(tmp_path / "g.png", samples)))
    assert np.abs(values[..., 1].astype(int) - (samples >> 8)).max() <= 1


def test_a_16_bit_rgb_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    decoded = decode_image_file(write_png16(tmp_path / "rgb16.png", samples))
    assert np.abs(np.asarray(decoded).astype(int) - (samples >> 8)).max() <= 1


def test_datasets_and_predict_decode_16_bit_the_same_way(tmp_path: Path) -> None:
    samples = gradient16()
    Image.fromarray(samples).save(tmp_path / "gray16.png")
    expected = np.asarray(decode_image_file(tmp_path / "gray16.png"))
    from_source = np.asarray(source_of(tmp_path, ["gray16.png"]).load_image(0))
    images, _, failures = load_images([tmp_path / "gray16.png"], to_tensor)
    assert failures == [] and images is not None
    assert np.array_equal(from_source, expected)
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)


# ---------------------------------------------------------------------------------------------
# EXIF orientation


def write_sideways_jpeg(path: Path, orientation: int) -> Path:
    """16 wide, 8 high as stored: red left half, blue right half, with an orientation tag."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, "red", "blue"), (8, "blue", "red")])
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, top: str, bottom: str
) -> None:
    path = write_sideways_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    assert Image.open(path).size == (16, 8)  # as stored
    for image in (decode_image_file(path), source_of(tmp_path, [path.name]).load_image(0)):
        assert image.size == (8, 16)  # turned upright: 8 wide, 16 high
        pixels = np.asarray(image).astype(int)
        color = {"red": np.array([255, 0, 0]), "blue": np.array([0, 0, 255])}
        assert np.abs(pixels[3, 4] - color[top]).max() < 40
        assert np.abs(pixels[12, 4] - color[bottom]).max() < 40


def test_predict_turns_photos_upright_too(tmp_path: Path) -> None:
    path = write_sideways_jpeg(tmp_path / "o6.jpg", 6)
    images, ok_paths, _ = load_images([path], to_tensor)
    assert ok_paths == [path] and images is not None
    assert tuple(images.shape) == (1, 3, 16, 8)
    assert images[0, 0, 3, 4] > 200 and images[0, 2, 3, 4] < 60  # red on top


def test_an_image_without_orientation_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    Image.fromarray(pixels).save(path)
    assert np.array_equal(np.asarray(decode_image_file(path)), pixels)


# ---------------------------------------------------------------------------------------------
# files that are not regular files


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "photos" / "pipe.png"
    path.parent.mkdir()
    os.mkfifo(path)
    return path


def test_file_problem_says_what_the_path_is(tmp_path: Path, fifo: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (2, 2)).save(good)
    (tmp_path / "broken.png").symlink_to(tmp_path / "absent.png")
    assert file_problem(good) is None
    assert file_problem(fifo) == "it is a FIFO (named pipe), not a regular file"
    assert file_problem(tmp_path) == "it is a folder, not a regular file"
    assert file_problem(tmp_path / "absent.png") == "no such file"
    assert file_problem(tmp_path / "broken.png") == "it is a link to a missing file"


def test_decoding_a_fifo_is_refused_without_blocking(fifo: Path) -> None:
    with pytest.raises(DataError, match=rf"image file {fifo}: it is a FIFO \(named pipe\)"):
        within_timeout(decode_image_file, fifo)


def test_a_source_image_that_is_a_fifo_is_a_data_error(fifo: Path) -> None:
    source = source_of(fifo.parent, ["pipe.png"])
    with pytest.raises(DataError, match=rf"files/train: image file {fifo}: it is a FIFO"):
        within_timeout(source.load_image, 0)


def test_a_manifest_listing_a_fifo_is_refused(tmp_path: Path, fifo: Path) -> None:
    Image.new("RGB", (2, 2)).save(tmp_path / "good.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,labels\ngood.png,cat\nphotos/pipe.png,cat\n")
    with pytest.raises(
        DataError,
        match=rf"{manifest}, line 3: image {fifo} cannot be read: it is a FIFO.*\(1 of 2 images",
    ):
        within_timeout(load_manifest, manifest, "train", ["cat"])


def test_predict_skips_a_fifo_in_a_folder_and_reports_it(fifo: Path) -> None:
    good = fifo.parent / "good.png"
    Image.new("RGB", (3, 3), (0, 255, 0)).save(good)
    images, problems = within_timeout(gather_images, [fifo.parent])
    assert images == [good]
    assert problems == [(str(fifo), "not read: it is a FIFO (named pipe), not a regular file")]


def test_predict_reports_a_fifo_given_by_name(fifo: Path) -> None:
    images, problems = within_timeout(gather_images, [fifo])
    assert images == []
    assert problems == [(str(fifo), "it is a FIFO (named pipe), not a regular file")]


def test_predict_decoding_skips_a_fifo_passed_directly(tmp_path: Path, fifo: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (3, 3), (0, 255, 0)).save(good)
    images, ok_paths, failures = within_timeout(load_images, [fifo, good], to_tensor)
    assert ok_paths == [good] and images is not None and images.shape[0] == 1
    assert failures[0][0] == str(fifo) and "FIFO" in failures[0][1]
    assert failures[0][1].startswith("cannot read image: ")


def test_a_folder_with_only_a_fifo_does_not_also_claim_it_holds_no_image(fifo: Path) -> None:
    images, problems = within_timeout(gather_images, [fifo.parent])
    assert images == [] and [path for path, _ in problems] == [str(fifo)]
