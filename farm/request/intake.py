"""The one way in for a request: the Python client, the CLI and campaign rows all come through here.

For each request, in order: its input images are read and checked (a path — relative to the prompt
file for campaign rows —, bytes, or a URI of the farm's own storage), its LoRA names are resolved
to sha256s in the registry, then :func:`farm.request.spec.check_request` fills the model's defaults
(``farm.catalogue``), checks every field and the prompt syntax, and expands the request into one
:class:`~farm.request.spec.ImageSpec` per image. Nothing is written until every request of a
submission or campaign passed; :meth:`Intake.upload_inputs` then stores each input image once,
by content.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

from farm.catalogue import Catalogue
from farm.errors import ValidationError
from farm.imaging.inputs import PreparedImage, prepare_image
from farm.request.spec import GenerationRequest, ImageSpec, PreparedInputs, check_request
from farm.request.text import shown
from farm.settings import Settings, redact
from farm.storage import Storage

__all__ = ["Intake", "LoraResolver"]

#: ``(refs, index) -> ((sha256, weight), …)``: LoRA references resolved against the registry.
LoraResolver = Callable[[Any, "int | None"], tuple]
#: ``() -> farm.embeddings.Matcher``: the registered embedding names (read once per intake).
EmbeddingNames = Callable[[], Any]

_IMAGE_FIELDS = (("init_image", "RGB"), ("mask", "L"))


class Intake:
    """Prepares requests against one farm's settings, registry and storage.

    One intake serves one submission or campaign: it remembers the input images and LoRAs it has
    already checked, so a campaign that names the same init image or LoRA in every row reads and
    checks it once.
    """

    def __init__(
        self, settings: Settings, *, resolve_loras: LoraResolver, storage: Callable[[], Storage],
        embeddings: EmbeddingNames | None = None,
    ):
        self.settings = settings
        self.catalogue = Catalogue(settings)
        self._resolve_loras = resolve_loras
        self._storage = storage
        self._images: dict[tuple, PreparedImage] = {}
        self._loras: dict[str, tuple] = {}
        self._embedding_names = embeddings
        self._matcher: Any = None

    def prepare(
        self,
        request: GenerationRequest | Mapping[str, Any],
        *,
        index: int | None = None,
        base_dir: Path | None = None,
    ) -> list[ImageSpec]:
        """Check ``request`` and expand it into image specs; a ValidationError names the field.

        ``index`` locates errors (``request 3``); ``base_dir`` is where relative image paths start
        (a campaign's prompt file's folder; default: the working directory).
        """
        try:
            return self._prepare(request, index, base_dir)
        except RecursionError:  # a value nested past Python's stack (what json.loads already refuses)
            raise ValidationError(
                "request", "…", "nests too deep: request fields are flat values, lists and objects", index=index
            ) from None

    def _prepare(self, request: Any, index: int | None, base_dir: Path | None) -> list[ImageSpec]:
        if request.__class__ is not dict and isinstance(request, GenerationRequest):
            request = request.to_dict()
        inputs = None
        is_mapping = request.__class__ is dict or isinstance(request, Mapping)
        embeddings = self._embeddings_of(request) if is_mapping else ()
        if is_mapping and (
            request.get("init_image") is not None or request.get("mask") is not None or request.get("loras") is not None
            or embeddings
        ):
            inputs = PreparedInputs(
                init=self._image(request.get("init_image"), "init_image", "RGB", index, base_dir),
                mask=self._image(request.get("mask"), "mask", "L", index, base_dir),
                loras=self._loras_of(request.get("loras"), index),
                embeddings=embeddings,
            )
        return check_request(request, self.settings, index=index, inputs=inputs, catalogue=self.catalogue).images

    def upload_inputs(self) -> int:
        """Store every checked input image once (content-addressed); returns how many were new."""
        storage = self._storage()
        new = 0
        for image in {p.key: p for p in self._images.values()}.values():
            if not storage.exists(image.key):
                storage.put(image.key, image.data, content_type="image/png")
                new += 1
        return new

    # -- input images ---------------------------------------------------------------------------
    def _image(self, source: Any, field: str, mode: str, index: int | None, base_dir: Path | None) -> PreparedImage | None:
        if source is None:
            return None
        if isinstance(source, (bytes, bytearray)):
            ident = (mode, hashlib.sha256(source).hexdigest())
        else:
            source = self._locate(source, field, index, base_dir)
            ident = (mode, str(source))
        if ident not in self._images:
            self._images[ident] = prepare_image(source, field=field, limits=self.settings.limits, mode=mode, index=index)
        return self._images[ident]

    def _locate(self, source: Any, field: str, index: int | None, base_dir: Path | None) -> Any:
        """A path (relative to ``base_dir``), or the bytes behind a URI of the farm's own storage."""
        if not isinstance(source, (str, Path)):
            return source  # prepare_image names the wrong type
        text = str(source)
        if "://" in text:
            storage = self._storage()
            key = storage.key_of(text)
            if key is None:
                raise ValidationError(
                    field, shown(redact(text)), f"is a URI outside the farm's storage ({redact(repr(storage))}); give a "
                    "local path, bytes, or a URI under the farm's storage", index=index,
                )
            try:
                return storage.get(key)
            except Exception as exc:  # noqa: BLE001 - MissingObject, storage down: one clear line
                raise ValidationError(field, shown(redact(text)), f"cannot be read from storage ({redact(str(exc))})", index=index) from None
        path = Path(text).expanduser()
        return path if path.is_absolute() or base_dir is None else Path(base_dir) / path

    # -- textual-inversion embeddings -------------------------------------------------------------
    def _embeddings_of(self, request: Mapping[str, Any]) -> tuple:
        """``((name, sha256), …)`` of the registered embeddings the prompt and negative prompt use."""
        if self._embedding_names is None:
            return ()
        if self._matcher is None:
            self._matcher = self._embedding_names()
        if not self._matcher:
            return ()
        return self._matcher.find(request.get("prompt"), request.get("negative_prompt"))

    # -- LoRAs ----------------------------------------------------------------------------------
    def _loras_of(self, refs: Any, index: int | None) -> tuple:
        if not refs:
            return ()
        try:
            key = repr(refs)
        except Exception:  # noqa: BLE001 - unprintable (nested too deep, a huge int): resolve it uncached
            return self._resolve_loras(refs, index)
        if key not in self._loras:
            self._loras[key] = self._resolve_loras(refs, index)
        return self._loras[key]
