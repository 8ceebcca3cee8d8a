"""Commands for running the farm: ``farm top``, ``farm exporter``, ``farm flower``."""

from __future__ import annotations

import signal
import threading
import time

import click

from farm.cli.common import load_settings
from farm.errors import ConfigError

__all__ = ["exporter", "flower", "top"]

#: Columns of Flower's task list: the summary (args: origin; kwargs: model, prompt, size, steps) and
#: the live step (result) next to the state.
FLOWER_TASK_COLUMNS = "name,uuid,state,args,kwargs,result,received,started,runtime,worker"


@click.command()
@click.option("--once", is_flag=True, help="Print one snapshot and exit (for scripts).")
@click.option("--interval", type=click.FloatRange(0.5, 3600), default=2.0, show_default=True, help="Seconds between refreshes.")
def top(once, interval):
    """Live view: each worker, what it renders, its images/s over the last minute; queue depth;
    failures in the last hour by reason class."""
    from farm.monitor import snapshot
    from farm.services import Services

    services = Services.open(load_settings())
    try:
        while True:
            text = str(snapshot(services))
            if once:
                click.echo(text)
                return
            click.clear()
            click.echo(f"farm top — {time.strftime('%H:%M:%S')} (every {interval:g} s; Ctrl-C quits)\n{text}")
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        services.close()


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True)
@click.option("--cache-seconds", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="Scrapes within this many seconds share one measurement.")
def exporter(host, port, cache_seconds):
    """Serve the farm-wide Prometheus metrics (queue depth, images by status, failures by reason,
    oldest queued age, campaign ETA, dead letters) on /metrics."""
    import logging

    from farm.metrics import serve
    from farm.services import Services

    logging.basicConfig(level="INFO", format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    services = Services.open(load_settings())
    try:
        server = serve(services, host=host, port=port, cache_seconds=cache_seconds)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"farm exporter on http://{host}:{port}/metrics", err=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        stopping.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    services.close()


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--address", default=None, help="Address to listen on (default FARM_FLOWER_ADDRESS, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default FARM_FLOWER_PORT, 5555).")
@click.option("--insecure", is_flag=True, help="Run without authentication (only on a trusted network).")
@click.pass_context
def flower(ctx, address, port, insecure):
    """Start Flower on the farm's broker, with basic auth (FARM_FLOWER_BASIC_AUTH=user:password)
    unless --insecure; extra options go to Flower (e.g. --url_prefix=flower). Needs only the broker."""
    from farm.dispatch.celery_app import make_celery

    settings = load_settings()
    auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
    if not auth and not insecure:
        raise ConfigError(
            "Flower needs FARM_FLOWER_BASIC_AUTH=user:password (anyone who reaches it sees every prompt "
            "and can revoke tasks); or pass --insecure on a trusted network"
        )
    if auth and ":" not in auth:
        raise ConfigError("bad setting FARM_FLOWER_BASIC_AUTH: must be user:password (given a value without ':')")
    options = [
        f"--address={address or settings.flower_address}",
        f"--port={port or settings.flower_port}",
        f"--tasks_columns={FLOWER_TASK_COLUMNS}",
    ]
    if auth and not insecure:
        options.append(f"--basic-auth={auth}")
    make_celery(settings).start(["flower", *options, *ctx.args])
