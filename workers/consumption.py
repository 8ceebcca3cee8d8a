"""Poison-proof consumption: a message a worker cannot decode or validate becomes a dead letter.

Such a message is acknowledged (gone from its queue, never restored or delivered again), kept with
its reason and raw form in the broker (:class:`farm.dispatch.dead_letters.DeadLetters`, which also
holds the per-queue, per-reason counts), logged once at WARNING without a traceback, and the worker
goes on with the next message. Wired in by ``workers.main`` (``install(app, settings)`` right after
the task is registered); what counts as poison is ``farm.dispatch.dead_letters``.

Why here and how (measured on Celery 5.7 / kombu 5.7 with Redis; the stock worker, one message each):

- Celery's consumer decodes only the headers; the body of a protocol 2 message is unpacked into
  ``[args, kwargs, embed]`` inside ``Request.__init__``, where a ``ValueError``/``TypeError`` is
  caught by nothing. ``application/data``/``application/text`` bodies (kombu passes them on
  undecoded even with ``accept_content=["json"]``), a missing content type (treated as
  ``application/data``), no body, a JSON body of the wrong shape, a ``timelimit`` header that is not
  a pair, headers that are a list, a ``delivery_info`` that is not an object: "Unrecoverable error",
  the worker exits, the message is restored to the queue on the way out and kills the next worker.
  A message without an ``id`` header raises ``KeyError``, which kombu's Redis transport counts as a
  *connection* error: the consumer reconnects, the message is restored, forever.
- A Redis item that is not JSON, not an object, or whose body does not decode from base64 fails
  inside kombu's transport, before any Celery hook: the worker exits (the item is lost).
- Pickle (``ContentDisallowed``) and unknown tasks were rejected with an ERROR and a traceback; a
  body that is not JSON was acked with a CRITICAL and a traceback; ``farm.render`` arguments of the
  wrong shape (ints as ids, 500 ids) ran the task.

So the check has to run before Celery builds a request, on every path a message takes:

1. :class:`PoisonProofConsumer`, a subclass of Celery's consumer, set as the ``worker_consumer``
   setting (Celery's documented way to change the consumer). It wraps the task handler Celery's
   event loop installs (``create_task_handler``) so each message is checked (headers, content type,
   body decoded exactly as kombu decodes it, protocol 2 shape, ``farm.render`` arguments) before the
   strategy sees it, and overrides the consumer's own refusal callbacks (``on_decode_error``,
   ``on_unknown_message``, ``on_unknown_task``, ``on_invalid_task``) so whatever still slips through
   is dead-lettered and acked, not rejected with a traceback. Anything else the handler raises
   (but a broker error, which Celery's reconnect handles) is a dead letter too: a message never
   crashes the consumer. No monkeypatching: Celery's own callbacks are methods meant to be overridden.
2. :class:`GuardedRedisTransport` / :class:`GuardedFsTransport`, subclasses of the broker's kombu
   transport, set as the ``broker_transport`` setting (the URL still says where the broker is). They
   check each broker item before kombu builds a message from it: a BRPOP reply callback on the
   Redis client (redis-py's ``set_response_callback``) for items that are not JSON, ``_get`` on the
   embedded broker, and ``_deliver`` (every virtual transport) for JSON that is not a kombu envelope.
   They also tell the consumer which queue a message really came from (a poison message may claim
   any routing key). ``rediss://`` and sentinel brokers keep kombu's stock transport (kombu sets TLS
   defaults by the transport's name); the consumer-level checks still apply there.

The same argument check runs where the task starts (:func:`check_render_arguments`, re-exported;
:func:`refuse_task` keeps and logs what it refuses there).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import signals
from celery.worker.consumer.consumer import Consumer
from kombu.exceptions import OperationalError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.transport import redis as kombu_redis

from farm.dispatch import broker_fs
from farm.dispatch.celery_app import broker_url
from farm.dispatch.dead_letters import (
    DeadLetter, DeadLetterError, DeadLetters, Poison, check_envelope, check_render_arguments, check_task_message,
    parse_envelope, safe_queue,
)
from farm.settings import Settings

__all__ = [
    "GuardedFsTransport", "GuardedRedisTransport", "PoisonGuard", "PoisonProofConsumer", "check_render_arguments",
    "install", "refuse_task",
]

log = logging.getLogger("farm.dead_letters")

#: The guard of this worker process (set by :func:`install`; the consumer and transport classes are
#: named in Celery's settings by import path, so they find it here).
_guard: "PoisonGuard | None" = None


class PoisonGuard:
    """Checks messages, and turns the bad ones into dead letters: kept, counted, logged once, acked."""

    def __init__(self, app, settings: Settings, store: DeadLetters | None):
        self.app = app
        self.settings = settings
        self.store = store
        self._tasks: frozenset[str] | None = None

    @property
    def tasks(self) -> frozenset[str]:
        """Task names this worker runs (Celery's built-in ``celery.*`` tasks never come on a farm queue)."""
        if self._tasks is None:
            self._tasks = frozenset(name for name in self.app.tasks if not name.startswith("celery."))
        return self._tasks

    def inspect(self, message) -> Poison | None:
        """Why a kombu message is poison, or None."""
        try:
            return check_task_message(
                message.content_type, message.content_encoding, message.headers, message.body,
                tasks=self.tasks, settings=self.settings,
            )
        except Exception as exc:  # noqa: BLE001 - a check must never be what crashes the consumer
            return Poison("refused", f"the message could not be checked ({type(exc).__name__}: {exc})")

    def refuse(self, message, poison: Poison) -> None:
        """Dead-letter a kombu message, then ack it (unless kombu already settled it)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        self.keep(
            _queue_of(message), poison, _raw_of(message),
            task_id=headers.get("id"), task=headers.get("task"),
        )
        if not message.acknowledged:
            message.ack()

    def keep(self, queue: str | None, poison: Poison, raw: Any, *, task_id: Any = None, task: Any = None) -> None:
        """Keep and count a dead letter, and log it once. Never raises: a store that fails is said in
        the same log line (with the start of the raw message), and the message is dropped all the same."""
        letter = DeadLetter.of(queue or "unknown", poison, raw, task_id=task_id, task=task)
        kept = ""
        if self.store is None:
            kept = f"; not kept (no dead-letter store for this broker): {letter.raw[:300]!r}"
        else:
            try:
                self.store.add(letter)
            except Exception as exc:  # noqa: BLE001 - losing one poison message beats a restart loop
                kept = f"; not kept ({type(exc).__name__}: {exc}): {letter.raw[:300]!r}"
        task = " ".join(part for part in (letter.task, letter.task_id) if part)
        log.warning(
            "dead letter from %s: %s: %s%s%s",
            letter.queue, letter.code, letter.reason, f" (task {task})" if task else "", kept,
        )


def _queue_of(message) -> str:
    """The queue a message was taken from: the guarded transport's word, else its routing key."""
    transport = getattr(getattr(message, "channel", None), "connection", None)
    queue = getattr(transport, "farm_delivering_queue", None)
    if queue:
        return safe_queue(queue)
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return safe_queue(info.get("routing_key"))


def _raw_of(message) -> Any:
    """The message as the broker held it: kombu's envelope on virtual transports, else rebuilt."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return raw
    import base64

    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    return {
        "body": base64.b64encode(body or b"").decode("ascii"),
        "content-type": message.content_type,
        "content-encoding": message.content_encoding,
        "headers": message.headers,
        "properties": {**(message.properties or {}), "body_encoding": "base64"},
    }


def _current() -> PoisonGuard:
    if _guard is None:
        raise RuntimeError("workers.consumption.install(app, settings) was not called in this process")
    return _guard


class PoisonProofConsumer(Consumer):
    """Celery's consumer, checking every task message before Celery builds a request from it."""

    @property
    def farm_guard(self) -> PoisonGuard:
        return _current()

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        guard = self.farm_guard
        # Broker errors while accepting a good message: Celery reconnects and the message is
        # restored. KeyError is in kombu's Redis connection errors, but here it is a malformed message.
        broker_errors = tuple(
            e for e in (*self.connection_errors, *self.channel_errors, OperationalError)
            if not issubclass(e, (KeyError, ValueError, TypeError, AttributeError))
        )

        def on_task_received(message):
            poison = guard.inspect(message)
            if poison is not None:
                return guard.refuse(message, poison)
            try:
                return handle(message)
            except broker_errors:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever else a message does, it is not a crash
                if message.acknowledged:
                    log.warning("message of task %s failed after it was settled: %s: %s",
                                (message.headers or {}).get("id"), type(exc).__name__, exc)
                    return None
                return guard.refuse(message, Poison("refused", f"the worker could not accept it ({type(exc).__name__}: {exc})"))

        return on_task_received

    # Celery's refusal callbacks: reached only by what the check above let through (or by kombu's
    # decode errors, which come before it). Each keeps, counts, logs once and acks.
    def on_decode_error(self, message, exc):
        self.farm_guard.refuse(message, Poison("undecodable", f"the body does not decode ({type(exc).__name__}: {exc})"))

    def on_unknown_message(self, body, message):
        self.farm_guard.refuse(message, Poison("headers", "not a Celery task message (no task header)"))
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body, message, exc):
        name = (message.headers or {}).get("task") if isinstance(message.headers, dict) else None
        self.farm_guard.refuse(message, Poison("unknown-task", f"unknown task {name!r}"))

    def on_invalid_task(self, body, message, exc):
        self.farm_guard.refuse(message, Poison("refused", f"Celery refused it ({type(exc).__name__}: {exc})"))
        signals.task_rejected.send(sender=self, message=message, exc=exc)


