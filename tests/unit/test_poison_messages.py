"""Poison messages: the checks (farm.dispatch.dead_letters), the dead-letter store on a real Redis and
on the embedded broker's folder, the ``farm dead-letters`` CLI, and the guarded kombu transports
(workers.consumption) consuming through real kombu connections.

Redis: db 14 on 127.0.0.1:6379, every key under a prefix of its own, deleted afterwards.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest

from farm.dispatch.dead_letters import (
    DeadLetter, DeadLetterError, DeadLetters, Poison, check_envelope, check_render_arguments, check_task_message,
    counts_key, letters_key, parse_envelope,
)
from farm.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
TASKS = {"farm.render"}


def make_settings(tmp_path: Path, broker: str | None = REDIS_URL, **extra) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", broker_url=broker, queue_prefix=f"poison{uuid.uuid4().hex[:8]}",
        models={"tiny": "builtin:tiny"}, max_batch_size=8, **extra,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, broker=None)  # checks only: no broker touched


@pytest.fixture
def redis_settings(tmp_path: Path):
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis at 127.0.0.1:6379 is needed: {exc}")
    settings = make_settings(tmp_path)
    yield settings
    keys = [*client.scan_iter(match=f"{settings.queue_prefix}*"), *client.scan_iter(match=f"_kombu.binding.{settings.queue_prefix}*")]
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["redis", "folder"])
def store_settings(request, tmp_path: Path) -> Settings:
    if request.param == "redis":
        return request.getfixturevalue("redis_settings")
    return make_settings(tmp_path, broker=None)


def headers(**changes) -> dict:
    task_id = str(uuid.uuid4())
    found = {
        "lang": "py", "task": "farm.render", "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": "submission=x", "kwargsrepr": "{}", "origin": "test", "ignore_result": False,
    }
    found.update(changes)
    return found


def body(args=(), kwargs=None, embed=EMBED) -> bytes:
    kwargs = {"image_ids": ["a" * 36], "model": "tiny"} if kwargs is None else kwargs
    return json.dumps([list(args) if isinstance(args, tuple) else args, kwargs, embed]).encode()


def envelope(raw_body: bytes | None = None, *, content_type="application/json", head=None, queue="farm.tiny") -> dict:
    task_headers = headers() if head is None else head
    return {
        "body": base64.b64encode(body() if raw_body is None else raw_body).decode(),
        "content-encoding": "utf-8", "content-type": content_type, "headers": task_headers,
        "properties": {
            "correlation_id": "c", "reply_to": "", "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


# -- farm.render arguments ---------------------------------------------------------------------------

IDS = ["a" * 36]
RENDER_ARGUMENTS = [
    ("args an object", {}, {"image_ids": IDS, "model": "tiny"}, "args is an object, not a list"),
    ("args null", None, {"image_ids": IDS, "model": "tiny"}, "args is null, not a list"),
    ("positional args", ["x", "y"], {"image_ids": IDS, "model": "tiny"},
     "farm.render takes keyword arguments only; got 2 positional argument(s)"),
    ("kwargs a list", [], ["x"], "kwargs is a list, not an object"),
    ("kwargs a string", [], "image_ids", "kwargs is a string, not an object"),
    ("no image_ids", [], {"model": "tiny"}, "kwargs lack 'image_ids'"),
    ("no model", [], {"image_ids": IDS}, "kwargs lack 'model'"),
    ("empty kwargs", [], {}, "kwargs lack 'image_ids' and 'model'"),
    ("an extra kwarg", [], {"image_ids": IDS, "model": "tiny", "seed": 1},
     "unexpected kwargs 'seed' (farm.render takes image_ids and model)"),
    ("many extra kwargs", [], {"image_ids": IDS, "model": "tiny", "a": 1, "b": 2, "c": 3, "d": 4},
     "unexpected kwargs 'a', 'b', 'c', … (farm.render takes image_ids and model)"),
    ("ids a string", [], {"image_ids": "abc", "model": "tiny"}, "image_ids is a string, not a list of strings"),
    ("ids an object", [], {"image_ids": {"a": 1}, "model": "tiny"}, "image_ids is an object, not a list of strings"),
    ("ids null", [], {"image_ids": None, "model": "tiny"}, "image_ids is null, not a list of strings"),
    ("no ids", [], {"image_ids": [], "model": "tiny"}, "image_ids is empty"),
    ("too many ids", [], {"image_ids": [f"id{n}" for n in range(9)], "model": "tiny"},
     "image_ids has 9 ids, more than FARM_MAX_BATCH_SIZE=8"),
    ("a million ids", [], {"image_ids": ["x"] * 1_000_000, "model": "tiny"},
     "image_ids has 1000000 ids, more than FARM_MAX_BATCH_SIZE=8"),
    ("an int id", [], {"image_ids": [1, 2], "model": "tiny"}, "image_ids[0] is a number, not a string"),
    ("a null id", [], {"image_ids": ["a", None], "model": "tiny"}, "image_ids[1] is null, not a string"),
    ("a list id", [], {"image_ids": ["a", "b", ["c"]], "model": "tiny"}, "image_ids[2] is a list, not a string"),
    ("a boolean id", [], {"image_ids": [True], "model": "tiny"}, "image_ids[0] is a boolean, not a string"),
    ("an empty id", [], {"image_ids": [""], "model": "tiny"}, "image_ids[0] is an empty string"),
    ("a long id", [], {"image_ids": ["a", "x" * 65], "model": "tiny"},
     "image_ids[1] is 65 characters long, more than 64"),
    ("model a number", [], {"image_ids": IDS, "model": 3}, "model is a number, not a string"),
    ("model null", [], {"image_ids": IDS, "model": None}, "model is null, not a string"),
    ("model empty", [], {"image_ids": IDS, "model": ""}, "model is an empty string"),
    ("model too long", [], {"image_ids": IDS, "model": "m" * 129}, "model is 129 characters long, more than 128"),
]


@pytest.mark.parametrize("args, kwargs, reason", [case[1:] for case in RENDER_ARGUMENTS], ids=[case[0] for case in RENDER_ARGUMENTS])
def test_render_arguments_of_the_wrong_shape_say_why(settings, args, kwargs, reason):
    assert check_render_arguments(args, kwargs, settings) == reason


@pytest.mark.parametrize("kwargs", [
    {"image_ids": ["a" * 36], "model": "tiny"},
    {"image_ids": [str(uuid.uuid4()) for _ in range(8)], "model": "m" * 128},
    {"image_ids": ["x" * 64], "model": "sd15"},
])
def test_good_render_arguments_pass(settings, kwargs):
    assert check_render_arguments([], kwargs, settings) is None
    assert check_render_arguments((), kwargs, settings) is None


# -- task messages (after the envelope) --------------------------------------------------------------

J = "application/json"
TASK_MESSAGES = [
    # (name, content type, content encoding, headers, body, code, reason)
    ("application/data", "application/data", "utf-8", headers(), body(), "content-type",
     "content type 'application/data' is not application/json"),
    ("application/text", "application/text", "utf-8", headers(), body(), "content-type",
     "content type 'application/text' is not application/json"),
    ("pickle", "application/x-python-serialize", "binary", headers(), b"\x80\x04N.", "content-type",
     "content type 'application/x-python-serialize' is not application/json"),
    ("yaml", "application/x-yaml", "utf-8", headers(), b"[]", "content-type",
     "content type 'application/x-yaml' is not application/json"),
    ("no content type", None, "utf-8", headers(), body(), "content-type",
     "no content type (kombu would hand the body over undecoded)"),
    ("binary encoding", J, "binary", headers(), body(), "content-encoding", "content encoding 'binary' is not utf-8"),
    ("no headers", J, "utf-8", None, body(), "headers", "no headers: not a Celery protocol 2 task message"),
    ("headers a list", J, "utf-8", [1, 2], body(), "headers", "headers is a list, not an object"),
    ("no task header", J, "utf-8", {"id": "x"}, body(), "headers", "no 'task' header: not a Celery protocol 2 task message"),
    ("task a number", J, "utf-8", headers(task=5), body(), "headers", "header task=5 is not a task name"),
    ("no id", J, "utf-8", {k: v for k, v in headers().items() if k != "id"}, body(), "headers",
     "header id=None is not a task id (a string of 1 to 255 characters)"),
    ("id a number", J, "utf-8", headers(id=7), body(), "headers",
     "header id=7 is not a task id (a string of 1 to 255 characters)"),
    ("unknown task", J, "utf-8", headers(task="farm.nope"), body(), "unknown-task",
     "unknown task 'farm.nope' (this worker runs farm.render)"),
    ("a celery built-in", J, "utf-8", headers(task="celery.backend_cleanup"), body(), "unknown-task",
     "unknown task 'celery.backend_cleanup' (this worker runs farm.render)"),
    ("eta garbage", J, "utf-8", headers(eta="garbage"), body(), "headers", "header eta='garbage' is not an ISO 8601 time"),
    ("expires a number", J, "utf-8", headers(expires=5), body(), "headers", "header expires=5 is not an ISO 8601 time"),
    ("timelimit a string", J, "utf-8", headers(timelimit="abc"), body(), "headers",
     "header timelimit='abc' is not [soft, hard] seconds"),
    ("timelimit of three", J, "utf-8", headers(timelimit=[1, 2, 3]), body(), "headers",
     "header timelimit=[1, 2, 3] is not [soft, hard] seconds"),
    ("retries a string", J, "utf-8", headers(retries="x"), body(), "headers", "header retries='x' is not a count"),
    ("retries negative", J, "utf-8", headers(retries=-1), body(), "headers", "header retries=-1 is not a count"),
    ("shadow a number", J, "utf-8", headers(shadow=5), body(), "headers", "header shadow=5 is not a string"),
    ("no body", J, "utf-8", headers(), None, "no-body", "no body"),
    ("empty body", J, "utf-8", headers(), b"", "no-body", "no body"),
    ("body not json", J, "utf-8", headers(), b"not json{", "not-json",
     "body is not JSON (Expecting value: line 1 column 1 (char 0))"),
    ("body truncated json", J, "utf-8", headers(), b'[[], {"image_ids": ["a"', "not-json",
     "body is not JSON (Expecting ',' delimiter: line 1 column 24 (char 23))"),
    ("body not utf-8", J, "utf-8", headers(), b"\xff\xfe[]", "not-json",
     "body is not UTF-8 text (invalid start byte at byte 0)"),
    ("body a bad kombu __type__", J, "utf-8", headers(), b'{"__type__": "datetime", "__value__": "x"}', "not-json",
     "body is not JSON (Invalid isoformat string: 'x')"),
    ("body an object", J, "utf-8", headers(), b'{"args": [], "kwargs": {}}', "body-shape",
     "body is an object, not Celery protocol 2's [args, kwargs, embed]"),
    ("body null", J, "utf-8", headers(), b"null", "body-shape", "body is null, not Celery protocol 2's [args, kwargs, embed]"),
    ("body a string", J, "utf-8", headers(), b'"hello"', "body-shape",
     "body is a string, not Celery protocol 2's [args, kwargs, embed]"),
    ("body of two", J, "utf-8", headers(), b"[[], {}]", "body-shape",
     "body is a list of 2, not Celery protocol 2's [args, kwargs, embed]"),
    ("body of four", J, "utf-8", headers(), b"[[], {}, {}, 1]", "body-shape",
     "body is a list of 4, not Celery protocol 2's [args, kwargs, embed]"),
    ("args an object", J, "utf-8", headers(), body(args={}), "body-shape", "body's args is an object, not a list"),
    ("kwargs a list", J, "utf-8", headers(), body(kwargs=[1]), "body-shape", "body's kwargs is a list, not an object"),
    ("embed a list", J, "utf-8", headers(), body(embed=[]), "body-shape", "body's embed is a list, not an object"),
    ("embed with callbacks", J, "utf-8", headers(), body(embed={**EMBED, "callbacks": [{"task": "x"}]}), "body-shape",
     "body's embed carries callbacks (farm tasks take none)"),
    ("embed with a chord and errbacks", J, "utf-8", headers(), body(embed={**EMBED, "errbacks": [1], "chord": {"a": 1}}),
     "body-shape", "body's embed carries errbacks, chord (farm tasks take none)"),
    ("a huge body", J, "utf-8", headers(), b"[" + b" " * (1024 * 1024) + b"]", "body-shape",
     "body is 1048578 bytes, more than 1048576"),
    ("ids not strings", J, "utf-8", headers(), body(kwargs={"image_ids": [1, 2], "model": "tiny"}), "arguments",
     "image_ids[0] is a number, not a string"),
    ("too many ids", J, "utf-8", headers(), body(kwargs={"image_ids": ["x"] * 500, "model": "tiny"}), "arguments",
     "image_ids has 500 ids, more than FARM_MAX_BATCH_SIZE=8"),
    ("positional args", J, "utf-8", headers(), body(args=["x"]), "arguments",
     "farm.render takes keyword arguments only; got 1 positional argument(s)"),
]


@pytest.mark.parametrize(
    "content_type, encoding, head, raw_body, code, reason", [case[1:] for case in TASK_MESSAGES],
    ids=[case[0] for case in TASK_MESSAGES],
)
def test_poison_task_messages_say_why(settings, content_type, encoding, head, raw_body, code, reason):
    assert check_task_message(content_type, encoding, head, raw_body, tasks=TASKS, settings=settings) == Poison(code, reason)


def test_what_the_farm_publishes_passes(settings):
    from farm.dispatch.celery_app import RENDER_TASK, make_celery

    app = make_celery(settings)
    ids = [str(uuid.uuid4()) for _ in range(8)]
    message = app.amqp.create_task_message(
        str(uuid.uuid4()), RENDER_TASK, (), {"image_ids": ids, "model": "tiny"}, countdown=30,
        argsrepr="submission=x", kwargsrepr="{}",
    )
    raw = json.dumps(message.body).encode()
    assert check_task_message(J, "utf-8", message.headers, raw, tasks=TASKS, settings=settings) is None
    assert check_task_message(J, "UTF-8", message.headers, raw.decode(), tasks=TASKS, settings=settings) is None


# -- broker envelopes --------------------------------------------------------------------------------

def _without(key):
    found = envelope()
    found.pop(key)
    return found


def _properties(**changes):
    found = envelope()
    found["properties"].update(changes)
    return found


ENVELOPES = [
    ("a list", [1, 2], "envelope", "the broker item is a list, not a kombu message object"),
    ("a string", "x", "envelope", "the broker item is a string, not a kombu message object"),
    ("no properties", _without("properties"), "envelope", "the broker item has no properties object"),
    ("properties a list", {**envelope(), "properties": []}, "envelope", "the broker item's properties is a list, not an object"),
    ("no delivery tag", _properties(delivery_tag=None), "envelope", "properties.delivery_tag is null, not a non-empty string"),
    ("delivery info a string", _properties(delivery_info="x"), "envelope", "properties.delivery_info is a string, not an object"),
    ("no routing key", _properties(delivery_info={"exchange": ""}), "envelope",
     "properties.delivery_info.routing_key is null, not a string"),
    ("priority a string", _properties(priority="high"), "envelope", "properties.priority is a string, not a number"),
    ("unknown body encoding", _properties(body_encoding="rot13"), "envelope", "properties.body_encoding 'rot13' is not base64"),
    ("body not base64", {**envelope(), "body": "!!!notbase64"}, "envelope",
     "body does not decode from base64 (Invalid base64-encoded string: number of data characters (9) cannot be 1 more than a multiple of 4)"),
    ("body a number", {**envelope(), "body": 5}, "envelope", "body is a number, not a string"),
    ("content type a list", {**envelope(), "content-type": ["a"]}, "envelope", "content-type is a list, not a string"),
    ("headers a string", {**envelope(), "headers": "x"}, "headers", "headers is a string, not an object"),
]


@pytest.mark.parametrize("value, code, reason", [case[1:] for case in ENVELOPES], ids=[case[0] for case in ENVELOPES])
def test_broker_items_that_are_not_kombu_messages_say_why(value, code, reason):
    assert check_envelope(value) == Poison(code, reason)


@pytest.mark.parametrize("raw, reason", [
    (b"garbage{{", "the broker item is not JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"\xff\xfe{}", "the broker item is not UTF-8 text (invalid start byte at byte 0)"),
    ("", "the broker item is not JSON (Expecting value: line 1 column 1 (char 0))"),
])
def test_broker_items_that_are_not_json_say_why(raw, reason):
    assert parse_envelope(raw) == (None, Poison("envelope", reason))


def test_a_good_envelope_passes():
    value, poison = parse_envelope(json.dumps(envelope()).encode())
    assert poison is None and check_envelope(value) is None


def test_what_kombu_stores_in_redis_passes(redis_settings):
    """The farm's own publish path, read back raw from Redis: envelope, headers and body all pass."""
    import redis

    from farm.dispatch.celery_app import make_celery
    from farm.dispatch.publish import Batch, publish

    app = make_celery(redis_settings)
    publish(app, [Batch(task_id=str(uuid.uuid4()), model="tiny", image_ids=("a", "b"), label="x", priority=6)],
            redis_settings, origin="test")
    client = redis.Redis.from_url(REDIS_URL)
    [raw] = client.lrange(f"{redis_settings.queue_for('tiny')}:6", 0, -1)
    value, poison = parse_envelope(raw)
    assert poison is None and check_envelope(value) is None
    raw_body = base64.b64decode(value["body"])
    assert check_task_message(value["content-type"], value["content-encoding"], value["headers"], raw_body,
                              tasks=TASKS, settings=redis_settings) is None
    app.close()


