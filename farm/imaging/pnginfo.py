"""PNG metadata as AUTOMATIC1111 writes it, so third-party tools (sd-parsers, Civitai, A1111's own
"PNG Info" tab) read farm images; plus a ``farm`` chunk with the exact spec for the farm itself.

Pure Pillow: safe on the light side.

The ``parameters`` text chunk follows A1111's infotext format::

    a red cube on a table
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, Model hash: abcdef1234, Model: tiny

Karras variants are written the A1111 ≥ 1.9 way (``Sampler: DPM++ 2M, Schedule type: Karras``):
sd-parsers reads that as sampler ``DPM++ 2M`` with parameter ``scheduler="Karras"``, which keeps
the sampler name comparable across schedules. Values holding ``,``, ``:`` or a newline are JSON-quoted,
as A1111's ``quote()`` does.

``Model hash`` is the worker's ``LoadedModel.hash``: for a single ``.safetensors`` checkpoint it is
A1111's own AutoV2 hash (first 10 hex digits of the file's sha256, what A1111 and Civitai show), so
readers can find the exact checkpoint; for a diffusers folder it is the same digest of ``unet/``'s
weights (there is no A1111 file to match).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any, Mapping

from PIL import Image, PngImagePlugin

from farm.request.schedulers import SCHEDULERS

__all__ = [
    "FARM_KEY", "PARAMETERS_KEY", "a1111_extra", "a1111_parameters", "add_infotext", "encode_png", "png_text",
    "quote", "read_png_metadata", "replace_text", "safety_infotext", "sampler_fields",
]

#: The text chunk A1111 writes its infotext to (and every reader looks for).
PARAMETERS_KEY = "parameters"
#: The text chunk holding the farm's own JSON spec.
FARM_KEY = "farm"

_KARRAS = " Karras"
_RESERVED = frozenset(
    {"Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model"}
)


def quote(value: object) -> str:
    """A1111's ``quote()``: JSON-quote a value that holds ``,``, ``:`` or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float | int) -> str:
    """``7`` for 7.0 and ``7.5`` for 7.5, as A1111 prints its CFG scale."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sampler_fields(scheduler: str) -> dict[str, str]:
    """A1111's ``Sampler`` (and ``Schedule type`` for Karras variants) for a farm scheduler name.

    Raised as ``ValueError`` for a name that is not in :data:`farm.request.schedulers.SCHEDULERS`.
    """
    try:
        info = SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(
            f"scheduler {scheduler!r} has no A1111 name; valid names: {', '.join(SCHEDULERS)}"
        ) from None
    name = info.a1111_name
    if info.options.get("use_karras_sigmas") or name.endswith(_KARRAS):
        return {"Sampler": name.removesuffix(_KARRAS), "Schedule type": "Karras"}
    return {"Sampler": name}


def a1111_parameters(
    params: Mapping[str, Any],
    *,
    model_name: str,
    model_hash: str | None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The infotext A1111 would write for ``params`` (one image's spec).

    ``params`` needs ``prompt``, ``negative_prompt``, ``steps``, ``scheduler`` (farm name),
    ``guidance_scale``, ``seed``, ``width`` and ``height``; other keys are ignored. ``extra`` is
    appended in order as ``Key: value`` (e.g. ``{"Denoising strength": "0.75", "Clip skip": "2"}``).

    Raised as ``ValueError`` when the scheduler is unknown or an ``extra`` key is empty, holds
    ``,``/``:``/a newline, or repeats a standard key.
    """
    fields: dict[str, str] = {"Steps": str(int(params["steps"]))}
    fields.update(sampler_fields(params["scheduler"]))
    fields["CFG scale"] = _number(params["guidance_scale"])
    fields["Seed"] = str(int(params["seed"]))
    fields["Size"] = f"{int(params['width'])}x{int(params['height'])}"
    if model_hash:
        fields["Model hash"] = model_hash
    if model_name:
        fields["Model"] = model_name
    for key, value in (extra or {}).items():
        _check_extra_key(key, fields)
        fields[key] = str(value)

    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    prompt = str(params.get("prompt") or "")
    negative = str(params.get("negative_prompt") or "")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    # A1111: f"{prompt}{negative}\n{params}".strip()
    return f"{prompt}{negative_line}\n{line}".strip()


def _check_extra_key(key: str, taken: Mapping[str, str]) -> None:
    if not key or key != key.strip() or any(c in key for c in ",:\n") or key in _RESERVED or key in taken:
        raise ValueError(
            f"extra infotext key {key!r} must be a non-empty name without ',', ':' or newlines "
            f"and not one of the standard keys ({', '.join(sorted(_RESERVED))})"
        )


def add_infotext(parameters: str, extra: Mapping[str, str]) -> str:
    """``parameters`` (an infotext) with ``extra`` appended to its last line, as ``a1111_parameters``'s
    ``extra`` would have put them (same key rules; values quoted the same way)."""
    if not extra:
        return parameters
    head, _, last = parameters.rpartition("\n")
    present = {part.split(":", 1)[0].strip(): "" for part in last.split(", ") if ":" in part}
    for key in extra:
        _check_extra_key(key, present)
    added = ", ".join(f"{key}: {quote(value)}" for key, value in extra.items())
    line = f"{last}, {added}" if last.strip() else added
    return f"{head}\n{line}" if head else line


def safety_infotext(verdict: Mapping[str, Any]) -> dict[str, str]:
    """The infotext keys of a safety check (``{"policy", "flagged", "checker", "scores"}``, as
    recorded in an image's ``safety``): ``Safety: blur, NSFW: true, NSFW score: -0.084``. The score is
    the highest concept score (above 0: flagged)."""
    fields = {"Safety": str(verdict["policy"]), "NSFW": "true" if verdict.get("flagged") else "false"}
    score = (verdict.get("scores") or {}).get("nsfw")
    if score is not None:
        fields["NSFW score"] = f"{float(score):.3f}"
    return fields


