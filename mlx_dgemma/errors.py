"""Every error mlx_dgemma raises on bad input, in one place.

Each is a ``ValueError`` with a one-line message naming the file, key or value and what
was expected; the command lines print it and exit 2, the server answers 400. The
modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or not a DiffusionGemma config."""


class WeightsError(ValueError):
    """Missing, truncated or mismatched weight files."""


class AdapterError(WeightsError):
    """Adapters that do not fit the model (one line, naming the file). A ``WeightsError``,
    so that every command that loads a model reports it the same way."""


class ConvertError(ValueError):
    """A conversion that cannot go ahead: bad arguments, output folder problems."""


class GenerateInputError(ValueError):
    """Bad input to a generation call (one-line message)."""


class SettingsError(ValueError):
    """A sampler setting out of range (one-line message naming the setting)."""


class ConstraintError(ValueError):
    """A canvas constraint out of range (one-line message)."""


class DataError(ValueError):
    """Training data that cannot be used (one line, naming the file and line)."""


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, truncated, too large."""


class SudokuInputError(ValueError):
    """A puzzle that cannot be read or breaks the rules (one-line message)."""


class UsageError(ValueError):
    """A bad flag or config value (one line)."""