# -- the store ---------------------------------------------------------------------------------------

def poison_letter(queue: str, reason: str = "content type 'application/data' is not application/json", **kw) -> DeadLetter:
    return DeadLetter.of(queue, Poison("content-type", reason), envelope(content_type="application/data", queue=queue),
                         task_id=kw.get("task_id", "t1"), task="farm.render")


def test_store_keeps_lists_and_counts_letters_newest_first(store_settings):
    queue = store_settings.queue_for("tiny")
    with DeadLetters(store_settings, keep=3) as store:
        for n in range(5):
            store.add(poison_letter(queue, reason=f"reason {n}", task_id=f"t{n}"))
            time.sleep(0.002)
        store.add(DeadLetter.of(store_settings.queue_for("other"), Poison("envelope", "the broker item is not JSON"), b"garbage"))
        letters = store.letters(queue)
        assert [letter.reason for letter in letters] == ["reason 4", "reason 3", "reason 2"]  # the newest 3 kept
        assert [letter.task_id for letter in store.letters(queue, limit=2)] == ["t4", "t3"]
        assert store.queues() == sorted([queue, store_settings.queue_for("other")])
        everywhere = store.letters()
        assert len(everywhere) == 4 and everywhere[0].queue == store_settings.queue_for("other")
        assert everywhere[0].raw == "garbage" and everywhere[0].raw_format == "text"
        assert store.counts() == {(queue, "content-type"): 5, (store_settings.queue_for("other"), "envelope"): 1}
        line = letters[0].line()
        assert line.split("\t")[1:] == [queue, "content-type: reason 4", "task t4"]
        assert store.purge(queue) == 3
        assert store.letters(queue) == []
        assert store.purge() == 1
        assert store.counts()[(queue, "content-type")] == 5, "counts are counters: purge keeps them"


