"""Affinity routing: send a LoRA job to a worker that already has its adapters loaded.

Each worker consumes its model's shared queue and a queue of its own, and advertises in Redis (with
an expiry) which adapters it holds. A batch whose LoRAs are all loaded on some worker goes to that
worker's own queue while the worker is not backed up (fewer than ``affinity_max_backlog`` tasks
waiting there); a batch no worker is warm for goes to a worker with a free adapter slot (so it
loads without evicting another's adapter); otherwise, and for every batch without LoRAs, to the
shared queue, where any worker takes it. Only the Redis broker routes; the embedded broker always
uses the shared queue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterable

from farm.settings import Settings


def routes(settings: Settings) -> bool:
    """Whether this broker does affinity routing (Redis); the embedded broker uses shared queues only."""
    return settings.broker.startswith(("redis://", "rediss://"))


def own_queue(settings: Settings, model: str, node: str) -> str:
    """The queue only the worker ``node`` consumes (besides its model's shared queue)."""
    return f"{settings.queue_for(model)}.{node}"


def _advert_key(settings: Settings, model: str, node: str) -> str:
    return f"{settings.queue_prefix}:adverts:{model}:{node}"


def _redis(settings: Settings):
    if not routes(settings):
        return None
    import redis

    return redis.Redis.from_url(settings.broker, socket_timeout=5)


def advertise(settings: Settings, *, model: str, node: str, loras: Iterable[str], client=None) -> None:
    """Say (for ``advert_ttl`` seconds) which adapters ``node`` holds and how many it can hold;
    workers call it when they start and after each LoRA task."""
    client = client or _redis(settings)
    if client is None:
        return
    body = json.dumps({
        "node": node, "queue": own_queue(settings, model, node), "loras": sorted(loras),
        "capacity": settings.lora_max_loaded, "at": time.time(),
    })
    client.set(_advert_key(settings, model, node), body, ex=settings.advert_ttl)


@dataclass
class Router:
    """Chooses queues for one publishing pass, counting what it sends to each worker's queue."""

    settings: Settings
    client: object = None
    _adverts: dict[str, list[dict]] = field(default_factory=dict)
    _sent: dict[str, int] = field(default_factory=dict)
    warm: int = 0
    cold: int = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> "Router":
        return cls(settings=settings, client=_redis(settings))

    def adverts(self, model: str) -> list[dict]:
        if model not in self._adverts:
            found = []
            if self.client is not None:
                pattern = _advert_key(self.settings, model, "*")
                keys = list(self.client.scan_iter(match=pattern, count=500))
                for raw in self.client.mget(keys) if keys else []:
                    if raw:
                        found.append(json.loads(raw))
            self._adverts[model] = found
        return self._adverts[model]

    def backlog(self, queue: str) -> int:
        """Tasks waiting in ``queue`` (all its priority lists) plus what this pass sent there."""
        steps = range(10)
        sep = ":"
        waiting = 0
        if self.client is not None:
            pipe = self.client.pipeline()
            pipe.llen(queue)
            for step in steps[1:]:
                pipe.llen(f"{queue}{sep}{step}")
            waiting = sum(pipe.execute())
        return waiting + self._sent.get(queue, 0)

    def queue_for(self, model: str, loras: Iterable[str]) -> str:
        wanted = set(loras)
        shared = self.settings.queue_for(model)
        if not wanted or self.client is None:
            return shared
        adverts = self.adverts(model)
        warm = [a for a in adverts if wanted <= set(a["loras"])]
        best = self._least_backed_up(warm)
        if best is not None:
            self.warm += 1
            return self._send(best, wanted)
        self.cold += 1
        # cold: a worker with room for these adapters loads them without evicting another's
        roomy = [a for a in adverts if len(set(a["loras"]) | wanted) <= a.get("capacity", 0)]
        best = self._least_backed_up(roomy)
        return self._send(best, wanted) if best is not None else shared

    def _least_backed_up(self, adverts: list[dict]) -> dict | None:
        best = min(adverts, key=lambda a: self.backlog(a["queue"]), default=None)
        if best is not None and self.backlog(best["queue"]) < self.settings.affinity_max_backlog:
            return best
        return None

    def _send(self, advert: dict, wanted: set[str]) -> str:
        """Count the task against the worker's queue, and its adapters as the worker's (for this pass)."""
        self._sent[advert["queue"]] = self._sent.get(advert["queue"], 0) + 1
        advert["loras"] = sorted(set(advert["loras"]) | wanted)
        return advert["queue"]
