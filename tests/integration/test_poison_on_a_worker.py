"""Poison messages on Redis, a real worker process: each is acked, kept as a dead letter with its reason
and logged once, and the good job queued behind them renders; the worker never restarts.

The messages are written straight into the queue's Redis list (LPUSH, as kombu's Redis transport
stores a message: a JSON envelope, the body base64 in it), ahead of a good submission.
"""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.integration

#: A worker process whose app goes through ``workers.consumption.install`` (idempotent: harmless
#: once ``workers.main`` calls it itself).
LAUNCH = """
import sys
import workers.consumption
import workers.main

register = workers.main.register

def register_and_guard(app, context):
    task = register(app, context)
    workers.consumption.install(app, context.settings)
    return task

workers.main.register = register_and_guard
workers.main.main(sys.argv[1:])
"""

#: ``farm dead-letters …`` in a fresh process (registered here until ``farm.cli.main`` adds it).
CLI = """
from farm.cli.dead_letters import dead_letters
from farm.cli.main import main
main.commands.setdefault("dead-letters", dead_letters)
main()
"""

#: As long as tests/integration/conftest.py gives a `farm worker` to report ready.
WORKER_READY_TIMEOUT = 180

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_headers(task_id: str, **changes) -> dict:
    headers = {
        "lang": "py", "task": "farm.render", "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}", "origin": "poison-test", "ignore_result": False,
    }
    headers.update(changes)
    return headers


def render_body(image_ids, model="tiny") -> bytes:
    return json.dumps([[], {"image_ids": image_ids, "model": model}, EMBED]).encode()


def kombu_envelope(queue: str, body: bytes | None, *, content_type="application/json", encoding="utf-8", headers=None) -> str:
    """A message exactly as kombu's Redis transport LPUSHes it."""
    envelope = {
        "body": base64.b64encode(body).decode() if body is not None else None,
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": str(uuid.uuid4()), "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    if body is None:
        envelope.pop("body")
    return json.dumps(envelope)


def poison_messages(queue: str) -> list[tuple[str, str | None, str]]:
    """``(broker item, task id or None, the reason the dead letter must give)`` for each kind of poison."""
    ids = lambda: str(uuid.uuid4())  # noqa: E731
    made = []

    def add(reason: str, body: bytes | None, task_id: str | None = None, **options) -> None:
        task_id = task_id or ids()
        options.setdefault("headers", task_headers(task_id))
        made.append((kombu_envelope(queue, body, **options), task_id, reason))

    good_ids = [str(uuid.uuid4())]
    add("content-type: content type 'application/data' is not application/json", render_body(good_ids), content_type="application/data")
    add("content-type: content type 'application/text' is not application/json", render_body(good_ids), content_type="application/text")
    add("content-type: content type 'application/x-python-serialize' is not application/json",
        pickle.dumps(((), {"image_ids": good_ids, "model": "tiny"}, EMBED)), content_type="application/x-python-serialize",
        encoding="binary")
    add("no-body: no body", None)
    add("not-json: body is not JSON (Expecting value: line 1 column 1 (char 0))", b"this is not json")
    add("body-shape: body is an object, not Celery protocol 2's [args, kwargs, embed]", b'{"image_ids": ["a"]}')
    add("body-shape: body is a list of 2, not Celery protocol 2's [args, kwargs, embed]", b"[[], {}]")
    unknown = ids()
    add("unknown-task: unknown task 'farm.upscale' (this worker runs farm.render, farm.train_lora)", render_body(good_ids), unknown,
        headers=task_headers(unknown, task="farm.upscale"))
    add("arguments: image_ids[0] is a number, not a string", render_body([1, 2, 3]))
    add("arguments: image_ids has 500 ids, more than FARM_MAX_BATCH_SIZE=8", render_body([str(n) for n in range(500)]))
    add("arguments: unexpected kwargs 'seed' (farm.render takes image_ids and model)",
        json.dumps([[], {"image_ids": good_ids, "model": "tiny", "seed": 3}, EMBED]).encode())
    limited = ids()
    add("headers: header timelimit='abc' is not [soft, hard] seconds", render_body(good_ids), limited,
        headers=task_headers(limited, timelimit="abc"))
    no_id = {k: v for k, v in task_headers("x").items() if k != "id"}
    made.append((kombu_envelope(queue, render_body(good_ids), headers=no_id), None,
                 "headers: header id=None is not a task id (a string of 1 to 255 characters)"))
    made.append((kombu_envelope(queue, render_body(good_ids), headers=None), None,  # kombu makes null headers {}
                 "headers: no 'task' header: not a Celery protocol 2 task message"))
    made.append(("this is not a kombu message {", None,
                 "envelope: the broker item is not JSON (Expecting value: line 1 column 1 (char 0))"))
    return made


@pytest.fixture(scope="module")
def farm_env(make_farm_env):
    return make_farm_env("servers", FARM_MAX_BATCH_SIZE="8")


def start_guarded_worker(farm_env, name: str) -> subprocess.Popen:
    log_path = farm_env.tmp / f"worker-{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--model", "tiny", "--device", "cpu", "--name", f"{name}@test"],
        env={**farm_env.process_env(), "CUDA_VISIBLE_DEVICES": ""},
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    farm_env.workers.append(process)  # stopped with the module's farm
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while b" ready." not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"worker {name} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    return process


