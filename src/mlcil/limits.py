"""Bounds of the sizes a user gives: far above any use, far below what exhausts a machine.

Checked before anything is allocated (the config schema, the command line's argument types,
the synthetic datasets, the Python API), so that a typo such as ``data.image_size=100000`` is an
error naming the bound instead of an attempt to allocate hundreds of gigabytes. A leaf module:
the config schema and the argument checks both read it.
"""

from __future__ import annotations

MAX_SEED = 2**32 - 1  # what NumPy's and every seeded library's generators take
MAX_IMAGE_SIZE = 2048  # pixels per side of the network's input (the benchmarks use 224-448)
MAX_BATCH_SIZE = 65_536  # images per step, per evaluation batch, per prediction batch
MAX_SYNTHETIC_IMAGES = 1_000_000  # images per split of a synthetic dataset (COCO has 82,783)
MAX_JOBS = 256  # processes at once (data loading workers, synthetic encoding, compare --jobs)
MAX_MAP_TOLERANCE = 1.0  # mAP points: a larger difference is no reproduction
