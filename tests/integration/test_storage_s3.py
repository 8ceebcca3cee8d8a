"""Storage contract, against moto's S3 server (a subprocess, over HTTP) and a local folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from farm.errors import ConfigError, StorageError
from farm.storage.keys import image_key
from farm.settings import Settings
from farm.storage.s3 import S3Storage
from farm.storage import FileStorage, MissingObject, Storage, open_storage

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
KEY = image_key(str(uuid.uuid4()), str(uuid.uuid4()))


def _bucket() -> str:
    return f"farm-test-{uuid.uuid4().hex[:12]}"


def _s3_settings(tmp_path: Path, url: str, endpoint: str, **kwargs: object) -> Settings:
    return Settings(data_dir=tmp_path, storage_url=url, s3_endpoint_url=endpoint, **kwargs)


@pytest.fixture(params=["s3", "file"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Each backend, opened the production way: ``open_storage(Settings(...))``."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_server")
        request.getfixturevalue("s3_env")
        settings = _s3_settings(tmp_path, f"s3://{_bucket()}/farm/prefix", endpoint)
    else:
        settings = Settings(data_dir=tmp_path, storage_url=(tmp_path / "store dir").as_uri())
    store = open_storage(settings)
    store.ensure_bucket()  # type: ignore[attr-defined]
    yield store


# -- the shared contract ----------------------------------------------------------------------------


def test_put_get_exists_head_delete(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    assert not storage.exists(KEY)

    storage.put(KEY, PNG, content_type="image/png", metadata={"image-id": "abc-123", "seed": "42"})
    assert storage.exists(KEY)
    assert storage.get(KEY) == PNG
    assert storage.head(KEY) == {"image-id": "abc-123", "seed": "42"}
    assert storage.content_type(KEY) == "image/png"  # type: ignore[attr-defined]

    storage.put(KEY, b"second", content_type="image/png")  # overwrite replaces data and metadata
    assert storage.get(KEY) == b"second"
    assert storage.head(KEY) == {}

    storage.delete(KEY)
    assert not storage.exists(KEY)
    storage.delete(KEY)  # deleting a missing object is fine


def test_missing_object(storage: Storage) -> None:
    with pytest.raises(MissingObject):
        storage.get(KEY)
    with pytest.raises(MissingObject):
        storage.head(KEY)
    assert issubclass(MissingObject, StorageError)


def test_uri(storage: Storage) -> None:
    uri = storage.uri(KEY)
    assert uri.startswith(storage.url + "/")
    assert uri.endswith("/" + KEY)
    if isinstance(storage, FileStorage):
        assert uri.startswith("file:///") and "store%20dir" in uri
    else:
        assert uri.startswith("s3://") and f"/farm/prefix/{KEY}" in uri


@pytest.mark.parametrize(
    "bad_key", ["../x", "images/../../x", "/etc/passwd", "a//b", "./a", "a\\..\\b", "", "a/.hidden", "x.png.meta.json"]
)
def test_keys_escaping_root_are_refused(storage: Storage, bad_key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        storage.put(bad_key, b"x", content_type="text/plain")
    with pytest.raises(ValueError, match="object key"):
        storage.get(bad_key)


@pytest.mark.parametrize(
    "metadata",
    [{"prompt": "un café"}, {"prompt": "line\nbreak"}, {"Upper": "1"}, {"under_score": "1"}, {"n": 1}],
)
def test_metadata_must_be_plain_ascii(storage: Storage, metadata: dict) -> None:
    with pytest.raises(ValueError, match="metadata"):
        storage.put(KEY, PNG, content_type="image/png", metadata=metadata)
    assert not storage.exists(KEY)


# -- S3 specifics -----------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(s3_server: str, s3_env: None) -> str:
    bucket = _bucket()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


def test_s3_object_has_content_type_metadata_and_prefix(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = open_storage(_s3_settings(tmp_path, f"s3://{s3_bucket}/renders/", s3_server))
    assert isinstance(store, S3Storage) and store.url == f"s3://{s3_bucket}/renders"
    store.put(KEY, PNG, content_type="image/png", metadata={"submission-id": "abc"})

    raw = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket=s3_bucket, Key=f"renders/{KEY}")
    assert raw["ContentType"] == "image/png"
    assert raw["Metadata"] == {"submission-id": "abc"}
    assert raw["ContentLength"] == len(PNG)
    assert store.uri(KEY) == f"s3://{s3_bucket}/renders/{KEY}"


def _localhost(endpoint: str) -> str:
    # botocore always uses path style for an IP-address endpoint; a host name lets the style show.
    return endpoint.replace("127.0.0.1", "localhost")


@pytest.mark.parametrize(
    ("style", "expected"),
    [("path", "http://localhost:{port}/{bucket}/"), ("virtual", "http://{bucket}.localhost:{port}/")],
)
def test_s3_addressing_style_is_applied(
    s3_server: str, s3_env: None, tmp_path: Path, style: str, expected: str
) -> None:
    bucket = _bucket()
    store = open_storage(_s3_settings(tmp_path, f"s3://{bucket}", _localhost(s3_server), s3_addressing_style=style))
    assert isinstance(store, S3Storage)
    url = store.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": KEY})
    assert url.startswith(expected.format(port=s3_server.rsplit(":", 1)[1], bucket=bucket))


def test_s3_path_style_round_trip(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    endpoint = _localhost(s3_server)
    store = open_storage(_s3_settings(tmp_path, f"s3://{s3_bucket}", endpoint, s3_addressing_style="path"))
    assert isinstance(store, S3Storage)
    urls: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: urls.append(request.url))

    store.put(KEY, PNG, content_type="image/png")
    assert store.get(KEY) == PNG
    assert store.exists(KEY)
    assert len(urls) == 3 and all(url.startswith(f"{endpoint}/{s3_bucket}/") for url in urls)


def test_s3_missing_bucket_names_the_bucket(s3_server: str, s3_env: None, tmp_path: Path) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    store = open_storage(_s3_settings(tmp_path, f"s3://{bucket}", s3_server))
    for action in (
        lambda: store.put(KEY, PNG, content_type="image/png"),
        lambda: store.get(KEY),
        lambda: store.exists(KEY),  # HEAD answers a bare 404: the bucket is checked to tell them apart
        lambda: store.head(KEY),
    ):
        with pytest.raises(StorageError) as caught:
            action()
        assert not isinstance(caught.value, MissingObject)
        message = str(caught.value)
        assert bucket in message and "NoSuchBucket" in message and "create the bucket" in message


def test_s3_unreachable_endpoint_says_what_to_check(s3_env: None, tmp_path: Path) -> None:
    settings = _s3_settings(tmp_path, "s3://some-bucket", "http://127.0.0.1:9", s3_max_attempts=1)
    store = open_storage(settings)
    with pytest.raises(StorageError, match="some-bucket.*ENDPOINT_URL"):
        store.put(KEY, PNG, content_type="image/png")


def test_s3_ensure_bucket_is_idempotent(s3_server: str, s3_env: None) -> None:
    store = S3Storage(_bucket(), endpoint_url=s3_server, region="eu-west-1", addressing_style="path")
    store.ensure_bucket()
    store.ensure_bucket()
    store.put(KEY, b"x", content_type="text/plain")
    assert store.exists(KEY)


# -- FileStorage specifics ----------------------------------------------------------------------------


def test_file_storage_layout_is_atomic_and_sidecar(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "root")
    store.put(KEY, PNG, content_type="image/png", metadata={"seed": "1"})
    path = tmp_path / "root" / KEY
    assert path.read_bytes() == PNG
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".meta.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert store.uri(KEY) == path.as_uri()

    store.delete(KEY)
    assert list(path.parent.iterdir()) == []


def test_file_storage_refuses_symlink_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "images")
    with pytest.raises(ValueError, match="outside the storage root"):
        FileStorage(root).put(KEY, b"x", content_type="image/png")
    assert list(outside.iterdir()) == []


# -- open_storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://example.com/bucket", "file://relative/dir", "file:relative", "s3://", "s3://Bad_Bucket/x", "/abs/dir", "s3://b?x=1"],
)
def test_open_storage_rejects_other_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="s3://bucket") as caught:
        open_storage(Settings(data_dir=tmp_path, storage_url=url))
    assert url in str(caught.value)


def test_open_storage_default_is_file_under_data_dir(tmp_path: Path) -> None:
    store = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(store, FileStorage) and store.root == (tmp_path / "images").resolve()


# -- deadlines --------------------------------------------------------------------------------------


def test_s3_calls_have_connect_and_read_timeouts(s3_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.storage.base import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

    store = open_storage(_s3_settings(tmp_path, "s3://some-bucket", "http://127.0.0.1:9"))
    assert isinstance(store, S3Storage)
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)
    assert config.retries["total_max_attempts"] == 1  # botocore does not retry: S3Storage does, within deadlines
    # FARM_S3_CONNECT_TIMEOUT / FARM_S3_READ_TIMEOUT
    store = open_storage(
        _s3_settings(tmp_path, "s3://some-bucket", "http://127.0.0.1:9", s3_connect_timeout=1.5, s3_read_timeout=2.5)
    )
    assert (store.client.meta.config.connect_timeout, store.client.meta.config.read_timeout) == (1.5, 2.5)


def test_s3_refused_connection_is_unavailable_after_its_attempts(s3_env: None) -> None:
    import time

    from farm.storage.base import StorageUnavailable

    store = S3Storage("some-bucket", endpoint_url="http://127.0.0.1:9", max_attempts=3)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"some-bucket.*3 attempts.*EndpointConnectionError.*ENDPOINT_URL"):
        store.put(KEY, PNG, content_type="image/png")
    assert time.monotonic() - started < 5  # two short, jittered pauses


def test_s3_errors_that_another_attempt_cannot_fix_are_not_unavailable(s3_server: str, s3_env: None) -> None:
    from farm.storage.base import StorageUnavailable

    store = S3Storage(f"missing-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server, max_attempts=3)
    urls: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: urls.append(request.url))
    with pytest.raises(StorageError, match="NoSuchBucket") as caught:
        store.put(KEY, PNG, content_type="image/png")
    assert not isinstance(caught.value, StorageUnavailable)
    assert len(urls) == 1  # not retried


def test_s3_no_attempt_starts_past_the_callers_deadline(s3_env: None) -> None:
    import time

    from farm.storage.base import StorageUnavailable, time_limit

    store = S3Storage("some-bucket", endpoint_url="http://127.0.0.1:9", max_attempts=50, connect_timeout=0.2, read_timeout=0.2)
    started = time.monotonic()
    with time_limit(3.0), pytest.raises(StorageUnavailable):
        store.put(KEY, PNG, content_type="image/png")
    assert time.monotonic() - started <= 3.0