def test_redis_keys_are_the_documented_ones(redis_settings):
    import redis

    queue = redis_settings.queue_for("tiny")
    with DeadLetters(redis_settings) as store:
        store.add(poison_letter(queue))
    client = redis.Redis.from_url(REDIS_URL)
    assert letters_key(redis_settings, queue) == f"{redis_settings.queue_prefix}:dead:{queue}"
    assert counts_key(redis_settings) == f"{redis_settings.queue_prefix}:dead-letter-counts"
    assert client.llen(letters_key(redis_settings, queue)) == 1
    assert client.hgetall(counts_key(redis_settings)) == {f"{queue}|content-type".encode(): b"1"}


def test_raw_messages_are_bounded_and_queue_names_cannot_escape(store_settings):
    huge = b"x" * 300_000
    letter = DeadLetter.of("../../etc", Poison("envelope", "the broker item is not JSON"), huge)
    assert letter.queue == "unknown" and letter.truncated and len(letter.raw) == 256 * 1024
    assert DeadLetter.of("q", Poison("envelope", "x"), b"\xff\x00").raw_format == "base64"
    with DeadLetters(store_settings) as store:
        store.add(letter)
        [kept] = store.letters("unknown")
        assert kept.truncated and kept == letter
        [outcome] = store.replay("unknown", force=True)
        assert not outcome.replayed and "cannot be replayed" in outcome.note


