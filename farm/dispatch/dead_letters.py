"""Dead letters: messages a worker could not decode or validate, kept per queue instead of killing it.

A worker (``workers.consumption``) checks every message before Celery touches it, with the checks
here. A message that fails is *acknowledged* (removed from its queue, never delivered again), kept
as a :class:`DeadLetter` (the reason and the raw message) in the broker, counted, and logged once;
the worker goes on with the next message. ``farm dead-letters list|replay|purge`` reads them back.

What makes a message a dead letter, by reason code (the ``code`` of a letter, a label of the counts):

==================  ==============================================================================
``envelope``        the broker item is not a kombu message (not JSON, not an object, no properties
                    or delivery tag, a body that does not decode from its body encoding)
``content-type``    not ``application/json`` (kombu would pass ``application/data``/``text`` and a
                    missing content type on undecoded, and refuses pickle)
``content-encoding`` not ``utf-8``
``headers``         not Celery protocol 2 headers: no ``task``/``id``, or a header Celery reads
                    (eta, expires, timelimit, retries, …) of the wrong type
``unknown-task``    a task name this worker does not run
``no-body``         no body
``not-json``        a body that is not UTF-8 JSON
``undecodable``     a body kombu could not decode (a bad ``compression`` header, …)
``body-shape``      not protocol 2's ``[args, kwargs, embed]``, an embed carrying callbacks, chains
                    or chords (the farm sends none), or a body over :data:`MAX_BODY_BYTES`
``arguments``       ``farm.render`` arguments of the wrong shape (:func:`check_render_arguments`)
``refused``         Celery itself refused it, or it failed while being accepted (a backstop)
==================  ==============================================================================

Where letters are kept (newest first, the newest ``keep`` per queue, 10,000 by default; older ones
are dropped):

- Redis broker: a list per queue, ``<queue_prefix>:dead:<queue>``, each item one letter as JSON;
  **counts** in the hash ``<queue_prefix>:dead-letter-counts``, field ``<queue>|<code>``, value the
  number of messages dead-lettered since the farm began (never reset, not even by ``purge``: a
  metrics exporter reads it as a counter, ``HGETALL`` and ``field.rsplit("|", 1)``).
- Embedded broker (``farmfs://``): ``<broker_folder>/dead/<queue>/<time>-<uuid>.json``, counts in
  ``<broker_folder>/dead/counts.json`` (``{"<queue>|<code>": n}``).

Light on purpose: no torch, nothing of ``workers``; the CLI and the submitter side import it.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterator

from farm.errors import FarmError
from farm.settings import Settings

__all__ = [
    "CODES", "DEFAULT_KEEP", "DeadLetter", "DeadLetterError", "DeadLetters", "Poison", "ReplayOutcome",
    "check_envelope", "check_render_arguments", "check_task_message", "counts_key", "letters_key", "parse_envelope",
]

#: Letters kept per queue (the newest); older ones are dropped as new ones arrive.
DEFAULT_KEEP = 10_000
#: A kept raw message is cut at this many characters (it is then marked ``truncated``, never replayed).
MAX_RAW_CHARS = 256 * 1024
#: A task body larger than this is not a farm message (the largest, 256 ids of 64 characters, is ~17 kB).
MAX_BODY_BYTES = 1024 * 1024
#: ``farm.render``: an image id is at most this long (the farm's are 36-character UUIDs), a model name this.
MAX_IMAGE_ID_CHARS = 64
MAX_MODEL_CHARS = 128
#: The only content type a farm worker decodes.
JSON = "application/json"

#: Reason codes (see the module docstring); a letter's ``code`` and the counts' label.
CODES = (
    "envelope", "content-type", "content-encoding", "headers", "unknown-task", "no-body", "not-json",
    "undecodable", "body-shape", "arguments", "refused",
)

RENDER_KWARGS = ("image_ids", "model")
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")
_STRING_HEADERS = ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin")
_SAFE_QUEUE = re.compile(r"^[A-Za-z0-9._@+=-]{1,200}$")


class DeadLetterError(FarmError):
    """Raised when dead letters cannot be read or written (a broker that keeps none, an unreachable
    broker), or a replay cannot publish; the letters themselves stay where they were."""


@dataclass(frozen=True)
class Poison:
    """Why a message is a dead letter: a ``code`` (one of :data:`CODES`) and a one-line ``reason``."""

    code: str
    reason: str


# -- checks ------------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    """A value's JSON kind, for reasons: ``a string``, ``a number``, ``null``…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    return type(value).__name__


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_render_arguments(args: Any, kwargs: Any, settings: Settings) -> str | None:
    """Why ``(args, kwargs)`` are not arguments of ``farm.render``, or None when they are.

    ``farm.render`` takes keyword arguments only, exactly ``image_ids`` (a list of 1 to
    ``settings.max_batch_size`` strings of 1 to 64 characters) and ``model`` (a string of 1 to 128
    characters). Workers check it before a message reaches Celery, and the task checks it again.
    """
    if not isinstance(args, (list, tuple)):
        return f"args is {_kind(args)}, not a list"
    if args:
        return f"farm.render takes keyword arguments only; got {len(args)} positional argument(s)"
    if not isinstance(kwargs, dict):
        return f"kwargs is {_kind(kwargs)}, not an object"
    missing = [name for name in RENDER_KWARGS if name not in kwargs]
    if missing:
        return f"kwargs lack {' and '.join(repr(name) for name in missing)}"
    unexpected = sorted(str(name) for name in kwargs if name not in RENDER_KWARGS)
    if unexpected:
        shown = ", ".join(_short(name, 40) for name in unexpected[:3]) + (", …" if len(unexpected) > 3 else "")
        return f"unexpected kwargs {shown} (farm.render takes image_ids and model)"
    ids = kwargs["image_ids"]
    if not isinstance(ids, (list, tuple)):
        return f"image_ids is {_kind(ids)}, not a list of strings"
    if not ids:
        return "image_ids is empty"
    if len(ids) > settings.max_batch_size:
        return f"image_ids has {len(ids)} ids, more than FARM_MAX_BATCH_SIZE={settings.max_batch_size}"
    for index, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            return f"image_ids[{index}] is {_kind(image_id)}, not a string"
        if not image_id:
            return f"image_ids[{index}] is an empty string"
        if len(image_id) > MAX_IMAGE_ID_CHARS:
            return f"image_ids[{index}] is {len(image_id)} characters long, more than {MAX_IMAGE_ID_CHARS}"
    model = kwargs["model"]
    if not isinstance(model, str):
        return f"model is {_kind(model)}, not a string"
    if not model:
        return "model is an empty string"
    if len(model) > MAX_MODEL_CHARS:
        return f"model is {len(model)} characters long, more than {MAX_MODEL_CHARS}"
    return None


