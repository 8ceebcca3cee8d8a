"""The `farm` command as a user runs it, with embedded defaults and no worker: bad input is one
`error:` line and nothing written; the follow-up commands report and exit with the documented codes
(0 all succeeded, 1 finished but not all succeeded, 2 could not do it).

Every case runs in this process through click's CliRunner (the ``farm_cli`` fixture: the same
command functions as ``python -m farm``, FARM_* passed through the runner's environment);
tests/integration runs the real ``python -m farm`` process end to end.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from farm import db

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _one_error_line(result) -> str:
    """The command failed with one line on stderr and no traceback (an exit, not an exception)."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _nothing_written(farm_settings) -> None:
    """No submission in the database, no message in the filesystem broker."""
    from farm.client import Farm

    with Farm(farm_settings) as farm:
        assert farm.latest() == []
    queue = farm_settings.data_dir / "broker" / "queue"
    assert not queue.exists() or not [p for p in queue.iterdir() if p.name.endswith(".msg")]


@pytest.fixture
def good_line(make_request) -> str:
    """One valid JSONL request line."""
    return json.dumps(make_request())


@pytest.fixture
def queued(embedded_farm, make_request) -> str:
    """The id of a submission of 3 images, queued, no worker."""
    return embedded_farm.submit(**make_request(num_images=3, seed=7)).id


# -- submit -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--width", "100"], "width=100"),
        (["--scheduler", "nope"], "scheduler='nope'"),
        (["--steps", "0"], "steps=0"),
        (["--guidance-scale", "nan"], "guidance_scale=nan"),
        (["--guidance-scale", "31"], "guidance_scale=31.0"),
        (["--seed", "4294967296"], "seed=4294967296"),
        (["--seed", "4294967295", "--num-images", "2"], "seed=4294967295"),
        (["--num-images", "0"], "num_images=0"),
        (["--model", "sd99"], "model='sd99'"),
        (["--height", "36"], "height=36"),
        (["--width", "2048", "--height", "2048"], "width×height='2048×2048'"),
    ],
)
def test_bad_submit_is_one_error_line_and_writes_nothing(farm_cli, farm_settings, args: list[str], named: str) -> None:
    result = farm_cli("submit", "--prompt", "x", *args)
    line = _one_error_line(result)
    assert result.exit_code == 2
    assert line.startswith("error:")
    assert named in line
    assert "is invalid:" in line
    assert result.stdout == ""
    _nothing_written(farm_settings)


def test_scheduler_error_lists_valid_names(farm_cli) -> None:
    line = _one_error_line(farm_cli("submit", "--prompt", "x", "--scheduler", "nope"))
    for name in ("ddim", "euler_a", "dpmpp_2m_karras", "unipc"):
        assert name in line


def test_valid_submit_prints_a_submission_id(farm_cli, embedded_farm) -> None:
    result = farm_cli("submit", "--prompt", "a red cube", "--width", "64", "--height", "64", "--num-images", "3")
    assert result.exit_code == 0, result.stderr
    submission_id = result.stdout.strip()
    assert UUID.match(submission_id)
    assert [job.id for job in embedded_farm.latest()] == [submission_id]
    assert embedded_farm.submission(submission_id).status().counts["queued"] == 3


# -- submit --file ------------------------------------------------------------------------------


def test_jsonl_bad_line_is_named(farm_cli, farm_settings, good_line: str, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f"{good_line}\n{{not json\n{good_line}\n")
    result = farm_cli("submit", "--file", requests)
    line = _one_error_line(result)
    assert result.exit_code == 2
    assert line.startswith("error:")
    assert "requests.jsonl line 2" in line
    assert "{not json" in line
    assert "not valid JSON" in line
    _nothing_written(farm_settings)


def test_valid_jsonl_submit(farm_cli, embedded_farm, good_line: str, make_request, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f"{good_line}\n\n" + json.dumps(make_request(prompt="a blue cube", num_images=2)) + "\n")
    result = farm_cli("submit", "--file", requests, "--label", "batch-1")
    assert result.exit_code == 0, result.stderr
    submission_id = result.stdout.strip()
    assert UUID.match(submission_id)
    results = embedded_farm.submission(submission_id).results()
    assert [r.prompt for r in results] == ["a red cube", "a blue cube", "a blue cube"]
    assert results[2].seed == results[1].seed + 1


