"""Who may do what in the object store: least privilege on the buckets.

Each service (and Triton) has its own access key, whose policy names the objects it reads and the
ones it writes (docs/security.md has the table):

- **ingest** owns ``cdl-datasets`` (shards, manifests, compaction, the sweep of unreferenced
  shards) and reads the uploads it is told of (``cdl-uploads``);
- **trainer** owns ``cdl-models`` (claims, versions, the champion, hyperparameters); reads
  ``cdl-datasets``;
- **tuner** writes its own documents in ``cdl-models`` (``*/tuning.json``, ``*/studies/*``);
  reads ``cdl-datasets`` and ``cdl-models``;
- **compressor** owns ``cdl-triton`` (the repository entries it signs) and writes its own in
  ``cdl-models`` (``*/compression.json``, ``*/variants/*``); reads ``cdl-models`` and
  ``cdl-datasets``;
- **gateway** writes the rollout's documents in ``cdl-models`` (``*/rollout.json``,
  ``*/serving.json``); reads ``cdl-models`` and ``cdl-triton`` (it verifies each entry's signature
  before it loads it);
- **monitor** reads ``cdl-models`` (lineage, the drift reference);
- **triton** reads ``cdl-triton``.

Reading a bucket is listing it and getting its objects (and the bucket's location, which S3
clients look up before their first call). What nobody is granted is denied: the trainer cannot
write the repository Triton loads, the gateway cannot change a model's weights. The operator
(``cdl``, the stack, the tests) uses the root credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdl.errors import ConfigError, UnavailableError

__all__ = ["STORE_GRANTS", "StoreGrant", "apply_store_grants", "policy", "store_buckets", "store_user"]


# cdl's buckets, named here so that the stack's tooling can read the grants without the store's
# client (a unit test keeps them equal to cdl.datasets', cdl.registry's, cdl.triton's, cdl.store's)
DATASETS_BUCKET, MODELS_BUCKET, TRITON_BUCKET, UPLOADS_BUCKET = (
    "cdl-datasets",
    "cdl-models",
    "cdl-triton",
    "cdl-uploads",
)


@dataclass(frozen=True)
class StoreGrant:
    """What one user may do in the object store."""

    reads: tuple[str, ...] = ()
    """Buckets it lists and reads."""
    writes: tuple[str, ...] = ()
    """Objects it writes and deletes: a bucket, or ``bucket/pattern`` (``*`` matches any part
    of a key, ``/`` included)."""


STORE_GRANTS: Mapping[str, StoreGrant] = {
    "ingest": StoreGrant(reads=(DATASETS_BUCKET, UPLOADS_BUCKET), writes=(DATASETS_BUCKET,)),
    "trainer": StoreGrant(reads=(DATASETS_BUCKET, MODELS_BUCKET), writes=(MODELS_BUCKET,)),
    "tuner": StoreGrant(
        reads=(DATASETS_BUCKET, MODELS_BUCKET),
        writes=(f"{MODELS_BUCKET}/*/tuning.json", f"{MODELS_BUCKET}/*/studies/*"),
    ),
    "compressor": StoreGrant(
        reads=(DATASETS_BUCKET, MODELS_BUCKET, TRITON_BUCKET),
        writes=(TRITON_BUCKET, f"{MODELS_BUCKET}/*/compression.json", f"{MODELS_BUCKET}/*/variants/*"),
    ),
    "gateway": StoreGrant(
        reads=(MODELS_BUCKET, TRITON_BUCKET),
        writes=(f"{MODELS_BUCKET}/*/rollout.json", f"{MODELS_BUCKET}/*/serving.json"),
    ),
    "monitor": StoreGrant(reads=(MODELS_BUCKET,)),
    "triton": StoreGrant(reads=(TRITON_BUCKET,)),
}


def store_user(name: str) -> str:
    """The access key of user ``name`` (one of :data:`STORE_GRANTS`)."""
    return f"cdl-{name}"


def store_buckets(name: str) -> tuple[str, ...]:
    """The buckets user ``name`` reads or writes: those it checks exist at start (provisioning)."""
    return _buckets(STORE_GRANTS[name])


def _buckets(grant: StoreGrant) -> tuple[str, ...]:
    return tuple(sorted({t.split("/", 1)[0] for t in (*grant.reads, *grant.writes)}))


def _objects(target: str) -> str:
    return f"arn:aws:s3:::{target}" if "/" in target else f"arn:aws:s3:::{target}/*"


def policy(grant: StoreGrant) -> dict[str, Any]:
    """The IAM policy document of ``grant``."""
    buckets = _buckets(grant)
    statements: list[dict[str, Any]] = [
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
            "Resource": [f"arn:aws:s3:::{b}" for b in buckets],
        },
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": sorted({_objects(b) for b in grant.reads})},
    ]
    if grant.writes:
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": sorted(_objects(t) for t in grant.writes),
            }
        )
    return {"Version": "2012-10-17", "Statement": [s for s in statements if s["Resource"]]}


def apply_store_grants(
    endpoint: str, access_key: str, secret_key: str, secrets: Mapping[str, str], secure: bool = False, ca_file: str = ""
) -> int:
    """Make (or update) a user per entry of ``secrets`` (name -> its secret key), each with the
    policy of its :data:`STORE_GRANTS` entry, as the store's root user; idempotent. Returns how
    many users it set."""
    import urllib3
    from minio.credentials.providers import StaticProvider
    from minio.error import MinioAdminException
    from minio.minioadmin import MinioAdmin

    from cdl.store import _unreachable

    unknown = sorted(set(secrets) - set(STORE_GRANTS))
    if unknown:
        raise ConfigError("no object-store grant for these users", users=unknown)
    ca_certs = ca_file if secure and ca_file else None
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=30.0), ca_certs=ca_certs)
    admin = MinioAdmin(
        endpoint=endpoint, credentials=StaticProvider(access_key, secret_key), secure=secure, http_client=http
    )
    try:
        for name, secret in sorted(secrets.items()):
            user = store_user(name)
            admin.policy_add(user, policy=policy(STORE_GRANTS[name]))
            admin.user_add(user, secret)
            admin.policy_set(user, user=user)
    except MinioAdminException as exc:
        raise UnavailableError(
            "the object store refused a user or policy", endpoint=endpoint, error=str(exc)[:300]
        ) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # (an untrusted certificate: a ConfigError)
        raise _unreachable(exc, endpoint) from exc
    return len(secrets)