# -- the broker side ---------------------------------------------------------------------------------


class _EnvelopeCheck:
    """For kombu's virtual transports: every broker item goes through ``Transport._deliver(item, queue)``
    before kombu builds a message from it; a malformed one is dead-lettered instead. While an item
    is delivered, ``farm_delivering_queue`` names its queue for the consumer."""

    farm_delivering_queue: str | None = None

    def _deliver(self, message, queue):
        poison = check_envelope(message)
        if poison is not None:
            if _guard is not None:
                task = message.get("headers") if isinstance(message, dict) else None
                task = task if isinstance(task, dict) else {}
                _guard.keep(queue, poison, message, task_id=task.get("id"), task=task.get("task"))
                return None
            raise ValueError(poison.reason)  # no guard: what kombu would have raised anyway
        self.farm_delivering_queue = queue
        try:
            return super()._deliver(message, queue)
        finally:
            self.farm_delivering_queue = None


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel; the BRPOP reply of its event-loop client is checked before kombu parses it."""

    def _create_client(self, asynchronous=False):
        client = super()._create_client(asynchronous=asynchronous)
        if asynchronous:
            parse = client.response_callbacks.get("BRPOP") or (lambda response, **options: response)
            sep = self.sep

            def brpop_reply(response, **options):
                reply = parse(response, **options)
                if not reply:
                    return reply
                key, item = reply
                _, poison = parse_envelope(item)
                if poison is None or _guard is None:
                    return reply
                queue = (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)).rsplit(sep, 1)[0]
                _guard.keep(queue, poison, item)
                return None  # as if BRPOP timed out: kombu polls again

            client.set_response_callback("BRPOP", brpop_reply)
        return client


class GuardedRedisTransport(_EnvelopeCheck, kombu_redis.Transport):
    Channel = GuardedRedisChannel


class GuardedFsChannel(broker_fs.Channel):
    """The embedded broker's channel; a message file that is not JSON becomes a dead letter."""

    def _get(self, queue):
        try:
            return super()._get(queue)
        except ValueError as exc:  # JSONDecodeError (its .doc is the file's text) or UnicodeDecodeError (.object)
            if _guard is None:
                raise
            raw = getattr(exc, "doc", None) or getattr(exc, "object", None) or ""
            _guard.keep(queue, Poison("envelope", f"the broker item is not JSON ({exc})"), raw)
            raise filesystem.Empty() from None