def dead_letters_cli(farm_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "dead-letters", *args], env=farm_env.process_env(),
                          capture_output=True, text=True, timeout=120)


def test_poison_messages_become_dead_letters_and_the_good_job_behind_them_renders(farm_env, s3_env):
    import redis

    settings = farm_env.settings
    queue = settings.queue_for("tiny")
    worker = start_guarded_worker(farm_env, "poison")
    pid = worker.pid
    client = redis.Redis.from_url(settings.broker)

    poison = poison_messages(queue)
    for item, _, _ in poison:
        client.lpush(queue, item)  # consumed in this order (BRPOP), before the good job
    job = farm_env.farm().submit("a red circle on a blue background", num_images=3, seed=7,
                                 width=64, height=64, steps=4)

    final = job.wait(timeout=240)
    assert final.succeeded, [(r.status, r.error) for r in job.results()]
    results = job.results()
    assert {r.worker.split("/")[0] for r in results} == {"poison@test"}

    log = farm_env.worker_log("poison")
    assert worker.poll() is None and worker.pid == pid, f"the worker exited:\n{log[-4000:]}"
    for sign in ("Unrecoverable error", "Traceback", "Connection to broker lost", "Received unregistered task",
                 "Can't decode message body", "Received invalid task message"):
        assert sign not in log, f"{sign!r} in the worker log:\n{log[-4000:]}"
    warnings = [line for line in log.splitlines() if "dead letter from" in line]
    assert len(warnings) == len(poison), "each poison message is logged once:\n" + "\n".join(warnings)
    assert all(" WARNING farm.dead_letters] " in line for line in warnings)

    # nothing is left on the queue, nor held unacknowledged (it would come back on a restart)
    assert [key for key in client.scan_iter(match=f"{queue}*") if client.type(key) == b"list" and client.llen(key)] == []
    tags = {json.loads(item)["properties"]["delivery_tag"] for item, _, _ in poison if item.startswith("{")}
    assert not tags & {tag.decode() for tag in client.hkeys("unacked")}

    listed = dead_letters_cli(farm_env, "list", "--queue", queue)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == len(poison)
    by_reason = {line.split("\t")[2]: line for line in lines}
    for _, task_id, reason in poison:
        assert reason in by_reason, f"{reason!r} not in:\n{listed.stdout}"
        fields = by_reason[reason].split("\t")
        assert fields[1] == queue
        assert fields[3] == f"task {task_id or '-'}"

    counts = dead_letters_cli(farm_env, "counts")
    assert counts.returncode == 0, counts.stderr
    assert sum(int(line.split("\t")[2]) for line in counts.stdout.splitlines()) == len(poison)
    assert client.hlen(f"{settings.queue_prefix}:dead-letter-counts") == len({r.split(":")[0] for _, _, r in poison})

    # still fails: nothing replayed; purge needs --yes (exit 2), then empties the list
    replayed = dead_letters_cli(farm_env, "replay", "--queue", queue)
    assert replayed.returncode == 0 and f"replayed 0 of {len(poison)} letter(s); {len(poison)} kept" in replayed.stderr
    assert dead_letters_cli(farm_env, "purge").returncode == 2
    purged = dead_letters_cli(farm_env, "purge", "--yes")
    assert purged.returncode == 0 and purged.stdout == f"deleted {len(poison)} dead letter(s)\n"
    assert worker.poll() is None and worker.pid == pid