def parse_envelope(raw: bytes | str) -> tuple[Any, Poison | None]:
    """A broker item (kombu's JSON envelope, as Redis or the embedded broker hold it) → ``(its JSON
    value, None)``, or ``(None, Poison)`` when it is not UTF-8 JSON. The value is not checked: see
    :func:`check_envelope`."""
    from kombu.utils.json import loads

    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, Poison("envelope", f"the broker item is not UTF-8 text ({exc.reason} at byte {exc.start})")
    try:
        return loads(raw), None
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, or kombu's object hook on a bad __type__
        return None, Poison("envelope", f"the broker item is not JSON ({_one_line(exc)})")


def check_envelope(envelope: Any) -> Poison | None:
    """Why a decoded broker item is not a kombu message that kombu and Celery can take, or None.

    kombu's virtual transports (Redis, the filesystem) build a message from ``properties``
    (``delivery_tag``, ``delivery_info`` with ``exchange`` and ``routing_key``, ``body_encoding``),
    ``body``, ``headers``, ``content-type`` and ``content-encoding``; a wrong one raises inside
    kombu, where nothing catches it.
    """
    if not isinstance(envelope, dict):
        return Poison("envelope", f"the broker item is {_kind(envelope)}, not a kombu message object")
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return Poison("envelope", "the broker item has no properties object" if properties is None
                      else f"the broker item's properties is {_kind(properties)}, not an object")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return Poison("envelope", f"properties.delivery_tag is {_kind(tag)}, not a non-empty string")
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return Poison("envelope", f"properties.delivery_info is {_kind(info)}, not an object")
    for key in ("exchange", "routing_key"):
        if not isinstance(info.get(key), str):
            return Poison("envelope", f"properties.delivery_info.{key} is {_kind(info.get(key))}, not a string")
    priority = properties.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        return Poison("envelope", f"properties.priority is {_kind(priority)}, not a number")
    for key in ("content-type", "content-encoding"):
        if envelope.get(key) is not None and not isinstance(envelope.get(key), str):
            return Poison("envelope", f"{key} is {_kind(envelope.get(key))}, not a string")
    headers = envelope.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return Poison("headers", f"headers is {_kind(headers)}, not an object")
    body = envelope.get("body")
    if body is not None and not isinstance(body, str):
        return Poison("envelope", f"body is {_kind(body)}, not a string")
    encoding = properties.get("body_encoding")
    if encoding is not None and not isinstance(encoding, str):
        return Poison("envelope", f"properties.body_encoding is {_kind(encoding)}, not a string")
    if encoding and encoding.lower() not in ("base64", "utf-8"):
        return Poison("envelope", f"properties.body_encoding {_short(encoding)} is not base64")
    if body and encoding and encoding.lower() == "base64":
        try:
            base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            return Poison("envelope", f"body does not decode from base64 ({_one_line(exc)})")
    return None


