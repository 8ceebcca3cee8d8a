"""What the reconciler asks the broker: did it lose its messages, and which task ids does it hold?

Redis restarted without persistence (or flushed) loses every message, yet the database still says
``queued``. A marker key (``<prefix>:epoch``) lives beside the messages: it vanishes with them, so
its absence means "compare the queues with the database now". The comparison lists the task ids of
every message in the farm's queues (``<prefix>.<model>``, its priority lists ``…:N`` and the warm
workers' own queues) and of the messages workers hold unacknowledged (kombu's ``unacked`` hash).
The embedded broker (``farmfs://``) is a folder: its message files, and the same marker as a file.

Other brokers (AMQP) cannot be listed without consuming: :meth:`BrokerState.task_ids` returns None
and the reconciler relies on the outbox alone there.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Iterable

from farm.settings import Settings

__all__ = ["BrokerState"]

log = logging.getLogger("farm.reconciler")

#: Messages read per round trip while listing a queue.
PAGE = 1000


class BrokerState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = settings.broker
        self._redis = None

    @property
    def kind(self) -> str:
        if self.url.startswith(("redis://", "rediss://")):
            return "redis"
        if self.url.startswith("filesystem://"):
            return "folder"
        return "other"

    def lost_state(self) -> bool:
        """True when the broker's marker is missing (it restarted empty, or this is its first check):
        sets the marker again, so the next call says False until the broker loses it again."""
        marker = uuid.uuid4().hex
        if self.kind == "redis":
            return bool(self._client().set(self._marker_key, marker, nx=True))
        if self.kind == "folder":
            path = self.settings.broker_folder / "epoch"
            if path.exists():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(marker)
            return True
        return False

    def task_ids(self) -> set[str] | None:
        """Ids of the tasks whose messages the broker holds (queued or unacknowledged); None when
        this broker cannot be listed."""
        if self.kind == "redis":
            return self._redis_ids()
        if self.kind == "folder":
            return self._folder_ids()
        return None

    def return_orphaned(self) -> int:
        """Move the messages of warm workers' own queues (``<prefix>.<model>.<node>``, affinity
        routing) whose worker is gone — its advert expired: stopped, scaled away, renamed — back to
        the model's shared queue, at the same priority. Returns how many were moved (Redis only)."""
        if self.kind != "redis":
            return 0
        import re

        client = self._client()
        prefix = self.settings.queue_prefix
        moved = 0
        for model in self.settings.models:
            base = f"{prefix}.{model}."
            for key in client.scan_iter(match=f"{base}*", count=1000, _type="list"):
                name = key.decode()
                node, priority = re.fullmatch(r"(.+?)(:\d+)?", name[len(base):]).groups()
                if "@" not in node:  # another model's queue whose name starts like this one (nodes have '@')
                    continue
                if client.exists(f"{prefix}:adverts:{model}:{node}"):
                    continue  # its worker lives: it consumes its own queue
                shared = f"{prefix}.{model}{priority or ''}"
                while client.rpoplpush(name, shared) is not None:
                    moved += 1
        return moved

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    # -- Redis --------------------------------------------------------------------------------
    @property
    def _marker_key(self) -> str:
        return f"{self.settings.queue_prefix}:epoch"

    def _client(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.url, socket_timeout=30, socket_connect_timeout=10)
        return self._redis

    def _redis_ids(self) -> set[str]:
        client = self._client()
        prefix = f"{self.settings.queue_prefix}."
        ids: set[str] = set()
        for key in client.scan_iter(match=f"{prefix}*", count=1000, _type="list"):
            start = 0
            while True:
                page = client.lrange(key, start, start + PAGE - 1)
                ids.update(_ids(page))
                if len(page) < PAGE:
                    break
                start += PAGE
        # messages a worker holds (delivered, not yet acknowledged): kombu keeps them in one hash
        for _field, raw in client.hscan_iter("unacked", count=1000):
            try:  # [envelope, exchange, routing key]
                envelope = json.loads(raw)[0]
            except (ValueError, IndexError, KeyError, TypeError):
                continue
            if (task_id := _task_id(envelope)) is not None:
                ids.add(task_id)
        return ids

    # -- the embedded broker --------------------------------------------------------------------
    def _folder_ids(self) -> set[str]:
        ids: set[str] = set()
        for sub in ("queue", "claimed"):
            folder = self.settings.broker_folder / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") or not path.name.endswith(".msg"):
                    continue
                try:
                    ids.update(_ids([path.read_bytes()]))
                except OSError:  # consumed while listing
                    continue
        return ids


def _ids(raws: Iterable[bytes | str]) -> set[str]:
    """The task ids in kombu message envelopes (unreadable ones are skipped: the dead-letter
    guard deals with them when a worker receives them)."""
    found = set()
    for raw in raws:
        try:
            envelope = json.loads(raw)
        except ValueError:
            continue
        if (task_id := _task_id(envelope)) is not None:
            found.add(task_id)
    return found


def _task_id(envelope: object) -> str | None:
    try:
        task_id = envelope["headers"]["id"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return task_id if isinstance(task_id, str) else None
