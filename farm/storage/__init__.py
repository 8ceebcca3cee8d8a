"""Where images, input images and LoRA files live: a local folder or an S3-compatible bucket.

:func:`open_storage` picks the backend from ``FARM_STORAGE_URL``; both backends keep the same
contract (:class:`Storage`), and object keys are built by :mod:`farm.storage.keys` only.
"""

from farm.storage.base import (
    FileStorage,
    MissingObject,
    Storage,
    atomic_write,
    check_key,
    check_metadata,
    open_storage,
)
from farm.storage.s3 import S3Storage

__all__ = [
    "FileStorage",
    "MissingObject",
    "S3Storage",
    "Storage",
    "atomic_write",
    "check_key",
    "check_metadata",
    "open_storage",
]