class GuardedFsTransport(_EnvelopeCheck, broker_fs.Transport):
    Channel = GuardedFsChannel


# Names for Celery's ``broker_transport`` setting (the worker's banner says ``farmredis://host…``).
TRANSPORT_ALIASES.setdefault("farmredis", f"{__name__}:GuardedRedisTransport")
TRANSPORT_ALIASES.setdefault("farmfs-guarded", f"{__name__}:GuardedFsTransport")


def refuse_task(task, reason: str) -> dict:
    """For a task body whose arguments fail :func:`check_render_arguments` (a message that reached the
    task without the consumer's check): keep it as a dead letter (code ``arguments``; its raw form is
    the request's args and kwargs, not replayable) and log it once; returns the task's result. Celery
    then acks the message as for any task that returned."""
    request = task.request
    raw = json.dumps({"task": task.name, "id": request.id, "args": request.args, "kwargs": request.kwargs}, default=repr)
    queue = (request.delivery_info or {}).get("routing_key")
    poison = Poison("arguments", reason)
    if _guard is not None:
        _guard.keep(queue, poison, raw, task_id=request.id, task=task.name)
    else:
        log.warning("dead letter from %s: arguments: %s (task %s %s); not kept (no guard installed)",
                    safe_queue(queue), reason, task.name, request.id)
    return {"refused": reason}


def install(app, settings: Settings) -> PoisonGuard:
    """Make ``app``'s worker poison-proof; call before the worker starts (``app.worker_main``).

    Sets Celery's ``worker_consumer`` (and, for ``redis://`` and the embedded broker,
    ``broker_transport``) to the guarded classes here. Calling it again replaces the guard.
    """
    global _guard
    try:
        store = DeadLetters(settings)
    except DeadLetterError as exc:
        log.warning("%s: poison messages are dropped and logged, not kept", exc)
        store = None
    _guard = PoisonGuard(app, settings, store)
    app.conf.worker_consumer = f"{__name__}:PoisonProofConsumer"
    url = broker_url(settings)
    if url.startswith("redis://"):
        app.conf.broker_transport = "farmredis"
    elif url.startswith("farmfs://"):
        app.conf.broker_transport = "farmfs-guarded"
    return _guard