def test_replay_publishes_fixed_messages_and_keeps_the_rest(store_settings):
    from farm.dispatch.celery_app import make_celery

    queue = store_settings.queue_for("tiny")
    good = envelope(queue=queue)  # e.g. an unknown task then, run by a newer worker now
    with DeadLetters(store_settings) as store:
        store.add(DeadLetter.of(queue, Poison("unknown-task", "unknown task"), good, task_id=good["headers"]["id"]))
        time.sleep(0.002)
        store.add(poison_letter(queue))
        time.sleep(0.002)
        store.add(DeadLetter.of(queue, Poison("envelope", "the broker item is not JSON"), "garbage{{"))
        outcomes = store.replay(queue)
        assert [(o.replayed, o.letter.code) for o in outcomes] == [(True, "unknown-task"), (False, "content-type"), (False, "envelope")]
        assert outcomes[1].note == "still fails: content type 'application/data' is not application/json (--force replays it anyway)"
        assert outcomes[2].note.startswith("not a kombu message (the broker item is not JSON")
        assert {letter.code for letter in store.letters(queue)} == {"content-type", "envelope"}
        forced = store.replay(queue, force=True)
        assert [(o.replayed, o.letter.code) for o in forced] == [(True, "content-type"), (False, "envelope")]
        assert [letter.code for letter in store.letters(queue)] == ["envelope"]

    # both messages are back on their queue, as the broker delivers them to a consumer
    app = make_celery(store_settings)
    received = []
    with app.connection_for_read() as connection:
        with connection.SimpleQueue(queue, no_ack=True, serializer="json") as simple:
            for _ in range(2):
                message = simple.get(timeout=5)
                received.append((message.content_type, message.headers["id"], message.body))
    app.close()
    assert received[0][:2] == ("application/json", good["headers"]["id"])
    assert received[0][2] == base64.b64decode(good["body"])
    assert received[1][0] == "application/data"


