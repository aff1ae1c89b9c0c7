"""Object storage through boto3: `s3://bucket/key` objects streamed for reading, shards uploaded for writing.

Endpoint, region and credentials come from boto3's standard chain (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3,
AWS_PROFILE and ~/.aws/config, environment keys, instance roles); `configure_s3` overrides the endpoint and region
(from the run config). boto3 is imported on first use, so the data package imports without it.

Transient failures (connection errors, 5xx, throttling, a stream cut mid-object) are retried with exponential
backoff for up to `retry_budget_s` seconds of consecutive failure; a cut stream resumes with a ranged GET from the
byte offset already delivered, pinned to the object's ETag, so no byte is lost, repeated, or taken from a replaced
object. Past the budget, or on a permanent error, the error names the object (never a credential).
"""

import io
import logging
import os
import time
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlparse

log = logging.getLogger(__name__)

BUFFER_BYTES = 1 << 20  # read-ahead per open object: large reads keep per-call overhead off the decode path
MULTIPART_BYTES = 64 << 20  # shards above this are uploaded in parts of this size, several at once
THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
              "TooManyRequestsException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
              "ServiceUnavailable"}


class StorageError(OSError):
    """Object storage could not serve a request: a permanent error, or transient failures past the retry budget."""


@dataclass(frozen=True)
class Settings:
    endpoint_url: str | None = None  # None: boto3's chain (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, config file)
    region: str | None = None  # None: boto3's chain (AWS_REGION, AWS_DEFAULT_REGION, profile)
    retry_budget_s: float = 120.0  # how long one request keeps retrying a run of transient failures


_settings = Settings()
_clients: dict[int, object] = {}  # per process id: a forked DataLoader worker must not share its parent's sockets


def configure_s3(*, endpoint_url: str | None = None, region: str | None = None,
                 retry_budget_s: float = Settings.retry_budget_s) -> None:
    """Set the endpoint and region (None: from the AWS environment and config) and the retry budget for this
    process and the DataLoader workers it starts afterwards. Replaces any earlier call's settings."""
    global _settings
    if retry_budget_s < 0:
        raise ValueError(f"retry_budget_s must be >= 0, got {retry_budget_s}")
    _settings = Settings(endpoint_url or None, region or None, float(retry_budget_s))
    _clients.clear()


def client():
    """This process's S3 client. botocore's own retries are off: `_Retry` applies one budget to every request."""
    pid = os.getpid()
    if pid not in _clients:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError("s3:// URLs need boto3: pip install boto3") from None
        _clients[pid] = boto3.session.Session().client(
            "s3", endpoint_url=_settings.endpoint_url, region_name=_settings.region,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60,
                          max_pool_connections=32))
    return _clients[pid]


def split_s3(url: str) -> tuple[str, str]:
    """(bucket, key) of s3://bucket/key."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def _transient(e: BaseException) -> bool:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(e, S3UploadFailedError):  # boto3's wrapper around the ClientError of a failed upload
        e = e.__context__
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or e.response.get("Error", {}).get("Code") in THROTTLING
    return isinstance(e, (ConnectionError, HTTPClientError, IncompleteReadError))


def _permanent(url: str, what: str, e: BaseException) -> OSError:
    """The error to raise for a failure that retrying cannot fix, naming the object."""
    from botocore.exceptions import ClientError, NoCredentialsError

    code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{url}: no such object")
    if code in ("NoSuchBucket",):
        return FileNotFoundError(f"{url}: no such bucket")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or \
            isinstance(e, NoCredentialsError):
        return PermissionError(f"{url}: {what} refused ({e}); check the credentials (AWS_ACCESS_KEY_ID / "
                               f"AWS_PROFILE / instance role) and the endpoint (AWS_ENDPOINT_URL_S3)")
    return StorageError(f"{url}: {what} failed: {e}")


class _Retry:
    """Exponential backoff (0.25 s doubling to 8 s) over a run of transient failures, for at most the budget."""

    def __init__(self, url: str, what: str):
        self.url, self.what, self.since, self.failures = url, what, None, 0

    def failed(self, e: Exception) -> None:
        """Sleep before the next attempt, or raise the error to report."""
        if not _transient(e):
            raise _permanent(self.url, self.what, e) from e
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        left = self.since + _settings.retry_budget_s - now
        if left <= 0:
            raise StorageError(f"{self.url}: {self.what} failed {self.failures + 1} time(s) in {now - self.since:.1f} "
                               f"s, past the retry budget of {_settings.retry_budget_s:g} s "
                               f"(scmlab.data.configure_s3); last error: {e}") from e
        delay = min(0.25 * 2**self.failures, 8.0, left)
        self.failures += 1
        log.warning("%s: %s: %s; retry %d in %.2f s", self.url, self.what, e, self.failures, delay)
        time.sleep(delay)

    def succeeded(self) -> None:
        self.since, self.failures = None, 0

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried. The failure run is not reset here: a stream that reopens and fails again
        before delivering a byte keeps counting against the same budget."""
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                self.failed(e)


class _ObjectStream(io.RawIOBase):
    """The bytes of one object, streamed from a GET; a transfer cut mid-way resumes from `offset` with a ranged GET."""

    def __init__(self, url: str):
        self.url, (self.bucket, self.key) = url, split_s3(url)
        self.offset, self.size, self.etag, self.body = 0, None, None, None
        self.retry = _Retry(url, "GET")
        self._get()

    def _get(self) -> None:
        """(Re)open the body at `offset`; a ranged GET must match the first response's ETag."""
        def get():
            if self.offset == 0:
                return client().get_object(Bucket=self.bucket, Key=self.key)
            pinned = {"IfMatch": self.etag} if self.etag else {}
            return client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.offset}-", **pinned)

        response = self.retry.call(get)
        if self.size is None:
            self.size, self.etag = response["ContentLength"], response.get("ETag")
        self.body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset < self.size:
            try:
                chunk = self.body.read(len(buffer))
                if not chunk:  # a body that ends early without an error: resume like a cut
                    from botocore.exceptions import IncompleteReadError

                    raise IncompleteReadError(actual_bytes=self.offset, expected_bytes=self.size)
            except Exception as e:
                self.body.close()
                self.retry.failed(e)
                self._get()
                continue
            self.retry.succeeded()
            buffer[:len(chunk)] = chunk
            self.offset += len(chunk)
            return len(chunk)
        return 0

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_s3(url: str) -> BinaryIO:
    """A buffered read stream over the object at s3://bucket/key, streamed (never downloaded whole first)."""
    return io.BufferedReader(_ObjectStream(url), BUFFER_BYTES)


def delete(url: str) -> None:
    bucket, key = split_s3(url)
    _Retry(url, "DELETE").call(client().delete_object, Bucket=bucket, Key=key)


def put_bytes(url: str, data: bytes) -> None:
    """Store `data` as one object (a single PUT, which S3 makes visible whole or not at all)."""
    bucket, key = split_s3(url)
    _Retry(url, "PUT").call(client().put_object, Bucket=bucket, Key=key, Body=data)


def put_file(url: str, path: str, *, sha256: str, size: int, callback=None) -> bool:
    """Upload the file at `path` unless the object already holds it (same size, and our sha256 in its metadata).
    Multipart above MULTIPART_BYTES. `callback(bytes)` reports progress. Returns whether it uploaded."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)

    def head():
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    present = _Retry(url, "HEAD").call(head)
    if present and present["ContentLength"] == size and present.get("Metadata", {}).get("sha256") == sha256:
        return False
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    _Retry(url, "upload").call(client().upload_file, path, bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}},
                               Config=config, Callback=callback)
    return True
