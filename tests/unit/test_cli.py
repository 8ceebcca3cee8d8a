"""The `farm` command as a user runs it (`python -m farm …` in a fresh process, embedded defaults, no
worker): bad input is one `error:` line and nothing written; the follow-up commands report and exit
with the documented codes (0 all succeeded, 1 finished but not all succeeded, 2 could not do it).

The one-shot commands are independent, so they run concurrently (module fixture) to keep this file
fast; further cases of the same error paths run in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from farm import db
from farm.client import Farm
from farm.settings import Settings

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_DATA_DIR=str(home / "data"), **extra)
    return env


def farm_cli(home: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm", *args],
        env=_env(home, **env),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process runs read `.env` from the working directory: keep the checkout's out of it."""
    monkeypatch.chdir(tmp_path)


def _settings(home: Path) -> Settings:
    return Settings(data_dir=home / "data")


def _one_error_line(run) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def _nothing_written(home: Path) -> None:
    with Farm(_settings(home)) as farm:
        assert farm.latest() == []
    queue = home / "data" / "broker" / "queue"
    assert not queue.exists() or not [p for p in queue.iterdir() if p.name.endswith(".msg")]


# -- one-shot commands, run concurrently --------------------------------------------------------

GOOD_LINE = json.dumps({"prompt": "a red cube", "width": 64, "height": 64})


@dataclass
class OneShot:
    args: list[str]
    env: dict[str, str]
    jsonl: str | None = None
    #: create a queued submission of 3 images first (in this process); "{id}" in args is its id
    queued: bool = False


ONESHOTS: dict[str, OneShot] = {
    "width": OneShot(["submit", "--prompt", "x", "--width", "100"], {}),
    "scheduler": OneShot(["submit", "--prompt", "x", "--scheduler", "nope"], {}),
    "steps": OneShot(["submit", "--prompt", "x", "--steps", "0"], {}),
    "jsonl-line-2": OneShot(["submit", "--file", "{file}"], {}, f"{GOOD_LINE}\n{{not json\n{GOOD_LINE}\n"),
    "submit-ok": OneShot(["submit", "--prompt", "a red cube", "--width", "64", "--height", "64", "--num-images", "3"], {}),
    "status-missing": OneShot(["status", "nonexistent-id"], {}),
    "wait-timeout": OneShot(["wait", "{id}", "--timeout", "1", "--no-progress"], {}, queued=True),
    "db-upgrade": OneShot(["db", "upgrade"], {}),
}


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    home: Path
    seconds: float  # an upper bound on how long it ran
    submission_id: str | None = None


@pytest.fixture(scope="module")
def oneshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    started = {}
    ids: dict[str, str] = {}
    for name, shot in ONESHOTS.items():
        home = tmp_path_factory.mktemp(name)
        args = list(shot.args)
        if shot.queued:
            with Farm(_settings(home)) as farm:
                ids[name] = farm.submit("a red cube", width=64, height=64, num_images=3, seed=7).id
            args = [ids[name] if a == "{id}" else a for a in args]
        if shot.jsonl is not None:
            (home / "requests.jsonl").write_text(shot.jsonl)
            args = [str(home / "requests.jsonl") if a == "{file}" else a for a in args]
        started[name] = (
            subprocess.Popen(
                [sys.executable, "-m", "farm", *args],
                env=_env(home, **shot.env),
                cwd=home,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            home,
            time.monotonic(),
        )
    ran = {}
    for name, (process, home, start) in started.items():
        out, err = process.communicate(timeout=120)
        ran[name] = Ran(process.returncode, out, err, home, time.monotonic() - start, ids.get(name))
    return ran


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("width", "width=100"),
        ("scheduler", "scheduler='nope'"),
        ("steps", "steps=0"),
    ],
)
def test_bad_submit_is_one_error_line_and_writes_nothing(oneshots: dict[str, Ran], case: str, named: str) -> None:
    run = oneshots[case]
    line = _one_error_line(run)
    assert run.returncode == 2
    assert line.startswith("error:")
    assert named in line
    assert "is invalid:" in line
    assert run.stdout == ""
    _nothing_written(run.home)


