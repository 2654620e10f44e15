"""A consumer process for the crash test: handles events from `src`, publishes to `out`.

argv: bootstrap group src out processed_db calls_log crash|ok
In `crash` mode it records the call and then kills itself with SIGKILL before
its output is produced or its offset committed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event
from cdl.kafka import ConsumerLoop, Outgoing, Producer, RecordContext
from cdl.v1 import events_pb2


def main() -> None:
    bootstrap, group, src, out, db, calls, mode = sys.argv[1:8]

    def handler(event: Event, ctx: RecordContext) -> list[Outgoing]:
        with open(calls, "a") as f:
            f.write(event.id + "\n")
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        version = event.payload.version  # type: ignore[attr-defined]
        return [Outgoing(out, event.caused(events_pb2.ModelTrained(model="m", version=version), source="/w"))]

    loop = ConsumerLoop(
        bootstrap=bootstrap,
        group_id=group,
        topics=[src],
        handler=handler,
        producer=Producer(bootstrap),
        processed=SqliteProcessedStore(Path(db)),
    )
    loop.install_signal_handlers()
    loop.run(idle_timeout_s=4)
    print(f"handled={loop.handled} skipped={loop.skipped} deadlettered={loop.deadlettered}")


if __name__ == "__main__":
    main()
