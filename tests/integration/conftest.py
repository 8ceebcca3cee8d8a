"""Integration fixtures: real PostgreSQL, Redis, a moto S3 server and real `farm worker` processes.

The services must be up (CI starts them before the session): a missing one FAILS the test, it
never skips. ``farm_env("servers")`` is PostgreSQL + Redis + S3; ``farm_env("embedded")`` is
SQLite + the filesystem broker + file storage, as a newcomer runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/11"
WORKER_READY_TIMEOUT = 180


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, dropped at the end."""
    from sqlalchemy import create_engine, text

    name = f"farm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is needed for integration tests: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis at 127.0.0.1:6379 is needed for integration tests: {exc}")
    return REDIS_URL


@dataclass
class FarmEnv:
    """A configured farm: the variables a shell would export, the Settings they make, and workers."""

    env: dict[str, str]
    tmp: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def settings(self):
        from farm.settings import Settings

        return Settings(**{k[5:].lower(): v for k, v in self.env.items() if k.startswith("FARM_") and "__" not in k})

    def farm(self):
        from farm.client import Farm

        return Farm(self.settings)

    def process_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``farm`` command as a user would, in a fresh process."""
        return subprocess.run(
            [sys.executable, "-m", "farm", *args],
            env=self.process_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_worker(self, name: str) -> subprocess.Popen:
        """``farm worker --cpu`` as a subprocess; returns once it reports ready."""
        log_path = self.tmp / f"worker-{name}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "farm", "worker", "--cpu", "--name", f"{name}@test"],
            env=self.process_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(process)
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while b" ready." not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        return process

    def worker_log(self, name: str) -> str:
        return (self.tmp / f"worker-{name}.log").read_text(errors="replace")

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.workers.clear()


@pytest.fixture(scope="module")
def make_farm_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Callable[..., FarmEnv]]:
    """A factory: ``make_farm_env("servers" | "embedded", **extra FARM_ variables)``."""
    made: list[FarmEnv] = []
    patch = pytest.MonkeyPatch()

    def make(kind: str, **extra: str) -> FarmEnv:
        tmp = tmp_path_factory.mktemp(f"farm-{kind}")
        env = {
            "FARM_DATA_DIR": str(tmp / "data"),
            "FARM_MODELS": f"tiny={tiny_model}",
            "FARM_DEFAULT_MODEL": "tiny",
            "FARM_QUEUE_PREFIX": f"farmtest{uuid.uuid4().hex[:8]}",
            "HF_HUB_OFFLINE": "1",
            "FARM_TORCH_THREADS": "1",  # several worker processes share two cores
            "TOKENIZERS_PARALLELISM": "false",
        }
        if kind == "servers":
            import boto3

            endpoint = request.getfixturevalue("s3_server")
            bucket = f"farm-{uuid.uuid4().hex[:12]}"
            env.update(
                {
                    "FARM_DATABASE_URL": request.getfixturevalue("pg_database"),
                    "FARM_BROKER_URL": request.getfixturevalue("redis_url"),
                    "FARM_STORAGE_URL": f"s3://{bucket}/renders",
                    "FARM_S3_ENDPOINT_URL": endpoint,
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                }
            )
            # the test process talks to S3 with the same dummy credentials as the workers
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
                patch.setenv(name, env[name])
            boto3.client(
                "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                region_name="us-east-1",
            ).create_bucket(Bucket=bucket)
            # the server database is migrated by the operator's command, as in production
            subprocess.run(
                [sys.executable, "-m", "farm", "db", "upgrade"], env={**os.environ, **env}, check=True,
                capture_output=True,
            )
        elif kind != "embedded":
            raise ValueError(kind)
        env.update(extra)
        farm_env = FarmEnv(env=env, tmp=tmp)
        made.append(farm_env)
        return farm_env

    yield make
    for farm_env in made:
        farm_env.stop_workers()
    patch.undo()
