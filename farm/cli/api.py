"""``farm api`` (serve the HTTP API with uvicorn) and ``farm api-key create|list|revoke``.

Registered in ``farm.cli.main``::

    from farm.cli.api import api, api_key
    main.add_command(api)
    main.add_command(api_key)
"""

from __future__ import annotations

import ipaddress

import click

from farm.cli.common import load_settings

__all__ = ["api", "api_key"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7860, show_default=True, help="Port (7860: A1111's).")
@click.option("--no-auth", is_flag=True, help="Serve without API keys (only with a loopback --host; loopback clients only).")
@click.option("--workers", type=int, default=1, show_default=True, help="uvicorn worker processes.")
@click.option("--log-level", default="info", show_default=True)
def api(host, port, no_auth, workers, log_level):
    """Serve the A1111-compatible HTTP API (docs/api.md)."""
    import os

    import uvicorn

    from farm.api.config import ApiSettings

    if no_auth and not _is_loopback(host):
        raise click.UsageError(f"--no-auth serves anyone who can connect: only with a loopback --host (127.0.0.1), not {host}")
    load_settings()  # a bad FARM_* value: one clear line now, not in every worker
    if no_auth:
        os.environ["FARM_API_AUTH"] = "false"  # the uvicorn workers build their app from the environment
    api_settings = ApiSettings()
    click.echo(f"farm api on http://{host}:{port} ({'no keys, loopback only' if no_auth else 'API keys required'})", err=True)
    uvicorn.run("farm.api.serve:app", factory=True, host=host, port=port, workers=workers, log_level=log_level,
                proxy_headers=False, server_header=False, timeout_keep_alive=int(api_settings.keep_alive))


@click.group("api-key")
def api_key() -> None:
    """API keys of `farm api` (stored hashed; a key is shown once)."""


@api_key.command("create")
@click.option("--name", required=True, help="What the key is for (unique).")
@click.option("--rate", default=None, help="Requests per second, e.g. 5/s or 120/m (default: unlimited).")
@click.option("--concurrency", type=int, default=None, help="Unfinished jobs at once (default: unlimited).")
def create(name, rate, concurrency):
    """Make a key; its last line of output is the key (shown once, stored as sha256)."""
    from farm.api import keys
    from farm.client import Farm

    with Farm(load_settings()) as farm:
        record, key = keys.create(farm.sessions, name, rate=keys.parse_rate(rate), concurrency=concurrency)
    click.echo(f"API key {record.name!r} (id {record.id}); webhook secret: {record.webhook_secret}")
    click.echo(key)


@api_key.command("list")
def list_keys():
    """Name, prefix, limits and state of every key (never the key)."""
    from farm.api import keys
    from farm.client import Farm

    with Farm(load_settings()) as farm:
        for record in keys.listing(farm.sessions):
            state = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
            rate = f"{record.rate:g}/s" if record.rate else "-"
            click.echo(f"{record.name}\t{record.prefix}…\trate {rate}\tconcurrency {record.concurrency or '-'}\t{state}")


@api_key.command("revoke")
@click.argument("name")
def revoke(name):
    """Revoke a key (at once for new connections; an API process may accept it for up to 5 s more)."""
    from farm.api import keys
    from farm.client import Farm

    with Farm(load_settings()) as farm:
        keys.revoke(farm.sessions, name)
    click.echo(f"revoked {name}")
