"""Object store access (S3 API, MinIO) for every cdl component."""

from __future__ import annotations

import builtins
import contextlib
import json
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import urllib3
from minio import Minio
from minio.error import S3Error

from cdl.errors import CdlError, ConfigError, NotFoundError, PermissionDeniedError, UnavailableError
from cdl.settings import ServiceSettings

__all__ = ["BUCKETS", "UPLOADS_BUCKET", "BlobStore", "ObjectInfo", "ObjectStore", "parse_uri"]

#: buckets of the storage layout (see DESIGN.md)
#: where producers put claim-checked tensors (records name them by ``features_uri``)
UPLOADS_BUCKET = "cdl-uploads"
BUCKETS = ("cdl-datasets", "cdl-models", "cdl-triton", UPLOADS_BUCKET)


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


class BlobStore(Protocol):
    """What cdl's domain code needs of an object store: :class:`ObjectStore` (MinIO) in the
    services, an in-memory one in the unit tests (tests/fakes.py).

    Reading a missing object, or writing or listing in a missing bucket, raises
    :class:`~cdl.errors.NotFoundError` (``exists`` says False; deleting a missing object is
    no error); an unreachable store raises :class:`~cdl.errors.UnavailableError`. Writes
    return the object's ``s3://`` URI and replace what was there; ``list`` goes in key order.
    """

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | Sequence[bytes | bytearray | memoryview],
        content_type: str = ...,
    ) -> str: ...

    def get_bytes(self, bucket: str, key: str) -> bytes: ...

    def put_json(self, bucket: str, key: str, doc: Any) -> str: ...

    def get_json(self, bucket: str, key: str) -> Any: ...

    def size(self, bucket: str, key: str) -> int: ...

    def exists(self, bucket: str, key: str) -> bool: ...

    def list(self, bucket: str, prefix: str = ..., recursive: bool = ...) -> Iterator[ObjectInfo]:
        """The objects under ``prefix`` (not recursive: only those right below it, no deeper key)."""
        ...

    def folders(self, bucket: str, prefix: str = ...) -> builtins.list[str]: ...

    def delete(self, bucket: str, key: str) -> None: ...


