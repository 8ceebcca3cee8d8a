"""The LoRA registry: files checked at registration, stored once by content, referenced by jobs.

A LoRA is accepted only as safetensors (read here from its JSON header alone: nothing is unpickled,
no tensor is loaded), in the diffusers/peft layout (``unet.….lora_A.weight``) or the kohya/A1111
layout (``lora_unet_…lora_down.weight`` with ``.alpha``), under a size cap, and only when its
layers exist, with matching shapes, in a base architecture the farm knows: SD1.x (bundled table of
module shapes) or one of the configured models whose folder is readable here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sqlalchemy import select

from farm import registry
from farm.errors import ValidationError
from farm.request.text import shown, text_problem
from farm.storage.keys import content_key
from farm.db.tables import LoraRecord, utcnow

if TYPE_CHECKING:
    from farm.services import Services

__all__ = ["LoraInfo", "add", "inspect", "listing", "parse_ref", "remove", "resolve"]

SD1_TABLE = Path(__file__).parent / "data" / "sd1_modules.json"
#: A LoRA's name (``loras.name`` is varchar(128)); matched whole (``fullmatch``: ``$`` would let a
#: trailing newline through).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: LoRAs one request may name.
MAX_LORAS_PER_REQUEST = 16
#: Bytes per element of each safetensors dtype (the format's own list).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class LoraInfo:
    sha256: str
    size: int
    format: str  # diffusers | kohya
    base: str  # the architecture it fits: "sd1" or a configured model's name
    layers: int

    @property
    def key(self) -> str:
        return content_key("loras", self.sha256, "safetensors")


def _module_of(key: str) -> tuple[str, str] | None:
    """``(normalised module name, part)`` of a LoRA tensor key, part in down/up/alpha; None if not LoRA."""
    for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
                         (".lora_A.weight", "down"), (".lora_B.weight", "up"),
                         (".lora.down.weight", "down"), (".lora.up.weight", "up")):
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return None
    if module.startswith("lora_unet_"):
        return "unet_" + module[len("lora_unet_"):], part
    if module.startswith("lora_te_"):
        return "text_encoder_" + module[len("lora_te_"):].replace("text_model_", "", 1), part
    module = module.replace(".text_model.", ".").replace(".processor.", ".")
    for old, new in ((".to_q_lora", ".to_q"), (".to_k_lora", ".to_k"), (".to_v_lora", ".to_v"), (".to_out_lora", ".to_out.0")):
        module = module.replace(old, new)
    return module.replace(".", "_"), part


def _header(data: bytes, label: Any) -> dict[str, Any]:
    """The tensors' entries of a safetensors header, checked against the file as safetensors itself
    does: each entry has a known dtype, a shape of non-negative integers and ``data_offsets``
    ``[begin, end]`` whose length is the shape's bytes, and the entries tile the data after the
    header exactly (no gap, no overlap, nothing pointing past the end of the file)."""
    if len(data) < 8:
        raise ValidationError("lora", label, "is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, 100 * 1024 * 1024):
        raise ValidationError("lora", label, "is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ValidationError("lora", label, "is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValidationError("lora", label, "is not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    body = len(data) - 8 - length
    spans = []
    for key, meta in header.items():
        where = f"is not a valid safetensors file: tensor {shown(key)!r}"
        if not isinstance(meta, dict):
            raise ValidationError("lora", label, f"{where} has no description")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ValidationError("lora", label, f"{where} has dtype {shown(dtype)!r}; known: {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(type(n) is int and 0 <= n < 2**40 for n in shape):
            raise ValidationError("lora", label, f"{where} has shape {shown(shape)!r}, not a list of sizes")
        if (
            not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValidationError("lora", label, f"{where} has data_offsets {shown(offsets)!r}, not [begin, end]")
        if offsets[1] > body:
            raise ValidationError(
                "lora", label, f"{where} ends at byte {offsets[1]} of the data, past its end ({body} bytes): "
                "truncated or corrupt",
            )
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValidationError(
                "lora", label, f"{where} holds {offsets[1] - offsets[0]} bytes; shape {shape} of {dtype} needs "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]}",
            )
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ValidationError(
                "lora", label, f"is not a valid safetensors file: tensor {shown(key)!r} starts at byte {begin} of the "
                f"data, expected {position} (tensors overlap or leave a gap)",
            )
        position = end
    if position != body:
        raise ValidationError(
            "lora", label, f"is not a valid safetensors file: its tensors cover {position} of the {body} data bytes",
        )
    return header


def _tables(services: "Services") -> dict[str, dict[str, list[int]]]:
    """Module shapes of the architectures a LoRA may fit: SD1.x, and each readable configured model."""
    tables = {"sd1": {k.replace(".", "_"): v for k, v in json.loads(SD1_TABLE.read_text()).items()}}
    catalogue = services.catalogue
    for name in catalogue.names:
        folder = catalogue.folder(name)  # None: not readable here (a hub id, a tiny model not built yet)
        table: dict[str, list[int]] = {}
        for component in ("unet", "text_encoder"):
            for weights in sorted((folder / component).glob("*.safetensors")) if folder is not None else []:
                with open(weights, "rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    header = json.loads(handle.read(length))
                for key, meta in header.items():
                    if key.endswith(".weight") and isinstance(meta, dict) and len(meta.get("shape", [])) in (2, 4):
                        module = f"{component}.{key[:-len('.weight')]}".replace(".text_model.", ".")
                        table[module.replace(".", "_")] = meta["shape"][:2]
        if table:
            tables[name] = table
    return tables


def _load(source: str | Path | bytes, limits) -> tuple[bytes, Any]:
    """``(data, label)``: the bytes of a LoRA file (a regular file, read once, up to the size cap)."""
    return registry.read_file(
        source, field="lora", max_bytes=limits.max_lora_bytes, cap=" (FARM_LIMITS__MAX_LORA_BYTES)",
        convert="convert it (e.g. load it yourself and save with safetensors.torch.save_file)",
    )


def inspect(services: "Services", source: str | Path | bytes) -> LoraInfo:
    """Check a LoRA file; raise :class:`~farm.errors.ValidationError` saying what is wrong."""
    data, label = _load(source, services.settings.limits)
    return _inspect(services, data, label)


def _inspect(services: "Services", data: bytes, label: Any) -> LoraInfo:
    if data[:2] == b"\x80\x02" or data[:4] == b"PK\x03\x04":
        raise ValidationError("lora", label, "is a pickle/zip (torch.save) file: farm loads safetensors only and never unpickles")
    header = _header(data, label)

    modules: dict[str, dict[str, list[int]]] = {}
    kohya = diffusers = False
    for key, meta in header.items():
        found = _module_of(key)
        if found is None:
            continue
        module, part = found
        kohya |= key.startswith(("lora_unet_", "lora_te_"))
        diffusers |= not key.startswith(("lora_unet_", "lora_te_"))
        modules.setdefault(module, {})[part] = meta.get("shape", []) if isinstance(meta, dict) else []
    if not modules:
        raise ValidationError(
            "lora", label, "has no LoRA tensors (expected diffusers '….lora_A.weight' or kohya 'lora_unet_….lora_down.weight' keys)"
        )
    if kohya and diffusers:
        raise ValidationError("lora", label, "mixes the kohya and diffusers key layouts")

    fits = []
    for base, table in _tables(services).items():
        if all(_fits(parts, table.get(module)) for module, parts in modules.items()):
            fits.append(base)
    if not fits:
        sample = sorted(modules)[0]
        raise ValidationError(
            "lora", label, f"has layers that match no layer of a known base model (sd1, {', '.join(sorted(services.settings.models))}): "
            f"e.g. {sample!r} is missing or has another shape"
        )
    return LoraInfo(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), format="kohya" if kohya else "diffusers",
        base=fits[0], layers=len(modules),
    )


def _fits(parts: Mapping[str, list[int]], shape: list[int] | None) -> bool:
    if shape is None:
        return False
    down, up = parts.get("down"), parts.get("up")
    if not down or not up:
        return False
    return down[1] == shape[1] and up[0] == shape[0]


def add(services: "Services", source: str | Path | bytes, name: str) -> LoraRecord:
    """Check, upload (once, by content) and register a LoRA under ``name``."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValidationError("name", shown(name), "must be 1–128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    data, label = _load(source, services.settings.limits)  # read once: what is checked is what is stored
    info = _inspect(services, data, label)
    with services.sessions() as session:
        if session.scalar(select(LoraRecord).where(LoraRecord.name == name)) is not None:
            raise ValidationError("name", name, "is taken: `farm lora rm` it first, or pick another name")
    record = LoraRecord(
        id=str(uuid.uuid4()), name=name, sha256=info.sha256, size=info.size, format=info.format, base=info.base,
        layers=info.layers, storage_key=info.key, created_at=utcnow(),
    )
    return registry.register(services, info.key, data, record)


