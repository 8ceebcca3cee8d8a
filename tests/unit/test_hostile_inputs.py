"""Hostile input (issue 12, items 7 and 8): every bad input gets ONE error line naming the field (or
the file and line), the value and the limit, before anything is written or queued; no traceback; no
password in sight.

Table-driven: each case is one bad input through one door — the Python client (``Farm.submit_many``
on an embedded farm), campaigns (dict rows, JSONL, CSV, Parquet files), the LoRA registry, input
images, settings (``FARM_*`` → ConfigError) and the ``farm`` command (click's CliRunner, in process).
After each case the database holds no submission, image, campaign or LoRA row and the broker folder
holds no message. (Poison broker messages are covered elsewhere.)
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from farm import ConfigError, Farm, FarmError, Settings, ValidationError
from farm.db.tables import CampaignRecord, ImageRecord, LoraRecord, SubmissionRecord
from farm.request.text import Shown, shown

PASSWORD = "hunter2"


# -- what every case checks -------------------------------------------------------------------------


def nothing_written(farm: Farm) -> None:
    """No row of any kind, no message in the broker folder."""
    with farm.sessions() as session:
        for table in (SubmissionRecord, ImageRecord, CampaignRecord, LoraRecord):
            assert session.query(table).count() == 0, f"{table.__tablename__} has rows"
    broker = farm.settings.data_dir / "broker"
    assert not list(broker.rglob("*.msg")) if broker.exists() else True, "a message was queued"


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text and PASSWORD not in text
    return lines[0]


def refused(call: Callable[[], Any], *expected: str, error: type = ValidationError, field: str | None = None) -> str:
    """Run ``call``; it must raise ``error`` whose message is one line holding every ``expected`` text."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    one_line(message)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    if field is not None:
        assert caught.value.field == field, message
    return message


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# -- the Python client: one bad field per case -------------------------------------------------------

HUGE = 10**400
ENORMOUS = 10**5000  # repr() raises past 4,300 digits

# (id, request fields (prompt "x" unless given), field named, text in the message)
REQUEST_CASES = [
    ("prompt-lone-surrogate", {"prompt": "a \ud800 b"}, "prompt", "lone surrogate"),
    ("prompt-low-surrogate", {"prompt": "\udfff"}, "prompt", "lone surrogate"),
    ("negative-lone-surrogate", {"negative_prompt": "blurry \ud83d"}, "negative_prompt", "lone surrogate"),
    ("prompt-nul", {"prompt": "a\x00b"}, "prompt", "NUL"),
    ("prompt-too-long", {"prompt": "x" * 4001}, "prompt", "at most 4000"),
    ("prompt-int", {"prompt": 123}, "prompt", "must be a string"),
    ("prompt-none", {"prompt": None}, "prompt", "must be a string"),
    ("prompt-list", {"prompt": ["a"]}, "prompt", "must be a string"),
    ("prompt-bytes", {"prompt": b"a red circle"}, "prompt", "must be a string"),
    ("prompt-deep", {"prompt": nested(5000)}, "prompt", "must be a string"),
    ("prompt-too-deep-brackets", {"prompt": "(" * 500 + "x"}, "prompt", "nested 500 deep"),
    ("guidance-huge-int", {"guidance_scale": HUGE}, "guidance_scale", "between"),
    ("guidance-huge-negative", {"guidance_scale": -HUGE}, "guidance_scale", "between"),
    ("guidance-enormous", {"guidance_scale": ENORMOUS}, "guidance_scale", "digits"),
    ("guidance-inf", {"guidance_scale": math.inf}, "guidance_scale", "finite"),
    ("guidance-nan", {"guidance_scale": math.nan}, "guidance_scale", "finite"),
    ("guidance-str", {"guidance_scale": "7.5"}, "guidance_scale", "finite number"),
    ("guidance-bool", {"guidance_scale": True}, "guidance_scale", "finite number"),
    ("guidance-list", {"guidance_scale": [7.5]}, "guidance_scale", "finite number"),
    ("steps-huge", {"steps": HUGE}, "steps", "between 1 and 150"),
    ("steps-enormous", {"steps": ENORMOUS}, "steps", "digits"),
    ("steps-float", {"steps": 20.0}, "steps", "integer"),
    ("steps-str", {"steps": "20"}, "steps", "integer"),
    ("steps-bool", {"steps": True}, "steps", "integer"),
    ("steps-negative", {"steps": -1}, "steps", "between"),
    ("seed-huge", {"seed": HUGE}, "seed", str(2**32 - 1)),
    ("seed-negative", {"seed": -1}, "seed", "between"),
    ("seed-past-32-bits", {"seed": 2**32}, "seed", "between"),
    ("seed-float", {"seed": 1.5}, "seed", "integer"),
    ("seed-str", {"seed": "1"}, "seed", "integer"),
    ("seed-bool", {"seed": False}, "seed", "integer"),
    ("seeds-huge", {"seeds": [HUGE]}, "seeds[0]", "between"),
    ("seeds-enormous", {"seeds": [1, ENORMOUS]}, "seeds[1]", "digits"),
    ("seeds-str", {"seeds": "123"}, "seeds", "list"),
    ("seeds-empty", {"seeds": []}, "seeds", "non-empty"),
    ("seeds-float", {"seeds": [1.0]}, "seeds[0]", "integer"),
    ("seeds-deep", {"seeds": nested(5000)}, "seeds[0]", "integer"),
    ("num-images-huge", {"num_images": HUGE}, "num_images", "between 1 and 256"),
    ("num-images-zero", {"num_images": 0}, "num_images", "between"),
    ("num-images-past-cap", {"num_images": 257}, "num_images", "256"),
    ("num-images-float", {"num_images": 2.0}, "num_images", "integer"),
    ("num-images-bool", {"num_images": True}, "num_images", "integer"),
    ("width-huge", {"width": HUGE}, "width", "between 64 and 2048"),
    ("width-64-bit", {"width": 2**63}, "width", "between"),
    ("width-float", {"width": 512.0}, "width", "integer"),
    ("width-str", {"width": "512"}, "width", "integer"),
    ("width-bool", {"width": True}, "width", "integer"),
    ("width-negative", {"width": -512}, "width", "between"),
    ("height-enormous", {"height": ENORMOUS}, "height", "digits"),
    ("height-not-multiple-of-8", {"height": 100}, "height", "multiple of 8"),
    ("scheduler-surrogate", {"scheduler": "\ud800"}, "scheduler", "unknown scheduler"),
    ("scheduler-megabyte", {"scheduler": "s" * 1_000_000}, "scheduler", "1000000 characters"),
    ("scheduler-int", {"scheduler": 5}, "scheduler", "unknown scheduler"),
    ("scheduler-list", {"scheduler": ["dpmpp_2m"]}, "scheduler", "unknown scheduler"),
    ("model-surrogate", {"model": "\ud800"}, "model", "unknown model"),
    ("model-too-long", {"model": "m" * 200}, "model", "unknown model"),
    ("model-dict", {"model": {"a": 1}}, "model", "unknown model"),
    ("clip-skip-huge", {"clip_skip": HUGE}, "clip_skip", "between 1 and 2"),
    ("clip-skip-3", {"clip_skip": 3}, "clip_skip", "between 1 and 2"),
    ("clip-skip-float", {"clip_skip": 1.0}, "clip_skip", "integer"),
    ("strength-without-image", {"strength": 0.5}, "strength", "init_image"),
    ("mask-blur-huge-without-image", {"mask_blur": HUGE}, "mask_blur", "init_image"),
    ("paste-back-str-without-image", {"paste_back": "yes"}, "paste_back", "init_image"),
    ("resize-mode-surrogate-without-image", {"resize_mode": "\ud800"}, "resize_mode", "init_image"),
    ("lora-unknown", {"loras": "nobody"}, "loras[0]", "not a registered LoRA"),
    ("lora-name-newline", {"loras": [{"name": "ink\n"}]}, "loras[0]", "registered LoRA"),
    ("lora-name-surrogate", {"loras": [{"name": "\ud800"}]}, "loras[0]", "registered LoRA"),
    ("lora-name-list", {"loras": [{"name": ["a"]}]}, "loras[0]", "registered LoRA"),
    ("lora-name-huge", {"loras": [{"name": "n" * 100_000}]}, "loras[0]", "registered LoRA"),
    ("lora-sha-int", {"loras": [{"sha256": 5}]}, "loras[0]", "registered LoRA"),
    ("lora-weight-huge", {"loras": [{"name": "a", "weight": HUGE}]}, "loras[0].weight", "between -4 and 4"),
    ("lora-weight-nan", {"loras": [{"name": "a", "weight": math.nan}]}, "loras[0].weight", "between -4 and 4"),
    ("lora-weight-bool", {"loras": [{"name": "a", "weight": True}]}, "loras[0].weight", "number"),
    ("lora-deep", {"loras": [nested(5000)]}, "loras[0]", "must be"),
    ("lora-int", {"loras": 5}, "loras", "must be a list"),
    ("lora-too-many", {"loras": [{"name": f"l{i}"} for i in range(17)]}, "loras", "at most 16"),
    ("lora-weight-inf-text", {"loras": "ink:inf"}, "loras[0].weight", "between -4 and 4"),
    ("lora-weight-1e400-text", {"loras": "ink:1e400"}, "loras[0].weight", "between -4 and 4"),
    ("lora-weight-word", {"loras": "ink:heavy"}, "loras[0]", "NAME:WEIGHT"),
    ("unknown-field-surrogate", {"\ud800": 1}, None, "unknown field"),
    ("unknown-field-newline", {"a\nb": 1}, None, "unknown field"),
    ("unknown-field-int-key", {1: 2}, "1", "unknown field"),
    ("unknown-field-huge-key", {"k" * 10_000: 1}, None, "unknown field"),
    ("unknown-field-huge-value", {"colour": "x" * 10**7}, "colour", "unknown field"),
]


