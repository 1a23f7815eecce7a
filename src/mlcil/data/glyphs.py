"""Multi-label scenes of rendered glyphs: a pretraining source whose classes are not digits.

Pretraining the digits benchmark's backbone on the digits themselves would leak every future
class into the class-incremental results (the problem docs/method.md, network describes for the
COCO-trained TResNet). These scenes look like the digits benchmark's (a square RGB canvas cut
into a 2x2 grid, 1 to 4 *distinct* classes in distinct cells, random offsets and colour tints
over faint noise) but every object is a capital letter or a symbol (``GLYPH_CLASSES``), never a
digit character.

Each glyph instance is rendered with Pillow from one of the TrueType fonts matplotlib ships
(DejaVu Sans/Serif/Mono and STIX General, in their regular, bold and italic cuts) with a random
stroke width, bent by a random affine map (rotation, shear, anisotropic scale), scaled to a
random size (its longer side 55-100% of a cell less 2 pixels) and textured with multiplicative
pixel noise. Everything is drawn from one NumPy generator per split (train and test use
different streams of the same seed), so a seed defines the scenes exactly on a given install;
the fonts come from matplotlib, so another matplotlib version may draw other pixels.

Generating the default 5,000 training scenes took 2.7 to 4.8 s on one core of the 2-core
development machine while other work shared it (1,000 test scenes: 0.5 to 1.3 s; reading them
back from the cache: 0.03 s). The scenes are cached as one ``.npz`` per split next to the digits
cache (``mlcil.cache.cache_root()``), named ``glyphs-v{version}-{split}-{count}-{size}-
{seed}.npz``; a missing, unreadable or mismatched cache falls back to generating in memory.
"""

from __future__ import annotations

import functools
import logging
import numbers
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlcil.cache import cache_root, save_arrays_atomic
from mlcil.data.base import ArrayImageSource
from mlcil.errors import DataError

logger = logging.getLogger(__name__)

# Capital letters and a few symbols, in code-point order (the package's class-order rule). No
# digit character: these classes must stay disjoint from the digits benchmark's.
GLYPH_CLASSES: tuple[str, ...] = tuple(sorted("ABCDEFGHIJKLMNOPQRSTUVWXYZ#%&*+<=>?@"))

# Fonts of matplotlib's ttf folder that map these characters to the usual shapes. The Computer
# Modern files are left out on purpose: their TeX encoding draws '<' and '>' as inverted
# punctuation; the STIX size/non-Unicode variants and the *Display cuts hold no letters.
FONT_NAMES: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)

CACHE_VERSION = 1
IMAGE_SIZE = 48
TRAIN_IMAGES = 5000
TEST_IMAGES = 1000
DATA_SEED = 0
MAX_GLYPHS_PER_IMAGE = 4
_SPLIT_STREAMS = {"train": 0, "test": 1}
# A code point no font here draws: its rendering is the font's "missing glyph" box.
_MISSING_PROBE = "\ue000"


def _font_folder() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    # Opening a font file costs far more than drawing one glyph; sizes are integers, so the
    # cache stays small (fonts x sizes).
    return ImageFont.truetype(path, size)


