#!/usr/bin/env python3
"""Kubernetes preStop hook of a worker pod: start the warm shutdown now and return when it is done.

    farm-prestop            # in the worker container: SIGTERM to PID 1, wait for the render processes

PID 1 is tini, which passes SIGTERM to `farm worker` only (like systemd's KillMode=mixed); `farm
worker` passes it to each render process, which finishes its chunk within FARM_SHUTDOWN_SECONDS (or
hands its images back) and drains its uploads (up to 120 s). This hook returns once no render process
(`workers.main`) is left, or after FARM_PRESTOP_MAX_SECONDS (default 270, below the pod's
terminationGracePeriodSeconds of 300), so the kubelet's own SIGTERM that follows finds `farm worker`
already on its way out, and the SIGKILL at the end of the grace period finds nothing.

Standard library only; FARM_PRESTOP_PID and FARM_PRESTOP_MATCH exist for tests.
"""

import os
import signal
import sys
import time
from pathlib import Path


def running(match: bytes, proc: Path = Path("/proc")) -> list[int]:
    """PIDs whose command line contains ``match`` (this process excluded)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if match in cmdline:
            found.append(int(entry.name))
    return found


def main() -> int:
    pid = int(os.environ.get("FARM_PRESTOP_PID", "1"))
    match = os.environ.get("FARM_PRESTOP_MATCH", "workers.main").encode()
    deadline = time.monotonic() + float(os.environ.get("FARM_PRESTOP_MAX_SECONDS", "270"))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    while time.monotonic() < deadline:
        if not running(match):
            return 0
        time.sleep(1.0)
    print("farm-prestop: render processes still running at the deadline", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