def test_jsonl_model_list_is_one_error_line(farm_cli, make_request, tmp_path: Path) -> None:
    """A JSON list as model is one error line, not a TypeError traceback."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(make_request(model=["tiny"])) + "\n")
    line = _one_error_line(farm_cli("submit", "--file", requests))
    assert line.startswith("error:") and "model=" in line


def _bad_fourth_line(farm_cli, good_line: str, make_request, tmp_path: Path):
    """Two good requests and a blank line before a bad request on line 4."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f"{good_line}\n\n{good_line}\n" + json.dumps(make_request(prompt="x", width=100)) + "\n")
    return farm_cli("submit", "--file", requests)


def test_jsonl_invalid_request_writes_nothing(farm_cli, farm_settings, good_line, make_request, tmp_path) -> None:
    """Two good requests before a bad one: the whole file is refused, not half submitted."""
    line = _one_error_line(_bad_fourth_line(farm_cli, good_line, make_request, tmp_path))
    assert line.startswith("error:") and "width=100" in line
    _nothing_written(farm_settings)


def test_jsonl_invalid_request_points_at_its_line(farm_cli, good_line, make_request, tmp_path) -> None:
    """The error names the file's line (1-based, blank lines counted), not the request's index."""
    line = _one_error_line(_bad_fourth_line(farm_cli, good_line, make_request, tmp_path))
    assert line.startswith("error: requests.jsonl line 4: width=100 is invalid:"), line


# -- commands that follow a submission -----------------------------------------------------------


def test_status_prints_counts(farm_cli, queued: str) -> None:
    result = farm_cli("status", queued)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"{queued} [tiny]: 0/3 finished (3 queued)"  # its model


def test_status_of_unknown_id(farm_cli) -> None:
    result = farm_cli("status", "nonexistent-id")
    line = _one_error_line(result)
    assert result.exit_code == 2
    assert line.startswith("error:")
    assert "no submission 'nonexistent-id'" in line


def test_wait_without_worker_times_out(farm_cli, queued: str) -> None:
    started = time.monotonic()
    result = farm_cli("wait", queued, "--timeout", "1", "--no-progress")
    assert time.monotonic() - started >= 1
    line = _one_error_line(result)
    assert result.exit_code == 2
    assert line.startswith("error:")
    assert "after 1.0 s" in line
    assert f"farm wait {queued}" in line
    assert "0/3 finished" in line


def test_cancel_then_wait_exits_1(farm_cli, queued: str) -> None:
    result = farm_cli("cancel", queued)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "canceled 3 image(s)"
    result = farm_cli("wait", queued, "--no-progress")
    assert result.exit_code == 1, result.stderr
    assert result.stdout.strip() == f"{queued} [tiny]: 3/3 finished (3 canceled)"


# -- db and settings -----------------------------------------------------------------------------


def test_db_upgrade_prints_the_revision(farm_cli, farm_settings) -> None:
    (farm_settings.data_dir / "farm.db").unlink()  # no database yet, as on a new machine
    result = farm_cli("db", "upgrade")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"database at revision {db.head_revision()}"
    engine = db.make_engine(farm_settings.database)
    try:
        db.ensure_schema(engine, auto_upgrade=False)  # at head now
    finally:
        engine.dispose()


BAD_SETTINGS = {
    "models": {"FARM_MODELS": "tiny=builtin:tiny,sd15"},
    "default-model": {"FARM_DEFAULT_MODEL": "sd15"},
    "limit": {"FARM_LIMITS__MAX_STEPS": "abc"},
}


@pytest.mark.parametrize(
    ("case", "mentions"),
    [("models", "'sd15'"), ("default-model", "FARM_DEFAULT_MODEL='sd15'"), ("limit", "MAX_STEPS")],
)
def test_bad_settings_are_one_line(farm_cli, case: str, mentions: str) -> None:
    result = farm_cli("status", **BAD_SETTINGS[case])
    line = _one_error_line(result)
    assert result.exit_code == 2
    assert "bad setting" in line
    assert mentions in line


@pytest.mark.parametrize(
    ("case", "variable"),
    [("models", "FARM_MODELS"), ("default-model", "FARM_DEFAULT_MODEL"), ("limit", "FARM_LIMITS__MAX_STEPS")],
)
def test_bad_setting_names_a_real_variable(farm_cli, case: str, variable: str) -> None:
    """The variable to fix is named as the user would type it (not FARM_SETTINGS or FARM_LIMITS.MAX_STEPS)."""
    line = _one_error_line(farm_cli("status", **BAD_SETTINGS[case]))
    assert f"bad setting {variable}:" in line
