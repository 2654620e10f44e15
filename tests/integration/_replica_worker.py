"""One replica of a job service (cdl.service.JobService: the trainer's, tuner's and compressor's
shell) for the replica tests: its jobs take ``job_s`` each and are logged, one line each.

argv: bootstrap group src out instance calls_log job_s metrics_port state_dir

Each job appends ``<instance> <event id>`` to ``calls_log`` and publishes one ``model.trained``
event with the input's id (``out-<id>``) to ``out``; ``/readyz`` is the service's. It runs until
SIGTERM (or SIGKILL: the test kills one mid-stream).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cdl.events import Event, OutRecord
from cdl.kafka.security import use
from cdl.logging import configure_logging
from cdl.service import JobService
from cdl.settings import ServiceSettings
from cdl.v1 import events_pb2


def main() -> None:
    bootstrap, group, src, out, instance, calls, job_s, port, state_dir = sys.argv[1:10]
    settings = ServiceSettings(kafka_bootstrap=bootstrap, metrics_port=int(port), state_dir=Path(state_dir))
    configure_logging(f"replica-{instance}", "INFO")
    use(settings.kafka_security())  # the identity its environment gives (a secured stack's)

    def job(event: Event) -> list[OutRecord]:
        with open(calls, "a") as f:
            f.write(f"{instance} {event.id}\n")
        time.sleep(float(job_s))
        msg = events_pb2.ModelTrained(model="m", version=event.payload.version)  # type: ignore[attr-defined]
        return [OutRecord.of(out, event.caused(msg, source="/replica", event_id=f"out-{event.id}"))]

    JobService(
        "replica",
        settings,
        group_id=group,
        instance=instance,
        topics=[src],
        deadletter_topic=out,
        job=job,
    ).main()


if __name__ == "__main__":
    main()