def listing(services: "Services") -> list[LoraRecord]:
    return registry.listing(services, LoraRecord)


def remove(services: "Services", name: str) -> None:
    """Forget a name (the stored file stays: other names or past images may refer to it)."""
    registry.remove(services, LoraRecord, name, what="LoRA", command="farm lora list")


def parse_ref(text: str, *, index: int | None = None, field: str = "loras") -> dict[str, Any]:
    """``"ink"`` or ``"ink:0.8"`` (the CLI's ``--lora``, a prompt file's cell) → ``{"name", "weight"}``."""
    name, sep, weight = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    try:
        return {"name": name.strip(), "weight": float(weight) if sep else 1.0}
    except ValueError:
        raise ValidationError(field, shown(text), "must be NAME or NAME:WEIGHT, e.g. ink:0.8", index=index) from None


def resolve(services: "Services", refs: Any, index: int | None = None) -> tuple[tuple[str, float], ...]:
    """LoRA references → ``((sha256, weight), …)``, refusing unknown ones.

    ``refs``: ``[{"name"|"sha256": …, "weight": w}, …]``, items may also be ``"NAME[:WEIGHT]"``
    strings, or one string of them separated by commas or spaces (a CSV cell).
    """
    if refs is None:
        return ()
    if isinstance(refs, str):
        refs = [part for part in refs.replace(",", " ").split() if part]
    if not isinstance(refs, (list, tuple)):
        raise ValidationError("loras", shown(refs), 'must be a list like [{"name": "ink", "weight": 0.8}]', index=index)
    if len(refs) > MAX_LORAS_PER_REQUEST:
        raise ValidationError("loras", f"{len(refs)} LoRAs", f"at most {MAX_LORAS_PER_REQUEST} per request", index=index)
    resolved = []
    with services.sessions() as session:
        for n, ref in enumerate(refs):
            where = f"loras[{n}]"
            if isinstance(ref, str):
                ref = parse_ref(ref, index=index, field=where)
            if not isinstance(ref, Mapping) or not ({"name", "sha256"} & set(ref)):
                raise ValidationError(where, shown(ref), 'must be {"name": …, "weight": …} or {"sha256": …, "weight": …}', index=index)
            weight = ref.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -4.0 <= weight <= 4.0:
                raise ValidationError(f"{where}.weight", shown(weight), "must be a number between -4 and 4", index=index)
            column = LoraRecord.name if "name" in ref else LoraRecord.sha256
            value = ref.get("name", ref.get("sha256"))
            if not isinstance(value, str) or len(value) > 128 or text_problem(value, names=True):
                raise ValidationError(
                    where, shown(value), "must name a registered LoRA by its name or sha256 (`farm lora list`)", index=index
                )
            record = session.scalar(select(LoraRecord).where(column == value).limit(1))
            if record is None:
                known = ", ".join(session.scalars(select(LoraRecord.name).order_by(LoraRecord.name).limit(20)))
                raise ValidationError(where, value, f"is not a registered LoRA (known: {known or 'none'}); `farm lora add FILE --name NAME`", index=index)
            resolved.append((record.sha256, float(weight)))
    if len({sha for sha, _ in resolved}) != len(resolved):
        raise ValidationError("loras", refs, "names the same LoRA twice", index=index)
    return tuple(sorted(resolved))
