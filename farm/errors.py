"""One error tree. Every error the farm raises on purpose is a :class:`FarmError`."""

from __future__ import annotations


class FarmError(Exception):
    """Base class of every error the farm raises on purpose."""


class ConfigError(FarmError):
    """Raised when settings are missing or inconsistent (a bad URL, an unknown model location)."""


class ValidationError(FarmError):
    """Raised when a generation request breaks a rule; nothing has been written or queued.

    ``field`` names the offending field, ``value`` what was given and ``limit`` what is allowed.
    """

    def __init__(self, field: str, value: object, limit: str, *, index: int | None = None, where: str | None = None):
        self.field = field
        self.value = value
        self.limit = limit
        self.index = index
        if where is None and index is not None:
            where = f"request {index}"
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{field}={value!r} is invalid: {limit}")

    def at(self, where: str) -> "ValidationError":
        """The same error, located differently (e.g. ``requests.jsonl line 3``)."""
        return ValidationError(self.field, self.value, self.limit, index=self.index, where=where)


class NotFound(FarmError):
    """Raised when a submission, image or model named by the caller does not exist."""


class SchemaOutOfDate(FarmError):
    """Raised when the database schema is older than this code; run ``farm db upgrade``."""


class StorageError(FarmError):
    """Raised when an object cannot be written to or read from storage."""


class ModelLoadError(FarmError):
    """Raised when a worker cannot load a model (missing files, pickle-only weights, wrong layout)."""


class RenderError(FarmError):
    """Raised when a batch cannot be rendered with the loaded pipeline (e.g. an inpainting UNet in txt2img)."""


class WaitTimeout(FarmError):
    """Raised when :meth:`Submission.wait` runs out of time before every image finished."""
