"""Exceptions that carry a message naming the file, key or value at fault.

All of them subclass ``ValueError`` so callers that only care about "bad input" can catch one
type, and ``MlcilError`` so the CLI can print them without a traceback.
"""

from __future__ import annotations


class MlcilError(ValueError):
    """Base class for errors caused by the user's input (configs, data, weights)."""


class ConfigError(MlcilError):
    """A configuration file or override is invalid: unknown key, wrong type, bad value."""


class ProtocolError(ConfigError):
    """A class-incremental protocol that cannot be built (e.g. B{b}-C{c} does not tile)."""


class DataError(MlcilError):
    """A dataset file is missing or malformed."""


class WeightsError(MlcilError):
    """A pretrained-weights or checkpoint file is missing or does not fit the model."""


class TrainingError(MlcilError):
    """Training cannot go on (e.g. a non-finite loss); earlier checkpoints are kept."""
