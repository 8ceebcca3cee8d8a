"""Shared pytest fixtures. Keep each fixture small and documented; add new ones in their own section.

Services run as real processes speaking their real protocol (here: moto's S3 server over HTTP), so
tests exercise the same client code paths as production. The rest serve every suite without any
process or service: ``tiny_model`` (built once per session), ``make_spec`` / ``make_request`` (the one
spec builder), ``memory_storage`` (an in-memory :class:`farm.storage.Storage`), ``farm_settings`` /
``embedded_farm`` (an embedded farm in the test's temp folder).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# -- S3 (moto server) -------------------------------------------------------------------------------

#: How long to wait for moto's server to answer before failing the session (it starts in < 1 s).
MOTO_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    """A TCP port that was free a moment ago (the tiny race with other processes is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` as a subprocess for the whole session; yield its endpoint URL.

    Point boto3 at it with ``endpoint_url=s3_server`` (and the ``s3_env`` credentials). Buckets
    persist for the session: tests should use their own bucket names (e.g. uuid-based).
    """
    executable = Path(sys.executable).parent / "moto_server"
    if not executable.exists():
        pytest.fail(f"{executable} not found: install the test extra (pip install -e '.[test]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(executable), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_answers(endpoint, process, log_path)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_until_answers(endpoint: str, process: subprocess.Popen, log_path: Path) -> None:
    """Poll ``endpoint`` until any HTTP answer comes back; fail clearly on exit or timeout."""
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"moto_server exited with code {process.returncode} before answering on {endpoint}; "
                f"its log:\n{log_path.read_text(errors='replace')}"
            )
        try:
            with urllib.request.urlopen(endpoint + "/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # Any HTTP status means the server is up.
        except OSError:
            pass  # Not listening yet.
        if time.monotonic() > deadline:
            process.terminate()
            pytest.fail(
                f"moto_server did not answer on {endpoint} within {MOTO_START_TIMEOUT_S:.0f} s; "
                f"its log:\n{log_path.read_text(errors='replace')}"
            )
        time.sleep(0.05)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region for boto3 (moto accepts any), isolated from the host's.

    Also hides the host's ``AWS_ENDPOINT_URL*``, profile and config files so tests only talk to the endpoint they pass.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


# -- the tiny model -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SD1.x pipeline (``workers.diffusion.tiny.make_tiny``, seed 0), built once per
    session through the real builder; its folder (``<models>/tiny``, diffusers format), so its parent
    serves as a ``models_dir`` in which ``builtin:tiny`` is already built. Treat both as read-only:
    copy the model to change it."""
    from workers.diffusion.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


# -- the one spec builder -------------------------------------------------------------------------

#: A request every default farm accepts (the built-in ``tiny`` model, 64 px, 4 steps): ``make_request()``.
REQUEST_DEFAULTS: dict[str, Any] = {
    "prompt": "a red cube",
    "negative_prompt": "",
    "seed": 1,
    "steps": 4,
    "guidance_scale": 7.5,
    "width": 64,
    "height": 64,
    "scheduler": "dpmpp_2m",
    "model": "tiny",
}


@pytest.fixture
def make_request() -> Callable[..., dict[str, Any]]:
    """``make_request(**overrides)``: a valid request dict (``REQUEST_DEFAULTS`` with the overrides; an
    override of ``None`` leaves the field to the model's or the settings' default, as in a real request)."""

    def make(**overrides: Any) -> dict[str, Any]:
        return {**REQUEST_DEFAULTS, **overrides}

    return make


@pytest.fixture
def make_spec() -> Callable[..., Any]:
    """``make_spec(**overrides)``: the :class:`farm.request.spec.ImageSpec` that ``check_request`` makes
    of ``make_request()`` (one image, seed 1), with the overrides (any ImageSpec field)."""
    from farm.request.spec import ImageSpec

    def make(**overrides: Any) -> ImageSpec:
        return ImageSpec(**{**REQUEST_DEFAULTS, **overrides})

    return make


# -- storage without a service ----------------------------------------------------------------------


class MemoryStorage:
    """A :class:`farm.storage.Storage` in a dict: the contract of ``FileStorage`` and ``S3Storage``
    (keys and metadata checked the same way, ``MissingObject`` for a missing object, deleting a
    missing object is fine, ``uri``/``key_of`` round-trip), with knobs for tests: ``delay`` (seconds
    each put takes), ``hold`` (a ``threading.Event``: puts wait until it is set, as a storage that has
    not answered yet; at most 30 s, then ``StorageError``) and ``fail`` (keys whose put raises
    ``StorageError`` as a throttled S3 would).
    """

    def __init__(self, url: str = "memory://test-bucket", *, delay: float = 0.0, fail: set[str] | None = None):
        self.url = url
        self.delay = delay
        self.hold: threading.Event | None = None
        self.fail: set[str] = set(fail or ())
        self.objects: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStorage({self.url!r}, {len(self.objects)} object(s))"

    def ensure_bucket(self) -> None:
        """Nothing to create (the twin of ``FileStorage.ensure_bucket``)."""

    def put(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None) -> None:
        from farm.errors import StorageError
        from farm.storage.base import check_key, check_metadata

        check_key(key)
        checked = check_metadata(metadata)
        if self.delay:
            time.sleep(self.delay)
        if self.hold is not None and not self.hold.wait(timeout=30):
            raise StorageError(f"S3 put timed out ({key}): the test never released MemoryStorage.hold")
        if key in self.fail:
            raise StorageError(f"S3 put failed: SlowDown ({key})")
        with self._lock:
            self.objects[key] = (bytes(data), content_type, checked)

    def get(self, key: str) -> bytes:
        return self._object(key)[0]

    def exists(self, key: str) -> bool:
        from farm.storage.base import check_key

        return check_key(key) in self.objects

    def delete(self, key: str) -> None:
        from farm.storage.base import check_key

        with self._lock:
            self.objects.pop(check_key(key), None)

    def uri(self, key: str) -> str:
        from farm.storage.base import check_key

        return f"{self.url}/{check_key(key)}"

    def key_of(self, uri: str) -> str | None:
        from farm.storage.base import check_key

        if not isinstance(uri, str) or not uri.startswith(self.url + "/"):
            return None
        try:
            return check_key(uri[len(self.url) + 1 :])
        except ValueError:
            return None

    def head(self, key: str) -> dict[str, str]:
        return dict(self._object(key)[2])

    def content_type(self, key: str) -> str:
        return self._object(key)[1]

    def keys(self) -> list[str]:
        """Every stored key, sorted (a test's view; not part of the Storage contract)."""
        return sorted(self.objects)

    def _object(self, key: str) -> tuple[bytes, str, dict[str, str]]:
        from farm.errors import MissingObject
        from farm.storage.base import check_key

        try:
            return self.objects[check_key(key)]
        except KeyError:
            raise MissingObject(f"no object {key!r} in {self.url}") from None


@pytest.fixture
def memory_storage() -> MemoryStorage:
    """A fresh, empty :class:`MemoryStorage` (set ``.delay``, ``.hold`` or ``.fail`` to slow, stall or break its puts)."""
    return MemoryStorage()


# -- an embedded farm -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty embedded database at the head revision, migrated once per session (a fresh one costs
    ~0.4 s of Alembic): ``farm_settings`` copies it into each test's data folder."""
    from farm import db

    path = tmp_path_factory.mktemp("template") / "farm.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()  # the last connection's close folds the WAL back into the file
    return path


@pytest.fixture
def farm_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_sqlite: Path):
    """Settings of an embedded farm whose data folder is ``tmp_path / "data"`` (SQLite, the filesystem
    broker, file storage), as a newcomer runs it: no ``FARM_*`` variable from the environment, and
    the working directory is ``tmp_path`` so no ``.env`` file is read either. Its database is already
    at head (a copy of ``migrated_sqlite``; delete ``data/farm.db`` to start from none)."""
    import shutil

    from farm.settings import Settings

    for name in [name for name in os.environ if name.startswith("FARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_sqlite, settings.data_dir / "farm.db")
    return settings


@pytest.fixture
def embedded_farm(farm_settings) -> Iterator[Any]:
    """A :class:`farm.Farm` on ``farm_settings`` (no worker: what is submitted stays queued), closed after the test."""
    from farm.client import Farm

    with Farm(farm_settings) as farm:
        yield farm


# -- Prometheus ---------------------------------------------------------------------------------------

class Scrape:
    """The samples of one ``/metrics`` page, read with Prometheus's own text parser."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    @classmethod
    def of(cls, port: int, host: str = "127.0.0.1") -> "Scrape":
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
            return cls(answer.read().decode())

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def scrape_exporter():
    """``scrape_exporter(services)``: serve ``farm.metrics`` on a free port, scrape it once, stop it."""
    from farm.metrics import serve

    def scrape(services) -> Scrape:
        port = _free_port()
        server = serve(services, host="127.0.0.1", port=port, cache_seconds=0)
        try:
            return Scrape.of(port)
        finally:
            server.shutdown()

    return scrape


@pytest.fixture
def scrape_port():
    """``scrape_port(port)``: the :class:`Scrape` of ``http://127.0.0.1:<port>/metrics``."""
    return Scrape.of


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: on a shared 2-core machine two threads ran a training step
    ~10× slower than one (oversubscription; docs/shapes-model.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
