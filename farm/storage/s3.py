"""The S3 backend of :mod:`farm.storage`: :class:`S3Storage` (AWS, MinIO, R2, moto…) and its error hints.

One boto3 client per storage, imported only when an ``s3://`` storage is opened (boto3 costs ~0.3 s
to import and ``file://`` users never need it): importing this module does not import boto3.
Botocore errors come out as :class:`~farm.errors.StorageError` (or
:class:`~farm.storage.MissingObject`) naming the bucket, key, endpoint, error code and a hint.
:func:`farm.storage.open_storage` builds it from ``s3://bucket[/prefix]``; ``farm.storage`` still
re-exports :class:`S3Storage`.

Deadlines: every call is bounded. Each attempt has a connect timeout and a read timeout (botocore's
defaults are 60 s each: a hung server, e.g. a SIGSTOPped moto, held one put for about two minutes);
a call makes at most ``max_attempts`` attempts, retrying only what may pass on a second try
(connection refused or reset, timeouts, HTTP 5xx, throttling) after a short capped, jittered pause,
and never starts an attempt that could not end before the deadline of an enclosing
:func:`farm.storage.base.time_limit` block. Those failures come out as
:class:`~farm.storage.base.StorageUnavailable`; botocore's own retries are off (one attempt per
botocore call), so the bound is this module's to keep.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any, Callable, Iterator, TypeVar

from farm.errors import StorageError
from farm.storage.base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    MissingObject,
    StorageUnavailable,
    check_key,
    check_metadata,
    current_deadline,
)

log = logging.getLogger("farm.storage.s3")
T = TypeVar("T")

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
    "ReadTimeoutError": "the server took the request but did not answer within FARM_S3_READ_TIMEOUT: it is hung or overloaded",
    "ConnectionClosedError": "the server closed the connection mid-request: it restarted, or a proxy cut it",
}
_DEFAULT_HINT = "check the credentials, that the bucket exists, and the endpoint (FARM_S3_ENDPOINT_URL)"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
#: Error codes worth another attempt (botocore's standard-mode transient and throttling codes).
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError", "ServiceUnavailable",
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "EC2ThrottledException", "500", "502", "503", "504",
}
_TRANSIENT_STATUS = {500, 502, 503, 504}
#: Pause before attempt n+1: min(cap, base * 2**(n-1)), the upper half of it jittered.
RETRY_BASE_SECONDS = 0.25
RETRY_CAP_SECONDS = 4.0
#: Seconds botocore waits for "100 Continue" before sending a put's body (added to an attempt's bound).
_EXPECT_CONTINUE_SECONDS = 1.0


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
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_pool_connections: int = 32,
    ):
        import boto3  # Imported here: ~0.3 s, and file:// users never need it.
        from botocore.config import Config

        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        #: Attempts per call (the first included), and the longest one attempt waits on a silent server.
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.attempt_seconds = connect_timeout + read_timeout + _EXPECT_CONTINUE_SECONDS
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # One attempt per botocore call: _retrying() retries, within the caller's deadline.
            retries={"mode": "standard", "total_max_attempts": 1},
            s3={"addressing_style": addressing_style},
            max_pool_connections=max_pool_connections,
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

    def key_of(self, uri: str) -> str | None:
        head = f"s3://{self.bucket}/" + (f"{self.prefix}/" if self.prefix else "")
        return uri[len(head):] if uri.startswith(head) and len(uri) > len(head) else None

    def put(
        self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        s3_key = self.object_key(key)
        meta = check_metadata(metadata)
        body = bytes(data)
        with self._errors("put", s3_key):
            self._retrying(
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=s3_key, Body=body, ContentType=content_type, Metadata=meta
                )
            )

    def get(self, key: str) -> bytes:
        s3_key = self.object_key(key)
        with self._errors("get", s3_key):
            # the body is read inside the attempt: a server that stalls mid-body is retried too
            return self._retrying(lambda: self.client.get_object(Bucket=self.bucket, Key=s3_key)["Body"].read())

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except MissingObject:
            return False
        return True

    def delete(self, key: str) -> None:
        s3_key = self.object_key(key)
        with self._errors("delete", s3_key):
            self._retrying(lambda: self.client.delete_object(Bucket=self.bucket, Key=s3_key))

    def head(self, key: str) -> dict[str, str]:
        return dict(self._head(key).get("Metadata", {}))

    def content_type(self, key: str) -> str:
        """The content type the object was written with."""
        return str(self._head(key).get("ContentType", ""))

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and demos; production buckets usually exist)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._retrying(lambda: self.client.head_bucket(Bucket=self.bucket))
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
            self._retrying(lambda: self.client.create_bucket(**kwargs))
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
            return self._retrying(lambda: self.client.head_object(Bucket=self.bucket, Key=s3_key))
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
            self._retrying(lambda: self.client.head_bucket(Bucket=self.bucket))
        except ClientError as error:
            code = "NoSuchBucket" if _code(error) in _NOT_FOUND else _code(error)
            raise self._wrap("head_bucket", "", error, code=code) from error
        except BotoCoreError as error:
            raise self._wrap("head_bucket", "", error) from error
        self._bucket_seen = True

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()`` (one botocore request), tried up to ``max_attempts`` times while its errors are
        transient, with a capped, jittered pause between attempts, starting no attempt that could not
        end before the enclosing :func:`~farm.storage.base.time_limit` deadline. Re-raises the last
        botocore error; its ``farm_attempts`` and ``farm_seconds`` say how many attempts took how long."""
        deadline = current_deadline()
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            attempt_started = time.monotonic()
            try:
                return call()
            except Exception as error:
                error.farm_attempts = attempt  # type: ignore[attr-defined]
                error.farm_seconds = time.monotonic() - started  # type: ignore[attr-defined]
                if not _transient(error) or attempt >= self.max_attempts:
                    raise
                pause = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1))
                pause = pause / 2 + random.uniform(0, pause / 2)
                if deadline is not None and time.monotonic() + pause + self.attempt_seconds > deadline:
                    raise
                log.info(
                    "S3 attempt %d of %d failed after %.1f s (%s: %s); again in %.2f s",
                    attempt, self.max_attempts, time.monotonic() - attempt_started, _code(error), error, pause,
                )
                time.sleep(pause)

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
        attempts = getattr(error, "farm_attempts", 1)
        tries = f", {attempts} attempts in {getattr(error, 'farm_seconds', 0.0):.1f} s" if attempts > 1 else ""
        message = f"S3 {op} failed ({where}, endpoint {endpoint}{tries}): {code}: {_message(error).rstrip('.')}; "
        message += _HINTS.get(code, _DEFAULT_HINT)
        if code == "NoSuchKey":
            return MissingObject(message)
        return StorageUnavailable(message) if _transient(error) else StorageError(message)


def _transient(error: BaseException) -> bool:
    """Whether another attempt may succeed: no answer (refused, reset, timed out), 5xx, throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(error, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return True  # EndpointConnectionError, Connect/ReadTimeoutError, ConnectionClosedError…
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _code(error) in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return False


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