def _iso_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _check_headers(headers: Any, tasks: Collection[str]) -> Poison | None:
    if headers is None:
        return Poison("headers", "no headers: not a Celery protocol 2 task message")
    if not isinstance(headers, dict):
        return Poison("headers", f"headers is {_kind(headers)}, not an object")
    if "task" not in headers:
        return Poison("headers", "no 'task' header: not a Celery protocol 2 task message")
    task = headers["task"]
    if not isinstance(task, str) or not task:
        return Poison("headers", f"header task={_short(task)} is not a task name")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 255:
        return Poison("headers", f"header id={_short(task_id)} is not a task id (a string of 1 to 255 characters)")
    if task not in tasks:
        runs = ", ".join(sorted(tasks)) or "no task"
        return Poison("unknown-task", f"unknown task {_short(task)} (this worker runs {runs})")
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is not None and not (isinstance(value, str) and _iso_time(value)):
            return Poison("headers", f"header {name}={_short(value)} is not an ISO 8601 time")
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, (list, tuple)) and len(limits) == 2
        and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0) for v in limits)
    ):
        return Poison("headers", f"header timelimit={_short(limits)} is not [soft, hard] seconds")
    retries = headers.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        return Poison("headers", f"header retries={_short(retries)} is not a count")
    for name in _STRING_HEADERS:
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            return Poison("headers", f"header {name}={_short(value)} is not a string")
    return None


