"""Chaos campaign: render a campaign on real CPU workers while the infrastructure fails around them.

    python bench/chaos.py --short                   # the CI form: ~100 images, fewer/shorter faults, ≤ 8 min
    python bench/chaos.py                           # the full form: 500 images, every fault at full length
    python bench/chaos.py --images 500 --workers 3 --seed 7 --artifacts chaos-out/

What it sets up (everything its own, removed at the end, also on Ctrl-C or failure):

- a fresh PostgreSQL database on 127.0.0.1:5432 that the farm reaches only through a fault proxy;
- its own ``redis-server`` (no persistence) on a free port, which it can restart empty;
- ``moto_server`` (S3) on a free port, reached through a fault proxy (``tests/chaos/faultproxy.py``),
  with versioning on so that every upload of an object is counted;
- ``--workers`` CPU workers, one ``farm worker --cpu`` supervisor each (its own process group, as
  one systemd unit per worker), all configured through ``FARM_*`` variables only.

Then ONE campaign (``farm campaign submit`` of a generated JSONL) renders while two tracks of faults
run, each fault firing when the campaign reaches its progress mark (or, if the farm makes no
progress, after a maximum gap: a stuck farm still gets every fault):

- outages, one at a time: a second submitter (``farm submit --file``) SIGKILLed right after its
  commit (its broker connection goes through a stalled proxy, so the kill always lands between its
  commit and its publish), Redis restarted empty (twice), S3 stalled then refusing, PostgreSQL cut,
  one worker's whole process group SIGTERMed (systemd's KillMode=control-group; the harness then
  starts the unit again, as ``Restart=always`` would);
- blips: SIGKILLs of render processes (the prefork child, preferably one holding images) and every
  few kills of a whole worker (the Celery parent and its child; the supervisor restarts it), and
  poison messages LPUSHed straight into the model's Redis queue in kombu's own envelope.

It never calls ``farm requeue``/``retry-failed`` or touches the farm's records. It waits (until the
deadline) for every asked image to finish, stops the workers, measures, and prints ONE JSON line last:

    asked, succeeded, failed (by reason), lost, duplicate_results, duplicate_objects, re_rendered,
    manual_steps, wall_s, … plus what each fault did and the evidence (log counts, leftovers).

``verdict``: ``pass`` (every asked image succeeded, none lost, no duplicate, no manual step),
``product-fail`` (the farm did not survive: exit 1) or ``harness-error`` (the harness could not
set up or could not apply/verify a fault: exit 2; the figures are then not a verdict on the farm).
How the figures are measured: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import base64
import collections
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the farm of this tree (also for the processes: PYTHONPATH below)
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PROMPT_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
PROMPT_SHAPES = ["circle", "square", "triangle", "cross"]
FINISHED = ("succeeded", "failed", "canceled")


def _load_faultproxy():
    spec = importlib.util.spec_from_file_location("chaos_faultproxy", REPO / "tests" / "chaos" / "faultproxy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


faultproxy = _load_faultproxy()


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class HarnessError(Exception):
    """The harness itself could not do its part (setup, a fault it could not apply or verify)."""


class NoTargetOutage(Exception):
    """An outage that found nothing to act on (e.g. no connection open to strand): not applied."""


class NoTarget(Exception):
    """No process of the farm to hit right now (all restarting): the fault is tried again shortly."""


# -- the plan -----------------------------------------------------------------------------------------

@dataclass
class Plan:
    images: int
    workers: int
    steps: int
    submitter_requests: int
    kills: int
    whole_worker_every: int  # every Nth kill takes the whole worker (Celery parent + child)
    poison: int
    poison_bursts: int
    redis_restarts: int
    redis_down_s: float
    s3_stall_s: float
    s3_refuse_s: float
    pg_cut_s: float
    sigterm_groups: int
    outage_gap_s: float  # pause after each outage before the next may start
    max_gap_s: float  # an outage fires at the latest this long after the previous one ended
    blip_max_gap_s: float
    budget_s: float  # whole run, setup to JSON
    lease_s: float
    strand_s: float = 0.0  # --extra: PostgreSQL's open connections silent this long, then reset

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> "Plan":
        if args.short:
            plan = cls(images=100, workers=3, steps=30, submitter_requests=25, kills=5, whole_worker_every=4,
                       poison=5, poison_bursts=1, redis_restarts=1, redis_down_s=2, s3_stall_s=20, s3_refuse_s=10,
                       pg_cut_s=20, sigterm_groups=1, outage_gap_s=8, max_gap_s=30, blip_max_gap_s=20,
                       budget_s=480, lease_s=10)
        else:
            plan = cls(images=500, workers=3, steps=30, submitter_requests=50, kills=20, whole_worker_every=4,
                       poison=20, poison_bursts=4, redis_restarts=2, redis_down_s=5, s3_stall_s=90, s3_refuse_s=60,
                       pg_cut_s=120, sigterm_groups=1, outage_gap_s=20, max_gap_s=90, blip_max_gap_s=45,
                       budget_s=3600, lease_s=10)
        for name in ("images", "workers", "steps", "budget_s", "lease_s", "poison", "kills"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(plan, name, value)
        if args.extra:
            plan.strand_s = 60 if args.short else 120
            if args.budget_s is None:
                plan.budget_s += plan.strand_s + plan.outage_gap_s + 60
        if args.no_faults:
            plan.kills = plan.poison = plan.redis_restarts = plan.sigterm_groups = 0
            plan.s3_stall_s = plan.s3_refuse_s = plan.pg_cut_s = plan.strand_s = 0
            plan.submitter_requests = 0
        return plan


@dataclass
class Fault:
    kind: str
    at_progress: float  # fraction of the campaign finished that triggers it
    seconds: float = 0.0
    count: int = 1
    # filled when it runs
    started: float | None = None
    ended: float | None = None
    progress_at_start: float | None = None
    applied: bool = False
    verified: bool | None = None
    detail: dict = field(default_factory=dict)


def build_schedule(plan: Plan) -> tuple[list[Fault], list[Fault]]:
    """Outages (one at a time, in this order) and blips (kills, poison), each with its progress mark."""
    outages: list[Fault] = []
    if plan.submitter_requests:
        outages.append(Fault("submitter_kill", 0.03))
    marks = iter([0.10, 0.50, 0.70, 0.80])
    for _ in range(plan.redis_restarts):
        outages.append(Fault("redis_restart", next(marks), seconds=plan.redis_down_s))
    if plan.s3_stall_s:
        outages.append(Fault("s3_stall", 0.20, seconds=plan.s3_stall_s))
    for _ in range(plan.sigterm_groups):
        outages.append(Fault("sigterm_group", 0.30))
    if plan.pg_cut_s:
        outages.append(Fault("pg_cut", 0.38, seconds=plan.pg_cut_s))
    if plan.s3_refuse_s:
        outages.append(Fault("s3_refuse", 0.62, seconds=plan.s3_refuse_s))
    if plan.strand_s:  # between the PostgreSQL cut and the S3 refusal, while there is work
        outages.append(Fault("pg_strand", 0.45, seconds=plan.strand_s))
    outages.sort(key=lambda f: f.at_progress)

    blips: list[Fault] = []
    for n in range(plan.kills):
        mark = 0.03 + 0.85 * (n + 0.5) / plan.kills
        whole = plan.whole_worker_every and (n + 1) % plan.whole_worker_every == 0
        blips.append(Fault("kill_worker" if whole else "kill_render", round(mark, 3)))
    if plan.poison:
        bursts = max(1, min(plan.poison_bursts, plan.poison))
        sizes = [plan.poison // bursts + (1 if i < plan.poison % bursts else 0) for i in range(bursts)]
        # after the first Redis restart (10%) and not just before the second (50%): a restart wipes
        # the poison still queued, which would hide what the workers do with it
        marks = [0.15, 0.30, 0.58, 0.75] if bursts <= 4 else [0.15 + 0.7 * i / bursts for i in range(bursts)]
        if plan.redis_restarts < 2:
            marks = [0.25, 0.45, 0.65, 0.8] if bursts <= 4 else marks
        for i, size in enumerate(sizes):
            blips.append(Fault("poison", round(marks[i], 3), count=size))
    blips.sort(key=lambda f: f.at_progress)
    return outages, blips


# -- processes ------------------------------------------------------------------------------------

def _ppid_map() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
            parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    parents = _ppid_map()
    children = collections.defaultdict(list)
    for child, parent in parents.items():
        children[parent].append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


class Processes:
    """Every process the harness starts, each in its own process group, killed at cleanup."""

    def __init__(self) -> None:
        self._all: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def start(self, cmd: list[str], *, env: dict, log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
        handle = open(log_path, "ab")
        try:
            process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                                       start_new_session=True)
        finally:
            handle.close()
        with self._lock:
            self._all.append(process)
        return process

    def kill_all(self) -> None:
        with self._lock:
            processes = list(self._all)
        for process in processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + 15
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group too: orphaned pool children, whatever is left
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# -- the environment ------------------------------------------------------------------------------

class Stack:
    """PostgreSQL database + proxy, own Redis, moto S3 + proxy, the farm's environment."""

    def __init__(self, plan: Plan, tmp: Path, processes: Processes, model: str, rng: random.Random):
        self.plan = plan
        self.tmp = tmp
        self.processes = processes
        self.model_arg = model
        self.rng = rng
        self.tag = uuid.uuid4().hex[:10]
        self.db_name = f"farm_chaos_{self.tag}"
        self.db_created = False
        self.redis_port = faultproxy.free_port()
        self.redis: subprocess.Popen | None = None
        self.moto_port = faultproxy.free_port()
        self.moto: subprocess.Popen | None = None
        self.bucket = f"chaos-{self.tag}"
        self.prefix = "renders"
        self.pg_proxy = None
        self.s3_proxy = None
        self.stalled_redis_proxy = None
        self.env: dict[str, str] = {}
        self.model_name = "shapes"
        self.queue_prefix = f"chaos{self.tag}"
        self.audit_installed = False

    # PostgreSQL
    def admin(self):
        import psycopg

        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=10)

    def direct_dsn(self) -> str:
        return f"host=127.0.0.1 port=5432 user=postgres dbname={self.db_name}"

    def db(self):
        import psycopg

        return psycopg.connect(self.direct_dsn(), autocommit=True, connect_timeout=10)

    def setup(self) -> None:
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_created = True
        self.pg_proxy = faultproxy.FaultProxy("127.0.0.1", 5432, name="postgres").start()

        self.start_redis()
        moto = Path(sys.executable).parent / "moto_server"
        self.moto = self.processes.start([str(moto), "-H", "127.0.0.1", "-p", str(self.moto_port)],
                                         env=self.base_env(), log_path=self.tmp / "moto.log")
        self._wait_port(self.moto_port, self.moto, "moto_server")
        self.s3_proxy = faultproxy.FaultProxy("127.0.0.1", self.moto_port, name="s3").start()
        s3 = self.s3()
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})

        if self.model_arg == "tiny":
            model_dir = self.tmp / "models" / "tiny"
            result = subprocess.run([sys.executable, "-m", "farm", "model", "make-tiny", str(model_dir)],
                                    env=self.base_env(), capture_output=True, text=True, timeout=600)
            if result.returncode:
                raise HarnessError(f"farm model make-tiny failed: {result.stderr[-2000:]}")
            self.model_name, location = "tiny", str(model_dir)
        elif self.model_arg == "shapes":
            location = str(REPO / "models" / "shapes")
        else:
            self.model_name, location = "custom", self.model_arg
        self.env = {
            **self.base_env(),
            "FARM_DATA_DIR": str(self.tmp / "data"),
            "FARM_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_proxy.port}/{self.db_name}",
            "FARM_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "FARM_STORAGE_URL": f"s3://{self.bucket}/{self.prefix}",
            "FARM_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_proxy.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FARM_MODELS": f"{self.model_name}={location}",
            "FARM_DEFAULT_MODEL": self.model_name,
            "FARM_CLAIM_LEASE_SECONDS": str(self.plan.lease_s),
            "FARM_QUEUE_PREFIX": self.queue_prefix,
            "FARM_MAX_BATCH_SIZE": "4",
            "FARM_TORCH_THREADS": "1",  # several worker processes share two cores
        }
        result = self.cli("db", "upgrade", timeout=180)
        if result.returncode:
            raise HarnessError(f"farm db upgrade failed: {result.stderr[-2000:]}")
        self.audit_installed = self.install_audit()

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
        env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    # the farm under test is the tree this script lies in (a snapshot of it, too)
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        return env

    def cli(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "farm", *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp)

    def install_audit(self) -> bool:
        """A trigger that writes every status / claim change of an image to chaos_audit (the harness's
        own table): how often each image was claimed and recorded, whatever the farm's columns say."""
        try:
            with self.db() as conn:
                conn.execute("""
                    CREATE TABLE chaos_audit (
                        n bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp(),
                        image_id varchar(36), old_status varchar(16), new_status varchar(16),
                        old_token varchar(36), new_token varchar(36), worker varchar(255), attempts int,
                        error text)""")
                conn.execute("""
                    CREATE FUNCTION chaos_audit_fn() RETURNS trigger AS $$
                    BEGIN
                      IF NEW.status IS DISTINCT FROM OLD.status OR NEW.claim_token IS DISTINCT FROM OLD.claim_token THEN
                        INSERT INTO chaos_audit(image_id, old_status, new_status, old_token, new_token, worker,
                                                attempts, error)
                        VALUES (NEW.id, OLD.status, NEW.status, OLD.claim_token, NEW.claim_token, NEW.worker,
                                NEW.attempts, left(NEW.error, 300));
                      END IF;
                      RETURN NULL;
                    END $$ LANGUAGE plpgsql""")
                conn.execute("CREATE TRIGGER chaos_audit AFTER UPDATE ON images FOR EACH ROW "
                             "EXECUTE FUNCTION chaos_audit_fn()")
            return True
        except Exception as exc:  # noqa: BLE001 - the measure falls back to images.attempts
            log(f"audit trigger not installed ({exc}); re-renders measured from images.attempts only")
            return False

    # Redis
    def start_redis(self) -> None:
        redis_dir = self.tmp / "redis"
        redis_dir.mkdir(exist_ok=True)
        self.redis = self.processes.start(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(redis_dir)],
            env=self.base_env(), log_path=self.tmp / "redis.log")
        self._wait_port(self.redis_port, self.redis, "redis-server")
        client = self.redis_client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()  # a crash: nothing saved (there is no persistence anyway)
            self.redis.wait(10)

    def redis_client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=10)

    # S3
    def s3(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1",
                            config=Config(retries={"max_attempts": 3}, connect_timeout=10, read_timeout=60))

    @staticmethod
    def _wait_port(port: int, process: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise HarnessError(f"{what} exited with {process.returncode} before listening on {port}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"{what} did not listen on {port} within 60 s")
                time.sleep(0.1)

    def teardown(self) -> None:
        for proxy in (self.pg_proxy, self.s3_proxy, self.stalled_redis_proxy):
            if proxy is not None:
                proxy.stop()
        if self.db_created:
            try:
                with self.admin() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
                self.db_created = False
            except Exception as exc:  # noqa: BLE001
                log(f"could not drop database {self.db_name}: {exc}")


# -- the workers ----------------------------------------------------------------------------------

@dataclass
class Supervisor:
    index: int
    name: str
    log_path: Path
    process: subprocess.Popen | None = None
    expected_exit: bool = False  # the harness SIGTERMed its group (a unit stop)
    starts: int = 0
    metrics_port: int = 0


class Workers:
    def __init__(self, stack: Stack, processes: Processes, count: int):
        self.stack = stack
        self.processes = processes
        self.lock = threading.RLock()
        self.supervisors = [Supervisor(i, f"w{i}-{stack.tag[:6]}@chaos", stack.tmp / f"worker-w{i}.log") for i in range(count)]
        self.unexpected_exits: list[dict] = []
        self.service_restarts = 0

    def start(self, sup: Supervisor) -> None:
        with self.lock:
            # its own metrics port on loopback: never the default 9809 that other farms on this
            # machine (other people's tests) may be using
            sup.metrics_port = sup.metrics_port or faultproxy.free_port()
            env = {**self.stack.env, "FARM_WORKER_METRICS_PORT": str(sup.metrics_port),
                   "FARM_WORKER_METRICS_HOST": "127.0.0.1"}
            sup.process = self.processes.start(
                [sys.executable, "-m", "farm", "worker", "--cpu", "--name", sup.name],
                env=env, log_path=sup.log_path)
            sup.starts += 1
            sup.expected_exit = False

    def start_all(self, timeout: float) -> float:
        started = time.monotonic()
        for sup in self.supervisors:
            self.start(sup)
        deadline = started + timeout
        pending = list(self.supervisors)
        while pending:
            for sup in list(pending):
                text = sup.log_path.read_bytes()
                if b" ready." in text:
                    pending.remove(sup)
                elif sup.process.poll() is not None:
                    raise HarnessError(f"worker {sup.name} exited at start:\n{text.decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                tail = pending[0].log_path.read_text(errors="replace")[-3000:]
                raise HarnessError(f"workers not ready within {timeout:.0f} s: {names}\n{tail}")
            time.sleep(0.5)
        return time.monotonic() - started

    def tree(self, sup: Supervisor) -> dict:
        """``{"worker": pid of python -m workers.main, "children": [pool processes]}`` for a live
        supervisor (none for one the harness is stopping: a kill there would test nothing)."""
        if sup.process is None or sup.process.poll() is not None or sup.expected_exit:
            return {}
        below = descendants(sup.process.pid)
        mains = [p for p in below if "workers.main" in cmdline(p) and _parent(p) == sup.process.pid]
        if not mains:
            return {}
        children = [p for p in descendants(mains[0]) if alive(p)]
        return {"worker": mains[0], "children": children}

    def all_pids(self) -> set[int]:
        pids = set()
        for sup in self.supervisors:
            if sup.process is not None and sup.process.poll() is None:
                pids.add(sup.process.pid)
                pids.update(descendants(sup.process.pid))
        return pids

    def check(self) -> None:
        """Supervisors must not exit on their own; one the harness stopped is started again (the unit's
        Restart=always); one that exited by itself is an intervention, counted."""
        with self.lock:
            for sup in self.supervisors:
                if sup.process is None or sup.process.poll() is None:
                    continue
                if sup.expected_exit:
                    self.service_restarts += 1
                else:
                    tail = sup.log_path.read_text(errors="replace")[-1500:]
                    self.unexpected_exits.append({"worker": sup.name, "code": sup.process.returncode, "tail": tail})
                    log(f"supervisor {sup.name} exited by itself ({sup.process.returncode}): restarting it (a manual step)")
                self.start(sup)

    def stop_all(self, timeout: float = 150) -> dict:
        """A graceful stop (SIGTERM to each supervisor, which stops its worker warmly), then the group."""
        outcome = {}
        with self.lock:
            for sup in self.supervisors:
                if sup.process is not None and sup.process.poll() is None:
                    sup.expected_exit = True
                    sup.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for sup in self.supervisors:
                if sup.process is None:
                    continue
                try:
                    sup.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                    outcome[sup.name] = sup.process.returncode
                except subprocess.TimeoutExpired:
                    outcome[sup.name] = "killed after timeout"
                try:
                    os.killpg(sup.process.pid, signal.SIGKILL)
                except OSError:
                    pass
        return outcome


def _parent(pid: int) -> int | None:
    return _ppid_map().get(pid)


# -- poison ---------------------------------------------------------------------------------------

POISON_KINDS = [
    "content-type application/data",
    "content-type application/text",
    "missing body",
    "non-JSON body",
    "wrong argument shapes (positional args, wrong arity)",
    "image_ids not a list",
    "body a dict, not [args, kwargs, embed]",
    "unknown task name",
    "arguments of the wrong types",
    "body not base64",
]


def envelope_template(stack: Stack) -> dict:
    """A real task message as kombu writes it into Redis (published to a scratch queue, read back)."""
    from farm.dispatch.celery_app import RENDER_TASK, make_celery
    from farm.settings import Settings

    settings = Settings(broker_url=stack.env["FARM_BROKER_URL"], queue_prefix=stack.queue_prefix,
                        models={stack.model_name: "unused"}, default_model=stack.model_name)
    app = make_celery(settings)
    scratch = f"{stack.queue_prefix}.chaos-template"
    message = app.amqp.create_task_message(str(uuid.uuid4()), RENDER_TASK, (),
                                           {"image_ids": [], "model": stack.model_name})
    with app.producer_or_acquire() as producer:
        producer.publish(message.body, exchange="", routing_key=scratch, serializer="json",
                         headers=message.headers, priority=0, retry=False, **message.properties)
    raw = stack.redis_client().rpop(scratch)
    if raw is None:
        raise HarnessError("could not read back a template message from Redis")
    return json.loads(raw)


def poison_message(template: dict, n: int, model: str, queue: str) -> tuple[str, dict]:
    kind = POISON_KINDS[n % len(POISON_KINDS)]
    env = json.loads(json.dumps(template))
    tag = f"chaos-poison-{n}-"  # the dash: "chaos-poison-1-" is not found in "chaos-poison-10-"
    env["headers"]["id"] = tag
    env["headers"]["root_id"] = tag
    env["properties"]["correlation_id"] = tag
    env["properties"]["delivery_tag"] = tag
    # as if a producer had sent it to the model's queue: kombu restores an unacked message to this
    env["properties"]["delivery_info"] = {"exchange": "", "routing_key": queue}
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    if kind == "content-type application/data":
        env["content-type"], env["content-encoding"] = "application/data", "binary"
        env["body"] = b64(bytes(range(256)))
    elif kind == "content-type application/text":
        env["content-type"] = "application/text"
        env["body"] = b64(b"this is not a task")
    elif kind == "missing body":
        env.pop("body", None)
    elif kind == "non-JSON body":
        env["body"] = b64(b"{this is: not json")
    elif kind.startswith("wrong argument shapes"):
        env["body"] = b64(json.dumps([[1, 2, 3, 4], {}, embed]).encode())
    elif kind == "image_ids not a list":
        env["body"] = b64(json.dumps([[], {"image_ids": "deadbeef", "model": model}, embed]).encode())
    elif kind.startswith("body a dict"):
        env["body"] = b64(json.dumps({"image_ids": [], "model": model}).encode())
    elif kind == "unknown task name":
        env["headers"]["task"] = "farm.no_such_task"
    elif kind == "arguments of the wrong types":
        env["body"] = b64(json.dumps([[], {"image_ids": [1, {"x": 2}], "model": 5}, embed]).encode())
    elif kind == "body not base64":
        env["body"] = "!!! not base64 !!!"
    return kind, env


# -- the campaign ---------------------------------------------------------------------------------

def write_prompts(path: Path, count: int, steps: int, rng: random.Random, *, start: int = 0) -> None:
    with open(path, "w") as handle:
        for n in range(start, start + count):
            fg, bg = rng.sample(PROMPT_COLOURS, 2)
            row = {"id": f"r{n}", "prompt": f"a {fg} {rng.choice(PROMPT_SHAPES)} on a {bg} background",
                   "seed": 1000 + n, "steps": steps, "width": 64, "height": 64}
            handle.write(json.dumps(row) + "\n")


class Progress:
    """What the database says, read directly on 5432 (never through the faulty proxy)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.campaign_id: str | None = None
        self.submitter_submission: str | None = None
        self.counts: dict[str, int] = {}
        self.submitter_counts: dict[str, int] = {}
        self.finished = 0
        self.asked_campaign = 0
        self.t0 = time.time()  # when the campaign was submitted
        self.ended: float | None = None  # when the harness stopped waiting
        self._conn = None

    def fraction(self) -> float:
        return self.finished / self.asked_campaign if self.asked_campaign else 0.0

    def poll(self) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self.stack.db()
            rows = self._conn.execute("SELECT status, count(*) FROM images WHERE campaign_id = %s GROUP BY status",
                                      (self.campaign_id,)).fetchall()
            self.counts = dict(rows)
            self.finished = sum(self.counts.get(s, 0) for s in FINISHED)
            if self.submitter_submission:
                rows = self._conn.execute(
                    "SELECT status, count(*) FROM images WHERE submission_id = %s GROUP BY status",
                    (self.submitter_submission,)).fetchall()
                self.submitter_counts = dict(rows)
        except Exception as exc:  # noqa: BLE001 - the machine's PostgreSQL is busy: next round
            log(f"progress poll failed: {exc}")
            self._conn = None

    def submitter_done(self) -> bool:
        if not self.submitter_submission:
            return True
        total = sum(self.submitter_counts.values())
        return total > 0 and sum(self.submitter_counts.get(s, 0) for s in FINISHED) == total

    def all_done(self) -> bool:
        return self.finished >= self.asked_campaign and self.submitter_done()


# -- faults ---------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, plan: Plan, stack: Stack, workers: Workers, progress: Progress, processes: Processes,
                 rng: random.Random):
        self.plan = plan
        self.stack = stack
        self.workers = workers
        self.progress = progress
        self.processes = processes
        self.rng = rng
        self.outages, self.blips = build_schedule(plan)
        self.stop = threading.Event()
        self.harness_errors: list[str] = []
        self.poison_sent: list[dict] = []
        self.template: dict | None = None
        self.submitter_info: dict = {}
        self.last_blip = time.monotonic()
        self.outage_thread: threading.Thread | None = None
        self.active: str | None = None
        self.campaign_done_at: float | None = None
        self.faults_after_done = 0
        self.done_blips: list[Fault] = []
        self.blip_retry_at = 0.0
        self.control_id: str | None = None
        self.redis_lock = threading.Lock()  # a poison burst and a Redis restart never interleave

    # the outage track (its own thread) --------------------------------------------------------
    def run_outages(self) -> None:
        last_end = time.monotonic()
        for fault in self.outages:
            while not self.stop.is_set():
                ready = time.monotonic() - last_end >= self.plan.outage_gap_s
                due = self.progress.fraction() >= fault.at_progress or time.monotonic() - last_end >= self.plan.max_gap_s
                if ready and due:
                    break
                self.stop.wait(0.5)
            if self.stop.is_set():
                return
            self._run(fault, getattr(self, f"_outage_{fault.kind}"))
            last_end = time.monotonic()

    def _run(self, fault: Fault, action) -> None:
        """Run one fault; NoTarget (nothing to hit now) goes up to the caller, which tries again."""
        started, progress = time.time(), round(self.progress.fraction(), 3)
        first_try = not fault.detail.get("postponed")
        if first_try:
            log(f"fault {fault.kind} (progress {progress:.0%}) begins")
        self.active = fault.kind
        try:
            action(fault)
        except NoTarget:
            if first_try:
                log(f"fault {fault.kind}: no target now, postponed (tried again every 3 s)")
            raise
        except NoTargetOutage as exc:
            fault.applied = False
            log(f"fault {fault.kind} found nothing to act on: {exc}")
        except HarnessError as exc:
            self.harness_errors.append(f"{fault.kind}: {exc}")
            log(f"HARNESS: fault {fault.kind} not applied: {exc}")
        except Exception as exc:  # noqa: BLE001
            self.harness_errors.append(f"{fault.kind}: {type(exc).__name__}: {exc}")
            log(f"HARNESS: fault {fault.kind} raised:\n{traceback.format_exc()}")
        finally:
            self.active = None
        fault.started, fault.progress_at_start, fault.ended = started, progress, time.time()
        if self.progress.all_done():
            self.faults_after_done += 1
        log(f"fault {fault.kind} ends ({fault.ended - fault.started:.1f} s) {json.dumps(fault.detail)[:300]}")

    def _hold(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _outage_pg_cut(self, fault: Fault) -> None:
        import psycopg

        self.stack.pg_proxy.set_mode("cut")
        fault.applied = True
        try:
            psycopg.connect(f"host=127.0.0.1 port={self.stack.pg_proxy.port} user=postgres dbname={self.stack.db_name}",
                            connect_timeout=3).close()
            fault.verified = False
        except psycopg.OperationalError:
            fault.verified = True
        fault.detail["connections_reset"] = self.stack.pg_proxy.stats()["reset_by_cut"]
        self._hold(fault.seconds)
        self.stack.pg_proxy.set_mode("pass")
        if not fault.verified:
            raise HarnessError("PostgreSQL still answered through the cut proxy")

    def _outage_s3_stall(self, fault: Fault) -> None:
        self.stack.s3_proxy.set_mode("stall")
        fault.applied = True
        fault.verified = not self._s3_answers(timeout=2)
        self._hold(fault.seconds)
        self.stack.s3_proxy.set_mode("pass")
        if not fault.verified:
            raise HarnessError("S3 still answered through the stalled proxy")

    def _outage_s3_refuse(self, fault: Fault) -> None:
        # a server gone: open connections reset, new ones refused
        self.stack.s3_proxy.set_mode("cut")
        fault.applied = True
        try:
            socket.create_connection(("127.0.0.1", self.stack.s3_proxy.port), timeout=2).close()
            fault.verified = False
        except ConnectionRefusedError:
            fault.verified = True
        except OSError:
            fault.verified = True
        self._hold(fault.seconds)
        self.stack.s3_proxy.set_mode("pass")
        if not fault.verified:
            raise HarnessError("the S3 proxy still accepted connections while refusing")

    def _strand(self, fault: Fault, proxy) -> None:
        """Every connection open now goes silent for good (new ones work): only the farm's own
        timeouts get it out; after ``seconds`` the harness resets what is still open."""
        before = proxy.stats()
        proxy.set_mode("strand")
        stranded = proxy.stats()["stranded"] - before["stranded"]
        fault.applied = True
        fault.verified = stranded > 0
        fault.detail["stranded"] = stranded
        self._hold(fault.seconds)
        after = proxy.stats()
        fault.detail["closed_by_farm"] = after["stranded_closed_by_client"] - before["stranded_closed_by_client"]
        fault.detail["still_hung_at_reset"] = proxy.release_stranded()
        if not fault.verified:
            raise NoTargetOutage(f"no open connection through the {proxy.name} proxy to strand")

    def _outage_pg_strand(self, fault: Fault) -> None:
        self._strand(fault, self.stack.pg_proxy)

    def _s3_answers(self, timeout: float) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.stack.s3_proxy.port}/", timeout=timeout).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def _outage_redis_restart(self, fault: Fault) -> None:
        with self.redis_lock:
            self._redis_restart(fault)

    def _redis_restart(self, fault: Fault) -> None:
        client = self.stack.redis_client()
        try:
            fault.detail["keys_before"] = client.dbsize()
            fault.detail["queued_before"] = self.queued_messages(client)
            # poison still in Redis now is wiped by the restart: it says nothing about the workers after it
            # (dead letters are set aside already: their loss is counted apart)
            where = poison_in_redis(self.stack, self)
            fault.detail["poison_wiped"] = sum(n for k, n in where.items() if "dead" not in k.lower())
            fault.detail["dead_letters_wiped"] = sum(n for k, n in where.items() if "dead" in k.lower())
        except Exception as exc:  # noqa: BLE001
            fault.detail["keys_before"] = f"? {exc}"
        sentinel = f"chaos:sentinel:{uuid.uuid4().hex}"
        client.set(sentinel, "1")
        self.stack.stop_redis()
        fault.applied = True
        self._hold(fault.seconds)
        self.stack.start_redis()
        # the workers reconnect at once and write keys again: the sentinel tells an empty restart
        fault.verified = not self.stack.redis_client().exists(sentinel)
        if not fault.verified:
            raise HarnessError("Redis came back with the harness's sentinel key: it was not restarted empty")

    def queued_messages(self, client) -> int:
        total = 0
        for key in client.scan_iter(match=f"{self.stack.queue_prefix}*", count=1000):
            if client.type(key) == b"list":
                total += client.llen(key)
        return total

    def _outage_sigterm_group(self, fault: Fault) -> None:
        with self.workers.lock:
            live = [s for s in self.workers.supervisors if s.process is not None and s.process.poll() is None]
            busy = self._busy_supervisors(live)
            sup = self.rng.choice(busy or live) if live else None
            if sup is None:
                raise HarnessError("no live worker to SIGTERM")
            sup.expected_exit = True
            unit = sup.process  # the main loop's check() replaces sup.process when it starts it again
            os.killpg(unit.pid, signal.SIGTERM)
        fault.applied = True
        fault.verified = True
        fault.detail.update(worker=sup.name, was_rendering=sup in busy)
        started = time.monotonic()
        while unit.poll() is None and time.monotonic() - started < 180:
            self._hold(0.5)
        fault.detail["stopped_in_s"] = round(time.monotonic() - started, 1)
        fault.detail["exit_code"] = unit.poll()
        if unit.poll() is None:
            fault.detail["stuck"] = True  # the product's: a unit that ignores a stop; systemd would SIGKILL it
            log(f"{sup.name} did not stop within 180 s of a group SIGTERM: SIGKILL, as systemd's stop timeout would")
            os.killpg(unit.pid, signal.SIGKILL)
            unit.wait(30)
        # Restart=always: the main loop's check() starts it again and counts a service restart
        while sup.process is unit and not self.stop.is_set():
            self._hold(0.2)

    def _busy_supervisors(self, sups: list[Supervisor]) -> list[Supervisor]:
        pids = self._running_pids()
        return [s for s in sups if pids & set(descendants(s.process.pid))]

    def _running_pids(self) -> set[int]:
        try:
            with self.stack.db() as conn:
                workers = conn.execute("SELECT DISTINCT worker FROM images WHERE status = 'running'").fetchall()
        except Exception:  # noqa: BLE001
            return set()
        pids = set()
        for (worker,) in workers:
            tail = (worker or "").rsplit("/", 1)[-1]
            if tail.isdigit():
                pids.add(int(tail))
        return pids

    def _outage_submitter_kill(self, fault: Fault) -> None:
        """``farm submit --file`` whose broker is a stalled proxy: it commits, then hangs publishing;
        the harness sees its submission row and SIGKILLs it there."""
        stack = self.stack
        path = stack.tmp / "submitter.jsonl"
        with open(path, "w") as handle:
            for n in range(self.plan.submitter_requests):
                fg, bg = self.rng.sample(PROMPT_COLOURS, 2)
                handle.write(json.dumps({"prompt": f"a {fg} {self.rng.choice(PROMPT_SHAPES)} on a {bg} background",
                                         "seed": 50_000 + n, "steps": self.plan.steps, "width": 64,
                                         "height": 64}) + "\n")
        stack.stalled_redis_proxy = faultproxy.FaultProxy("127.0.0.1", stack.redis_port, name="submitter-redis").start()
        stack.stalled_redis_proxy.set_mode("stall")
        env = {**stack.env, "FARM_BROKER_URL": f"redis://127.0.0.1:{stack.stalled_redis_proxy.port}/0"}
        label = f"chaos-submitter-{stack.tag}"
        process = self.processes.start([sys.executable, "-m", "farm", "submit", "--file", str(path), "--label", label],
                                       env=env, log_path=stack.tmp / "submitter.log", cwd=stack.tmp)
        started = time.monotonic()
        row = None
        with stack.db() as conn:
            while time.monotonic() - started < 120 and process.poll() is None:
                row = conn.execute("SELECT id, num_images, published_at FROM submissions WHERE label = %s",
                                   (label,)).fetchone()
                if row:
                    break
                time.sleep(0.02)
            if row:
                os.killpg(process.pid, signal.SIGKILL)
                fault.applied = True
            code = process.wait(30)
            if row is None:  # one last look: it may have committed just as it exited
                row = conn.execute("SELECT id, num_images, published_at FROM submissions WHERE label = %s",
                                   (label,)).fetchone()
        stack.stalled_redis_proxy.stop()
        fault.detail.update(exit_code=code, seconds_to_commit=round(time.monotonic() - started, 2),
                            proxy_bytes_to_broker=stack.stalled_redis_proxy.stats()["bytes_up"])
        if row is None:
            tail = (stack.tmp / "submitter.log").read_text(errors="replace")[-1500:]
            raise HarnessError(f"the submitter never committed (exit {code}): {tail}")
        submission_id, num_images, published_at = row
        self.progress.submitter_submission = submission_id
        fault.detail.update(submission=submission_id, images=num_images, published_before_kill=published_at is not None)
        fault.verified = fault.applied and published_at is None
        self.submitter_info = {"submission": submission_id, "images": num_images,
                               "published_before_kill": published_at is not None, "killed": fault.applied}
        if not fault.applied:
            raise HarnessError(f"the submitter exited (code {code}) before it could be killed after its commit")

    # the blip track (main thread) ------------------------------------------------------------
    def maybe_blip(self) -> None:
        if not self.blips or time.monotonic() < self.blip_retry_at:
            return
        fault = self.blips[0]
        if self.progress.fraction() >= fault.at_progress or time.monotonic() - self.last_blip >= self.plan.blip_max_gap_s:
            try:
                self._run(fault, getattr(self, f"_blip_{fault.kind}"))
            except NoTarget as exc:  # every worker is (re)starting: try again in a few seconds
                fault.detail["postponed"] = fault.detail.get("postponed", 0) + 1
                fault.detail["why_postponed"] = str(exc)
                self.blip_retry_at = time.monotonic() + 3
                return
            self.blips.pop(0)
            self.done_blips.append(fault)
            self.last_blip = time.monotonic()

    def _blip_kill_render(self, fault: Fault) -> None:
        """SIGKILL one pool process, preferably one holding running images."""
        mine = self.workers.all_pids()  # safety: only processes of the harness's own workers
        with self.workers.lock:
            for sup in self.workers.supervisors:  # not a unit being stopped by the harness
                if sup.expected_exit and sup.process is not None:
                    mine -= {sup.process.pid, *descendants(sup.process.pid)}
        busy = sorted(self._running_pids() & mine)
        children = []
        with self.workers.lock:
            for sup in self.workers.supervisors:
                children += self.workers.tree(sup).get("children", [])
        candidates = busy or children
        if not candidates:
            raise NoTarget("no render process alive (every worker is starting or restarting)")
        pid = self.rng.choice(candidates)
        os.kill(pid, signal.SIGKILL)
        fault.applied = fault.verified = True
        fault.detail.update(pid=pid, was_rendering=pid in busy)

    def _blip_kill_worker(self, fault: Fault) -> None:
        """SIGKILL a whole worker: the Celery parent (python -m workers.main) and its pool child."""
        with self.workers.lock:
            trees = [(s, self.workers.tree(s)) for s in self.workers.supervisors]
        trees = [(s, t) for s, t in trees if t]
        if not trees:
            raise NoTarget("no worker process alive (every supervisor is between restarts)")
        sup, tree = self.rng.choice(trees)
        for pid in [tree["worker"], *tree["children"]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        fault.applied = fault.verified = True
        fault.detail.update(worker=sup.name, pids=[tree["worker"], *tree["children"]])

    def _blip_poison(self, fault: Fault) -> None:
        # a Redis restart due before this burst goes first: it would wipe the poison before any
        # worker met it (the burst is tried again every 3 s)
        if any(o.kind == "redis_restart" and o.ended is None and o.at_progress <= fault.at_progress
               for o in self.outages):
            raise NoTarget("a Redis restart due before this burst has not run yet")
        if not self.redis_lock.acquire(timeout=1):
            raise NoTarget("Redis is being restarted")
        try:
            self._send_poison(fault)
        finally:
            self.redis_lock.release()

    def _send_poison(self, fault: Fault) -> None:
        if self.template is None:
            self.template = envelope_template(self.stack)
        client = self.stack.redis_client()
        queue = f"{self.stack.queue_prefix}.{self.stack.model_name}"
        kinds = []
        if self.control_id is None:
            # a well-formed task in the same hand-made envelope, consumed before the poison (BRPOP
            # takes the oldest): if no worker runs it, the envelope is wrong, not the workers
            self.control_id = f"chaos-control-{uuid.uuid4().hex[:8]}"
            control = json.loads(json.dumps(self.template))
            # one image id that is nowhere in the database: the task claims nothing and returns
            control["body"] = base64.b64encode(json.dumps(
                [[], {"image_ids": [str(uuid.uuid4())], "model": self.stack.model_name},
                 {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()).decode()
            control["headers"]["id"] = control["headers"]["root_id"] = self.control_id
            control["properties"]["correlation_id"] = control["properties"]["delivery_tag"] = self.control_id
            control["properties"]["delivery_info"] = {"exchange": "", "routing_key": queue}
            client.lpush(queue, json.dumps(control))
        for _ in range(fault.count):
            n = len(self.poison_sent)
            kind, env = poison_message(self.template, n, self.stack.model_name, queue)
            length = client.lpush(queue, json.dumps(env))
            self.poison_sent.append({"n": n, "kind": kind, "tag": f"chaos-poison-{n}-", "queue_length": length})
            kinds.append(kind)
        fault.applied = fault.verified = True
        fault.detail["kinds"] = kinds


# -- measuring ------------------------------------------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def reason_of(error: str | None) -> str:
    text = _UUID.sub("<id>", error or "(no reason recorded)")
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:160]


def measure(stack: Stack, progress: Progress, plan: Plan, chaos: Chaos, workers: Workers) -> dict:
    result: dict = {}
    with stack.db() as conn:
        campaign = conn.execute(
            "SELECT id, status, attempts, error, storage_key, item_key, submission_id FROM images WHERE campaign_id = %s",
            (progress.campaign_id,)).fetchall()
        submitter = []
        if progress.submitter_submission:
            submitter = conn.execute(
                "SELECT id, status, attempts, error, storage_key, NULL, submission_id FROM images WHERE submission_id = %s",
                (progress.submitter_submission,)).fetchall()
        audit_claims, audit_successes = {}, {}
        if stack.audit_installed:
            audit_claims = dict(conn.execute(
                "SELECT image_id, count(*) FROM chaos_audit WHERE new_status = 'running' AND new_token IS NOT NULL "
                "AND new_token IS DISTINCT FROM old_token GROUP BY image_id").fetchall())
            audit_successes = dict(conn.execute(
                "SELECT image_id, count(*) FROM chaos_audit WHERE new_status = 'succeeded' "
                "AND old_status IS DISTINCT FROM 'succeeded' GROUP BY image_id").fetchall())
        successes = [row[0].timestamp() for row in conn.execute(
            "SELECT at FROM chaos_audit WHERE new_status = 'succeeded' ORDER BY at").fetchall()] \
            if stack.audit_installed else []
        other = conn.execute(
            "SELECT count(*) FROM images WHERE campaign_id IS DISTINCT FROM %s AND submission_id IS DISTINCT FROM %s",
            (progress.campaign_id, progress.submitter_submission)).fetchone()[0]

    asked_submitter = chaos.submitter_info.get("images", 0) or 0
    asked = progress.asked_campaign + asked_submitter
    rows = list(campaign) + list(submitter)
    by_status = collections.Counter(r[1] for r in rows)
    succeeded_ids = {r[0] for r in rows if r[1] == "succeeded"}
    failed = collections.Counter(reason_of(r[3]) for r in rows if r[1] == "failed")
    distinct_items = {r[5] for r in campaign}
    missing_from_db = max(0, progress.asked_campaign - len(distinct_items)) + max(0, asked_submitter - len(submitter))
    unfinished = sum(1 for r in rows if r[1] not in FINISHED)
    duplicate_rows = (len(campaign) - len(distinct_items))

    # S3, read directly (not through the proxy), every version of every object
    s3 = stack.s3()
    versions: collections.Counter = collections.Counter()
    current: set[str] = set()
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=stack.bucket, Prefix=f"{stack.prefix}/images/"):
        for version in page.get("Versions", []):
            versions[version["Key"]] += 1
            if version.get("IsLatest"):
                current.add(version["Key"])
    image_of_key = {}
    for key in current:
        match = re.search(r"images/(?:[^/]+/)+([^/]+)\.png$", key)  # images/<shard>/<submission>/<image>.png (or without shard)
        image_of_key[key] = match.group(1) if match else key
    per_image = collections.Counter(image_of_key.values())
    succeeded_keys = {f"{stack.prefix}/{r[4]}" for r in rows if r[1] == "succeeded" and r[4]}
    missing_objects = len(succeeded_keys - current)
    orphans = sorted(k for k in current if image_of_key[k] not in succeeded_ids)
    duplicate_objects = max(0, len(current) - len(succeeded_ids)) + sum(n - 1 for n in per_image.values() if n > 1)
    overwritten = {k: n for k, n in versions.items() if n > 1}

    duplicate_results = duplicate_rows + sum(n - 1 for n in audit_successes.values() if n > 1)
    claimed_again = {i for i, n in audit_claims.items() if n > 1} if stack.audit_installed else \
        {r[0] for r in rows if (r[2] or 0) > 1}
    uploaded_again = {image_of_key.get(k, k) for k in overwritten}
    re_rendered = claimed_again | uploaded_again

    lost = unfinished + missing_from_db + missing_objects
    result.update(
        asked=asked,
        asked_campaign=progress.asked_campaign,
        asked_submitter=asked_submitter,
        succeeded=by_status.get("succeeded", 0),
        failed=dict(failed.most_common()),
        failed_total=sum(failed.values()),
        canceled=by_status.get("canceled", 0),
        lost=lost,
        lost_detail={"unfinished": unfinished, "unfinished_by_status": {s: n for s, n in by_status.items() if s not in FINISHED},
                     "missing_from_db": missing_from_db, "succeeded_without_object": missing_objects},
        duplicate_results=duplicate_results,
        duplicate_objects=duplicate_objects,
        objects={"current": len(current), "versions": sum(versions.values()), "orphans": len(orphans),
                 "keys_uploaded_more_than_once": len(overwritten)},
        re_rendered=len(re_rendered),
        re_rendered_detail={"claimed_more_than_once": len(claimed_again), "uploaded_more_than_once": len(uploaded_again),
                            "claims_total": sum(audit_claims.values()) if audit_claims else None,
                            "source": "audit trigger + S3 versions" if stack.audit_installed else "images.attempts + S3 versions"},
        other_images_in_db=other,
        stalls=stalls(successes, progress.t0, chaos, end=progress.ended),
        images_per_min=round(60 * len(successes) / (successes[-1] - progress.t0), 1) if successes else None,
    )
    return result


def stalls(successes: list[float], t0: float, chaos: "Chaos", end: float | None = None,
           threshold: float = 20.0) -> list[dict]:
    """Stretches of more than ``threshold`` s without any image recorded as succeeded (from the audit
    trigger's clock), with the faults that overlapped them: how long each fault held the farm up.
    ``end``: when the run stopped waiting (a stretch still open then is counted up to it)."""
    faults = [f for f in [*chaos.outages, *chaos.done_blips] if f.started]
    out = []
    # from the first image on (before it, the workers load their model and render a first batch)
    ends = [*successes[1:], end] if end and successes and end > successes[-1] else successes[1:]
    for before, after in zip(successes, ends):
        if after - before > threshold:
            during = sorted({f.kind for f in faults if f.started <= after and (f.ended or after) >= before - 1})
            out.append({"from_s": round(before - t0, 1), "seconds": round(after - before, 1), "faults": during})
    return out[:12]


def log_evidence(tmp: Path, workers: Workers) -> dict:
    patterns = {
        "unrecoverable_error": "Unrecoverable error",
        "worker_lost": "Task handler raised error: WorkerLostError",
        "supervisor_restarts": "; restarting in",
        "tracebacks": "Traceback (most recent call last)",
        "lease_sweeps_requeued": "queued again",
        "lease_sweep_failed": "lease sweep failed",
        "unregistered_task": "unregistered task",
        "connection_lost_broker": "Cannot connect to redis",
        "not_finished_uploads": "not finished:",
        "could_not_give_back": "could not give back",
        "timed_out_up": "Timed out waiting for UP message",
    }
    counts: dict[str, int] = {k: 0 for k in patterns}
    per_worker = {}
    exceptions: collections.Counter = collections.Counter()
    for sup in workers.supervisors:
        text = sup.log_path.read_text(errors="replace") if sup.log_path.exists() else ""
        found = {k: text.count(p) for k, p in patterns.items()}
        # the last line of each traceback, and Celery's one-line criticals: what crashed, how often
        for match in re.finditer(r"^(?:[\w.]+(?:Error|Exception|Exit)(?::[^\n]*)?|.*CRITICAL.*)$", text, re.M):
            line = re.sub(r"^\[[^\]]*\] ", "", match.group(0))
            exceptions[reason_of(line)[:140]] += 1
        per_worker[sup.name] = {k: n for k, n in found.items() if n}
        for k in patterns:
            counts[k] += found[k]
    return {"totals": counts, "per_worker": per_worker, "top_errors": dict(exceptions.most_common(8))}


def poison_in_redis(stack: Stack, chaos: "Chaos", *, others: collections.Counter | None = None,
                    kinds: set | None = None) -> dict[str, int]:
    """Where the poison messages sent so far are in Redis now, by key (a queue, kombu's ``unacked``
    hash, a dead-letter list…). ``others`` counts the other messages left in the farm's queues;
    ``kinds`` collects the kinds of poison found."""
    tags = [p["tag"] for p in chaos.poison_sent]
    kind_of = {p["tag"]: p["kind"] for p in chaos.poison_sent}
    found: collections.Counter = collections.Counter()
    client = stack.redis_client()
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = client.hvals(key)
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        else:
            continue
        name = key.decode(errors="replace")
        for raw in values:
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            hits = [tag for tag in tags if tag in text]
            if hits:
                found[name] += 1
                if kinds is not None:
                    kinds.update(kind_of[tag] for tag in hits)
            elif others is not None and kind == b"list" and name.startswith(stack.queue_prefix):
                others[name] += 1
    return dict(found)


def poison_leftovers(stack: Stack, chaos: "Chaos") -> dict:
    """After the run: poison still in Redis (by key: queued or unacked = neither dropped nor
    dead-lettered; a dead-letter key = set aside), and the other messages left in the queues."""
    try:
        others: collections.Counter = collections.Counter()
        kinds: set = set()
        where = poison_in_redis(stack, chaos, others=others, kinds=kinds)
        queues = {k: n for k, n in where.items() if k.startswith(stack.queue_prefix) and "dead" not in k.lower()}
        return {"left_in_queues_or_unacked": sum(n for k, n in where.items() if k in queues or k.startswith("unacked")),
                "in_redis_by_key": where, "kinds_left": sorted(kinds), "other_messages_left": dict(others),
                "wiped_by_redis_restart": sum(f.detail.get("poison_wiped", 0) or 0 for f in chaos.outages
                                              if f.kind == "redis_restart"),
                "dead_letters_wiped_by_redis_restart": sum(f.detail.get("dead_letters_wiped", 0) or 0
                                                           for f in chaos.outages if f.kind == "redis_restart")}
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="campaign images (default 500; --short 100)")
    parser.add_argument("--workers", type=int, default=None, help="CPU workers, one supervisor each (default 3)")
    parser.add_argument("--short", action="store_true", help="the CI form: ~100 images, fewer and shorter faults, ≤ 8 min")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault choices and the prompts")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per image (default 30)")
    parser.add_argument("--budget", dest="budget_s", type=float, default=None,
                        help="seconds for the whole run; the drain deadline is what is left of it (default 3600; --short 480)")
    parser.add_argument("--lease", dest="lease_s", type=float, default=None, help="FARM_CLAIM_LEASE_SECONDS (default 10)")
    parser.add_argument("--poison", type=int, default=None, help="poison messages (default 20; --short 5)")
    parser.add_argument("--kills", type=int, default=None, help="worker SIGKILLs (default 20; --short 5)")
    parser.add_argument("--model", default="shapes", help="'shapes' (shipped, default), 'tiny' (built), or a model folder")
    parser.add_argument("--extra", action="store_true",
                        help="also strand PostgreSQL's open connections (silent, never reset; new ones work) for "
                             "60 s (--short) or 120 s: do the farm's own timeouts get it out?")
    parser.add_argument("--no-faults", action="store_true", help="the same run without any fault (a baseline)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="copy logs, the final image table and the fault timeline here")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs) instead of removing it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_args(args)
    rng = random.Random(args.seed)
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="farm-chaos-"))
    processes = Processes()
    stack = Stack(plan, tmp, processes, args.model, rng)
    workers: Workers | None = None
    chaos: Chaos | None = None
    progress = Progress(stack)
    output: dict = {"form": "short" if args.short else "full", "seed": args.seed, "code": code_identity(),
                    "plan": asdict(plan)}
    harness_errors: list[str] = []
    manual_steps = 0
    interrupted = False
    wall_s = None

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job ignores it
        signal.signal(signum, on_signal)
    try:
        log(f"setting up in {tmp} (database {stack.db_name})")
        stack.setup()
        workers = Workers(stack, processes, plan.workers)
        ready_s = workers.start_all(timeout=max(120.0, plan.budget_s * 0.4))
        output["workers_ready_s"] = round(ready_s, 1)
        log(f"{plan.workers} workers ready in {ready_s:.0f} s; ports: postgres proxy {stack.pg_proxy.port}, "
            f"redis {stack.redis_port}, s3 {stack.moto_port} via proxy {stack.s3_proxy.port}")

        prompts = tmp / "campaign.jsonl"
        write_prompts(prompts, plan.images, plan.steps, rng)
        name = f"chaos-{stack.tag}"
        campaign_started = time.monotonic()
        progress.t0 = time.time()
        result = stack.cli("campaign", "submit", str(prompts), "--name", name, timeout=300)
        if result.returncode:
            raise HarnessError(f"farm campaign submit failed ({result.returncode}): {result.stderr[-2000:]}")
        with stack.db() as conn:
            progress.campaign_id = conn.execute("SELECT id FROM campaigns WHERE name = %s", (name,)).fetchone()[0]
        progress.asked_campaign = plan.images
        output["campaign_submit_s"] = round(time.monotonic() - campaign_started, 1)
        log(f"campaign {name}: {plan.images} images submitted in {output['campaign_submit_s']} s")

        chaos = Chaos(plan, stack, workers, progress, processes, rng)
        if plan.poison:
            chaos.template = envelope_template(stack)  # now, not in the middle of the faults
        chaos.outage_thread = threading.Thread(target=chaos.run_outages, name="outages", daemon=True)
        chaos.outage_thread.start()
        deadline = began + plan.budget_s - 60  # what is left for stopping the workers and measuring
        last_report = 0.0
        while True:
            progress.poll()
            workers.check()
            chaos.maybe_blip()
            if progress.all_done() and chaos.campaign_done_at is None:
                chaos.campaign_done_at = time.monotonic()
            faults_done = not chaos.blips and not chaos.outage_thread.is_alive()
            if faults_done and progress.all_done():
                break
            now = time.monotonic()
            if now > deadline:
                log("deadline reached: stopping the faults and measuring what finished")
                output["deadline_reached"] = True
                break
            if now - last_report > 10:
                last_report = now
                log(f"progress {progress.finished}/{progress.asked_campaign} {progress.counts} "
                    f"submitter {progress.submitter_counts} active={chaos.active} blips left={len(chaos.blips)}")
            time.sleep(0.5)
        wall_s = time.monotonic() - campaign_started
        progress.ended = time.time()
        chaos.stop.set()
        chaos.outage_thread.join(60)
        restore(stack)
        workers.check()
    except KeyboardInterrupt as exc:
        interrupted = True
        harness_errors.append(f"interrupted: {exc}")
        log(f"interrupted ({exc}): cleaning up")
    except HarnessError as exc:
        harness_errors.append(str(exc))
        log(f"HARNESS ERROR: {exc}")
    except Exception as exc:  # noqa: BLE001
        harness_errors.append(f"{type(exc).__name__}: {exc}")
        log(f"HARNESS ERROR:\n{traceback.format_exc()}")
    finally:
        try:
            if chaos is not None:
                chaos.stop.set()
            restore(stack)
            if workers is not None and not interrupted:
                left = began + plan.budget_s - time.monotonic() - 30
                output["worker_stop"] = workers.stop_all(timeout=max(20.0, min(150.0, left)))
            if not interrupted and progress.campaign_id and chaos is not None:
                try:
                    output.update(measure(stack, progress, plan, chaos, workers))
                except Exception as exc:  # noqa: BLE001
                    harness_errors.append(f"measure: {type(exc).__name__}: {exc}")
                    log(traceback.format_exc())
                output["poison"] = {"sent": len(chaos.poison_sent), **poison_leftovers(stack, chaos)}
                if chaos.control_id:
                    logs = "".join(s.log_path.read_text(errors="replace") for s in workers.supervisors)
                    ran = f"farm.render[{chaos.control_id}] succeeded" in logs
                    output["poison"]["control_task_ran"] = ran
                    if not ran:
                        harness_errors.append("the well-formed control task sent in the poison's envelope never "
                                              "ran: the envelope may be wrong, the poison figures mean nothing")
                output["evidence"] = log_evidence(tmp, workers)
            if workers is not None:
                manual_steps += len(workers.unexpected_exits)
                output["service_restarts"] = workers.service_restarts
                output["unexpected_supervisor_exits"] = [
                    {k: v for k, v in e.items() if k != "tail"} for e in workers.unexpected_exits]
            if chaos is not None:
                harness_errors += chaos.harness_errors
                output["faults"] = summarize_faults(chaos)
                output["submitter"] = chaos.submitter_info
            if args.artifacts is not None:
                save_artifacts(args.artifacts, tmp, stack, output, chaos)
        finally:
            processes.kill_all()
            stack.teardown()
            if args.keep:
                log(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    output["manual_steps"] = manual_steps
    output["wall_s"] = round(wall_s, 1) if wall_s is not None else None
    output["total_s"] = round(time.monotonic() - began, 1)
    output["harness_errors"] = harness_errors
    ok = (not harness_errors and output.get("asked") and output.get("succeeded") == output.get("asked")
          and output.get("lost") == 0 and output.get("duplicate_results") == 0 and output.get("duplicate_objects") == 0
          and manual_steps == 0)
    incomplete = bool(output.get("faults", {}).get("not_applied"))
    if harness_errors:
        output["verdict"] = "harness-error"
    elif not ok:
        output["verdict"] = "product-fail"
    else:
        output["verdict"] = "incomplete" if incomplete else "pass"
    headline = {k: output.get(k) for k in ("verdict", "asked", "succeeded", "failed", "lost", "duplicate_results",
                                            "duplicate_objects", "re_rendered", "manual_steps", "wall_s")}
    ordered = {**headline, **{k: v for k, v in output.items() if k not in headline}}
    if args.artifacts is not None:
        args.artifacts.mkdir(parents=True, exist_ok=True)
        (args.artifacts / "result.json").write_text(json.dumps(ordered, indent=1, default=str))
    print(json.dumps(ordered, default=str), flush=True)
    return {"pass": 0, "product-fail": 1, "harness-error": 2, "incomplete": 3}[output["verdict"]]


def code_identity() -> dict:
    """Which farm ran: the tree, its commit and how many files differ from it (others edit it live)."""
    identity: dict = {"tree": str(REPO)}
    try:
        identity["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30).stdout
        identity["modified_files"] = len(status.splitlines())
    except (OSError, subprocess.SubprocessError):
        identity["commit"] = None
    return identity


def restore(stack: Stack) -> None:
    """Every fault off: proxies passing, Redis up."""
    for proxy in (stack.pg_proxy, stack.s3_proxy):
        if proxy is not None and proxy.mode != "pass":
            try:
                proxy.set_mode("pass")
            except Exception as exc:  # noqa: BLE001
                log(f"could not restore proxy {proxy.name}: {exc}")
    if stack.redis is not None and stack.redis.poll() is not None:
        try:
            stack.start_redis()
        except Exception as exc:  # noqa: BLE001
            log(f"could not restart Redis: {exc}")


def summarize_faults(chaos: Chaos) -> dict:
    done = [*chaos.outages, *chaos.done_blips]
    ran = [f for f in done if f.started is not None]
    counts = collections.Counter(f.kind for f in ran if f.applied)
    summary = {
        "applied": dict(counts),
        "not_applied": [f.kind for f in [*chaos.outages, *chaos.done_blips, *chaos.blips] if not f.applied],
        "after_campaign_done": chaos.faults_after_done,
        "kills_of_rendering_processes": sum(1 for f in ran if f.kind == "kill_render" and f.detail.get("was_rendering")),
        "outage_seconds": {f.kind: round(f.ended - f.started, 1) for f in chaos.outages if f.started and f.ended},
        "timeline": [{"kind": f.kind, "at_s": round(f.started - chaos.progress.t0, 1),  # from the campaign submit
                      "progress": f.progress_at_start, "applied": f.applied, "verified": f.verified}
                     for f in sorted(ran, key=lambda f: f.started)],
    }
    return summary


def save_artifacts(folder: Path, tmp: Path, stack: Stack, output: dict, chaos: Chaos | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in tmp.glob("*.log"):
        shutil.copy(path, folder / path.name)
    if chaos is not None:
        faults = [asdict(f) for f in [*chaos.outages, *chaos.done_blips]]
        (folder / "faults.json").write_text(json.dumps({"faults": faults, "poison": chaos.poison_sent}, indent=1,
                                                       default=str))
    if stack.db_created:
        try:
            with stack.db() as conn, open(folder / "images.tsv", "w") as handle:
                handle.write("id\tsubmission_id\tcampaign\tstatus\tattempts\tworker\tfinished_at\terror\n")
                for row in conn.execute("SELECT id, submission_id, campaign_id IS NOT NULL, status, attempts, worker, "
                                        "finished_at, left(error, 300) FROM images ORDER BY queued_at, position"):
                    handle.write("\t".join("" if v is None else str(v).replace("\t", " ").replace("\n", " ")
                                           for v in row) + "\n")
                if stack.audit_installed:
                    with open(folder / "audit.tsv", "w") as audit:
                        audit.write("at\timage_id\told\tnew\told_token\tnew_token\tworker\tattempts\terror\n")
                        for row in conn.execute("SELECT at, image_id, old_status, new_status, old_token, new_token, "
                                                "worker, attempts, error FROM chaos_audit ORDER BY n"):
                            audit.write("\t".join("" if v is None else str(v).replace("\t", " ").replace("\n", " ")
                                                  for v in row) + "\n")
        except Exception as exc:  # noqa: BLE001
            log(f"could not dump the image table: {exc}")
    log(f"artifacts in {folder}")


if __name__ == "__main__":
    sys.exit(main())
