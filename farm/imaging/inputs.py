"""Input images (img2img init images and inpainting masks): checked at submit, normalised, stored once.

Input images are the main door for bad and hostile input, so each is checked before anything is
queued: its size in bytes, its pixel count from the header (before any decoding, with Pillow's own
decompression-bomb guard on as well), its format (PNG, JPEG or WebP only), that it decodes whole,
and its smallest side. EXIF orientation is applied, and the result is re-encoded as a plain PNG
whose sha256 names its storage key, so the same picture is uploaded once however often it is used.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from farm.errors import ValidationError
from farm.request.text import shown, shown_path
from farm.storage.keys import content_key
from farm.settings import Limits

FORMATS = ("PNG", "JPEG", "WEBP")
RESIZE_MODES = ("resize", "crop", "fill")


@dataclass(frozen=True)
class PreparedImage:
    """A checked input image, as it will be stored: a PNG in RGB (init image) or L (mask)."""

    data: bytes
    sha256: str
    width: int
    height: int

    @property
    def key(self) -> str:
        return content_key("inputs", self.sha256, "png")


def _read(source: str | Path | bytes, field: str, limits: Limits, index: int | None) -> bytes:
    """The bytes of ``source``: bytes as given, or a regular file read up to the byte limit (a
    directory, a device such as /dev/zero or a pipe is refused before anything is read)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        where = shown_path(source)
        try:  # O_NONBLOCK: opening a pipe must not wait for a writer (regular files ignore it)
            handle = os.fdopen(os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
        except (OSError, ValueError) as exc:  # missing, unreadable, a NUL or an unencodable character in the path
            raise ValidationError(field, where, f"cannot be read ({getattr(exc, 'strerror', None) or exc})", index=index) from None
        with handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "a device or pipe"
                raise ValidationError(field, where, f"is {kind}, not an image file", index=index)
            size = os.fstat(handle.fileno()).st_size
            if size > limits.max_input_bytes:
                raise ValidationError(field, where, f"is {size} bytes; at most {limits.max_input_bytes} are allowed", index=index)
            data = handle.read(limits.max_input_bytes + 1)  # the file may have grown since
    else:
        raise ValidationError(field, type(source).__name__, "must be a file path or bytes", index=index)
    if len(data) > limits.max_input_bytes:
        raise ValidationError(field, f"{len(data)} bytes", f"at most {limits.max_input_bytes} bytes are allowed", index=index)
    return data


def prepare_image(
    source: str | Path | bytes, *, field: str, limits: Limits, mode: str = "RGB", index: int | None = None
) -> PreparedImage:
    """Check an input image and return it normalised (EXIF orientation applied, PNG, ``mode``).

    Raises :class:`~farm.errors.ValidationError` naming the field, what was wrong and the limit.
    """
    data = _read(source, field, limits, index)
    label = shown_path(source) if isinstance(source, (str, Path)) else f"<{len(data)} bytes>"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValidationError(
                field, label, f"is a decompression bomb ({exc}); at most {limits.max_input_pixels} pixels", index=index
            ) from None
        except (UnidentifiedImageError, OSError) as exc:
            raise ValidationError(field, label, f"is not a readable PNG, JPEG or WebP image ({exc})", index=index) from None
        if image.format not in FORMATS:
            raise ValidationError(field, label, f"is {image.format}; only {', '.join(FORMATS)} are accepted", index=index)
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > limits.max_input_pixels:
            raise ValidationError(
                field, f"{label} ({width}x{height})", f"has {width * height} pixels; at most {limits.max_input_pixels}", index=index
            )
        if min(width, height) < limits.min_input_side:
            raise ValidationError(
                field, f"{label} ({width}x{height})", f"must be at least {limits.min_input_side} pixels on each side", index=index
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValidationError(field, label, f"does not decode whole ({exc}): truncated or corrupt", index=index) from None
    normalised = image.convert(mode)
    out = io.BytesIO()
    normalised.save(out, format="PNG")
    png = out.getvalue()
    return PreparedImage(data=png, sha256=hashlib.sha256(png).hexdigest(), width=normalised.width, height=normalised.height)


def output_size(width: int, height: int) -> tuple[int, int]:
    """The size an image-conditioned job renders at when none is given: the input's, rounded down to
    multiples of 8 (the VAE needs them)."""
    return width - width % 8, height - height % 8


def fit(image: Image.Image, width: int, height: int, resize_mode: str, *, fill: int | tuple = 0) -> Image.Image:
    """Bring ``image`` to ``width``×``height``.

    ``resize`` stretches; ``crop`` scales to cover and cuts the centre; ``fill`` scales to fit and pads
    with ``fill`` (for a mask, pass 255 so the padding is repainted).
    """
    if image.size == (width, height):
        return image
    if resize_mode == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if resize_mode == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if resize_mode == "fill":
        return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=fill)
    raise ValueError(f"resize_mode {resize_mode!r}: one of {', '.join(RESIZE_MODES)}")
