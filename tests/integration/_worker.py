"""A job process for the crash test: handles events from `src`, publishes to `out`.

argv: bootstrap group src out processed_db calls_log crash|ok
In `crash` mode it records the call and then kills itself with SIGKILL before
its output is committed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event, OutRecord
from cdl.kafka import JobLoop, RecordContext
from cdl.kafka.security import use
from cdl.settings import ServiceSettings
from cdl.v1 import events_pb2


def main() -> None:
    use(ServiceSettings().kafka_security())  # the identity its environment gives (a secured stack's)
    bootstrap, group, src, out, db, calls, mode = sys.argv[1:8]
    last = [time.monotonic()]

    def job(event: Event, ctx: RecordContext) -> list[OutRecord]:
        with open(calls, "a") as f:
            f.write(event.id + "\n")
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        last[0] = time.monotonic()
        version = event.payload.version  # type: ignore[attr-defined]
        return [OutRecord.of(out, event.caused(events_pb2.ModelTrained(model="m", version=version), source="/w"))]

    loop = JobLoop(
        bootstrap=bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        job=job,
        key=lambda e: e.id,
        processed=SqliteProcessedStore(Path(db)),
    )
    loop.install_signal_handlers()
    # done once partitions are ours and nothing new came for a few seconds after that (the
    # rebalance after a killed member may take longer than those seconds: count from it)
    assigned_at = [0.0]

    def done() -> bool:
        if not loop.assigned.is_set():
            return False
        if not assigned_at[0]:
            assigned_at[0] = time.monotonic()
        return time.monotonic() - max(last[0], assigned_at[0]) > 6

    loop.run(until=done)
    print(f"jobs={loop.jobs_done}")


if __name__ == "__main__":
    main()
