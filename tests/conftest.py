"""Shared pytest fixtures. Keep each fixture small and documented; add new ones in their own section.

Services run as real processes speaking their real protocol (here: moto's S3 server over HTTP), so
tests exercise the same client code paths as production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

# -- S3 (moto server) -------------------------------------------------------------------------------

#: How long to wait for moto's server to answer before failing the session (it starts in < 1 s).
MOTO_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    """A TCP port that was free a moment ago (the tiny race with other processes is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` as a subprocess for the whole session; yield its endpoint URL.

    Point boto3 at it with ``endpoint_url=s3_server`` (and the ``s3_env`` credentials). Buckets
    persist for the session: tests should use their own bucket names (e.g. uuid-based).
    """
    executable = Path(sys.executable).parent / "moto_server"
    if not executable.exists():
        pytest.fail(f"{executable} not found: install the test extra (pip install -e '.[test]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(executable), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_answers(endpoint, process, log_path)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_until_answers(endpoint: str, process: subprocess.Popen, log_path: Path) -> None:
    """Poll ``endpoint`` until any HTTP answer comes back; fail clearly on exit or timeout."""
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"moto_server exited with code {process.returncode} before answering on {endpoint}; "
                f"its log:\n{log_path.read_text(errors='replace')}"
            )
        try:
            with urllib.request.urlopen(endpoint + "/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # Any HTTP status means the server is up.
        except OSError:
            pass  # Not listening yet.
        if time.monotonic() > deadline:
            process.terminate()
            pytest.fail(
                f"moto_server did not answer on {endpoint} within {MOTO_START_TIMEOUT_S:.0f} s; "
                f"its log:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.05)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region for boto3 (moto accepts any), isolated from the host's.

    Also hides the host's ``AWS_ENDPOINT_URL*``, profile and config files so tests only talk to the endpoint they pass.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
