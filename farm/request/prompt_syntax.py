"""A1111's prompt attention syntax: ``(word)``, ``((word))``, ``[word]``, ``(word:1.3)``, ``BREAK``.

Pure Python (light side): the submitter validates and records prompts with it, the worker
(:mod:`workers.diffusion.prompts`) turns the parsed form into weighted text embeddings.

:func:`parse` is a faithful port of AUTOMATIC1111 stable-diffusion-webui's
``modules/prompt_parser.parse_prompt_attention``, quirks included, so a prompt means here what it
means there:

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1; nesting multiplies
  (``((x))`` is 1.21); ``(x:1.3)`` sets an explicit factor (also multiplied by enclosing brackets).
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` and ``\\\\`` are literal characters; a lone backslash vanishes.
* Brackets still open at the end apply to the rest of the prompt (``(unbalanced`` is 1.1); a closing
  bracket with nothing open is plain text, and so is ``:1.2)`` with no ``(`` open.
* ``BREAK`` (upper case, as a word) outside brackets becomes the marker ``("BREAK", -1.0)``: the
  worker starts a new 75-token window there. Inside brackets A1111 multiplies the marker's weight,
  so it stops being a marker and is encoded as the word "BREAK" (kept as is).
* Adjacent pieces of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

Why not a library: no maintained package on PyPI implements A1111's attention grammar (compel has
its own, different syntax and weighting maths; see ``workers/prompts.py``), and the original is a
30-line regular-expression scanner, so porting it exactly is the safest way to match A1111.
"""

from __future__ import annotations

import re

__all__ = [
    "BREAK",
    "MAX_NESTING",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "check",
    "describe",
    "has_syntax",
    "is_plain",
    "parse",
]

#: The text of the marker chunk that starts a new 75-token window (its weight is -1).
BREAK = "BREAK"
#: Weights a submitted prompt may give any piece of text (after nesting is multiplied in).
MIN_WEIGHT = 0.0
MAX_WEIGHT = 10.0
#: Deepest bracket nesting a submitted prompt may use (``(((((((((x)))))))))`` is 9).
MAX_NESTING = 8

_ROUND = 1.1
_SQUARE = 1 / 1.1

# Exactly A1111's tokens, in A1111's order (the order matters: escapes first).
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
#: Where a prompt breaks into 75-token windows: ``BREAK`` as a word, with the whitespace around it.
#: A1111 writes ``\s*\bBREAK\b\s*``, which backtracks quadratically on a long run of whitespace (each
#: start inside the run rescans it). This form matches the same spans in linear time: a match starts
#: only where a whitespace run starts (``(?<!\s)\s*``), or right at ``BREAK`` after whitespace that an
#: earlier match already took (``(?<=\s)``); ``re.split`` never resumes inside a run, because the
#: trailing ``\s*`` of a match takes the whole run.
_RE_BREAK = re.compile(r"(?:(?<!\s)\s*|(?<=\s))\bBREAK\b\s*", re.S)


class _TooDeep(Exception):
    """Raised inside :func:`_parse` when nesting passes ``max_depth`` (``depth`` is the deepest seen)."""

    def __init__(self, depth: int):
        self.depth = depth


def is_plain(prompt: str) -> bool:
    """True when the prompt cannot hold any syntax: no ``(``, ``[``, backslash or ``BREAK``.

    Such a prompt parses to itself at weight 1 (a stray ``)``, ``]`` or ``:1.2)`` is plain text), so
    the submit path skips the parser for it: most prompts of a big campaign are plain.
    """
    return "(" not in prompt and "[" not in prompt and "\\" not in prompt and "BREAK" not in prompt


