"""Every domain exception clipdex raises, each knowing its CLI exit status and HTTP status.

The CLI turns a ClipdexError into one line on stderr and `exit_code`; the server into a JSON
`{"error": message}` with `http_status`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CaptionFileError",
    "ClipdexError",
    "EmptyLibrary",
    "GeneratorUnavailable",
    "LibraryUnavailable",
    "MissingExtra",
    "ModelMismatch",
    "ModelUnavailable",
    "NoLibrary",
    "NoTrainingPairs",
    "IndexWriteFailed",
    "NotFound",
    "PriorNotTrained",
    "RayFailed",
    "RayUnavailable",
    "TooLarge",
    "UsageProblem",
]


class ClipdexError(Exception):
    """A failure the user can understand and act on; never shown with a traceback."""

    exit_code = 1
    http_status = 400


class UsageProblem(ClipdexError):
    """The request itself is wrong (empty query, bad option value)."""

    exit_code = 2
    http_status = 400


class ModelUnavailable(ClipdexError):
    """A model spec could not be loaded (weights not downloadable, bad path, unknown name)."""

    http_status = 503


class ModelMismatch(ClipdexError):
    """The library was built with another model than the one asked for."""

    http_status = 409


class EmptyLibrary(ClipdexError):
    """A search was asked of a library (or target) that holds nothing yet."""

    http_status = 404


class NoLibrary(ClipdexError):
    """A reader was pointed at a home (or database) that holds no library."""

    http_status = 404


class LibraryUnavailable(ClipdexError):
    """The library's home or database cannot be used (bad URL, missing driver, unwritable
    folder, a newer schema)."""

    http_status = 503


class IndexWriteFailed(ClipdexError):
    """A vector index file could not be written (a full disk, most often). The previous file
    is kept and the store holds every vector, so nothing is lost."""

    http_status = 507


class ConcurrentWriter(ClipdexError):
    """Another writer (a second `clipdex index`, a `watch`) committed some of the same files
    while this run was embedding them. What both committed is kept; a rerun completes."""

    http_status = 409


class RayUnavailable(ClipdexError):
    """`index --ray`: the cluster at the address cannot be reached or refuses this driver, or
    a local Ray instance cannot start. Nothing was written."""

    http_status = 503


class RayFailed(ClipdexError):
    """`index --ray`: the Ray job failed (a worker could not load the model, the cluster went
    away). The batches committed before are kept; a rerun continues from there."""

    http_status = 503


class CaptionFileError(ClipdexError):
    """A caption file is empty, unreadable or in an unknown format."""


class NotFound(ClipdexError):
    """The thing a request names (an image id, a file behind it) does not exist."""

    http_status = 404


class TooLarge(ClipdexError):
    """A request, or an image in it, is over one of the server's limits."""

    http_status = 413


class PriorNotTrained(ClipdexError):
    """`--expand prior` or `--expand contrastive` asked of a library that has not trained."""


class NoTrainingPairs(ClipdexError):
    """The library has no captions linked to indexed images to learn from."""


class GeneratorUnavailable(ClipdexError):
    """The image generator for `--expand pixels` could not be loaded or run."""

    http_status = 503


class MissingExtra(ClipdexError):
    """An optional dependency is not installed; the message names the extra."""

    http_status = 501
