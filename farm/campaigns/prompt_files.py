"""Prompt files for campaigns: JSONL, CSV or Parquet, streamed row by row, and parameter sweeps.

Every problem is a :class:`~farm.errors.ValidationError` that names the file, the line (or row)
number and the field, found before anything is written or queued.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import stat
from pathlib import Path
from typing import Any, Iterator

from farm.errors import ValidationError
from farm.request.text import shown, shown_path, text_problem

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


#: Longest line of a JSONL or CSV prompt file, in bytes (a row is a few request fields; a longer
#: line is a broken or hostile file, refused before it is held in memory).
MAX_LINE_BYTES = 1024 * 1024
#: Longest row id (ids are hashed into item keys, never stored whole; this keeps errors and memory sane).
MAX_ID_CHARS = 1000


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
        raise ValidationError(field, shown(value), "must be true or false", where=where)
    try:
        if kind is int:
            if len(text) > 20:  # past any limit; int() of 4,300+ digits raises anyway
                raise ValueError
            return int(text)
        number = float(text)
    except ValueError:
        raise ValidationError(field, shown(value), f"must be {'an integer' if kind is int else 'a number'}", where=where) from None
    if not math.isfinite(number):
        raise ValidationError(field, shown(value), "must be a finite number", where=where)
    return number


#: The canonical form a row's content is hashed in: exactly ``json.dumps(fields, sort_keys=True,
#: ensure_ascii=False, default=str)`` (item keys of rows without an id depend on it, so it never
#: changes), with the encoder built once instead of per row.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str).encode
_JSON_STR = json.encoder.encode_basestring  # what that encoder writes a str as (ensure_ascii=False)


def canonical(fields: dict[str, Any]) -> str:
    """``_CANONICAL(fields)``, character for character, built directly when every value is a plain
    str, int, finite float, bool or None (a prompt file's usual row: ~5× faster than the encoder);
    anything else goes through the encoder itself."""
    parts = []
    for key in sorted(fields):
        value = fields[key]
        kind = value.__class__
        if kind is str:
            text = _JSON_STR(value)
        elif kind is int:
            text = int.__repr__(value)
        elif kind is float and math.isfinite(value):
            text = float.__repr__(value)
        elif kind is bool:
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        else:
            return _CANONICAL(fields)
        parts.append(f"{_JSON_STR(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def row_id(explicit: str | None, fields: dict[str, Any]) -> str:
    """A row's stable id: its ``id`` column, or else a hash of its content."""
    if explicit is not None:
        return explicit
    # surrogatepass: valid text encodes as plain UTF-8 (same hash); a lone surrogate is hashed here
    # and refused by the request checks, which name its field
    return hashlib.sha256(canonical(fields).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def finish_row(number: int, raw: dict[str, Any], where: str) -> Row:
    fields = {}
    types = FIELD_TYPES
    for key, value in raw.items():
        if value is None or (value.__class__ is str and not value):
            continue
        if key.__class__ is not str:
            raise ValidationError("column", shown(key), "column names must be text", where=where)
        fields[key] = coerce(key, value, where) if key in types else value
    if not isinstance(fields.get("prompt"), str):
        raise ValidationError("prompt", shown(fields.get("prompt")), "is required in every row", where=where)
    explicit = fields.pop(ID_COLUMN, None)
    if explicit is None:
        return number, None, fields
    if isinstance(explicit, bool) or not isinstance(explicit, (str, int)):
        raise ValidationError(ID_COLUMN, shown(explicit), "must be text or an integer", where=where)
    explicit = str(explicit)
    if len(explicit) > MAX_ID_CHARS:
        raise ValidationError(ID_COLUMN, shown(explicit), f"is {len(explicit)} characters; at most {MAX_ID_CHARS}", where=where)
    problem = text_problem(explicit)
    if problem:
        raise ValidationError(ID_COLUMN, shown(explicit), problem, where=where)
    return number, explicit, fields


def read_rows(path: Path) -> Iterator[Row]:
    """Stream ``(number, id column or None, fields)`` from a ``.jsonl``, ``.csv`` or ``.parquet`` file.

    The file must be a regular file (not a directory, a device such as /dev/zero, or a pipe), its
    text UTF-8 (a byte-order mark is skipped), its lines at most :data:`MAX_LINE_BYTES`; a Parquet
    file must be one. Each problem is one ValidationError naming the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".parquet"):
        raise ValidationError("file", shown(path.name), "must end in .jsonl, .csv or .parquet")
    if suffix == ".csv":
        _check_regular(path)
        yield from _csv(path)
    elif suffix == ".parquet":
        _check_regular(path)
        yield from _parquet(path)
    else:
        yield from _jsonl(path)


def _check_regular(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:
        raise ValidationError("file", shown_path(path), f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device or pipe, not a regular file"
        raise ValidationError("file", shown_path(path), f"is {kind}; give a .jsonl, .csv or .parquet file")


def _open(path: Path, **kwargs):
    try:
        return open(path, **kwargs)
    except OSError as exc:
        raise ValidationError("file", shown_path(path), f"cannot be read ({exc.strerror or exc})") from None


def _long_line(path: Path, number: int) -> ValidationError:
    return ValidationError(
        "line", f"more than {MAX_LINE_BYTES} bytes", f"is too long: lines of a prompt file hold at most {MAX_LINE_BYTES} "
        "bytes (is it a prompt file?)", where=f"{path.name} line {number}",
    )


def _not_utf8(path: Path, number: int, line: bytes, exc: UnicodeDecodeError) -> ValidationError:
    return ValidationError(
        "line", shown(line[max(0, exc.start - 20) : exc.start + 20]),
        f"is not UTF-8 text (byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line): save the file as UTF-8",
        where=f"{path.name} line {number}",
    )


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-empty line of a JSONL file (a regular, UTF-8 file of
    bounded lines); a line that is not JSON is a ValidationError naming the file and line."""
    path = Path(path)
    _check_regular(path)
    with _open(path, mode="rb") as handle:
        number = 0
        while line := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise _long_line(path, number)
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, number, line, exc) from None
            if not text.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValidationError("line", shown(text.strip()[:60]), f"is not valid JSON ({exc.msg})", where=where) from None
            except RecursionError:
                raise ValidationError("line", shown(text.strip()[:60]), "nests JSON too deep: a row is an object of request fields", where=where) from None
            except ValueError as exc:  # an integer of more than 4,300 digits
                raise ValidationError("line", shown(text.strip()[:60]), f"is not valid JSON ({exc})", where=where) from None


def _jsonl(path: Path) -> Iterator[Row]:
    for number, raw in json_lines(path):
        where = f"{path.name} line {number}"
        if not isinstance(raw, dict):
            raise ValidationError("line", shown(raw), "must be a JSON object", where=where)
        yield finish_row(number, raw, where)


def _bounded_lines(handle, path: Path) -> Iterator[str]:
    """The lines of a text file, refusing one longer than MAX_LINE_BYTES (counted in characters)."""
    number = 0
    while line := handle.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise _long_line(path, number)
        yield line


def _csv(path: Path) -> Iterator[Row]:
    with _open(path, mode="r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(_bounded_lines(handle, path), strict=True)
        start = 1
        try:
            columns = next(reader, None) or []
            if "prompt" not in columns:
                raise ValidationError(
                    "prompt", None, f"column is missing; the header has {shown(columns)!r}", where=f"{path.name} line 1"
                )
            width = len(columns)
            while True:
                start = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    return
                if not cells:  # an empty line
                    continue
                where = f"{path.name} line {reader.line_num}"
                if len(cells) > width:
                    raise ValidationError("line", shown(cells[width:]), f"has more cells than the {width} columns", where=where)
                yield finish_row(reader.line_num, dict(zip(columns, cells)), where)
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message:
                message = 'a quoted cell opens on this line and is never closed (an unbalanced ")'
            raise ValidationError("line", f"line {start}", f"is not valid CSV: {message}", where=f"{path.name} line {start}") from None
        except UnicodeDecodeError:
            raise _first_bad_utf8(path) from None


def _first_bad_utf8(path: Path) -> ValidationError:
    """The first line of ``path`` that is not UTF-8 (after a decode error somewhere in its text)."""
    with _open(path, mode="rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _not_utf8(path, number, line, exc)
    return ValidationError("file", shown(path.name), "is not UTF-8 text: save the file as UTF-8")


def _parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the campaign extra
        raise ValidationError("file", path.name, "reading Parquet needs pyarrow: pip install 'farm[campaign]'") from None
    import pyarrow as pa

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValidationError("file", shown(path.name), f"is not a readable Parquet file ({_first_line(exc)})") from None
    if "prompt" not in names:
        raise ValidationError("prompt", None, f"column is missing; the columns are {shown(names)!r}", where=path.name)
    number = 0
    batches = table.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ValidationError(
                "file", shown(path.name), f"is not a readable Parquet file ({_first_line(exc)})", where=f"{path.name} row {number + 1}"
            ) from None
        if rows is None:
            return
        for raw in rows:
            number += 1
            yield finish_row(number, raw, f"{path.name} row {number}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else type(exc).__name__)


def parse_sweeps(items: list[str] | dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``["seed=1,2,3", "guidance_scale=5,7.5"]`` → ``{"seed": [1, 2, 3], "guidance_scale": [5.0, 7.5]}``.

    Refused: a field that cannot be swept or is swept twice, a value given twice (both would be the
    same images), and ``size`` with ``width`` or ``height`` (they set the same fields).
    """
    sweeps: dict[str, list[Any]] = {}
    if isinstance(items, dict):
        for field, values in items.items():
            if not isinstance(field, str):
                raise ValidationError("sweep", shown(field), f"must name a field; sweepable fields: {', '.join(SWEEPABLE)}")
            sweeps[field] = _sweep_values(field, [str(v) for v in (values if isinstance(values, (list, tuple)) else [values])])
    elif isinstance(items, (list, tuple)):
        for item in items:
            if not isinstance(item, str):
                raise ValidationError("sweep", shown(item), "must be FIELD=V1,V2,… (e.g. seed=1,2,3)")
            field, sep, values = item.partition("=")
            field = field.strip()
            if not sep or not values.strip():
                raise ValidationError("sweep", shown(item), "must be FIELD=V1,V2,… (e.g. seed=1,2,3)")
            if field in sweeps:
                raise ValidationError("sweep", shown(field), "is swept twice: give all its values in one FIELD=V1,V2,…")
            sweeps[field] = _sweep_values(field, values.split(","))
    else:
        raise ValidationError("sweeps", shown(items), 'must be a list like ["seed=1,2,3"] or a dict like {"seed": [1, 2, 3]}')
    if "size" in sweeps and ("width" in sweeps or "height" in sweeps):
        raise ValidationError("sweep", "size", "cannot be swept together with width or height (they set the same fields)")
    return sweeps


def _sweep_values(field: str, values: list[str]) -> list[Any]:
    if field not in SWEEPABLE:
        raise ValidationError("sweep", shown(field), f"cannot be swept; sweepable fields: {', '.join(SWEEPABLE)}")
    out = []
    seen: set = set()
    for value in values:
        value = value.strip()
        if field == "size":
            w, sep, h = value.lower().partition("x")
            if not sep:
                raise ValidationError("sweep size", shown(value), "must be WIDTHxHEIGHT, e.g. 512x768")
            parsed: Any = {"width": coerce("width", w, "sweep size"), "height": coerce("height", h, "sweep size")}
            ident: Any = (parsed["width"], parsed["height"])
        else:
            parsed = ident = coerce(field, value, f"sweep {field}")
        if ident in seen:
            raise ValidationError(f"sweep {field}", shown(value), "is given twice (both would be the same images)")
        seen.add(ident)
        out.append(parsed)
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
