"""Where images (and later LoRAs and input images) are kept: S3 or a local folder, one contract.

:func:`open_storage` turns ``settings.storage`` into a backend:

* ``s3://bucket[/prefix]``: :class:`S3Storage` (AWS, MinIO, R2, moto…; endpoint from settings or
  boto3's own ``AWS_ENDPOINT_URL_S3``),
* ``file:///abs/dir``: :class:`FileStorage` (atomic writes, metadata in a ``.meta.json`` sidecar).

Keys are relative, ``/``-separated and built by :mod:`farm.keys`; both backends refuse keys that
could escape their root. User metadata is a small ``dict[str, str]`` of ids and numbers: keys are
lowercase letters, digits and dashes, values printable ASCII (S3 sends them as HTTP headers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from farm.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from farm.settings import Settings

#: Suffix of FileStorage's metadata sidecars; keys may not end with it.
META_SUFFIX = ".meta.json"
#: S3 limits user metadata to 2 KB (keys + values); keep well inside it.
MAX_METADATA_BYTES = 2048

_META_KEY = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class MissingObject(StorageError):
    """Raised when a key has no object (``get``/``head`` of something never written or deleted)."""


@runtime_checkable
class Storage(Protocol):
    """What the farm needs from an object store. Keys come from :mod:`farm.keys`."""

    #: The storage URL this backend was opened from (``s3://bucket/prefix`` or ``file:///dir``).
    url: str

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``data`` at ``key`` (replacing any object there) with its content type and metadata."""

    def get(self, key: str) -> bytes:
        """Return the object's bytes; :class:`MissingObject` when there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    def delete(self, key: str) -> None:
        """Remove the object at ``key``; deleting a missing object is not an error."""

    def uri(self, key: str) -> str:
        """The object's full address (``s3://bucket/prefix/key`` or ``file:///dir/key``)."""

    def head(self, key: str) -> dict[str, str]:
        """The object's user metadata; :class:`MissingObject` when there is none."""


# -- validation shared by both backends ----------------------------------------------------------


def check_key(key: object) -> str:
    """Return ``key`` if it is a safe relative object key.

    Raised as ``ValueError`` when the key is empty, absolute, contains ``\\`` or a NUL, an empty,
    ``.``/``..`` or dot-led segment, or ends with the sidecar suffix: build keys with
    :mod:`farm.keys` instead of from user text.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r} is empty or not a string; build keys with farm.keys")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"object key {key!r} must be relative and '/'-separated; build keys with farm.keys")
    for part in key.split("/"):
        if not part or part.startswith("."):
            raise ValueError(
                f"object key {key!r} has an empty, '.', '..' or dot-led segment {part!r}; "
                "build keys with farm.keys"
            )
    if key.endswith(META_SUFFIX):
        raise ValueError(f"object key {key!r} ends with {META_SUFFIX!r}, which is reserved for metadata")
    return key


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Return a copy of ``metadata`` if S3 can carry it unchanged.

    Raised as ``ValueError`` when a key is not lowercase letters, digits and dashes (S3 lowercases
    header names and proxies such as nginx drop ones with ``_``), a value is not a printable ASCII
    string (pass ids and numbers only, never prompts), or the total exceeds 2 KB.
    """
    if not metadata:
        return {}
    checked: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or _META_KEY.fullmatch(name) is None:
            raise ValueError(
                f"metadata key {name!r} must be lowercase letters, digits and dashes "
                "(e.g. 'image-id'), at most 64 characters"
            )
        if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            raise ValueError(
                f"metadata value {name}={value!r} must be a printable ASCII string: "
                "store ids and numbers as metadata, put text in the object itself"
            )
        checked[name] = value
    size = sum(len(k) + len(v) for k, v in checked.items())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes; S3 allows at most {MAX_METADATA_BYTES}")
    return checked


# -- local folder ---------------------------------------------------------------------------------


