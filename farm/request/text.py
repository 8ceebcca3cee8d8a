"""Values from outside, made safe to check and to show: bounded display, Unicode text, names and labels.

Every error the request path raises shows the value it refuses. A hostile value must not break the
error itself: a 10 MB string, a list nested 900 deep (``repr`` recurses), an integer of 5,000
digits (``repr`` raises past 4,300), a lone surrogate (cannot be encoded, nor printed to a strict
stream). :func:`shown` gives such values a short, printable stand-in and leaves ordinary ones as
they are, so ``ValidationError.value`` stays what was given in every ordinary case.

:func:`check_text` and :func:`check_name` refuse text the database cannot store (text that is not
valid Unicode, NUL) and names that would be ambiguous when printed or typed back (control
characters, a trailing newline, surrounding spaces); both give the limit in characters, which is
what a PostgreSQL ``varchar(n)`` counts (SQLite would store anything, so the limit is checked here,
up front, identically on both).
"""

from __future__ import annotations

import reprlib
import unicodedata
from typing import Any

from farm.errors import ValidationError

__all__ = [
    "LABEL_MAX_CHARS", "Shown", "check_label", "check_name", "check_text", "shown", "shown_path", "text_problem",
]

#: A submission's label: ``submissions.label`` is ``varchar(255)``.
LABEL_MAX_CHARS = 255
#: Longest text an error shows of a value.
SHOW_CHARS = 60
#: Longest int shown in full (longer ones are described by their digit count).
_SHOW_DIGITS = 40


class Shown:
    """A stand-in for a value that cannot be shown as it is; its ``repr`` is a short description."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Shown) and other.text == self.text

    __hash__ = None  # type: ignore[assignment]


class _Repr(reprlib.Repr):
    """reprlib, bounded in depth, width and length, with huge ints described instead of written out."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6
        self.maxstring = SHOW_CHARS
        self.maxother = SHOW_CHARS
        self.maxlong = _SHOW_DIGITS

    def repr_int(self, x: int, level: int) -> str:
        return _int_text(x)

    def repr_str(self, x: str, level: int) -> str:
        return _str_text(x)


def _int_text(value: int) -> str:
    if value.bit_length() <= 128:
        return repr(value)
    digits = int(value.bit_length() * 0.30103) + 1
    return f"<an integer of about {digits} digits>"


def _str_text(value: str) -> str:
    if len(value) <= SHOW_CHARS:
        return repr(value)  # escapes lone surrogates and control characters
    return repr(value[:SHOW_CHARS]) + f"… ({len(value)} characters)"


_REPR = _Repr()


def shown(value: Any) -> Any:
    """``value`` itself when its ``repr`` is short and safe; else a :class:`Shown` describing it."""
    kind = value.__class__
    if value is None or kind is bool or kind is float:
        return value
    if kind is int:
        return value if value.bit_length() <= 128 else Shown(_int_text(value))
    if kind is str:
        return value if len(value) <= SHOW_CHARS else Shown(_str_text(value))
    try:
        return Shown(_REPR.repr(value))
    except Exception:  # noqa: BLE001 - a hostile __repr__: describe by type alone
        return Shown(f"<a {type(value).__name__}>")


def shown_path(path: Any) -> Any:
    """A file path as an error shows it: whole up to 200 characters, else its end (the file's name
    matters more than its folders)."""
    text = str(path)
    if len(text) <= 200:
        return text if not text_problem(text) else Shown(repr(text))
    return Shown(repr("…" + text[-150:]))


def text_problem(value: str, *, names: bool = False) -> str | None:
    """What makes ``value`` unfit to store and show, or None.

    Always refused: NUL and text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``
    cannot be encoded as UTF-8, so no database, file or terminal takes it). With ``names``, also
    control characters (newlines, tabs, escapes), Unicode line separators, and leading or
    trailing spaces.
    """
    if value.isascii():  # the common case: one C-level scan
        if "\x00" in value:
            return f"must not contain NUL characters (at character {value.index(chr(0))})"
        if names:
            if not value.isprintable():
                position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
                return f"must not contain control characters ({char!r} at character {position})"
            if value != value.strip():
                return "must not start or end with spaces"
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"is not valid Unicode text: {value[exc.start]!r} at character {exc.start} is a lone surrogate "
            "(text must be encodable as UTF-8)"
        )
    if "\x00" in value:
        return f"must not contain NUL characters (at character {value.index(chr(0))})"
    if names:
        for position, char in enumerate(value):
            if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
                return f"must not contain control characters ({char!r} at character {position})"
        if value != value.strip():
            return "must not start or end with spaces"
    return None


def check_text(
    field: str, value: Any, *, max_chars: int, index: int | None = None, where: str | None = None
) -> str:
    """``value`` if it is a string of at most ``max_chars`` characters, valid Unicode and without NUL."""
    if not isinstance(value, str):
        raise ValidationError(field, shown(value), "must be a string", index=index, where=where)
    if len(value) > max_chars:
        raise ValidationError(
            field, Shown(_str_text(value[:40])), f"is {len(value)} characters; at most {max_chars} are allowed",
            index=index, where=where,
        )
    problem = text_problem(value)
    if problem:
        raise ValidationError(field, shown(value), problem, index=index, where=where)
    return value


def check_name(
    field: str, value: Any, *, max_chars: int, index: int | None = None, where: str | None = None
) -> str:
    """A name (a campaign's, a LoRA's): 1 to ``max_chars`` printable characters, no surrounding spaces."""
    if not isinstance(value, str):
        raise ValidationError(field, shown(value), f"must be a string of 1 to {max_chars} characters", index=index, where=where)
    if not value or len(value) > max_chars:
        raise ValidationError(
            field, shown(value), f"is {len(value)} characters; it must be 1 to {max_chars}", index=index, where=where
        )
    problem = text_problem(value, names=True)
    if problem:
        raise ValidationError(field, shown(value), problem, index=index, where=where)
    return value


def check_label(value: Any, *, field: str = "label") -> str | None:
    """A submission's label: None, or a name of at most :data:`LABEL_MAX_CHARS` characters."""
    if value is None:
        return None
    return check_name(field, value, max_chars=LABEL_MAX_CHARS)