class ObjectStore:
    """Bytes and JSON in buckets; errors mapped onto cdl's hierarchy."""

    def __init__(
        self, endpoint: str, access_key: str, secret_key: str, secure: bool = False, ca_file: str = ""
    ) -> None:
        """``secure``: TLS, verified against ``ca_file`` (PEM; empty: the system's CAs)."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            ca_certs=ca_file if secure and ca_file else None,
        )
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, http_client=http)
        self._http = http
        self.endpoint = endpoint

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ObjectStore:
        s = settings
        return cls(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_secure, s.s3_ca_file)

    @property
    def client(self) -> Minio:
        return self._client

    def ensure_buckets(self, *buckets: str) -> None:
        for bucket in buckets or BUCKETS:
            try:
                if not self._client.bucket_exists(bucket):
                    self._client.make_bucket(bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    _refused(exc, f"s3://{bucket}")
                    raise
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _unreachable(exc, self.endpoint) from exc

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | Sequence[bytes | bytearray | memoryview],
        content_type: str = "application/octet-stream",
    ) -> str:
        """Write ``data`` as one object (a replay overwrites it with the same bytes).

        ``data`` may come in parts (e.g. :func:`cdl.datasets.shard_parts`): they
        are sent one after the other, never joined.

        One presigned PUT: its signature covers the request but not the body
        (``UNSIGNED-PAYLOAD``, what S3 clients send over TLS). minio-py's own
        PUT over plain HTTP would SHA-256 every body and MinIO would hash it again
        to verify; for ingest's shards that was a tenth of a second of CPU per
        128 MiB on each side, and it would split bodies over 5 MiB into a
        multipart upload. TCP's checksums guard the bytes on the way.
        """
        try:
            url = self._client.presigned_put_object(bucket, key, expires=timedelta(minutes=15))
            parts: list[Any] = [data] if isinstance(data, bytes) else list(data)  # urllib3 sends any buffer
            size = sum(memoryview(p).nbytes for p in parts)
            headers = {"Content-Type": content_type, "Content-Length": str(size)}
            resp = self._http.request("PUT", url, body=parts, headers=headers)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(exc, self.endpoint) from exc
        except S3Error as exc:  # the bucket's region is looked up once, on first use
            if exc.code == "NoSuchBucket":
                raise NotFoundError("bucket not found", bucket=bucket) from exc
            _refused(exc, f"s3://{bucket}/{key}")
            raise
        if resp.status != 200:
            body = resp.data.decode(errors="replace")
            if "<Code>NoSuchBucket</Code>" in body:
                raise NotFoundError("bucket not found", bucket=bucket)
            if "<Code>AccessDenied</Code>" in body:
                raise PermissionDeniedError("the object store refused the write", uri=f"s3://{bucket}/{key}")
            error = CdlError if resp.status < 500 else UnavailableError
            uri = f"s3://{bucket}/{key}"
            raise error("object store refused the write", uri=uri, status=resp.status, body=body[:300])
        return f"s3://{bucket}/{key}"

    @contextlib.contextmanager
    def _reading(self, bucket: str, key: str) -> Iterator[None]:
        """Errors of a read of one object as cdl's: NotFoundError, UnavailableError."""
        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise NotFoundError("object not found", uri=f"s3://{bucket}/{key}") from exc
            _refused(exc, f"s3://{bucket}/{key}")
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(exc, self.endpoint) from exc

    def get_bytes(self, bucket: str, key: str) -> bytes:
        with self._reading(bucket, key):
            resp = self._client.get_object(bucket, key)
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def put_json(self, bucket: str, key: str, doc: Any) -> str:
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def size(self, bucket: str, key: str) -> int:
        """The object's size in bytes (NotFoundError when there is none)."""
        with self._reading(bucket, key):
            return int(self._client.stat_object(bucket, key).size or 0)

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            _refused(exc, f"s3://{bucket}/{key}")
            raise
        return True

    def list(self, bucket: str, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        try:
            for obj in self._client.list_objects(bucket, prefix=prefix, recursive=recursive):
                if obj.object_name is None or obj.is_dir:
                    continue
                yield ObjectInfo(bucket, obj.object_name, int(obj.size or 0), str(obj.etag or ""))
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise NotFoundError("bucket not found", bucket=bucket) from exc
            _refused(exc, f"s3://{bucket}/{prefix}")
            raise

    def folders(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        """The names one level below ``prefix`` that hold objects (S3 common prefixes), sorted."""
        try:
            return sorted(
                obj.object_name[len(prefix) :].rstrip("/")
                for obj in self._client.list_objects(bucket, prefix=prefix, recursive=False)
                if obj.is_dir and obj.object_name
            )
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise NotFoundError("bucket not found", bucket=bucket) from exc
            _refused(exc, f"s3://{bucket}/{prefix}")
            raise

    def delete(self, bucket: str, key: str) -> None:
        try:
            self._client.remove_object(bucket, key)
        except S3Error as exc:
            _refused(exc, f"s3://{bucket}/{key}")
            raise


def _unreachable(exc: Exception, endpoint: str) -> CdlError:
    """What a failed connection to the object store means: a certificate this client does not
    trust is a configuration to fix (``s3_ca_file``), not a server to wait for."""
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.SSLError | ssl.SSLError):
        return ConfigError("the object store's TLS certificate is not trusted (s3_ca_file)", endpoint=endpoint)
    return UnavailableError("object store unreachable", endpoint=endpoint)


def _refused(exc: S3Error, uri: str) -> None:
    """Raise what an object store's refusal of a call means: this credential may not do it (its
    policy, cdl.store_access); any other error is left to the caller."""
    if exc.code == "AccessDenied":
        raise PermissionDeniedError("the object store refused the call: this key may not", uri=uri) from exc
    if exc.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        raise PermissionDeniedError(
            "the object store refused this key (a wrong access or secret key)", uri=uri
        ) from exc