def _parse(text: str, max_depth: int | None = None) -> tuple[list[list], int]:
    """A1111's ``parse_prompt_attention`` plus the deepest bracket nesting seen (for :func:`check`).

    Linear in the prompt's length when ``max_depth`` is given: each piece is multiplied once per
    bracket open around it, so past ``max_depth`` the pieces are dropped and only the depth is
    followed (raising :class:`_TooDeep` with the deepest nesting at the end).
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    depth = 0
    too_deep = False

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token = m.group(0)
        weight = m.group(1)

        if too_deep:  # only the depth matters now; no piece is kept
            if token == "(":
                round_brackets.append(0)
            elif token == "[":
                square_brackets.append(0)
            elif weight is not None and round_brackets:
                round_brackets.pop()
            elif token == ")" and round_brackets:
                round_brackets.pop()
            elif token == "]" and square_brackets:
                square_brackets.pop()
        elif token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                factor = float(weight)
            except ValueError:  # "1.2.3" or "." match the pattern; A1111's float() raises too
                raise ValueError(f"attention weight {weight!r} in {m.group(0)!r} is not a number") from None
            multiply_range(round_brackets.pop(), factor)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE)
        elif "BREAK" not in token:
            res.append([token, 1.0])
        else:
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append([BREAK, -1.0])
                res.append([part, 1.0])
        depth = max(depth, len(round_brackets) + len(square_brackets))
        if max_depth is not None and depth > max_depth:
            too_deep = True
    if too_deep:
        raise _TooDeep(depth)

    for pos in round_brackets:
        multiply_range(pos, _ROUND)
    for pos in square_brackets:
        multiply_range(pos, _SQUARE)

    if not res:
        res = [["", 1.0]]

    # merge runs of identical weights (one pass; the texts joined once, not concatenated piece by piece)
    merged: list[list] = []
    parts: list[str] = []
    for piece in res:
        if merged and merged[-1][1] == piece[1]:
            parts.append(piece[0])
            continue
        if len(parts) > 1:
            merged[-1][0] = "".join(parts)
        merged.append(piece)
        parts = [piece[0]]
    if len(parts) > 1:
        merged[-1][0] = "".join(parts)
    return merged, depth


def parse(prompt: str) -> list[tuple[str, float]]:
    """Split ``prompt`` into ``(text, weight)`` pieces exactly as A1111's ``parse_prompt_attention``.

    >>> parse("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    ``("BREAK", -1.0)`` marks a window break. Raises ``ValueError`` for a weight that matches A1111's
    pattern but is not a number (``(x:1.2.3)``), where A1111 fails too; :func:`check` reports it.
    """
    return [(text, weight) for text, weight in _parse(prompt)[0]]


def is_break(text: str, weight: float) -> bool:
    """True for the window-break marker that :func:`parse` emits for ``BREAK``."""
    return text == BREAK and weight == -1


def has_syntax(prompt: str) -> bool:
    """True when the syntax changes anything: ``parse`` gives more than the plain ``(prompt, 1.0)``."""
    if is_plain(prompt):
        return False
    try:
        return parse(prompt) != [(prompt, 1.0)]
    except ValueError:
        return True


def describe(prompt: str) -> list[dict]:
    """The parsed form, JSON-ready, to record on the job: ``[{"text": ..., "weight": ...}, ...]``.

    Weights are rounded to 6 decimals (A1111's own products carry float noise like 1.5730000000000004);
    a window break is ``{"text": "BREAK", "weight": -1.0}``.
    """
    return [{"text": text, "weight": round(weight, 6)} for text, weight in parse(prompt)]


def check(prompt: str, *, field: str = "prompt") -> None:
    """Refuse, at submit time, a prompt whose syntax the worker should not render.

    Raises :class:`farm.errors.ValidationError` (``field``, the prompt, and what is wrong) for a
    weight that is not a number, an effective weight outside [0, 10] (nesting multiplied in), or
    brackets nested deeper than :data:`MAX_NESTING`.
    """
    from farm.errors import ValidationError

    if is_plain(prompt):
        return
    try:
        pieces, _ = _parse(prompt, max_depth=MAX_NESTING)
    except ValueError as exc:
        raise ValidationError(field, prompt, str(exc)) from None
    except _TooDeep as exc:
        raise ValidationError(
            field, prompt, f"brackets are nested {exc.depth} deep; at most {MAX_NESTING} levels are allowed"
        ) from None
    for text, weight in pieces:
        if is_break(text, weight):
            continue
        if text == BREAK and weight < 0:
            raise ValidationError(
                field,
                prompt,
                "BREAK inside brackets is not a window break (A1111 encodes it as the word BREAK with a "
                "negative weight); put BREAK outside the brackets",
            )
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValidationError(
                field,
                prompt,
                f"attention weight {round(weight, 4):g} on {text!r} is outside "
                f"[{MIN_WEIGHT:g}, {MAX_WEIGHT:g}] (nested brackets multiply their weights)",
            )