def encode_png(image: Image.Image, *, parameters: str, spec: Mapping[str, Any]) -> bytes:
    """``image`` as PNG bytes with a ``parameters`` chunk (A1111's) and a ``farm`` JSON chunk.

    ``parameters`` goes in tEXt when it is latin-1 and in iTXt (UTF-8) otherwise, so unicode
    prompts survive; the spec is ``json.dumps(spec, sort_keys=True)`` (ASCII, so tEXt).
    """
    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt(PARAMETERS_KEY, parameters)
    else:
        info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(FARM_KEY, json.dumps(dict(spec), sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes):
    """``(start, end, type, body)`` of each chunk of PNG ``data``; ValueError if it is not a PNG."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"not a PNG ({len(data)} bytes)")
    at = len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        end = at + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        yield at, end, kind, data[at + 8 : at + 8 + length]
        at = end
        if kind == b"IEND":
            return


def _text_of(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """``(keyword, text)`` of an uncompressed tEXt or iTXt chunk (what :func:`encode_png` writes)."""
    keyword, _, rest = body.partition(b"\x00")
    if kind == b"tEXt":
        return keyword.decode("latin-1"), rest.decode("latin-1")
    if kind == b"iTXt" and rest[:1] == b"\x00":  # not compressed
        _language, _, rest = rest[2:].partition(b"\x00")
        _translated, _, text = rest.partition(b"\x00")
        return keyword.decode("latin-1"), text.decode("utf-8")
    return None


def png_text(data: bytes) -> dict[str, str]:
    """The uncompressed text chunks of PNG ``data``, read from its bytes without decoding a pixel."""
    found = {}
    for _start, _end, kind, body in _chunks(data):
        if kind in (b"tEXt", b"iTXt"):
            text = _text_of(kind, body)
            if text is not None:
                found[text[0]] = text[1]
    return found


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _text_chunk(keyword: str, text: str) -> bytes:
    try:
        return _chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", keyword.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8"))


_REPLACED = (PARAMETERS_KEY.encode(), FARM_KEY.encode())


def replace_text(data: bytes, *, parameters: str, spec: Mapping[str, Any]) -> bytes:
    """PNG ``data`` with its ``parameters`` and ``farm`` chunks replaced (written where the first of
    them was), the pixels' chunks copied as they are: no decode, no re-encode."""
    out, written = [data[: len(_PNG_SIGNATURE)]], False
    new = _text_chunk(PARAMETERS_KEY, parameters) + _text_chunk(FARM_KEY, json.dumps(dict(spec), sort_keys=True))
    for start, end, kind, body in _chunks(data):
        keyword = body.partition(b"\x00")[0] if kind in (b"tEXt", b"iTXt", b"zTXt") else None
        if keyword in _REPLACED:
            if not written:
                out.append(new)
                written = True
            continue
        if kind == b"IEND" and not written:
            out.append(new)
            written = True
        out.append(data[start:end])
    return b"".join(out)


def read_png_metadata(data: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """``(parameters text, farm spec)`` from PNG bytes; ``None`` for a chunk that is absent.

    Raised as ``ValueError`` when ``data`` is not a PNG or the ``farm`` chunk is not a JSON object.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, Image.UnidentifiedImageError) as error:
        raise ValueError(f"not a readable image ({len(data)} bytes): {error}") from error
    with image:
        if image.format != "PNG":
            raise ValueError(f"expected a PNG, got {image.format}")
        # ``.text`` also reads text chunks that come after the image data.
        text = dict(image.text)  # type: ignore[attr-defined]
    parameters = text.get(PARAMETERS_KEY)
    raw_spec = text.get(FARM_KEY)
    if raw_spec is None:
        return parameters, None
    try:
        spec = json.loads(raw_spec)
    except json.JSONDecodeError as error:
        raise ValueError(f"the PNG's {FARM_KEY!r} chunk is not valid JSON: {error}") from error
    if not isinstance(spec, dict):
        raise ValueError(f"the PNG's {FARM_KEY!r} chunk is {type(spec).__name__}, not a JSON object")
    return parameters, spec


def a1111_extra(params: Any) -> dict[str, str]:
    """The keys A1111 adds for image-conditioned jobs and clip skip, from an ImageSpec (or its params)."""
    get = params.get if isinstance(params, Mapping) else lambda name, default=None: getattr(params, name, default)
    extra: dict[str, str] = {}
    if get("mode", "txt2img") != "txt2img" and get("strength") is not None:
        extra["Denoising strength"] = _number(get("strength"))
    if get("mode") == "inpaint":
        extra["Mask blur"] = str(int(get("mask_blur", 0) or 0))
    if int(get("clip_skip", 1) or 1) > 1:
        extra["Clip skip"] = str(int(get("clip_skip")))
    embeddings = [_pair(e) for e in get("embeddings") or ()]
    if embeddings:  # A1111's line, so its PNG Info and civitai recognise the embeddings used
        extra["TI hashes"] = ", ".join(f"{name}: {sha[:12]}" for name, sha in embeddings)  # quoted when written
    return extra


def _pair(embedding: Any) -> tuple[str, str]:
    """(name, sha256) of an embedding as an ImageSpec holds it (a pair) or its params (a dict)."""
    if isinstance(embedding, Mapping):
        return str(embedding["name"]), str(embedding["sha256"])
    name, sha = embedding
    return str(name), str(sha)
