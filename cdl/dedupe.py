"""Which events a consumer group has already handled (idempotency on ``ce_id``).

A consumer loop marks an event handled after its outputs were acknowledged and
before it commits the offset, so a crash in between redelivers an event the
loop then skips. The SQLite store survives restarts of the process.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

__all__ = ["MemoryProcessedStore", "ProcessedStore", "SqliteProcessedStore"]


class ProcessedStore(Protocol):
    def seen(self, group: str, event_id: str) -> bool: ...

    def mark(self, group: str, event_id: str) -> None: ...


class MemoryProcessedStore:
    """For one process' lifetime only (unit tests, tools)."""

    def __init__(self) -> None:
        self._ids: set[tuple[str, str]] = set()

    def seen(self, group: str, event_id: str) -> bool:
        return (group, event_id) in self._ids

    def mark(self, group: str, event_id: str) -> None:
        self._ids.add((group, event_id))


class SqliteProcessedStore:
    """Handled event ids in a SQLite file; entries older than ``retention_s`` are pruned."""

    def __init__(self, path: Path, retention_s: float = 7 * 24 * 3600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS processed (grp TEXT, id TEXT, at REAL, PRIMARY KEY (grp, id))")
        self._lock = threading.Lock()
        self._retention_s = retention_s
        self._db.execute("DELETE FROM processed WHERE at < ?", (time.time() - retention_s,))

    def seen(self, group: str, event_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM processed WHERE grp = ? AND id = ?", (group, event_id)).fetchone()
        return row is not None

    def mark(self, group: str, event_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO processed (grp, id, at) VALUES (?, ?, ?)", (group, event_id, time.time())
            )

    def close(self) -> None:
        self._db.close()
