"""``mlcil data export-digits``: new scenes of the embedded benchmark as PNG files + manifests.

A practitioner's walk-through needs image files to predict and a manifest that brings new
classes to a trained run. The scenes are composed like the benchmark's (``compose_scenes``) but
with their own seed, so they are new images: training scenes from the benchmark's training
digits, test scenes from its test digits (no handwritten digit is shared between the two).
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mlcil.data.classes import class_names
from mlcil.data.embedded import compose_scenes, digit_crops
from mlcil.errors import DataError
from mlcil.fileio import write_text_atomic
from mlcil.safety import MAX_SEED, MAX_SYNTHETIC_IMAGES, check_bounded


def scenes_with(
    split: str, count: int, classes: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` new scenes of ``split``; each shows at least one of ``classes`` (when given)."""
    digits, digit_labels = digit_crops(split)
    images, labels = [], []
    kept = 0
    while kept < count:
        batch, batch_labels = compose_scenes(digits, digit_labels, max(4 * count, 16), rng)
        mask = batch_labels[:, list(classes)].any(axis=1) if classes else np.ones(len(batch), bool)
        images.append(batch[mask])
        labels.append(batch_labels[mask])
        kept += int(mask.sum())
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


# What an export writes; only a folder holding nothing else may be overwritten.
EXPORT_ENTRIES = ("train", "test", "train.csv", "test.csv")


def _is_export(output: Path) -> bool:
    if not output.is_dir() or output.is_symlink():
        return False
    names = {entry.name for entry in output.iterdir()}
    return bool(names) and names <= set(EXPORT_ENTRIES)


def export_digit_scenes(
    output: str | Path,
    classes: Sequence[int] = (),
    train: int = 200,
    test: int = 100,
    seed: int = 1,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``<output>/{train,test}/NNNNN.png`` and ``<output>/{train,test}.csv`` manifests.

    Args:
        output: a folder that does not exist yet or is empty.
        classes: digits every scene must show at least one of (empty: any scene).
        train: training scenes to write (0: none, and no train.csv).
        test: test scenes to write (0: none, and no test.csv).
        seed: the scenes' random seed.
        overwrite: replace an earlier export in ``output`` (a folder holding only what this
            function writes: ``train/``, ``test/``, ``train.csv``, ``test.csv``); anything else
            in the folder is still refused, so no other file is ever deleted.

    Returns:
        The manifests written, ``{"train": path, "test": path}`` (those with scenes).
    """
    output = Path(output)
    bad = [c for c in classes if not 0 <= c <= 9]
    if bad:
        raise DataError(f"export-digits: class {bad[0]} is not a digit 0-9")
    for split, count in (("train", train), ("test", test)):
        check_bounded(count, 0, MAX_SYNTHETIC_IMAGES, f"export-digits: {split} scenes")
    if train == 0 and test == 0:
        raise DataError("export-digits: --train and --test are both 0: nothing to write")
    check_bounded(seed, 0, MAX_SEED, "export-digits: seed")
    if overwrite and _is_export(output):
        for name in EXPORT_ENTRIES:
            entry = output / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        hint = "" if overwrite else " (--overwrite replaces an earlier export)"
        raise DataError(f"export-digits: {output} exists and is not an empty folder{hint}")
    names = class_names("digits")
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in (("train", train), ("test", test)):
        if count == 0:
            continue
        images, labels = scenes_with(split, count, classes, rng)
        (output / split).mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "labels"])
        for position, (image, row) in enumerate(zip(images, labels, strict=True)):
            ref = f"{split}/{position:05d}.png"
            Image.fromarray(image).save(output / ref)
            writer.writerow([ref, ";".join(names[c] for c in np.flatnonzero(row))])
        written[split] = output / f"{split}.csv"
        write_text_atomic(written[split], buffer.getvalue())
    return written
