"""The zshard error hierarchy.

Every error a user can cause is a ``ZshardError``: the CLI prints its message as one line and exits
with code 2. Subclasses also derive from the matching built-in so callers can catch them the usual
way (``except FileNotFoundError``). Messages name the tensor, file or key at fault and the fix.
"""

from __future__ import annotations


class ZshardError(Exception):
    """Base class for every error zshard raises on bad input or bad state."""


class CheckpointNotFoundError(ZshardError, FileNotFoundError):
    """No committed checkpoint where one was expected."""


class NotACheckpointError(ZshardError, ValueError):
    """A path exists but holds no zshard checkpoint."""


class FormatVersionError(ZshardError, ValueError):
    """The checkpoint was written by a newer, unsupported format version."""


class ManifestError(ZshardError, ValueError):
    """A manifest is malformed, inconsistent or fails its checksum."""


class CorruptDataError(ZshardError, ValueError):
    """Stored bytes fail their checksum or do not match the manifest."""


class OutputExistsError(ZshardError, FileExistsError):
    """The output already exists and ``overwrite`` was not given."""


class StorageError(ZshardError, OSError):
    """A storage backend could not be reached or written."""


class InvalidArgumentError(ZshardError, ValueError):
    """A command or function argument is out of range or malformed."""


class SafetensorsFormatError(ZshardError, ValueError):
    """A safetensors file has a bad header or truncated data."""


class ConfigError(ZshardError, ValueError):
    """A training configuration is malformed: unknown key, wrong type, bad value."""
