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


# How much of an input an error message may show: a value read from a file or the command line
# can be megabytes long (or, through YAML aliases, gigabytes once expanded), and a message that
# prints it whole costs the memory it was meant to protect.
SHOWN_CHARACTERS = 200


def clip(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` cut to at most about ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 40, 20)]}... ({len(text):,} characters)"


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """A bounded ``repr`` of an input value for an error message: long strings, long or deeply
    nested lists and mappings are elided while the repr is built (never built whole first)."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxstring = bounded.maxother = bounded.maxlong = limit // 2
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 6
    if isinstance(value, int) and abs(value).bit_length() > 4 * limit:  # no decimal expansion
        return f"<an integer of about {int(abs(value).bit_length() * 0.30103):,} digits>"
    try:
        return clip(bounded.repr(value), limit)
    except ValueError:  # an integer inside a container past Python's digit limit
        return f"<a {type(value).__name__} too large to show>"
