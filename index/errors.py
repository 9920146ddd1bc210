"""Domain exceptions. The CLI maps ClipdexError to exit 1 and UsageProblem to exit 2."""

from __future__ import annotations

__all__ = [
    "ClipdexError",
    "EmptyLibrary",
    "ModelMismatch",
    "ModelUnavailable",
    "UsageProblem",
    "CaptionFileError",
]


class ClipdexError(Exception):
    """A failure the user can understand and act on; never shown with a traceback."""


class UsageProblem(ClipdexError):
    """The request itself is wrong (empty query, bad option value)."""


class ModelUnavailable(ClipdexError):
    """A model spec could not be loaded (weights not downloadable, bad path, unknown name)."""


class ModelMismatch(ClipdexError):
    """The library was built with another model than the one asked for."""


class EmptyLibrary(ClipdexError):
    """A search was asked of a library (or target) that holds nothing yet."""


class CaptionFileError(ClipdexError):
    """A caption file is empty, unreadable or in an unknown format."""
