"""farm.request.prompt_syntax: A1111's attention syntax, parsed exactly as A1111's parse_prompt_attention does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from farm.errors import ValidationError
from farm.request.prompt_syntax import MAX_NESTING, check, describe, has_syntax, parse

# The first six are A1111's own doctests of modules/prompt_parser.parse_prompt_attention, with
# A1111's exact float results; the rest cover the other rules the same code implements.
PARSE_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    ("unnecessary(((parens)))", [("unnecessary", 1.0), ("parens", 1.3310000000000004)]),
    ("(masterpiece:1.2), [blurry]", [("masterpiece", 1.2), (", ", 1.0), ("blurry", 1 / 1.1)]),
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("[word", [("word", 1 / 1.1)]),
    ("(x: 1.3 )", [("x", 1.3)]),
    ("((x:2))", [("x", 2.2)]),
    # stray closers and a weight with nothing open are plain text
    ("x))", [("x))", 1.0)]),
    ("word:1.2) more", [("word:1.2) more", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    # escapes: \\ is a backslash, a lone backslash vanishes
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("\\(x\\) (y)", [("(x) ", 1.0), ("y", 1.1)]),
    ("", [("", 1.0)]),
    # BREAK outside brackets is the window marker (-1); inside brackets A1111 scales it like text
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_CASES, ids=[c[0] or "<empty>" for c in PARSE_CASES])
def test_parse_matches_a1111(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert parse(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle on a blue background", False),
        ("", False),
        ("x)) and word:1.2) and 16:9", False),  # parses to itself: plain text
        ("a (red) circle", True),
        ("a (red:1.0) circle", True),  # neutral weight but still written as syntax
        ("\\(literal\\)", True),  # escapes change the text
        ("a BREAK b", True),
        ("(x:1.2.3)", True),  # unparseable weight: not plain
    ],
)
def test_has_syntax(prompt: str, expected: bool) -> None:
    assert has_syntax(prompt) is expected


def test_describe_is_json_ready_and_rounded() -> None:
    parsed = describe("a ((house:1.3)) BREAK [on]")
    assert parsed == [
        {"text": "a ", "weight": 1.0},
        {"text": "house", "weight": 1.43},  # 1.4300000000000002 in parse()
        {"text": "", "weight": 1.0},  # BREAK takes the spaces around it
        {"text": "BREAK", "weight": -1.0},
        {"text": "", "weight": 1.0},
        {"text": "on", "weight": 0.909091},
    ]
    assert json.loads(json.dumps(parsed)) == parsed
    assert describe("plain") == [{"text": "plain", "weight": 1.0}]


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle",
        "(masterpiece:1.2), [blurry], (((best)))",
        "(x:0)",
        "(x:10)",
        "a BREAK b",
        "(" * MAX_NESTING + "deep" + ")" * MAX_NESTING,
        "x)) ratio 16:9",
    ],
)
def test_check_accepts(prompt: str) -> None:
    check(prompt)


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("a (red:12) circle", "12 on 'red' is outside [0, 10]"),
        ("a (red:-1) circle", "-1 on 'red' is outside [0, 10]"),
        ("((((x:9))))", "on 'x' is outside [0, 10]"),  # 9 * 1.1**3: nesting multiplies
        ("(" * (MAX_NESTING + 1) + "deep", f"nested {MAX_NESTING + 1} deep"),
        ("[" * 12 + "deep" + "]" * 12, "nested 12 deep"),
        ("(x:1.2.3)", "'1.2.3'"),
        ("(a BREAK b)", "BREAK inside brackets"),
    ],
)
def test_check_rejects_with_field_and_value(prompt: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check(prompt)
    assert caught.value.field == "prompt"
    assert caught.value.value == prompt
    assert says in caught.value.limit
    assert str(caught.value).startswith(f"prompt={prompt!r} is invalid")

    with pytest.raises(ValidationError) as caught:
        check(prompt, field="negative_prompt")
    assert caught.value.field == "negative_prompt"


def test_parse_raises_value_error_on_a_bad_weight() -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse("(x:.)")


def test_import_is_light() -> None:
    script = (
        "import json, sys\n"
        "import farm.request.prompt_syntax as ps\n"
        "ps.check('a (red:1.3) circle'); ps.describe('[x]')\n"
        "print(json.dumps([m for m in ('torch', 'transformers', 'diffusers', 'compel') if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# -- the linear parser against A1111's original, on random prompts ------------------------------------

import random
import re

# A1111's modules/prompt_parser.py, verbatim but for the depth it does not track (the reference here:
# farm's parser was rewritten to be linear and must still give exactly this).
_A1111_ATTENTION = re.compile(
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
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_parse(text: str) -> tuple[list[list], int]:
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    depth = 0

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in _A1111_ATTENTION.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(_A1111_BREAK, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
        depth = max(depth, len(round_brackets) + len(square_brackets))
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res, depth


_ALPHABET = ["(", ")", "[", "]", ":", "1", ".", "5", "2", " ", "  ", "\t", "\n", "\\", "a", "cat", "B", "BREAK",
             " BREAK ", "BREAKFAST", "+", "-", ",", "é"]


def _outcome(function, prompt: str):
    try:
        return ("ok", function(prompt))
    except ValidationError as exc:
        return ("refused", exc.limit)
    except ValueError:
        return ("ValueError", None)


def _reference_check(prompt: str) -> None:
    """farm's check as it was before the linear parser, on A1111's own parse."""
    try:
        pieces, depth = a1111_parse(prompt)
    except ValueError as exc:
        raise ValidationError("prompt", prompt, str(exc)) from None
    if depth > MAX_NESTING:
        raise ValidationError("prompt", prompt, f"brackets are nested {depth} deep; at most {MAX_NESTING} levels are allowed")
    for text, weight in pieces:
        if text == "BREAK" and weight == -1:
            continue
        if text == "BREAK" and weight < 0:
            raise ValidationError("prompt", prompt, "BREAK inside brackets")
        if not 0.0 <= weight <= 10.0:
            raise ValidationError("prompt", prompt, f"attention weight {round(weight, 4):g} on {text!r}")


@pytest.mark.parametrize("seed", range(4))
def test_the_linear_parser_gives_exactly_a1111s_result_on_random_prompts(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2500):
        prompt = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30)))
        expected = _outcome(lambda p: [tuple(piece) for piece in a1111_parse(p)[0]], prompt)
        assert _outcome(parse, prompt) == expected, prompt
        assert has_syntax(prompt) == (expected[0] != "ok" or expected[1] != [(prompt, 1.0)]), prompt
        ours, reference = _outcome(check, prompt), _outcome(_reference_check, prompt)
        assert ours[0] == reference[0], (prompt, ours, reference)
        if ours[0] == "refused" and "nested" in reference[1]:  # the depth reported is the deepest there is
            assert ours[1] == reference[1], (prompt, ours, reference)