def test_other_brokers_keep_no_dead_letters(tmp_path):
    with pytest.raises(DeadLetterError, match="Redis and the embedded broker only, not amqp://"):
        DeadLetters(make_settings(tmp_path, broker="amqp://guest@localhost//"))


def test_an_unreachable_redis_is_a_farm_error(tmp_path):
    settings = make_settings(tmp_path, broker="redis://127.0.0.1:1/0")
    with pytest.raises(DeadLetterError, match="cannot list dead letters: ConnectionError"):
        DeadLetters(settings).letters()


# -- the CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    from click.testing import CliRunner

    from farm.cli.dead_letters import dead_letters
    from farm.cli.main import main

    monkeypatch.setitem(main.commands, "dead-letters", dead_letters)  # until farm.cli.main adds it

    def run(settings: Settings, *args: str):
        env = {"FARM_DATA_DIR": str(settings.data_dir), "FARM_BROKER_URL": settings.broker_url or "",
               "FARM_QUEUE_PREFIX": settings.queue_prefix, "FARM_MODELS": "tiny=builtin:tiny"}
        return CliRunner().invoke(main, ["dead-letters", *args], env=env)

    return run


def test_cli_lists_replays_and_purges(cli, store_settings):
    queue = store_settings.queue_for("tiny")
    with DeadLetters(store_settings) as store:
        store.add(poison_letter(queue, task_id="task-1"))
    listed = cli(store_settings, "list")
    assert listed.exit_code == 0, listed.output
    [line] = listed.stdout.splitlines()
    assert line.endswith(f"\t{queue}\tcontent-type: content type 'application/data' is not application/json\ttask task-1")
    assert cli(store_settings, "list", "--queue", "farm.none").stderr.strip() == "no dead letters in farm.none"
    assert cli(store_settings, "counts").stdout == f"{queue}\tcontent-type\t1\n"
    replayed = cli(store_settings, "replay")
    assert replayed.exit_code == 0
    assert replayed.stdout.startswith("kept\t") and "still fails" in replayed.stdout
    refused = cli(store_settings, "purge")
    assert refused.exit_code == 2 and "purge deletes 1 dead letter(s) of every queue; add --yes" in refused.stderr
    purged = cli(store_settings, "purge", "--queue", queue, "--yes")
    assert purged.exit_code == 0 and purged.stdout == "deleted 1 dead letter(s)\n"
    assert cli(store_settings, "list").stdout == ""


