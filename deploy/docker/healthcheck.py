#!/usr/bin/env python3
"""Container health check for farm: exit 0 when a farm HTTP endpoint answers 200, 1 otherwise.

    farm-healthcheck                          # a worker: http://127.0.0.1:$FARM_WORKER_METRICS_PORT/healthz (9809)
    farm-healthcheck http://127.0.0.1:9808/healthz       # the exporter
    farm-healthcheck http://127.0.0.1:5555/healthcheck   # Flower

Standard library only: it runs with whatever python3 the image has, imports nothing of farm, and
never prints a URL's credentials.
"""

import os
import sys
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("FARM_WORKER_METRICS_PORT", "9809")
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local http URL
            ok = response.status == 200
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {type(exc).__name__}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: HTTP {response.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
