"""The gateway's API keys are the kernel's (:mod:`cdl.auth`), shared with ingest."""

from cdl.auth import ApiKeys, bearer, hash_key

__all__ = ["ApiKeys", "bearer", "hash_key"]