def _glyph_mask(
    font: ImageFont.FreeTypeFont, char: str, canvas: int, stroke: int = 0
) -> Image.Image:
    image = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(image).text(
        (canvas / 2, canvas / 2),
        char,
        font=font,
        fill=255,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    return image


def _draws_every_class(path: Path) -> bool:
    """Whether a font draws each class as its own shape, none as the missing-glyph box."""
    font = _font(str(path), 24)
    missing = np.asarray(_glyph_mask(font, _MISSING_PROBE, 48)).tobytes()
    shapes = {np.asarray(_glyph_mask(font, char, 48)).tobytes() for char in GLYPH_CLASSES}
    blank = bytes(48 * 48)
    return len(shapes) == len(GLYPH_CLASSES) and not shapes & {missing, blank}


@functools.lru_cache(maxsize=1)
def glyph_fonts() -> tuple[str, ...]:
    """Paths of the usable fonts of ``FONT_NAMES``, in that order.

    A font that is absent, fails to load, or does not draw every class as a distinct shape is
    skipped with a log line.

    Raises:
        DataError: when none of the fonts is usable.
    """
    folder = _font_folder()
    usable = []
    for name in FONT_NAMES:
        path = folder / f"{name}.ttf"
        try:
            if _draws_every_class(path):
                usable.append(str(path))
            else:
                logger.info("glyphs: skipping font %s: it does not draw every glyph class", path)
        except OSError as error:
            logger.info("glyphs: skipping font %s: %s", path, error)
    if not usable:
        raise DataError(
            f"glyphs: none of the fonts {list(FONT_NAMES)} under {folder} can draw the glyph "
            "classes; is matplotlib installed with its fonts?"
        )
    return tuple(usable)


def _affine(rng: np.random.Generator, canvas: int) -> tuple[float, ...]:
    """Pillow AFFINE coefficients (output -> input map) of a random rotation/shear/scale about
    the canvas centre."""
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.3, 0.3)
    scale_x, scale_y = rng.uniform(0.8, 1.15, size=2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale_x, scale_y])
    inverse = np.linalg.inv(forward)
    centre = np.array([canvas / 2, canvas / 2])
    offset = centre - inverse @ centre
    return (
        inverse[0, 0],
        inverse[0, 1],
        offset[0],
        inverse[1, 0],
        inverse[1, 1],
        offset[1],
    )


