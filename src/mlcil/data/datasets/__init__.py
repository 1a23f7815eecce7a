"""The built-in datasets, one file each, registered by name.

Importing this package imports every module in this folder (in name order), so the dataset
registry is complete and a new dataset is one new file here: its ``load(config, split)`` and
one ``add_dataset(DatasetSpec(...))``; nothing else has to list it. Loaders of heavy formats are
imported inside ``load``, when the dataset is built.
"""

from __future__ import annotations

from mlcil.registry import discover

discover(__name__, __path__)