@pytest.mark.parametrize(("fields", "field", "says"), [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES])
def test_a_bad_request_field_is_one_line_and_nothing_is_written(embedded_farm, fields, field, says) -> None:
    request = {"prompt": "x", **fields}
    message = refused(lambda: embedded_farm.submit_many([request]), says)
    assert message.startswith("request 0: ")
    if field is not None:
        assert message.startswith(f"request 0: {field}="), message
    assert len(message) < 1200, f"the message shows too much: {len(message)} characters"
    nothing_written(embedded_farm)


# (id, the request, text in the message)
NOT_A_REQUEST = [
    ("a-string", "a red circle", "must be an object"),
    ("none", None, "must be an object"),
    ("deep-list", nested(5000), "must be an object"),
    ("huge-int", ENORMOUS, "digits"),
    ("bytes", b"\xff" * 10**6, "must be an object"),
]


@pytest.mark.parametrize(("request_", "says"), [c[1:] for c in NOT_A_REQUEST], ids=[c[0] for c in NOT_A_REQUEST])
def test_a_request_that_is_not_an_object_is_refused(embedded_farm, request_, says) -> None:
    refused(lambda: embedded_farm.submit_many([request_]), "request 0: request=", says, field="request")
    nothing_written(embedded_farm)


# -- input images: files that lie about their type, devices, folders, bad paths ---------------------


def _image_cases(tmp: Path) -> dict[str, dict[str, Any]]:
    good = tmp / "good.png"
    good.write_bytes(png_bytes())
    (tmp / "text.png").write_text("not an image at all\n")
    (tmp / "folder.png").mkdir()
    os.mkfifo(tmp / "pipe.png")
    os.symlink("/dev/zero", tmp / "zero.png")
    return {
        "dev-zero": {"init_image": "/dev/zero"},
        "dev-null": {"init_image": "/dev/null"},
        "symlink-to-dev-zero": {"init_image": str(tmp / "zero.png")},
        "folder": {"init_image": str(tmp / "folder.png")},
        "fifo": {"init_image": str(tmp / "pipe.png")},
        "text-named-png": {"init_image": str(tmp / "text.png")},
        "missing": {"init_image": str(tmp / "missing.png")},
        "surrogate-path": {"init_image": "\ud800.png"},
        "nul-in-path": {"init_image": "a\x00b.png"},
        "int": {"init_image": 5},
        "garbage-bytes": {"init_image": b"\x00\x01" * 100},
        "outside-storage-uri": {"init_image": "s3://elsewhere/x.png"},
        "mask-dev-zero": {"init_image": str(good), "mask": "/dev/zero"},
        "mask-folder": {"init_image": str(good), "mask": str(tmp / "folder.png")},
        "strength-huge": {"init_image": str(good), "strength": HUGE},
        "strength-nan": {"init_image": str(good), "strength": math.nan},
        "strength-str": {"init_image": str(good), "strength": "0.5"},
        "resize-mode-surrogate": {"init_image": str(good), "resize_mode": "\ud800"},
        "resize-mode-list": {"init_image": str(good), "resize_mode": ["crop"]},
        "mask-blur-huge": {"init_image": str(good), "mask_blur": HUGE},
        "paste-back-str": {"init_image": str(good), "paste_back": "yes"},
    }