def render_glyph(char: str, rng: np.random.Generator, box: int) -> np.ndarray:
    """Draw one randomly styled glyph, cropped to its ink and scaled to a random size.

    Args:
        char: the character to draw.
        rng: decides the font, stroke width, affine distortion, size and texture noise.
        box: the largest side the result may have, in pixels.

    Returns:
        ``(h, w)`` float32 intensities in [0, 1]; the longer side is between 55% of ``box`` and
        ``box``.
    """
    fonts = glyph_fonts()
    path = fonts[int(rng.integers(len(fonts)))]
    # Draw at twice the final size and scale down: strokes come out antialiased, and small
    # symbols ('*', '=') end up as large as letters instead of as a few blurred pixels.
    work = 2 * box
    stroke = int(rng.integers(0, 3))
    canvas = 2 * work  # room for rotated, sheared and enlarged glyphs before cropping
    mask = _glyph_mask(_font(path, work), char, canvas, stroke)
    mask = mask.transform(
        (canvas, canvas), Image.Transform.AFFINE, _affine(rng, canvas), Image.Resampling.BILINEAR
    )
    bbox = mask.getbbox()
    if bbox is None:  # cannot happen with the validated fonts; say which glyph if it does
        raise DataError(f"glyphs: {char!r} in {path} at size {work} rendered no pixel")
    mask = mask.crop(bbox)
    longest = int(rng.integers(round(0.55 * box), box + 1))
    factor = longest / max(mask.size)
    new_size = (max(1, round(mask.width * factor)), max(1, round(mask.height * factor)))
    ink = np.asarray(mask.resize(new_size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    # Multiplicative texture noise: strokes are not flat, as in scanned or photographed text.
    return ink * rng.uniform(0.65, 1.0, size=ink.shape).astype(np.float32)


def compose_glyph_scenes(
    num_images: int, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_images`` scenes of 1 to ``MAX_GLYPHS_PER_IMAGE`` distinct glyph classes.

    Args:
        num_images: scenes to draw.
        rng: the generator that decides everything about the scenes.
        image_size: side of the square canvas; each glyph sits in one cell of a 2x2 grid.

    Returns:
        ``(num_images, image_size, image_size, 3)`` uint8 images and ``(num_images,
        len(GLYPH_CLASSES))`` uint8 multi-hot labels.
    """
    cell = image_size // 2
    box = cell - 2  # like the digits' 22-pixel crops in 24-pixel cells: a little jitter room
    num_classes = len(GLYPH_CLASSES)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.float32)
    labels = np.zeros((num_images, num_classes), dtype=np.uint8)
    for i in range(num_images):
        canvas = rng.uniform(0.0, 24.0, size=(image_size, image_size, 3)).astype(np.float32)
        count = int(rng.integers(1, MAX_GLYPHS_PER_IMAGE + 1))
        chosen = rng.choice(num_classes, size=count, replace=False)
        cells = rng.choice(4, size=count, replace=False)
        for glyph_class, grid_cell in zip(chosen, cells, strict=True):
            ink = render_glyph(GLYPH_CLASSES[glyph_class], rng, box)
            tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32) * 255.0
            height, width = ink.shape
            top = (grid_cell // 2) * cell + int(rng.integers(0, cell - height + 1))
            left = (grid_cell % 2) * cell + int(rng.integers(0, cell - width + 1))
            region = canvas[top : top + height, left : left + width]
            # Max-compositing keeps strokes intact over the background noise.
            np.maximum(region, ink[:, :, None] * tint, out=region)
            labels[i, glyph_class] = 1
        images[i] = canvas
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _cache_path(split: str, num_images: int, image_size: int, seed: int) -> Path:
    return cache_root() / f"glyphs-v{CACHE_VERSION}-{split}-{num_images}-{image_size}-{seed}.npz"


def _read_cache(path: Path, num_images: int, image_size: int) -> tuple[np.ndarray, ...] | None:
    """The cached ``(images, labels)`` if the file is readable and has the expected shapes."""
    try:
        with np.load(path) as cached:
            images, labels = cached["images"], cached["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if path.exists():
            logger.info("glyphs: ignoring unreadable cache %s (%s); regenerating", path, error)
        return None
    expected = (num_images, image_size, image_size, 3)
    if (
        images.shape != expected
        or images.dtype != np.uint8
        or labels.shape != (num_images, len(GLYPH_CLASSES))
    ):
        logger.info("glyphs: ignoring cache %s with unexpected shapes; regenerating", path)
        return None
    return images, labels.astype(np.uint8)


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    try:
        save_arrays_atomic(path, {"images": images, "labels": labels})  # never half-written
    except OSError as error:
        logger.debug("glyphs: could not cache the scenes at %s: %s", path, error)


@functools.lru_cache(maxsize=4)
def _build(split: str, num_images: int, image_size: int, seed: int) -> tuple[np.ndarray, ...]:
    path = _cache_path(split, num_images, image_size, seed)
    cached = _read_cache(path, num_images, image_size)
    if cached is not None:
        return cached
    # One stream per split from the same seed: the test scenes are not a continuation of the
    # training ones, and a split's scenes do not depend on how many the other split has.
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    images, labels = compose_glyph_scenes(num_images, rng, image_size)
    logger.debug("built %d glyph scenes for %s (seed %d)", num_images, split, seed)
    _write_cache(path, images, labels)
    return images, labels


def _integer(name: str, value: object, minimum: int) -> int:
    """``value`` as a plain int (NumPy integers accepted), or a DataError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"glyphs: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def load_glyphs(
    split: str, num_images: int | None = None, seed: int = DATA_SEED, image_size: int = IMAGE_SIZE
) -> ArrayImageSource:
    """Load one split of the glyph scenes.

    Args:
        split: ``"train"`` or ``"test"``.
        num_images: number of scenes; ``None`` for the split's default (``TRAIN_IMAGES`` or
            ``TEST_IMAGES``).
        seed: data seed (a non-negative integer).
        image_size: side of the square scenes in pixels (even, at least 16).

    Returns:
        An ``ArrayImageSource`` with ``dataset="glyphs"`` and ``class_names`` = ``GLYPH_CLASSES``.

    Raises:
        DataError: on an unknown split or an invalid count, seed or size.
    """
    if split not in _SPLIT_STREAMS:
        raise DataError(f"glyphs: unknown split {split!r}, expected 'train' or 'test'")
    if num_images is None:
        num_images = TRAIN_IMAGES if split == "train" else TEST_IMAGES
    num_images = _integer("num_images", num_images, minimum=1)
    seed = _integer("seed", seed, minimum=0)
    image_size = _integer("image_size", image_size, minimum=16)
    if image_size % 2:
        raise DataError(f"glyphs: image_size must be even (a 2x2 grid), got {image_size}")
    images, labels = _build(split, num_images, image_size, seed)
    return ArrayImageSource(
        dataset="glyphs",
        split=split,
        class_names=GLYPH_CLASSES,
        images=images,
        labels=labels,
        image_refs=[f"glyphs/{split}/{i:05d}" for i in range(len(images))],
    )