def check_task_message(
    content_type: Any,
    content_encoding: Any,
    headers: Any,
    body: Any,
    *,
    tasks: Collection[str],
    settings: Settings,
) -> Poison | None:
    """Why a kombu message is not a task message this worker can run, or None when it is.

    ``tasks`` are the task names the worker runs; ``body`` is the message body as the transport
    hands it over (bytes, after the envelope's body encoding). The body is decoded here exactly as
    kombu decodes it, so a message that passes reaches the task with the arguments checked.
    """
    from kombu.utils.json import loads

    if content_type != JSON:
        if content_type is None:
            return Poison("content-type", "no content type (kombu would hand the body over undecoded)")
        return Poison("content-type", f"content type {_short(content_type)} is not {JSON}")
    encoding = content_encoding.lower() if isinstance(content_encoding, str) else content_encoding
    if encoding not in ("utf-8", "utf8"):
        return Poison("content-encoding", f"content encoding {_short(content_encoding)} is not utf-8")
    poison = _check_headers(headers, tasks)
    if poison:
        return poison
    if body is None or body == b"" or body == "":
        return Poison("no-body", "no body")
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, (bytes, bytearray)):
        if len(body) > MAX_BODY_BYTES:
            return Poison("body-shape", f"body is {len(body)} bytes, more than {MAX_BODY_BYTES}")
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            return Poison("not-json", f"body is not UTF-8 text ({exc.reason} at byte {exc.start})")
    if not isinstance(body, str):
        return Poison("not-json", f"body is {_kind(body)}, not JSON text")
    try:
        payload = loads(body)
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, or kombu's object hook
        return Poison("not-json", f"body is not JSON ({_one_line(exc)})")
    if not isinstance(payload, list) or len(payload) != 3:
        what = f"a list of {len(payload)}" if isinstance(payload, list) else _kind(payload)
        return Poison("body-shape", f"body is {what}, not Celery protocol 2's [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list):
        return Poison("body-shape", f"body's args is {_kind(args)}, not a list")
    if not isinstance(kwargs, dict):
        return Poison("body-shape", f"body's kwargs is {_kind(kwargs)}, not an object")
    if embed is not None and not isinstance(embed, dict):
        return Poison("body-shape", f"body's embed is {_kind(embed)}, not an object")
    carried = [key for key in _EMBED_KEYS if (embed or {}).get(key)]
    if carried:
        return Poison("body-shape", f"body's embed carries {', '.join(carried)} (farm tasks take none)")
    from farm.dispatch.celery_app import RENDER_TASK

    if headers["task"] == RENDER_TASK:
        reason = check_render_arguments(args, kwargs, settings)
        if reason:
            return Poison("arguments", reason)
    return None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def safe_queue(name: Any) -> str:
    """A queue name fit for a key or a folder name (a message may claim any routing key)."""
    return name if isinstance(name, str) and _SAFE_QUEUE.match(name) and name not in (".", "..") else "unknown"


# -- letters -----------------------------------------------------------------------------------------


@dataclass
class DeadLetter:
    """One message taken off ``queue`` and kept instead of run.

    ``raw`` is the message as it was: ``raw_format`` ``envelope`` (kombu's JSON envelope, body in its
    body encoding), ``text`` (a broker item that is not a kombu envelope) or ``base64`` (bytes that
    are not text). ``truncated``: ``raw`` was cut at :data:`MAX_RAW_CHARS` (never replayed).
    """

    queue: str
    code: str
    reason: str
    raw: str
    raw_format: str = "envelope"
    task_id: str | None = None
    task: str | None = None
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    truncated: bool = False
    #: How the store holds it (the exact stored text in Redis, the file path in a folder).
    stored: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, queue: str, poison: Poison, raw: Any, *, task_id: Any = None, task: Any = None) -> "DeadLetter":
        """A letter for ``raw``: a dict (an envelope), text, or bytes."""
        if isinstance(raw, dict):
            text, fmt = json.dumps(raw, default=repr), "envelope"
        elif isinstance(raw, str):
            text, fmt = raw, "text"
        elif isinstance(raw, (bytes, bytearray, memoryview)):
            data = bytes(raw)
            try:
                text, fmt = data.decode("utf-8"), "text"
            except UnicodeDecodeError:
                text, fmt = base64.b64encode(data).decode("ascii"), "base64"
        else:
            text, fmt = repr(raw), "text"
        truncated = len(text) > MAX_RAW_CHARS
        return cls(
            queue=safe_queue(queue), code=poison.code, reason=poison.reason, raw=text[:MAX_RAW_CHARS], raw_format=fmt,
            task_id=task_id if isinstance(task_id, str) else None, task=task if isinstance(task, str) else None,
            truncated=truncated,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("stored")
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, stored: str | None = None) -> "DeadLetter":
        data = json.loads(text)
        known = {name for name in cls.__dataclass_fields__ if name != "stored"}
        return cls(**{k: v for k, v in data.items() if k in known}, stored=stored)

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def line(self) -> str:
        """``time  queue  code: reason  task <id>`` (tab separated, one line)."""
        reason = " ".join(self.reason.split())
        return f"{self.when}\t{self.queue}\t{self.code}: {reason}\ttask {self.task_id or '-'}"