IMAGE_FIELDS = {
    "dev-zero": ("init_image", "device or pipe"),
    "dev-null": ("init_image", "device or pipe"),
    "symlink-to-dev-zero": ("init_image", "device or pipe"),
    "folder": ("init_image", "directory"),
    "fifo": ("init_image", "device or pipe"),
    "text-named-png": ("init_image", "not a readable PNG"),
    "missing": ("init_image", "cannot be read"),
    "surrogate-path": ("init_image", "cannot be read"),
    "nul-in-path": ("init_image", "cannot be read"),
    "int": ("init_image", "file path or bytes"),
    "garbage-bytes": ("init_image", "not a readable PNG"),
    "outside-storage-uri": ("init_image", "outside the farm's storage"),
    "mask-dev-zero": ("mask", "device or pipe"),
    "mask-folder": ("mask", "directory"),
    "strength-huge": ("strength", "between 0 and 1"),
    "strength-nan": ("strength", "between 0 and 1"),
    "strength-str": ("strength", "between 0 and 1"),
    "resize-mode-surrogate": ("resize_mode", "resize, crop, fill"),
    "resize-mode-list": ("resize_mode", "resize, crop, fill"),
    "mask-blur-huge": ("mask_blur", "between 0 and 64"),
    "paste-back-str": ("paste_back", "true or false"),
}


@pytest.mark.parametrize("case", list(IMAGE_FIELDS))
def test_a_bad_input_image_is_refused_before_anything_is_read_or_written(embedded_farm, tmp_path, case) -> None:
    fields = _image_cases(tmp_path)[case]
    field, says = IMAGE_FIELDS[case]
    started = time.monotonic()
    message = refused(lambda: embedded_farm.submit_many([{"prompt": "x", **fields}]), f"request 0: {field}=", says)
    assert time.monotonic() - started < 30, "a device was read"
    assert len(message) < 1200
    nothing_written(embedded_farm)
    assert not list((embedded_farm.settings.data_dir / "images").rglob("*.png"))


# -- labels: the CLI and Farm.submit_many both check them (farm.request.text.check_label) -------------

LABELS = [("too-long", "x" * 300, "1 to 255"), ("newline", "batch\n1", "control"), ("surrogate", "\ud800", "surrogate")]


@pytest.mark.parametrize(("label", "says"), [c[1:] for c in LABELS], ids=[c[0] for c in LABELS])
def test_a_bad_label_is_refused_by_the_cli(farm_cli, embedded_farm, label, says) -> None:
    result = farm_cli("submit", "--prompt", "x", "--label", label)
    assert result.exit_code == 2
    assert "--label=" in one_line(result.stderr) and says in result.stderr
    nothing_written(embedded_farm)


@pytest.mark.parametrize(("label", "says"), [c[1:] for c in LABELS], ids=[c[0] for c in LABELS])
def test_a_bad_label_is_refused_by_the_client(embedded_farm, label, says) -> None:
    refused(lambda: embedded_farm.submit_many([{"prompt": "x"}], label=label), says)
    nothing_written(embedded_farm)


# -- campaigns from Python: names, sweeps, priority, row sources -------------------------------------

# (id, campaign name, text in the message)
CAMPAIGN_NAMES = [
    ("trailing-newline", "nightly\n", "control characters"),
    ("tab", "a\tb", "control characters"),
    ("escape", "a\x1b[31mred", "control characters"),
    ("line-separator", "a\u2028b", "control characters"),
    ("surrogate", "\ud800", "valid Unicode"),
    ("nul", "a\x00b", "NUL"),
    ("padded", " nightly ", "spaces"),
    ("too-long-for-postgres", "c" * 230, "1 to 200"),
    ("past-255", "c" * 300, "1 to 255"),
    ("empty", "", "1 to 255"),
    ("int", 5, "string"),
]


@pytest.mark.parametrize(("name", "says"), [c[1:] for c in CAMPAIGN_NAMES], ids=[c[0] for c in CAMPAIGN_NAMES])
def test_a_bad_campaign_name_is_refused(embedded_farm, name, says) -> None:
    refused(lambda: embedded_farm.campaign(name).submit([{"prompt": "a red circle"}]), says)
    nothing_written(embedded_farm)


# (id, submit keyword arguments, text in the message)
CAMPAIGN_OPTIONS = [
    ("sweep-value-twice", {"sweeps": ["seed=1,1"]}, "given twice"),
    ("sweep-float-twice", {"sweeps": ["guidance_scale=5,5.0"]}, "given twice"),
    ("sweep-field-twice", {"sweeps": ["seed=1", "seed=2"]}, "swept twice"),
    ("sweep-size-and-width", {"sweeps": ["size=64x64", "width=64"]}, "together with width"),
    ("sweep-not-text", {"sweeps": [5]}, "FIELD=V1"),
    ("sweep-a-string", {"sweeps": "seed=1"}, "must be a list"),
    ("sweep-unknown-field", {"sweeps": ["prompt=a,b"]}, "cannot be swept"),
    ("sweep-huge-int", {"sweeps": ["seed=" + "9" * 5000]}, "integer"),
    ("sweep-inf", {"sweeps": ["guidance_scale=inf"]}, "finite"),
    ("sweep-dict-key", {"sweeps": {5: [1]}}, "must name a field"),
    ("priority-huge", {"priority": HUGE}, "between 0"),
    ("priority-bool", {"priority": True}, "between 0"),
    ("priority-str", {"priority": "1"}, "between 0"),
    ("priority-negative", {"priority": -1}, "between 0"),
]


@pytest.mark.parametrize(("options", "says"), [c[1:] for c in CAMPAIGN_OPTIONS], ids=[c[0] for c in CAMPAIGN_OPTIONS])
def test_bad_campaign_options_are_refused(embedded_farm, options, says) -> None:
    refused(lambda: embedded_farm.campaign("c").submit([{"prompt": "a red circle"}], **options), says)
    nothing_written(embedded_farm)