@pytest.mark.parametrize("args", [("list", "--limit", "0"), ("list", "--bogus"), ("replay", "--limit", "x"), ("nope",)])
def test_cli_bad_usage_exits_2(cli, settings, args):
    assert cli(settings, *args).exit_code == 2


def test_cli_unsupported_broker_is_one_error_line(cli, tmp_path):
    result = cli(make_settings(tmp_path, broker="amqp://guest@localhost//"), "list")
    assert result.exit_code == 2
    assert result.stderr == "error: dead letters are kept for Redis and the embedded broker only, not amqp://\n"


# -- the guarded transports (real kombu connections, no worker) ---------------------------------------

@pytest.fixture
def guard(monkeypatch):
    import workers.consumption as consumption

    monkeypatch.setattr(consumption, "_guard", None)

    def install(settings: Settings):
        from farm.dispatch.celery_app import make_celery

        app = make_celery(settings)
        consumption.install(app, settings)
        return app

    return install


def _consume(app, queue: str, expected: int, timeout: float = 10) -> list:
    """Messages a kombu consumer on ``queue`` gets, through the app's (guarded) transport."""
    from kombu import Consumer, Queue

    got = []
    with app.connection_for_read() as connection:
        with Consumer(connection, [Queue(queue, routing_key=queue)], accept=["json"],
                      on_message=lambda message: (got.append(message), message.ack())):
            deadline = time.monotonic() + timeout
            while len(got) < expected and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    return got