@dataclass(frozen=True)
class ReplayOutcome:
    letter: DeadLetter
    replayed: bool
    note: str

    def line(self) -> str:
        return f"{'replayed' if self.replayed else 'kept'}\t{self.letter.line()}\t{self.note}"


def letters_key(settings: Settings, queue: str) -> str:
    """The Redis list of ``queue``'s dead letters, newest first."""
    return f"{settings.queue_prefix}:dead:{queue}"


def counts_key(settings: Settings) -> str:
    """The Redis hash of dead-letter counts: field ``<queue>|<code>``, value a count that only grows."""
    return f"{settings.queue_prefix}:dead-letter-counts"


class _RedisShelf:
    def __init__(self, settings: Settings, keep: int):
        import redis

        self.settings, self.keep = settings, keep
        self.client = redis.Redis.from_url(settings.broker, socket_timeout=10, socket_connect_timeout=5)
        self._prefix = letters_key(settings, "")

    def add(self, letter: DeadLetter) -> None:
        text = letter.to_json()
        key = letters_key(self.settings, letter.queue)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(key, text).ltrim(key, 0, self.keep - 1)
            pipe.hincrby(counts_key(self.settings), f"{letter.queue}|{letter.code}", 1)
            pipe.execute()
        letter.stored = text

    def queues(self) -> list[str]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._prefix) + "*"
        return sorted(key.decode()[len(self._prefix):] for key in self.client.scan_iter(match=pattern, count=500))

    def letters(self, queue: str, limit: int | None) -> list[DeadLetter]:
        items = self.client.lrange(letters_key(self.settings, queue), 0, -1 if limit is None else limit - 1)
        return [DeadLetter.from_json(item, stored=item.decode()) for item in items]

    def remove(self, letter: DeadLetter) -> bool:
        return bool(self.client.lrem(letters_key(self.settings, letter.queue), 1, letter.stored or letter.to_json()))

    def purge(self, queue: str) -> int:
        key = letters_key(self.settings, queue)
        with self.client.pipeline(transaction=True) as pipe:
            count, _ = pipe.llen(key).delete(key).execute()
        return int(count)

    def counts(self) -> dict[tuple[str, str], int]:
        found = {}
        for name, value in self.client.hgetall(counts_key(self.settings)).items():
            queue, _, code = name.decode().rpartition("|")
            found[(queue, code)] = int(value)
        return found

    def close(self) -> None:
        self.client.close()