def test_a_sweep_past_the_cap_is_refused_before_the_product_is_built(embedded_farm) -> None:
    """3,000 × 2,999 combinations (9M dicts, gigabytes) are counted, not built."""
    tracemalloc.start()
    try:
        refused(
            lambda: embedded_farm.campaign("c").submit(
                [{"prompt": "a red circle"}], sweeps={"seed": list(range(3000)), "steps": list(range(1, 3000))}
            ),
            "8997000 combinations", "5000000",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024, f"{peak / 2**20:.0f} MB held before refusing"
    nothing_written(embedded_farm)


# (id, rows, text in the message)
ROW_CASES = [
    ("row-not-a-dict", [{"prompt": "a"}, "b"], "row 2"),
    ("row-int-key", [{1: "x", "prompt": "a"}], "column names must be text"),
    ("row-prompt-surrogate", [{"prompt": "a"}, {"prompt": "\ud800"}], "row 2: prompt="),
    ("row-prompt-missing", [{"seed": 1}], "prompt"),
    ("row-id-repeated", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}], "row 3: id='a' is invalid: repeats row 1"),
    ("row-int-id-repeated", [{"id": 7, "prompt": "x"}, {"id": "7", "prompt": "y"}], "repeats row 1"),
    ("row-same-content", [{"prompt": "x", "seed": 1}, {"prompt": "x", "seed": 1}], "row 2: row='x' is invalid: is the same row as row 1"),
    ("row-id-surrogate", [{"id": "\ud800", "prompt": "x"}], "lone surrogate"),
    ("row-id-list", [{"id": [1], "prompt": "x"}], "text or an integer"),
    ("row-id-huge", [{"id": "i" * 2000, "prompt": "x"}], "at most 1000"),
    ("row-deep-loras", [{"prompt": "x", "loras": nested(5000)}], "row 1: row="),
    ("row-huge-seed", [{"prompt": "x", "seed": ENORMOUS}], "digits"),
    ("row-late-error", [{"prompt": f"p{i}"} for i in range(30)] + [{"prompt": "x", "steps": 0}], "row 31: steps=0"),
    ("source-int", 5, "iterable of dicts"),
    ("source-bytes", b"prompt\nx\n", "iterable of dicts"),
    ("source-dict", {"prompt": "x"}, "iterable of dicts"),
]


