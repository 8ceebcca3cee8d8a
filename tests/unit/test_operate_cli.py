"""The operator's commands: `farm top` shows workers, queue and failures; `farm flower` refuses to
start open to the world; `farm exporter` says clearly when its port is taken; worker names carry
their model and a second worker of the same name on a host refuses to start."""

from __future__ import annotations

import socket

import pytest

from farm import lifecycle
from farm.cli import operate
from farm.errors import ConfigError
from farm.supervisor import _lock_name, plan_slots


def test_top_once_shows_what_each_worker_renders_and_why_images_failed(farm_cli, embedded_farm) -> None:
    farm = embedded_farm
    job = farm.submit_many([{"prompt": "a red circle on white", "num_images": 3}])
    ids = [r.id for r in job.results()]
    claim = lifecycle.claim(farm.sessions, ids[:2], worker="tiny-gpu0@box/123", lease_seconds=60, max_attempts=5)
    lifecycle.record_failure(farm.sessions, claim.token, ids[:1], "StorageUnavailable: S3 did not answer")

    result = farm_cli("top", "--once")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    [worker] = [line for line in lines if line.startswith("tiny-gpu0@box/123")]
    assert "'a red circle on white'" in worker and "step 0/" in worker and worker.split()[1] == "1"
    assert any(line.startswith("queue: ") and farm.settings.default_model in line for line in lines)
    assert "  failed ×1 storage: StorageUnavailable: S3 did not answer" in lines


def test_flower_refuses_to_start_without_credentials(farm_cli, monkeypatch) -> None:
    started = []
    monkeypatch.setattr("celery.Celery.start", lambda self, argv: started.append(argv))
    result = farm_cli("flower")
    assert result.exit_code == 2 and not started
    assert result.stderr.startswith("error:") and "FARM_FLOWER_BASIC_AUTH" in result.stderr
    assert "Traceback" not in result.output


def test_flower_binds_localhost_with_basic_auth_and_shows_the_summary_columns(farm_cli, monkeypatch) -> None:
    started = []
    monkeypatch.setattr("celery.Celery.start", lambda self, argv: started.append(argv))
    result = farm_cli("flower", FARM_FLOWER_BASIC_AUTH="ops:s3cret")
    assert result.exit_code == 0, result.output
    [argv] = started
    assert argv[0] == "flower" and "--address=127.0.0.1" in argv and "--basic-auth=ops:s3cret" in argv
    assert f"--tasks_columns={operate.FLOWER_TASK_COLUMNS}" in argv and "s3cret" not in result.output


def test_flower_insecure_is_explicit(farm_cli, monkeypatch) -> None:
    started = []
    monkeypatch.setattr("celery.Celery.start", lambda self, argv: started.append(argv))
    assert farm_cli("flower", "--insecure").exit_code == 0
    assert not any(a.startswith("--basic-auth") for a in started[0])


def test_exporter_on_a_taken_port_is_one_error_line(farm_cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = farm_cli("exporter", "--host", "127.0.0.1", "--port", port)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_worker_names_carry_their_model() -> None:
    [slot] = plan_slots("0", cpu=False, name=None, model="sd15")
    assert slot.name.startswith("sd15-gpu0@")
    [cpu] = plan_slots("all", cpu=True, name=None, model="tiny")
    assert cpu.name.startswith("tiny-cpu@")


def test_a_second_worker_with_the_same_name_refuses_to_start(farm_settings) -> None:
    first = _lock_name(farm_settings, "tiny-gpu0@box")
    try:
        with pytest.raises(ConfigError, match="already runs on this host"):
            _lock_name(farm_settings, "tiny-gpu0@box")
    finally:
        first.close()
    _lock_name(farm_settings, "tiny-gpu0@box").close()  # free again once the first has stopped