def test_guarded_redis_transport_dead_letters_broken_items_and_delivers_the_rest(guard, redis_settings):
    import redis

    app = guard(redis_settings)
    assert app.conf.broker_transport == "farmredis"
    queue = redis_settings.queue_for("tiny")
    client = redis.Redis.from_url(REDIS_URL)
    good = envelope(queue=queue)
    for item in (b"garbage{{", b"\xff\xfe", json.dumps([1, 2]), json.dumps(_without("properties")),
                 json.dumps({**envelope(queue=queue), "body": "!!!notbase64"}), json.dumps(good)):
        client.lpush(queue, item)
    got = _consume(app, queue, expected=1)
    assert [message.headers["id"] for message in got] == [good["headers"]["id"]]
    with DeadLetters(redis_settings) as store:
        letters = list(reversed(store.letters(queue)))
    assert [letter.reason.split(" (")[0] for letter in letters] == [
        "the broker item is not JSON", "the broker item is not UTF-8 text", "the broker item is a list, not a kombu message object",
        "the broker item has no properties object", "body does not decode from base64",
    ]
    assert letters[0].raw == "garbage{{" and letters[1].raw_format == "base64"
    assert client.llen(queue) == 0
    app.close()


def test_guarded_embedded_transport_dead_letters_broken_files(guard, tmp_path):
    settings = make_settings(tmp_path, broker=None)
    app = guard(settings)
    assert app.conf.broker_transport == "farmfs-guarded"
    queue = settings.queue_for("tiny")
    folder = settings.broker_folder / "queue"
    good = envelope(queue=queue)
    for n, item in enumerate(["not json at all", json.dumps([1]), json.dumps(good)]):
        (folder / f"{n:015d}_{uuid.uuid4()}.{queue}.msg").write_text(item)
    got = _consume(app, queue, expected=1)
    assert [message.headers["id"] for message in got] == [good["headers"]["id"]]
    with DeadLetters(settings) as store:
        assert sorted(letter.raw for letter in store.letters(queue)) == ["[1]", "not json at all"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".msg")]
    app.close()


def test_the_hooks_used_are_still_there():
    """What workers.consumption relies on in Celery 5.7 / kombu 5.7 / redis-py (fails loudly on an upgrade that moves them)."""
    import inspect

    from celery.worker.consumer.consumer import Consumer
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual import Transport

    for name in ("create_task_handler", "on_decode_error", "on_unknown_message", "on_unknown_task", "on_invalid_task"):
        assert callable(getattr(Consumer, name))
    source = inspect.getsource(kombu_redis.Channel._brpop_read)
    assert "parse_response" in source and "'BRPOP'" in source and "self.connection._deliver(" in source
    assert "_deliver" in Transport.__dict__


def test_a_task_refusing_its_arguments_keeps_a_dead_letter(guard, redis_settings):
    """What workers.tasks does when arguments reach the task body unchecked."""
    from types import SimpleNamespace

    from workers.consumption import check_render_arguments, refuse_task

    app = guard(redis_settings)
    queue = redis_settings.queue_for("tiny")
    kwargs = {"image_ids": [1], "model": "tiny"}
    request = SimpleNamespace(id="t-9", args=[], kwargs=kwargs, delivery_info={"routing_key": queue})
    reason = check_render_arguments((), kwargs, redis_settings)
    assert refuse_task(SimpleNamespace(name="farm.render", request=request), reason) == {"refused": reason}
    with DeadLetters(redis_settings) as store:
        [letter] = store.letters(queue)
        assert (letter.code, letter.reason, letter.task_id, letter.raw_format) == ("arguments", reason, "t-9", "text")
        assert json.loads(letter.raw)["kwargs"] == kwargs
        [outcome] = store.replay(queue, force=True)
        assert not outcome.replayed
    app.close()
