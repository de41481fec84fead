"""User-facing errors.

Every failure a user can cause (a missing file, a wrong config, a corrupt
checkpoint, a bad flag value) raises a :class:`QnextError` subclass whose
message is one actionable line; command-line entry points print it without a
traceback.
"""


class QnextError(Exception):
    """Base class for errors that are reported to the user as one line."""


class ConfigError(QnextError):
    """config.json is missing, malformed, or has an unknown/inconsistent value."""


class CheckpointError(QnextError):
    """Weight files are missing, corrupt, truncated, or do not match the config."""


class ModelNotFoundError(QnextError):
    """A model path or repo id could not be resolved to a local folder."""


class ConversionError(QnextError):
    """A conversion cannot write or publish its output (folder exists, disk full, upload failed)."""


class CacheError(QnextError):
    """A saved prompt cache is missing, damaged, or was made by another model."""