def test_scheduler_error_lists_valid_names(oneshots: dict[str, Ran]) -> None:
    line = _one_error_line(oneshots["scheduler"])
    for name in ("ddim", "euler_a", "dpmpp_2m_karras", "unipc"):
        assert name in line


def test_jsonl_bad_line_is_named(oneshots: dict[str, Ran]) -> None:
    run = oneshots["jsonl-line-2"]
    line = _one_error_line(run)
    assert line.startswith("error:")
    assert "requests.jsonl line 2" in line
    assert "{not json" in line
    assert "not valid JSON" in line
    _nothing_written(run.home)


def test_valid_submit_prints_a_submission_id(oneshots: dict[str, Ran]) -> None:
    run = oneshots["submit-ok"]
    assert run.returncode == 0, run.stderr
    submission_id = run.stdout.strip()
    assert UUID.match(submission_id)
    with Farm(_settings(run.home)) as farm:
        assert [job.id for job in farm.latest()] == [submission_id]
        assert farm.submission(submission_id).status().counts["queued"] == 3


def test_status_of_unknown_id(oneshots: dict[str, Ran]) -> None:
    run = oneshots["status-missing"]
    line = _one_error_line(run)
    assert run.returncode == 2
    assert line.startswith("error:")
    assert "no submission 'nonexistent-id'" in line


# -- commands that follow a submission -------------------------------------------------------------


@pytest.fixture
def queued(tmp_path: Path) -> tuple[Path, str]:
    """A submission of 3 images, queued, no worker."""
    with Farm(_settings(tmp_path)) as farm:
        job = farm.submit("a red cube", width=64, height=64, num_images=3, seed=7)
    return tmp_path, job.id


def test_status_prints_counts(queued: tuple[Path, str]) -> None:
    home, submission_id = queued
    run = farm_cli(home, "status", submission_id)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{submission_id}: 0/3 finished (3 queued)"


def test_wait_without_worker_times_out(oneshots: dict[str, Ran]) -> None:
    run = oneshots["wait-timeout"]
    submission_id = run.submission_id
    assert run.seconds >= 1
    line = _one_error_line(run)
    assert run.returncode == 2
    assert line.startswith("error:")
    assert "after 1.0 s" in line
    assert f"farm wait {submission_id}" in line
    assert "0/3 finished" in line


def test_cancel_then_wait_exits_1(queued: tuple[Path, str]) -> None:
    home, submission_id = queued
    run = farm_cli(home, "cancel", submission_id)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "canceled 3 image(s)"
    run = farm_cli(home, "wait", submission_id, "--no-progress", timeout=30)
    assert run.returncode == 1, run.stderr
    assert run.stdout.strip() == f"{submission_id}: 3/3 finished (3 canceled)"


