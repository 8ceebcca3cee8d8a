"""The worker's cache of input images (init images and masks), kept on local disk by content hash.

Objects are stored under content-addressed keys (``inputs/<ab>/<sha256>.png``): a download is checked
against the hash in its key before use, so a truncated or altered object fails its image with that
reason and is never cached. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from farm.errors import InputError
from farm.storage import Storage, atomic_write



class InputCache:
    def __init__(self, storage: Storage, folder: Path):
        self.storage = storage
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        """The local copy of ``key``, downloaded and verified on first use."""
        expected = Path(key).stem
        local = self.folder / key
        if local.is_file():
            return local
        data = self.storage.get(key)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise InputError(f"stored input {key} does not match its hash (got sha256 {actual[:12]}…): corrupt or altered")
        local.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(local, data)
        return local

    def image(self, key: str) -> Image.Image:
        path = self.path(key)
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            path.unlink(missing_ok=True)
            raise InputError(f"stored input {key} does not decode: {exc}") from None