class FileStorage:
    """Objects as files under ``root``; writes are atomic (temp file in the same folder + ``os.replace``).

    Each object has a sidecar ``<file>.meta.json`` holding its content type and user metadata, so
    :meth:`head` answers as S3 does.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileStorage({str(self.root)!r})"

    def ensure_bucket(self) -> None:
        """Create the root folder if it is missing (the local twin of :meth:`S3Storage.ensure_bucket`)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create storage folder {self.root}: {error}; check permissions") from error

    def path(self, key: str) -> Path:
        """The file that holds ``key``; ``ValueError`` if the key would land outside the root."""
        path = self.root.joinpath(*check_key(key).split("/"))
        # A symlink inside the root could still point elsewhere: compare resolved paths.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key {key!r} resolves outside the storage root {self.root}")
        return path

    def _meta_path(self, path: Path) -> Path:
        return path.with_name(path.name + META_SUFFIX)

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        path = self.path(key)
        meta = {"content_type": content_type, "metadata": check_metadata(metadata)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Sidecar first, so a new object never shows without its metadata (each file is
            # replaced atomically; the pair is not: an overwrite may briefly pair old data, new meta).
            atomic_write(self._meta_path(path), json.dumps(meta, sort_keys=True).encode())
            atomic_write(path, bytes(data))
        except OSError as error:
            raise StorageError(
                f"cannot write {key!r} to {path}: {error}; check the folder's permissions and free space"
            ) from error

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as error:
            raise MissingObject(f"no object {key!r} in {self.url} ({path} does not exist)") from error
        except OSError as error:
            raise StorageError(f"cannot read {key!r} from {path}: {error}; check permissions") from error

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
            self._meta_path(path).unlink(missing_ok=True)
        except OSError as error:
            raise StorageError(f"cannot delete {key!r} at {path}: {error}; check permissions") from error

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def head(self, key: str) -> dict[str, str]:
        return dict(self._read_meta(key)["metadata"])

    def content_type(self, key: str) -> str:
        """The content type the object was written with."""
        return str(self._read_meta(key)["content_type"])

    def _read_meta(self, key: str) -> dict[str, Any]:
        path = self.path(key)
        if not path.is_file():
            raise MissingObject(f"no object {key!r} in {self.url} ({path} does not exist)")
        try:
            return json.loads(self._meta_path(path).read_text())
        except FileNotFoundError:
            # Written by hand or by an older version: no metadata, like an S3 object without any.
            return {"content_type": "application/octet-stream", "metadata": {}}
        except (OSError, ValueError) as error:
            raise StorageError(f"cannot read metadata of {key!r} ({self._meta_path(path)}): {error}") from error


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; images are meant to be served.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- S3 -------------------------------------------------------------------------------------------

_HINTS = {
    "NoSuchKey": "the object was never written, or was deleted",
    "NoSuchBucket": "create the bucket or fix the bucket name in FARM_STORAGE_URL",
    "AccessDenied": "check the credentials' permissions on this bucket (s3:GetObject/PutObject/ListBucket)",
    "403": "check the credentials' permissions on this bucket (without s3:ListBucket a missing key reads as 403)",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / the credentials profile, and that the endpoint is the right one",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY, and FARM_S3_REGION for this endpoint",
    "AuthorizationHeaderMalformed": "check FARM_S3_REGION (the bucket lives in another region)",
    "PermanentRedirect": "the bucket is in another region: set FARM_S3_REGION",
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile / instance role)",
    "EndpointConnectionError": "check FARM_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and that the server is up",
    "ConnectTimeoutError": "check FARM_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network",
}
_DEFAULT_HINT = "check the credentials, that the bucket exists, and the endpoint (FARM_S3_ENDPOINT_URL)"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3Storage:
    """Objects in ``s3://bucket/prefix/…`` through one boto3 client (thread-safe once built).

    ``endpoint_url`` is passed only when set, so boto3's own ``AWS_ENDPOINT_URL_S3`` still works;
    credentials come from boto3's usual chain.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        max_attempts: int = 5,
    ):
        import boto3  # Imported here: ~0.3 s, and file:// users never need it.
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": addressing_style},
        )
        kwargs: dict[str, Any] = {"config": config}
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        if region:
            kwargs["region_name"] = region
        # A session per storage: boto3's default session is not thread-safe, clients are.
        self.client = boto3.session.Session().client("s3", **kwargs)
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.client.meta.endpoint_url!r})"

    def object_key(self, key: str) -> str:
        """The S3 key of ``key`` (with the prefix)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        s3_key = self.object_key(key)
        meta = check_metadata(metadata)
        with self._errors("put", s3_key):
            self.client.put_object(
                Bucket=self.bucket, Key=s3_key, Body=bytes(data), ContentType=content_type, Metadata=meta
            )

    def get(self, key: str) -> bytes:
        s3_key = self.object_key(key)
        with self._errors("get", s3_key):
            response = self.client.get_object(Bucket=self.bucket, Key=s3_key)
            return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except MissingObject:
            return False
        return True

    def delete(self, key: str) -> None:
        s3_key = self.object_key(key)
        with self._errors("delete", s3_key):
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)

    def head(self, key: str) -> dict[str, str]:
        return dict(self._head(key).get("Metadata", {}))

    def content_type(self, key: str) -> str:
        """The content type the object was written with."""
        return str(self._head(key).get("ContentType", ""))

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and demos; production buckets usually exist)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _code(error) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise self._wrap("head_bucket", "", error) from error
        except BotoCoreError as error:
            raise self._wrap("head_bucket", "", error) from error
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as error:
            if _code(error) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._wrap("create_bucket", "", error) from error
        except BotoCoreError as error:  # connection, credentials
            raise self._wrap("create_bucket", "", error) from error

    # -- internals ------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        s3_key = self.object_key(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=s3_key)
        except ClientError as error:
            if _code(error) not in _NOT_FOUND:
                raise self._wrap("head", s3_key, error) from error
            # HEAD answers a bare 404 for a missing bucket too: tell the two apart once.
            self._check_bucket()
            raise MissingObject(f"no object at s3://{self.bucket}/{s3_key}") from error
        except BotoCoreError as error:
            raise self._wrap("head", s3_key, error) from error

    def _check_bucket(self) -> None:
        if self._bucket_seen:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = "NoSuchBucket" if _code(error) in _NOT_FOUND else _code(error)
            raise self._wrap("head_bucket", "", error, code=code) from error
        except BotoCoreError as error:
            raise self._wrap("head_bucket", "", error) from error
        self._bucket_seen = True

    @contextlib.contextmanager
    def _errors(self, op: str, s3_key: str) -> Iterator[None]:
        """Turn botocore errors inside ``with`` into :class:`StorageError` naming bucket, key and code."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as error:
            raise self._wrap(op, s3_key, error) from error

    def _wrap(self, op: str, s3_key: str, error: BaseException, *, code: str | None = None) -> StorageError:
        code = code or _code(error)
        where = f"bucket {self.bucket!r}" + (f", key {s3_key!r}" if s3_key else "")
        endpoint = self.client.meta.endpoint_url
        message = f"S3 {op} failed ({where}, endpoint {endpoint}): {code}: {_message(error).rstrip('.')}; "
        message += _HINTS.get(code, _DEFAULT_HINT)
        cls = MissingObject if code == "NoSuchKey" else StorageError
        return cls(message)


def _code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(error).__name__


def _message(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        message = response.get("Error", {}).get("Message")
        if message:
            return str(message)
    return str(error) or type(error).__name__


# -- opening from settings ------------------------------------------------------------------------

_ACCEPTED = "'s3://bucket[/prefix]' or 'file:///absolute/dir'"


def open_storage(settings: "Settings") -> Storage:
    """The backend named by ``settings.storage``.

    Raised as :class:`ConfigError` when the URL is neither ``s3://bucket[/prefix]`` nor
    ``file:///absolute/dir``: fix ``FARM_STORAGE_URL``.
    """
    url = settings.storage
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URL {url!r} must not have a query or fragment; use {_ACCEPTED}")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(
                f"storage URL {url!r} is not an absolute file URL (three slashes: file:///dir); use {_ACCEPTED}"
            )
        return FileStorage(Path(url2pathname(parts.path)))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if _BUCKET.fullmatch(bucket) is None:
            raise ConfigError(
                f"storage URL {url!r} names bucket {bucket!r}, which is not a valid S3 bucket name "
                f"(3-63 lowercase letters, digits, '.' and '-'); use {_ACCEPTED}"
            )
        return S3Storage(
            bucket,
            unquote(parts.path).strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            addressing_style=settings.s3_addressing_style,
            max_attempts=settings.s3_max_attempts,
        )
    raise ConfigError(f"storage URL {url!r} is not supported; use {_ACCEPTED} (FARM_STORAGE_URL)")