@pytest.mark.parametrize(("rows", "says"), [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_bad_campaign_rows_are_refused_and_leave_no_campaign(embedded_farm, rows, says) -> None:
    refused(lambda: embedded_farm.campaign("c").submit(rows), says)
    nothing_written(embedded_farm)


def test_a_bad_row_after_a_whole_chunk_rolls_the_written_chunks_back(tmp_path, migrated_sqlite) -> None:
    """Chunks of 10 are written as they come; the error on row 31 takes them all back, campaign row too."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(migrated_sqlite, data / "farm.db")
    with Farm(Settings(data_dir=data, campaign_chunk_size=10)) as farm:
        rows = [{"prompt": f"p{i}"} for i in range(30)] + [{"prompt": "x", "width": 100}]
        refused(lambda: farm.campaign("c").submit(rows), "row 31: width=100")
        nothing_written(farm)


# -- campaign files: JSONL, CSV, Parquet --------------------------------------------------------------


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def _jsonl(*rows: Any) -> bytes:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


GOOD_PARQUET = None  # built lazily (pyarrow import)

# (id, file name, content (bytes, or a callable making the file at a path), text in the message)
FILE_CASES: list[tuple[str, str, Any, str]] = [
    # JSONL
    ("jsonl-latin1", "p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', "p.jsonl line 2: line="),
    ("jsonl-surrogate-escape", "p.jsonl", _jsonl('{"prompt": "\\ud800"}'), "p.jsonl line 1: prompt="),
    ("jsonl-deep-nesting", "p.jsonl", _jsonl({"prompt": "a"}, '{"prompt": "a", "loras": ' + "[" * 100_000 + "]" * 100_000 + "}"), "p.jsonl line 2: line="),
    ("jsonl-deep-prompt", "p.jsonl", _jsonl('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}"), "p.jsonl line 1"),
    ("jsonl-5000-digit-seed", "p.jsonl", _jsonl('{"prompt": "a", "seed": 1' + "0" * 5000 + "}"), "p.jsonl line 1: line="),
    ("jsonl-1e400-seed", "p.jsonl", _jsonl('{"prompt": "a", "seed": 1e400}'), "p.jsonl line 1: seed="),
    ("jsonl-1e400-guidance", "p.jsonl", _jsonl('{"prompt": "a", "guidance_scale": 1e400}'), "p.jsonl line 1: guidance_scale=inf"),
    ("jsonl-nan-guidance", "p.jsonl", _jsonl('{"prompt": "a", "guidance_scale": NaN}'), "p.jsonl line 1: guidance_scale=nan"),
    ("jsonl-steps-true", "p.jsonl", _jsonl({"prompt": "a", "steps": True}), "p.jsonl line 1: steps=True"),
    ("jsonl-steps-word", "p.jsonl", _jsonl({"prompt": "a", "steps": "twenty"}), "p.jsonl line 1: steps='twenty'"),
    ("jsonl-steps-float", "p.jsonl", _jsonl({"prompt": "a", "steps": 20.5}), "p.jsonl line 1: steps=20.5"),
    ("jsonl-not-an-object", "p.jsonl", _jsonl({"prompt": "a"}, [1, 2]), "p.jsonl line 2: line="),
    ("jsonl-repeated-id", "p.jsonl", _jsonl({"id": "r1", "prompt": "a"}, {"id": "r2", "prompt": "b"}, {"id": "r1", "prompt": "c"}), "p.jsonl line 3: id='r1' is invalid: repeats line 1"),
    ("jsonl-same-row", "p.jsonl", _jsonl({"prompt": "a"}, {"prompt": "b"}, "", {"prompt": "b"}), "p.jsonl line 4: row='b' is invalid: is the same row as line 2"),
    ("jsonl-line-too-long", "p.jsonl", _jsonl({"prompt": "a"}, {"prompt": "x" * 2_000_000}), "p.jsonl line 2: line="),
    ("jsonl-png-renamed", "p.jsonl", png_bytes(), "p.jsonl line 1: line="),
    ("jsonl-id-surrogate", "p.jsonl", _jsonl('{"id": "\\udc80", "prompt": "a"}'), "p.jsonl line 1: id="),
    ("jsonl-id-object", "p.jsonl", _jsonl({"id": {"a": 1}, "prompt": "a"}), "p.jsonl line 1: id="),
    ("jsonl-unknown-field", "p.jsonl", _jsonl({"prompt": "a", "colour": "red"}), "p.jsonl line 1: colour="),
    ("jsonl-nul-prompt", "p.jsonl", _jsonl('{"prompt": "a\\u0000b"}'), "p.jsonl line 1: prompt="),
    ("jsonl-bad-lora-ref", "p.jsonl", _jsonl({"prompt": "a", "loras": "ink:heavy"}), "p.jsonl line 1: loras[0]="),
    # CSV
    ("csv-unbalanced-quote", "p.csv", b'prompt,seed\na,1\n"b,2\nc,3\n', "p.csv line 3: line="),
    ("csv-latin1", "p.csv", b"prompt,seed\na,1\ncaf\xe9,2\n", "p.csv line 3: line="),
    ("csv-cell-past-field-limit", "p.csv", b"prompt\n" + b"a" * 200_000 + b"\n", "p.csv line 2"),
    ("csv-more-cells", "p.csv", b"prompt,seed\na,1,extra\n", "p.csv line 2: line="),
    ("csv-5000-digit-seed", "p.csv", b"prompt,seed\na,1" + b"0" * 5000 + b"\n", "p.csv line 2: seed="),
    ("csv-1e400-guidance", "p.csv", b"prompt,guidance_scale\na,1e400\n", "p.csv line 2: guidance_scale="),
    ("csv-nan-guidance", "p.csv", b"prompt,guidance_scale\na,nan\n", "p.csv line 2: guidance_scale="),
    ("csv-float-steps", "p.csv", b"prompt,steps\na,20.5\n", "p.csv line 2: steps="),
    ("csv-paste-back-word", "p.csv", b"prompt,paste_back\na,maybe\n", "p.csv line 2: paste_back="),
    ("csv-repeated-id", "p.csv", b"id,prompt\nr1,a\nr2,b\nr1,c\n", "p.csv line 4: id='r1' is invalid: repeats line 2"),
    ("csv-same-row", "p.csv", b"prompt,seed\na,1\na,1\n", "p.csv line 3: row='a' is invalid: is the same row as line 2"),
    ("csv-no-prompt-column", "p.csv", b"text,seed\nhello,1\n", "p.csv line 1: prompt="),
    ("csv-line-too-long", "p.csv", b"prompt\n" + b"a" * 2_000_000 + b"\n", "p.csv line 2: line="),
    ("csv-random-bytes", "p.csv", bytes(range(256)) * 4, "p.csv line 2: line="),
    ("csv-nul-prompt", "p.csv", b"prompt\na\x00b\n", "p.csv line 2: prompt="),
    ("csv-prompt-too-long", "p.csv", b"prompt\n" + b"p" * 5000 + b"\n", "p.csv line 2: prompt="),
    # Parquet
    ("parquet-text", "p.parquet", b"prompt,seed\na,1\n", "file="),
    ("parquet-empty", "p.parquet", b"", "file="),
    ("parquet-truncated", "p.parquet", lambda: _parquet([{"prompt": "a", "seed": i} for i in range(100)])[:-40], "file="),
    ("parquet-no-prompt", "p.parquet", lambda: _parquet([{"text": "a"}]), "prompt="),
    ("parquet-int-prompt", "p.parquet", lambda: _parquet([{"prompt": 5}]), "p.parquet row 1: prompt="),
    ("parquet-repeated-id", "p.parquet", lambda: _parquet([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]), "p.parquet row 2: id='a' is invalid: repeats row 1"),
    ("parquet-bad-seed", "p.parquet", lambda: _parquet([{"prompt": "x", "seed": "one"}]), "p.parquet row 1: seed="),
    ("parquet-inf-guidance", "p.parquet", lambda: _parquet([{"prompt": "x", "guidance_scale": math.inf}]), "p.parquet row 1: guidance_scale=inf"),
    ("parquet-huge-steps", "p.parquet", lambda: _parquet([{"prompt": "x", "steps": 2**62}]), "p.parquet row 1: steps="),
    ("parquet-list-prompt", "p.parquet", lambda: _parquet([{"prompt": ["a", "b"]}]), "p.parquet row 1: prompt="),
    # what the path is
    ("wrong-suffix", "p.txt", b"prompt\na\n", "must end in .jsonl, .csv or .parquet"),
    ("folder-named-csv", "p.csv", "mkdir", "is a directory"),
    ("folder-named-parquet", "p.parquet", "mkdir", "is a directory"),
    ("dev-zero-named-jsonl", "p.jsonl", "dev-zero", "device or pipe"),
    ("dev-null-named-csv", "p.csv", "dev-null", "device or pipe"),
    ("fifo-named-csv", "p.csv", "fifo", "device or pipe"),
    ("missing-jsonl", "p.jsonl", "missing", "cannot be read"),
]


def _make_file(tmp: Path, name: str, content: Any) -> Path:
    path = tmp / name
    if content == "mkdir":
        path.mkdir()
    elif content == "dev-zero":
        os.symlink("/dev/zero", path)
    elif content == "dev-null":
        os.symlink("/dev/null", path)
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "missing":
        pass
    else:
        path.write_bytes(content() if callable(content) else content)
    return path


@pytest.mark.parametrize(("name", "content", "says"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_bad_campaign_file_is_one_line_naming_file_and_line(embedded_farm, tmp_path, name, content, says) -> None:
    path = _make_file(tmp_path, name, content)
    started = time.monotonic()
    message = refused(lambda: embedded_farm.campaign("c").submit(path), says)
    assert time.monotonic() - started < 30
    assert len(message) < 1200, len(message)
    nothing_written(embedded_farm)


# -- the LoRA registry ---------------------------------------------------------------------------

SD1_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def sd1_header(**changes: Any) -> dict:
    """A valid SD1.x kohya LoRA's header: down (1, 768) and up (320, 1) in F16, then its alpha."""
    header = {
        f"{SD1_MODULE}.lora_down.weight": {"dtype": "F16", "shape": [1, 768], "data_offsets": [0, 1536]},
        f"{SD1_MODULE}.lora_up.weight": {"dtype": "F16", "shape": [320, 1], "data_offsets": [1536, 2176]},
        f"{SD1_MODULE}.alpha": {"dtype": "F16", "shape": [], "data_offsets": [2176, 2178]},
    }
    for key, value in changes.items():
        header[f"{SD1_MODULE}.{key}"] = value
    return header


SD1_BYTES = 2178
DOWN = "lora_down.weight"

# (id, the file's bytes (or a special), text in the message)
LORA_FILES = [
    ("offsets-past-the-end", safetensors(sd1_header(**{DOWN: {"dtype": "F16", "shape": [1, 768], "data_offsets": [0, 10**9]}}), b"\0" * SD1_BYTES), "past its end"),
    ("truncated-data", safetensors(sd1_header(), b"\0" * (SD1_BYTES - 100)), "past its end"),
    ("overlapping", safetensors(sd1_header(alpha={"dtype": "F16", "shape": [], "data_offsets": [2174, 2176]}), b"\0" * SD1_BYTES), "overlap or leave a gap"),
    ("gap", safetensors(sd1_header(alpha={"dtype": "F16", "shape": [], "data_offsets": [2176, 2178]}), b"\0" * (SD1_BYTES + 10)), "cover 2178 of the 2188"),
    ("size-mismatch", safetensors(sd1_header(**{DOWN: {"dtype": "F32", "shape": [1, 768], "data_offsets": [0, 1536]}}), b"\0" * SD1_BYTES), "needs 3072"),
    ("unknown-dtype", safetensors(sd1_header(**{DOWN: {"dtype": "F128", "shape": [1, 768], "data_offsets": [0, 1536]}}), b"\0" * SD1_BYTES), "dtype 'F128'"),
    ("shape-not-a-list", safetensors(sd1_header(**{DOWN: {"dtype": "F16", "shape": "1x768", "data_offsets": [0, 1536]}}), b"\0" * SD1_BYTES), "shape"),
    ("negative-offsets", safetensors(sd1_header(**{DOWN: {"dtype": "F16", "shape": [1, 768], "data_offsets": [-1536, 0]}}), b"\0" * SD1_BYTES), "data_offsets"),
    ("offsets-not-ints", safetensors(sd1_header(**{DOWN: {"dtype": "F16", "shape": [1, 768], "data_offsets": [0.0, 1536.0]}}), b"\0" * SD1_BYTES), "data_offsets"),
    ("entry-not-an-object", safetensors(sd1_header(**{DOWN: [1, 2]}), b"\0" * SD1_BYTES), "no description"),
    ("header-deep", struct.pack("<Q", 200_001) + b"[" * 100_000 + b"]" * 100_000 + b" ", "header is not JSON"),
    ("header-huge-length", struct.pack("<Q", 2**60) + b"{}", "bad header length"),
    ("header-not-json", struct.pack("<Q", 5) + b"hello", "header is not JSON"),
    ("header-a-list", struct.pack("<Q", 2) + b"[]", "header is not an object"),
    ("too-short", b"\x01\x02", "too short"),
    ("zip-renamed", b"PK\x03\x04" + b"\0" * 100, "pickle/zip"),
    ("pickle-renamed", b"\x80\x02}q\x00." + b"\0" * 100, "pickle/zip"),
    ("no-lora-tensors", safetensors({"weight": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "no LoRA tensors"),
]


@pytest.mark.parametrize(("content", "says"), [c[1:] for c in LORA_FILES], ids=[c[0] for c in LORA_FILES])
def test_a_bad_lora_file_is_refused_by_the_registry(embedded_farm, tmp_path, content, says) -> None:
    path = tmp_path / "style.safetensors"
    path.write_bytes(content)
    refused(lambda: embedded_farm.add_lora(path, name="style"), "lora=", says, field="lora")
    refused(lambda: embedded_farm.add_lora(content, name="style"), "lora=", says, field="lora")  # as bytes too
    nothing_written(embedded_farm)


def test_a_valid_lora_of_the_same_layout_is_accepted(embedded_farm, tmp_path) -> None:
    """The control case of the table above: the same header with honest offsets registers."""
    path = tmp_path / "style.safetensors"
    path.write_bytes(safetensors(sd1_header(), b"\0" * SD1_BYTES))
    assert embedded_farm.add_lora(path, name="style").base == "sd1"


# (id, source special or file name, LoRA name, field, text in the message)
LORA_SOURCES = [
    ("dev-zero", "/dev/zero", "style", "lora", "device or pipe"),
    ("dev-null", "/dev/null", "style", "lora", "device or pipe"),
    ("folder", "folder", "style", "lora", "directory"),
    ("fifo", "fifo", "style", "lora", "device or pipe"),
    ("missing", "missing.safetensors", "style", "lora", "does not exist"),
    ("nul-in-path", "a\x00b.safetensors", "style", "lora", "cannot be read"),
    ("pickle-suffix", "style.ckpt", "style", "lora", "pickle file"),
    ("name-trailing-newline", "good", "ink\n", "name", "letters, digits"),
    ("name-surrogate", "good", "\ud800", "name", "letters, digits"),
    ("name-129-chars", "good", "n" * 129, "name", "1–128"),
    ("name-empty", "good", "", "name", "letters, digits"),
    ("name-space", "good", "my style", "name", "letters, digits"),
    ("name-leading-dash", "good", "-style", "name", "starting with a letter"),
    ("name-int", "good", 5, "name", "letters, digits"),
    ("name-control", "good", "a\x1bb", "name", "letters, digits"),
]


@pytest.mark.parametrize(("source", "name", "field", "says"), [c[1:] for c in LORA_SOURCES], ids=[c[0] for c in LORA_SOURCES])
def test_a_bad_lora_source_or_name_is_refused(embedded_farm, tmp_path, source, name, field, says) -> None:
    if source == "folder":
        (tmp_path / "dir.safetensors").mkdir()
        source = tmp_path / "dir.safetensors"
    elif source == "fifo":
        os.mkfifo(tmp_path / "p.safetensors")
        source = tmp_path / "p.safetensors"
    elif source == "good":
        source = tmp_path / "good.safetensors"
        source.write_bytes(safetensors(sd1_header(), b"\0" * SD1_BYTES))
    elif source == "style.ckpt":
        source = tmp_path / "style.ckpt"
        source.write_bytes(b"\x80\x02.")
    elif not source.startswith("/"):
        source = str(tmp_path / source)
    refused(lambda: embedded_farm.add_lora(source, name=name), says, field=field)
    nothing_written(embedded_farm)


# -- settings: FARM_* variables → one ConfigError line, no password --------------------------------

# (id, environment, text in the message)
SETTINGS_CASES = [
    ("batch-zero", {"FARM_MAX_BATCH_SIZE": "0"}, "FARM_MAX_BATCH_SIZE"),
    ("batch-word", {"FARM_MAX_BATCH_SIZE": "eight"}, "FARM_MAX_BATCH_SIZE"),
    ("batch-1e400", {"FARM_MAX_BATCH_SIZE": "1e400"}, "FARM_MAX_BATCH_SIZE"),
    ("batch-5000-digits", {"FARM_MAX_BATCH_SIZE": "9" * 5000}, "FARM_MAX_BATCH_SIZE"),
    ("max-steps-word", {"FARM_LIMITS__MAX_STEPS": "many"}, "FARM_LIMITS__MAX_STEPS"),
    ("max-steps-negative", {"FARM_LIMITS__MAX_STEPS": "-1"}, "FARM_LIMITS"),
    ("min-steps-above-max", {"FARM_LIMITS__MIN_STEPS": "200"}, "min_steps=200 is above max_steps=150"),
    ("min-size-not-multiple", {"FARM_LIMITS__MIN_SIZE": "100"}, "multiples of 8"),
    ("max-guidance-inf", {"FARM_LIMITS__MAX_GUIDANCE_SCALE": "inf"}, "finite"),
    ("max-guidance-nan", {"FARM_LIMITS__MAX_GUIDANCE_SCALE": "nan"}, "finite"),
    ("limits-not-json", {"FARM_LIMITS": "{not json"}, "FARM_LIMITS"),
    ("unknown-limit", {"FARM_LIMITS__MAX_FUN": "1"}, "FARM_LIMITS__MAX_FUN"),
    ("default-scheduler", {"FARM_DEFAULT_SCHEDULER": "nope"}, "FARM_DEFAULT_SCHEDULER"),
    ("default-size", {"FARM_DEFAULT_SIZE": "100"}, "FARM_DEFAULT_SIZE"),
    ("campaign-priority", {"FARM_CAMPAIGN_PRIORITY": "10"}, "FARM_CAMPAIGN_PRIORITY"),
    ("model-name-too-long", {"FARM_MODELS": "m" * 200 + "=builtin:tiny"}, "1 to 128"),
    ("model-name-space", {"FARM_MODELS": "my model=builtin:tiny"}, "model name"),
    ("model-item", {"FARM_MODELS": "tiny"}, "name=location"),
    ("default-model", {"FARM_DEFAULT_MODEL": "nope"}, "FARM_DEFAULT_MODEL"),
    ("addressing-style", {"FARM_S3_ADDRESSING_STYLE": "sideways"}, "FARM_S3_ADDRESSING_STYLE"),
    ("database-url-garbage", {"FARM_DATABASE_URL": f"not a url {PASSWORD}"}, "not a database URL"),
    ("database-url-driver", {"FARM_DATABASE_URL": f"nosuch://farm:{PASSWORD}@db/farm"}, "farm:***@db"),
    ("database-url-unreachable", {"FARM_DATABASE_URL": f"postgresql://farm:{PASSWORD}@127.0.0.1:1/farm"}, "farm:***@127.0.0.1:1"),
    ("database-url-query-password", {"FARM_DATABASE_URL": f"postgresql://127.0.0.1:1/farm?user=farm&password={PASSWORD}"}, "cannot reach"),
    ("database-url-password-with-at", {"FARM_DATABASE_URL": f"postgresql://farm:{PASSWORD}@x@127.0.0.1:1/farm"}, "cannot reach"),
    ("sqlite-folder-is-a-file", {"FARM_DATABASE_URL": "sqlite:////dev/null/farm.db"}, "cannot create the folder"),
]


@pytest.mark.parametrize("via", ["python", "cli"])
@pytest.mark.parametrize(("env", "says"), [c[1:] for c in SETTINGS_CASES], ids=[c[0] for c in SETTINGS_CASES])
def test_a_bad_setting_is_one_config_error_line_without_secrets(farm_settings, monkeypatch, env, says, via) -> None:
    if via == "python":
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FARM_DATA_DIR", str(farm_settings.data_dir))
        refused(lambda: Farm(Settings()), says, error=ConfigError)
        return
    from click.testing import CliRunner

    from farm.cli.main import main

    result = CliRunner().invoke(main, ["status"], env={"FARM_DATA_DIR": str(farm_settings.data_dir), **env})
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    assert line.startswith("error: ") and says in line, line
    assert result.stdout == ""


def test_settings_never_show_a_password() -> None:
    settings = Settings(
        database_url=f"postgresql://farm:{PASSWORD}@db/farm", broker_url=f"redis://:{PASSWORD}@redis:6379/0",
        storage_url="s3://bucket/prefix", s3_endpoint_url=f"http://key:{PASSWORD}@minio:9000",
    )
    for text in (repr(settings), str(settings)):
        assert PASSWORD not in text and "farm:***@db" in text and "redis://:***@redis" in text


def test_a_data_dir_with_nul_is_a_config_error(tmp_path) -> None:
    refused(lambda: Settings(data_dir=str(tmp_path) + "/a\x00b"), "FARM_DATA_DIR", "NUL", error=ConfigError)


# -- the farm command ------------------------------------------------------------------------------


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """(arguments, text in the one error line) by case id; files made in ``tmp``."""
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (tmp / "deep.jsonl").write_bytes(_jsonl('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"))
    (tmp / "digits.jsonl").write_bytes(_jsonl('{"prompt": "a", "seed": 1' + "0" * 5000 + "}"))
    (tmp / "surrogate.jsonl").write_bytes(_jsonl('{"prompt": "\\ud800"}'))
    (tmp / "quote.csv").write_bytes(b'prompt\na\n"b\nc\n')
    (tmp / "text.parquet").write_bytes(b"prompt\na\n")
    (tmp / "rows.csv").write_bytes(b"prompt\na\nb\n")
    (tmp / "same.csv").write_bytes(b"id,prompt\n1,a\n1,b\n")
    (tmp / "past-end.safetensors").write_bytes(safetensors(sd1_header(alpha={"dtype": "F16", "shape": [], "data_offsets": [2176, 9999]}), b"\0" * SD1_BYTES))
    (tmp / "good.safetensors").write_bytes(safetensors(sd1_header(), b"\0" * SD1_BYTES))
    zero = tmp / "zero.jsonl"
    os.symlink("/dev/zero", zero)
    return {
        "submit-prompt-surrogate": (["submit", "--prompt", "a \ud800"], "prompt="),
        "submit-negative-surrogate": (["submit", "--prompt", "a", "--negative-prompt", "\udc80"], "negative_prompt="),
        "submit-steps-huge": (["submit", "--prompt", "a", "--steps", "1" + "0" * 400], "steps="),
        "submit-seed-huge": (["submit", "--prompt", "a", "--seed", "9" * 60], "seed="),
        "submit-guidance-1e400": (["submit", "--prompt", "a", "--guidance-scale", "1e400"], "guidance_scale=inf"),
        "submit-guidance-word": (["submit", "--prompt", "a", "--guidance-scale", "lots"], "--guidance-scale"),
        "submit-seed-word": (["submit", "--prompt", "a", "--seed", "abc"], "--seed"),
        "submit-width-float": (["submit", "--prompt", "a", "--width", "512.5"], "--width"),
        "submit-clip-skip-huge": (["submit", "--prompt", "a", "--clip-skip", "9" * 50], "clip_skip="),
        "submit-lora-newline": (["submit", "--prompt", "a", "--lora", "ink\n:0.5"], "loras[0]="),
        "submit-lora-weight-word": (["submit", "--prompt", "a", "--lora", "ink:heavy"], "loras[0]="),
        "submit-init-image-dev-zero": (["submit", "--prompt", "a", "--init-image", "/dev/zero"], "init_image="),
        "submit-init-image-folder": (["submit", "--prompt", "a", "--init-image", str(tmp)], "--init-image"),
        "submit-file-dev-zero": (["submit", "--file", str(zero)], "device or pipe"),
        "submit-file-folder": (["submit", "--file", str(tmp)], "--file"),
        "submit-file-latin1": (["submit", "--file", str(tmp / "latin1.jsonl")], "latin1.jsonl line 1"),
        "submit-file-deep": (["submit", "--file", str(tmp / "deep.jsonl")], "deep.jsonl line 1"),
        "submit-file-digits": (["submit", "--file", str(tmp / "digits.jsonl")], "digits.jsonl line 1"),
        "submit-file-surrogate": (["submit", "--file", str(tmp / "surrogate.jsonl")], "surrogate.jsonl line 1: prompt="),
        "submit-no-prompt": (["submit"], "--prompt"),
        "campaign-name-newline": (["campaign", "submit", str(tmp / "rows.csv"), "--name", "nightly\n"], "campaign="),
        "campaign-name-long": (["campaign", "submit", str(tmp / "rows.csv"), "--name", "n" * 230], "campaign="),
        "campaign-csv-quote": (["campaign", "submit", str(tmp / "quote.csv"), "--name", "c"], "quote.csv line 3"),
        "campaign-parquet-text": (["campaign", "submit", str(tmp / "text.parquet"), "--name", "c"], "not a readable Parquet"),
        "campaign-repeated-id": (["campaign", "submit", str(tmp / "same.csv"), "--name", "c"], "same.csv line 3: id='1'"),
        "campaign-sweep-twice": (["campaign", "submit", str(tmp / "rows.csv"), "--name", "c", "--sweep", "seed=1,1"], "given twice"),
        "campaign-sweep-cap": (["campaign", "submit", str(tmp / "rows.csv"), "--name", "c", "--sweep", "seed=" + ",".join(map(str, range(3000))), "--sweep", "steps=" + ",".join(map(str, range(1, 2000)))], "combinations"),
        "campaign-priority-word": (["campaign", "submit", str(tmp / "rows.csv"), "--name", "c", "--priority", "high"], "--priority"),
        "campaign-folder": (["campaign", "submit", str(tmp), "--name", "c"], "FILE"),
        "lora-add-dev-zero": (["lora", "add", "/dev/zero", "--name", "x"], "device or pipe"),
        "lora-add-past-end": (["lora", "add", str(tmp / "past-end.safetensors"), "--name", "x"], "past its end"),
        "lora-add-name-newline": (["lora", "add", str(tmp / "good.safetensors"), "--name", "x\n"], "name="),
        "worker-name-too-long": (["worker", "--cpu", "--name", "w" * 300], "--name="),
        "worker-name-newline": (["worker", "--cpu", "--name", "w\n"], "--name="),
        "unknown-command": (["render"], "No such command"),
    }


CLI_CASES = [
    "submit-prompt-surrogate", "submit-negative-surrogate", "submit-steps-huge", "submit-seed-huge", "submit-guidance-1e400",
    "submit-guidance-word", "submit-seed-word", "submit-width-float", "submit-clip-skip-huge", "submit-lora-newline",
    "submit-lora-weight-word", "submit-init-image-dev-zero", "submit-init-image-folder", "submit-file-dev-zero",
    "submit-file-folder", "submit-file-latin1", "submit-file-deep", "submit-file-digits", "submit-file-surrogate",
    "submit-no-prompt", "campaign-name-newline", "campaign-name-long", "campaign-csv-quote", "campaign-parquet-text",
    "campaign-repeated-id", "campaign-sweep-twice", "campaign-sweep-cap", "campaign-priority-word", "campaign-folder",
    "lora-add-dev-zero", "lora-add-past-end", "lora-add-name-newline", "worker-name-too-long", "worker-name-newline",
    "unknown-command",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_cli_gives_one_error_line_exit_2_and_writes_nothing(farm_cli, embedded_farm, tmp_path, case) -> None:
    args, says = _cli_cases(tmp_path)[case]
    result = farm_cli(*args, FARM_LIMITS__MAX_CAMPAIGN_IMAGES="100000")
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    line = one_line(result.stderr)
    assert line.startswith("error: ") and says in line, line
    assert result.stdout == ""
    nothing_written(embedded_farm)


# -- prompt parsing stays linear ----------------------------------------------------------------------


def test_a_prompt_of_4000_whitespace_characters_is_checked_fast(embedded_farm) -> None:
    """Before: A1111's BREAK pattern backtracked over every start in a whitespace run (~0.5 s here for
    4,000 characters, quadratic). Now a whole submit of such prompts takes milliseconds."""
    started = time.monotonic()
    for text in (" " * 4000, "\t" * 3995 + "BREAK", "a:" * 2000, "(a) " * 1000):
        embedded_farm.intake().prepare({"prompt": "x", "negative_prompt": text})
    with pytest.raises(ValidationError, match="nested 2000 deep"):
        embedded_farm.intake().prepare({"prompt": "x", "negative_prompt": " (" * 2000})
    assert time.monotonic() - started < 2.0


def test_prompt_checks_are_linear_in_the_prompt(monkeypatch) -> None:
    """Counting the work, not the clock: the pieces the parser multiplies grow linearly with the prompt
    (before: nested brackets were multiplied once per enclosing bracket, quadratically)."""
    from farm.request import prompt_syntax

    def work(text: str) -> int:
        calls = 0
        original = prompt_syntax._parse

        def counting(text: str, max_depth: int | None = None):
            nonlocal calls
            pieces, depth = original(text, max_depth)
            calls += len(pieces) + depth
            return pieces, depth

        monkeypatch.setattr(prompt_syntax, "_parse", counting)
        try:
            prompt_syntax.check(text)
        except ValidationError:
            pass
        finally:
            monkeypatch.setattr(prompt_syntax, "_parse", original)
        return calls

    for unit in ("(a", " ", "a BREAK ", "[x:1.1] "):
        assert work(unit * 4000) <= 2 * work(unit * 2000) + 10
    # and the clock, generously: 400,000 characters of whitespace in well under a second
    started = time.monotonic()
    prompt_syntax.check(" " * 400_000 + "BREAK")
    assert time.monotonic() - started < 1.0


def test_shown_values_are_short_and_safe() -> None:
    """What an error shows of a hostile value: bounded, printable, never raising."""
    for value in (ENORMOUS, nested(10_000), "x" * 10**6, "\ud800", {"k" * 10**5: nested(5000)}, b"\xff" * 10**6):
        text = repr(shown(value))
        assert len(text) < 300 and text.isprintable()
        text.encode("utf-8")
    assert shown(5) == 5 and shown("short") == "short" and isinstance(shown(ENORMOUS), Shown)
