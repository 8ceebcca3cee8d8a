"""The systemd units stop a worker warmly: SIGTERM reaches `farm worker` (the main process) only,
which passes it on, and systemd waits long enough for a chunk to finish and uploads to drain."""

from __future__ import annotations

import configparser
from pathlib import Path

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


def test_worker_unit_signals_the_main_process_only() -> None:
    service = _unit("farm-worker@.service")["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert "farm worker" in service["ExecStart"]


def test_worker_unit_waits_longer_than_the_farms_shutdown_bound() -> None:
    from farm.settings import Settings

    service = _unit("farm-worker@.service")["Service"]
    assert int(service["TimeoutStopSec"]) > Settings().shutdown_seconds + 120  # + the uploads' drain
