"""One error tree. Every error the farm raises on purpose is a :class:`FarmError`.

The CLI turns them into one ``error: …`` line in one place (``farm.cli.main``) with exit code 2
(bad usage, input or configuration), 1 meaning only "the work ran and (some of it) failed".
"""

from __future__ import annotations

__all__ = [
    "ConfigError", "FarmError", "Incomplete", "InputError", "LoraError", "MissingObject", "ModelLoadError", "NotFound",
    "PublishError", "RenderError", "SchemaOutOfDate", "StorageError", "ValidationError", "WaitTimeout",
]


class FarmError(Exception):
    """Raised by the farm on purpose; the base of every other error here."""


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


class MissingObject(StorageError):
    """Raised when a storage key holds no object (a deleted input, a wrong key)."""


class PublishError(FarmError):
    """Raised when work was recorded but could not (all) be handed to the broker.

    Nothing is lost: the images stay queued in the database and are published again.
    """


class InputError(FarmError):
    """Raised when a stored input image (init image, mask) is corrupt, altered or does not decode."""


class LoraError(FarmError):
    """Raised when a LoRA file cannot be fetched, cached or loaded by a worker (its job fails, the worker goes on)."""


class ModelLoadError(FarmError):
    """Raised when a worker cannot load a model (missing files, pickle-only weights, wrong layout)."""


class RenderError(FarmError):
    """Raised when a batch cannot be rendered with the loaded pipeline (e.g. an inpainting UNet in txt2img)."""


class Incomplete(FarmError):
    """Raised when a download is asked for all of a submission's images and some have not succeeded."""


class WaitTimeout(FarmError):
    """Raised when :meth:`Submission.wait` runs out of time before every image finished."""
