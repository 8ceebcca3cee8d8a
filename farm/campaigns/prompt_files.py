"""Prompt files for campaigns: JSONL, CSV or Parquet, streamed row by row, and parameter sweeps.

Every problem is a :class:`~farm.errors.ValidationError` that names the file, the line (or row)
number and the field, found before anything is written or queued.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

from farm.errors import ValidationError

#: How a text value (a CSV cell, a --sweep value) becomes a request field.
FIELD_TYPES: dict[str, type] = {
    "num_images": int,
    "seed": int,
    "steps": int,
    "guidance_scale": float,
    "width": int,
    "height": int,
    "strength": float,
    "mask_blur": int,
    "clip_skip": int,
    "paste_back": bool,
}
#: Fields a sweep may vary (``size`` is ``WxH`` and sets width and height).
SWEEPABLE = ("seed", "guidance_scale", "steps", "scheduler", "width", "height", "size", "model", "negative_prompt")
#: A column naming each row's stable id; without it the id is derived from the row's content.
ID_COLUMN = "id"

Row = tuple[int, str | None, dict[str, Any]]  # (line or row number, the id column's value, request fields)


def coerce(field: str, value: Any, where: str) -> Any:
    """Turn a text value into the field's type; an error names where, the field and the value."""
    kind = FIELD_TYPES.get(field)
    if kind is None or not isinstance(value, str):
        return value
    text = value.strip()
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValidationError(field, value, "must be true or false", where=where)
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        raise ValidationError(field, value, f"must be {'an integer' if kind is int else 'a number'}", where=where) from None


def row_id(explicit: str | None, fields: dict[str, Any]) -> str:
    """A row's stable id: its ``id`` column, or else a hash of its content."""
    if explicit is not None:
        return explicit
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def finish_row(number: int, raw: dict[str, Any], where: str) -> Row:
    fields = {k: coerce(k, v, where) for k, v in raw.items() if v is not None and v != ""}
    if not isinstance(fields.get("prompt"), str):
        raise ValidationError("prompt", fields.get("prompt"), "is required in every row", where=where)
    explicit = fields.pop(ID_COLUMN, None)
    return number, str(explicit) if explicit is not None else None, fields


def read_rows(path: Path) -> Iterator[Row]:
    """Stream ``(number, id column or None, fields)`` from a ``.jsonl``, ``.csv`` or ``.parquet`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise ValidationError("file", path.name, "must end in .jsonl, .csv or .parquet")


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError("line", line.strip()[:60], f"is not valid JSON ({exc.msg})", where=where) from None
            if not isinstance(raw, dict):
                raise ValidationError("line", line.strip()[:60], "must be a JSON object", where=where)
            yield finish_row(number, raw, where)


def _csv(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "prompt" not in columns:
            raise ValidationError(
                "prompt", None, f"column is missing; the header has {columns}", where=f"{path.name} line 1"
            )
        for raw in reader:
            where = f"{path.name} line {reader.line_num}"
            if None in raw:
                raise ValidationError("line", raw[None], f"has more cells than the {len(columns)} columns", where=where)
            yield finish_row(reader.line_num, raw, where)


def _parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the campaign extra
        raise ValidationError("file", path.name, "reading Parquet needs pyarrow: pip install 'farm[campaign]'") from None
    table = pq.ParquetFile(path)
    if "prompt" not in table.schema_arrow.names:
        raise ValidationError("prompt", None, f"column is missing; the columns are {table.schema_arrow.names}", where=path.name)
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for raw in batch.to_pylist():
            number += 1
            yield finish_row(number, raw, f"{path.name} row {number}")


def parse_sweeps(items: list[str] | dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``["seed=1,2,3", "guidance_scale=5,7.5"]`` → ``{"seed": [1, 2, 3], "guidance_scale": [5.0, 7.5]}``."""
    if isinstance(items, dict):
        return {
            field: _sweep_values(field, [str(v) for v in (values if isinstance(values, (list, tuple)) else [values])])
            for field, values in items.items()
        }
    sweeps: dict[str, list[Any]] = {}
    for item in items:
        field, sep, values = item.partition("=")
        field = field.strip()
        if not sep or not values.strip():
            raise ValidationError("sweep", item, "must be FIELD=V1,V2,… (e.g. seed=1,2,3)")
        sweeps[field] = _sweep_values(field, values.split(","))
    return sweeps


def _sweep_values(field: str, values: list[str]) -> list[Any]:
    if field not in SWEEPABLE:
        raise ValidationError("sweep", field, f"cannot be swept; sweepable fields: {', '.join(SWEEPABLE)}")
    out = []
    for value in values:
        value = value.strip()
        if field == "size":
            w, sep, h = value.lower().partition("x")
            if not sep:
                raise ValidationError("sweep size", value, "must be WIDTHxHEIGHT, e.g. 512x768")
            out.append({"width": coerce("width", w, "sweep size"), "height": coerce("height", h, "sweep size")})
        else:
            out.append(coerce(field, value, f"sweep {field}"))
    if not out:
        raise ValidationError("sweep", field, "needs at least one value")
    return out


def combinations(sweeps: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of sweep values, as request fields (the product; one empty dict without sweeps)."""
    fields = list(sweeps)
    combos = []
    for values in itertools.product(*(sweeps[f] for f in fields)):
        combo: dict[str, Any] = {}
        for field, value in zip(fields, values):
            if field == "size":
                combo.update(value)
            else:
                combo[field] = value
        combos.append(combo)
    return combos
