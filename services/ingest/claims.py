"""Claim checks: a record whose tensor is too large for a Kafka message names an object instead
(``features_uri``: ``s3://<bucket>/<key>``), and ingest fetches it before validating the record.

Only buckets in the service's ``claim_buckets`` setting are read (by default ``cdl-uploads``,
which the stack creates): a record cannot make ingest read the model registry or another
dataset. An object over ``claim_max_bytes`` is refused before it is read. A refused, missing or
oversized claim dead-letters its record with the reason; an unreachable store is an outage
(the batch is retried, nothing is dead-lettered).
"""

from __future__ import annotations

from collections.abc import Iterable

from cdl.errors import NotFoundError
from cdl.store import UPLOADS_BUCKET, BlobStore, parse_uri
from services.ingest.records import Reason, RecordError

__all__ = ["DEFAULT_BUCKETS", "DEFAULT_MAX_BYTES", "Claims"]

#: the service's defaults (``IngestSettings.claim_buckets`` / ``claim_max_bytes``)
DEFAULT_BUCKETS = (UPLOADS_BUCKET,)
DEFAULT_MAX_BYTES = 256 << 20


class Claims:
    """Fetches claim-checked tensors from the allowed buckets, within a size limit."""

    def __init__(self, store: BlobStore, buckets: Iterable[str], max_bytes: int) -> None:
        self._store = store
        self._buckets = frozenset(buckets)
        self._max = max_bytes

    def fetch(self, uri: str) -> bytes:
        """The object's bytes; a :class:`RecordError` (claim_refused, claim_missing,
        record_too_large) says why not."""
        try:
            bucket, key = parse_uri(uri)
        except ValueError:
            raise RecordError(Reason.CLAIM_REFUSED, "features_uri must be s3://<bucket>/<key>") from None
        if bucket not in self._buckets:
            allowed = ", ".join(sorted(self._buckets)) or "none"
            raise RecordError(Reason.CLAIM_REFUSED, f"claims are read from {allowed}, not {bucket[:100]!r}")
        if not key or key.endswith("/") or ".." in key.split("/"):
            raise RecordError(Reason.CLAIM_REFUSED, "features_uri names no object")
        try:
            size = self._store.size(bucket, key)
            if size > self._max:
                detail = f"claimed object is {size} bytes, the limit is {self._max}"
                raise RecordError(Reason.RECORD_TOO_LARGE, detail)
            return self._store.get_bytes(bucket, key)
        except NotFoundError:
            raise RecordError(Reason.CLAIM_MISSING, f"no object at {uri[:300]}") from None