def test_db_upgrade_prints_the_revision(oneshots: dict[str, Ran]) -> None:
    run = oneshots["db-upgrade"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"database at revision {db.head_revision()}"
    engine = db.make_engine(_settings(run.home).database)
    try:
        db.ensure_schema(engine, auto_upgrade=False)  # at head now
    finally:
        engine.dispose()


# -- in-process (click's CliRunner): more cases of the same error paths, cheap to run -------------
#
# A fresh interpreter costs ~0.7 s of CPU; these cases exercise the same command functions, so they
# run in this process with FARM_* passed through the runner's environment.


def run_in_process(home: Path, *args: str, **env: str):
    from click.testing import CliRunner

    from farm.cli.main import main

    env = {"FARM_DATA_DIR": str(home / "data"), **env}
    cleared = {k: None for k in os.environ if k.startswith("FARM_") and k not in env}
    return CliRunner().invoke(main, list(args), env={**cleared, **env})


def _one_error_line_in_process(result) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
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
def test_more_bad_submits_in_process(tmp_path: Path, args: list[str], named: str) -> None:
    result = run_in_process(tmp_path, "submit", "--prompt", "x", *args)
    line = _one_error_line_in_process(result)
    assert result.exit_code == 2
    assert line.startswith("error:") and named in line
    _nothing_written(tmp_path)


def test_valid_jsonl_submit(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        f"{GOOD_LINE}\n\n" + json.dumps({"prompt": "a blue cube", "width": 64, "height": 64, "num_images": 2}) + "\n"
    )
    result = run_in_process(tmp_path, "submit", "--file", str(requests), "--label", "batch-1")
    assert result.exit_code == 0, result.stderr
    submission_id = result.stdout.strip()
    assert UUID.match(submission_id)
    with Farm(_settings(tmp_path)) as farm:
        results = farm.submission(submission_id).results()
    assert [r.prompt for r in results] == ["a red cube", "a blue cube", "a blue cube"]
    assert results[2].seed == results[1].seed + 1


def test_jsonl_model_list_is_one_error_line(tmp_path: Path) -> None:
    """A JSON list as model is one error line, not a TypeError traceback."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "x", "width": 64, "height": 64, "model": ["tiny"]}) + "\n")
    result = run_in_process(tmp_path, "submit", "--file", str(requests))
    line = _one_error_line_in_process(result)
    assert line.startswith("error:") and "model=" in line


BAD_SETTINGS = {
    "models": {"FARM_MODELS": "tiny=builtin:tiny,sd15"},
    "default-model": {"FARM_DEFAULT_MODEL": "sd15"},
    "limit": {"FARM_LIMITS__MAX_STEPS": "abc"},
}


@pytest.mark.parametrize(
    ("case", "mentions"),
    [("models", "'sd15'"), ("default-model", "FARM_DEFAULT_MODEL='sd15'"), ("limit", "MAX_STEPS")],
)
def test_bad_settings_are_one_line(tmp_path: Path, case: str, mentions: str) -> None:
    result = run_in_process(tmp_path, "status", **BAD_SETTINGS[case])
    line = _one_error_line_in_process(result)
    assert "bad setting" in line
    assert mentions in line


@pytest.mark.parametrize(
    ("case", "variable"),
    [("models", "FARM_MODELS"), ("default-model", "FARM_DEFAULT_MODEL"), ("limit", "FARM_LIMITS__MAX_STEPS")],
)
def test_bad_setting_names_a_real_variable(tmp_path: Path, case: str, variable: str) -> None:
    """The variable to fix is named as the user would type it (not FARM_SETTINGS or FARM_LIMITS.MAX_STEPS)."""
    result = run_in_process(tmp_path, "status", **BAD_SETTINGS[case])
    line = _one_error_line_in_process(result)
    assert f"bad setting {variable}:" in line


def _bad_fourth_line(tmp_path: Path):
    """Two good requests and a blank line before a bad request on line 4."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(f"{GOOD_LINE}\n\n{GOOD_LINE}\n" + json.dumps({"prompt": "x", "width": 100}) + "\n")
    return run_in_process(tmp_path, "submit", "--file", str(requests))


def test_jsonl_invalid_request_writes_nothing(tmp_path: Path) -> None:
    """Two good requests before a bad one: the whole file is refused, not half submitted."""
    line = _one_error_line_in_process(_bad_fourth_line(tmp_path))
    assert line.startswith("error:") and "width=100" in line
    _nothing_written(tmp_path)


def test_jsonl_invalid_request_points_at_its_line(tmp_path: Path) -> None:
    """The error names the file's line (1-based, blank lines counted), not the request's index."""
    line = _one_error_line_in_process(_bad_fourth_line(tmp_path))
    assert line.startswith("error: requests.jsonl line 4: width=100 is invalid:"), line
