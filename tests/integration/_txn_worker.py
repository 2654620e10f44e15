"""A job loop process that stops inside its first transaction until the test says go.

argv: bootstrap group src out processed_db metrics_port pause_marker go_marker

On its first ``send_offsets_to_transaction`` (records produced, offsets about to join the open
transaction) it writes ``pause_marker`` and waits for ``go_marker``: the test stops the broker
meanwhile, so the transaction is open when the broker goes away. Its failure policy has short
deadlines, and its ``/healthz`` serves the process's watchdog: a call that blocks past its
deadline makes the process exit 70, for the supervisor that runs it to start it again. It runs
until stopped (SIGTERM).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cdl.dedupe import SqliteProcessedStore
from cdl.events import Event, OutRecord
from cdl.failure import FailurePolicy
from cdl.kafka import JobLoop, RecordContext
from cdl.kafka.security import use
from cdl.logging import configure_logging
from cdl.observability import serve_http
from cdl.settings import ServiceSettings
from cdl.v1 import events_pb2

POLICY = FailurePolicy(backoff_s=0.2, max_backoff_s=2, transaction_retry_s=10, call_grace_s=5, progress_deadline_s=60)


class PausingJobLoop(JobLoop):
    pause_marker = Path()
    go_marker = Path()

    def _retrying(self, what: str, call: Callable[[float], None], deadline: float) -> None:
        if what == "send_offsets_to_transaction" and not self.pause_marker.exists():
            self.pause_marker.write_text(str(os.getpid()))
            while not self.go_marker.exists():
                time.sleep(0.05)
        super()._retrying(what, call, deadline)


def main() -> None:
    use(ServiceSettings().kafka_security())  # the identity its environment gives (a secured stack's)
    bootstrap, group, src, out, db, port, pause, go = sys.argv[1:9]
    configure_logging("txn-worker", "INFO")

    def job(event: Event, ctx: RecordContext) -> list[OutRecord]:
        version = event.payload.version  # type: ignore[attr-defined]
        return [OutRecord.of(out, event.caused(events_pb2.ModelTrained(model="m", version=version), source="/w"))]

    loop = PausingJobLoop(
        bootstrap=bootstrap,
        group_id=group,
        topics=[src],
        transactional_id=f"tx-{group}",
        job=job,
        key=lambda e: e.id,
        processed=SqliteProcessedStore(Path(db)),
        policy=POLICY,
    )
    loop.pause_marker, loop.go_marker = Path(pause), Path(go)
    loop.install_signal_handlers()
    serve_http(int(port))
    loop.run()


if __name__ == "__main__":
    main()