class _FolderShelf:
    def __init__(self, settings: Settings, keep: int):
        self.root = settings.broker_folder / "dead"
        self.keep = keep

    def add(self, letter: DeadLetter) -> None:
        folder = self.root / letter.queue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.time_ns():020d}-{letter.id}.json"
        temp = folder / f".{path.name}.tmp"
        temp.write_text(letter.to_json(), encoding="utf-8")
        os.replace(temp, path)
        letter.stored = str(path)
        names = self._names(folder)
        for old in names[: max(0, len(names) - self.keep)]:
            (folder / old).unlink(missing_ok=True)
        with self._locked():
            counts = self._read_counts()
            name = f"{letter.queue}|{letter.code}"
            counts[name] = counts.get(name, 0) + 1
            temp = self.root / ".counts.json.tmp"
            temp.write_text(json.dumps(counts, sort_keys=True), encoding="utf-8")
            os.replace(temp, self.root / "counts.json")

    @staticmethod
    def _names(folder: Path) -> list[str]:
        try:
            return sorted(name for name in os.listdir(folder) if name.endswith(".json") and not name.startswith("."))
        except FileNotFoundError:
            return []

    def _locked(self):
        import contextlib

        @contextlib.contextmanager
        def lock() -> Iterator[None]:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".counts.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

        return lock()

    def _read_counts(self) -> dict[str, int]:
        try:
            return json.loads((self.root / "counts.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}

    def queues(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir() if path.is_dir())

    def letters(self, queue: str, limit: int | None) -> list[DeadLetter]:
        folder = self.root / queue
        letters = []
        for name in reversed(self._names(folder)):
            if limit is not None and len(letters) >= limit:
                break
            try:
                letters.append(DeadLetter.from_json((folder / name).read_text(encoding="utf-8"), stored=str(folder / name)))
            except FileNotFoundError:  # trimmed or purged meanwhile
                continue
        return letters

    def remove(self, letter: DeadLetter) -> bool:
        if not letter.stored:
            return False
        try:
            os.unlink(letter.stored)
        except FileNotFoundError:
            return False
        return True

    def purge(self, queue: str) -> int:
        folder = self.root / queue
        count = 0
        for name in self._names(folder):
            try:
                (folder / name).unlink()
                count += 1
            except FileNotFoundError:
                pass
        return count

    def counts(self) -> dict[tuple[str, str], int]:
        with self._locked():
            counts = self._read_counts()
        return {tuple(name.rsplit("|", 1)): int(value) for name, value in counts.items() if "|" in name}

    def close(self) -> None:
        pass


class DeadLetters:
    """The dead letters of a farm's broker: keep one (:meth:`add`), read (:meth:`letters`), count
    (:meth:`counts`), publish back to their queue (:meth:`replay`) or delete (:meth:`purge`).

    Redis and the embedded broker only (see the module docstring for where they lie); any other
    broker raises :class:`DeadLetterError`.
    """

    def __init__(self, settings: Settings, *, keep: int = DEFAULT_KEEP):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.settings = settings
        self.keep = keep
        from farm.dispatch.celery_app import broker_url

        url = broker_url(settings)
        if url.startswith(("redis://", "rediss://")):
            self._shelf: _RedisShelf | _FolderShelf = _RedisShelf(settings, keep)
        elif url.startswith("farmfs://"):
            self._shelf = _FolderShelf(settings, keep)
        else:
            scheme = url.split("://", 1)[0]
            raise DeadLetterError(f"dead letters are kept for Redis and the embedded broker only, not {scheme}://")

    def __enter__(self) -> "DeadLetters":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._shelf.close()

    def _guarded(self, what: str, call, *args):
        try:
            return call(*args)
        except (OSError, ValueError) as exc:
            raise DeadLetterError(f"cannot {what} dead letters: {type(exc).__name__}: {_one_line(exc)}") from exc
        except Exception as exc:  # redis.RedisError and the like: the broker is unreachable
            if type(exc).__module__.partition(".")[0] in ("redis", "kombu"):
                raise DeadLetterError(f"cannot {what} dead letters: {type(exc).__name__}: {_one_line(exc)}") from exc
            raise

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Keep ``letter`` (dropping the oldest past ``keep``) and count it."""
        self._guarded("keep", self._shelf.add, letter)
        return letter

    def queues(self) -> list[str]:
        """Queues that hold dead letters."""
        return self._guarded("list", self._shelf.queues)

    def letters(self, queue: str | None = None, *, limit: int | None = None) -> list[DeadLetter]:
        """Letters of ``queue`` (default: every queue), newest first, at most ``limit``."""
        queues = [safe_queue(queue)] if queue is not None else self.queues()
        found: list[DeadLetter] = []
        for name in queues:
            found.extend(self._guarded("list", self._shelf.letters, name, limit))
        found.sort(key=lambda letter: letter.time, reverse=True)
        return found if limit is None else found[:limit]

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(queue, code): messages dead-lettered}`` since the farm began (purge keeps them)."""
        return self._guarded("count", self._shelf.counts)

    def purge(self, queue: str | None = None) -> int:
        """Delete the letters of ``queue`` (default: every queue); returns how many."""
        queues = [safe_queue(queue)] if queue is not None else self.queues()
        return sum(self._guarded("purge", self._shelf.purge, name) for name in queues)

    def replay(
        self, queue: str | None = None, *, limit: int | None = None, force: bool = False, app=None,
    ) -> list[ReplayOutcome]:
        """Publish letters back to their queue, oldest first, and drop each one published.

        Only meaningful after a fix (a worker that runs the task now, a raised batch limit). A
        letter whose message still fails the checks is kept unless ``force``; one that is not a
        kombu message, or was truncated when kept, is always kept.
        """
        from farm.dispatch.celery_app import RENDER_TASK, make_celery

        chosen = list(reversed(self.letters(queue, limit=limit)))
        outcomes: list[ReplayOutcome] = []
        own_app = app is None
        app = app or make_celery(self.settings)
        try:
            with app.producer_or_acquire() as producer:
                for letter in chosen:
                    message, why = _replayable(letter, {RENDER_TASK}, self.settings, force=force)
                    if message is None:
                        outcomes.append(ReplayOutcome(letter, False, why))
                        continue
                    body, options = message
                    try:
                        producer.publish(body, exchange="", routing_key=letter.queue, retry=False, **options)
                    except Exception as exc:  # noqa: BLE001 - the broker refused: keep it, say why
                        raise DeadLetterError(
                            f"replay stopped: the broker refused a message of {letter.queue} "
                            f"({type(exc).__name__}: {_one_line(exc)}); {len(outcomes)} letter(s) handled before"
                        ) from exc
                    self._guarded("remove", self._shelf.remove, letter)
                    outcomes.append(ReplayOutcome(letter, True, why))
        finally:
            if own_app:
                app.close()
        return outcomes


def _replayable(letter: DeadLetter, tasks: Collection[str], settings: Settings, *, force: bool):
    """``((body, publish options), note)`` for a letter that may be published again, else ``(None, why not)``."""
    if letter.truncated:
        return None, f"the message was cut at {MAX_RAW_CHARS} characters when kept; it cannot be replayed"
    if letter.raw_format == "base64":
        return None, "not a kombu message (bytes); it cannot be replayed"
    envelope, poison = parse_envelope(letter.raw)
    poison = poison or check_envelope(envelope)
    if poison:
        return None, f"not a kombu message ({poison.reason}); it cannot be replayed"
    body = envelope.get("body")
    properties = envelope["properties"]
    if body and (properties.get("body_encoding") or "").lower() == "base64":
        body = base64.b64decode(body)
    elif isinstance(body, str):
        body = body.encode("utf-8")
    content_type, content_encoding = envelope.get("content-type"), envelope.get("content-encoding")
    headers = envelope.get("headers")
    poison = check_task_message(content_type, content_encoding, headers, body, tasks=tasks, settings=settings)
    if poison and not force:
        return None, f"still fails: {poison.reason} (--force replays it anyway)"
    options = {
        "content_type": content_type or "application/data",
        "content_encoding": content_encoding or "binary",
        "headers": dict(headers or {}),
        "priority": properties.get("priority"),
    }
    for name in ("correlation_id", "reply_to", "delivery_mode"):
        if properties.get(name) not in (None, ""):
            options[name] = properties[name]
    return (body or b"", options), ("forced, still fails: " + poison.reason) if poison else "passes the checks"
