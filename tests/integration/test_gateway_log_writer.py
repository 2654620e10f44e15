"""The inference log's writer process (services/gateway/log_writer.py) on the real broker.

Records written by the child process are the records the in-thread writer builds; a child
killed -9 is started again and only the rounds it missed are lost (and counted); a gateway
killed -9 leaves no child behind, and what the child held reaches Kafka first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cdl.events import decode
from cdl.v1 import events_pb2
from cdl.v1 import open_inference_pb2 as pb
from services.gateway.inference_log import LOG_DROPPED, LOG_SENT, InferenceLog, build_record
from services.gateway.log_writer import WriterProcess
from tests.helpers import read_topic


def _pair(i: int) -> tuple[bytes, bytes]:
    x = np.full((1, 4), i, dtype="<f4")
    req = pb.ModelInferRequest(model_name="affine", model_version="2", id=f"r{i}")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(x.tobytes())
    resp = pb.ModelInferResponse(model_name="affine", model_version="2", id=f"r{i}")
    resp.outputs.add(name="output", datatype="FP32", shape=[1, 3])
    resp.raw_output_contents.append(np.array([[0.0, i % 3, 0.5]], dtype="<f4").tobytes())
    return req.SerializeToString(), resp.SerializeToString()


def _wait(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _count(metric: Any, **labels: str) -> float:
    return float((metric.labels(**labels) if labels else metric)._value.get())


def _records(bootstrap: str, topic: str, n: int) -> dict[str, events_pb2.InferenceLogged]:
    out: dict[str, events_pb2.InferenceLogged] = {}
    for r in read_topic(bootstrap, topic, n, timeout_s=30):
        event = decode(r.key, r.value, list(r.headers.items()))
        assert event.type == "dev.cdl.inference.logged.v1" and event.source == "/cdl/gateway/test"
        assert isinstance(event.payload, events_pb2.InferenceLogged)
        out[event.payload.request_id] = event.payload
    return out


def test_records_from_the_writer_process_are_the_threads_records(kafka_bootstrap: str, topic_factory: Any) -> None:
    topic = topic_factory("logged")
    sent_before = _count(LOG_SENT)
    writer = WriterProcess(kafka_bootstrap, topic, "/cdl/gateway/test")
    logger = InferenceLog(None, topic, writer=writer, source="/cdl/gateway/test")
    assert logger.enabled
    items = []
    for i in range(300):
        request, response = _pair(i)
        logger.offer("affine", 2, f"r{i}", request, response, 0.002, "OK")
        items.append(("affine", 2, f"r{i}", request, response, 0.002, "OK"))
    _wait(lambda: logger.pending() == 0 and _count(LOG_SENT) - sent_before == 300)
    logger.close()
    assert writer.pid is None  # the child ended
    got = _records(kafka_bootstrap, topic, 300)
    assert sorted(got) == sorted(f"r{i}" for i in range(300))
    for model, version, rid, request, response, latency, status in items[:20]:
        want = build_record((model, version, rid, request, response, latency, status, 0.0), 4096)
        rec = got[rid]
        assert rec.time.ToNanoseconds() > 0
        rec.ClearField("time")
        want.ClearField("time")
        assert rec == want
        assert list(rec.predicted_labels) == [str(max(range(3), key=[0.0, int(rid[1:]) % 3, 0.5].__getitem__))]


def test_a_killed_writer_process_is_started_again(kafka_bootstrap: str, topic_factory: Any) -> None:
    topic = topic_factory("logged")
    writer = WriterProcess(kafka_bootstrap, topic, "/cdl/gateway/test")
    logger = InferenceLog(None, topic, writer=writer, source="/cdl/gateway/test")
    lost_before = _count(LOG_DROPPED, reason="writer")
    request, response = _pair(1)
    try:
        for i in range(50):
            logger.offer("affine", 2, f"a{i}", request, response, 0.001, "OK")
        assert len(read_topic(kafka_bootstrap, topic, 50, timeout_s=30)) == 50  # acknowledged, all of them
        first = writer.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # requests keep being offered: the next round starts a new child at once (the last start
        # was long ago); that one is killed too, and is started again only after RESTART_S, so
        # the rounds in between are lost and counted; then a new child takes the rest
        i = 0
        second: int | None = None
        while writer.restarts < 2 or i < 100:
            logger.offer("affine", 2, f"b{i}", request, response, 0.001, "OK")
            i += 1
            time.sleep(0.01)
            if second is None and writer.pid not in (first, None):
                second = writer.pid
                assert second is not None
                os.kill(second, signal.SIGKILL)
            assert i < 1000, "the writer process was not started again"
        for j in range(50):
            logger.offer("affine", 2, f"c{j}", request, response, 0.001, "OK")
        _wait(lambda: logger.pending() == 0)
    finally:
        logger.close()
    lost = _count(LOG_DROPPED, reason="writer") - lost_before
    assert writer.restarts == 2 and lost >= 1
    got = _records(kafka_bootstrap, topic, 50 + i + 50 - int(lost))
    keys = set(got)
    assert {f"a{j}" for j in range(50)} <= keys and {f"c{j}" for j in range(50)} <= keys
    assert len([k for k in keys if k.startswith("b")]) == i - lost  # exactly the counted ones are missing


CHILD = """
import sys, time
from services.gateway.inference_log import InferenceLog
from services.gateway.log_writer import WriterProcess
writer = WriterProcess(sys.argv[1], sys.argv[2], "/cdl/gateway/test")
logger = InferenceLog(None, sys.argv[2], writer=writer, source="/cdl/gateway/test")
for i in range(200):
    logger.offer("affine", 2, f"k{i}", b"", b"", 0.001, "OK")
while logger.pending():
    time.sleep(0.01)
print(writer.pid, flush=True)
time.sleep(60)
"""


def test_a_gateway_killed_leaves_no_writer_and_its_records_arrive(kafka_bootstrap: str, topic_factory: Any) -> None:
    topic = topic_factory("logged")
    gateway = subprocess.Popen([sys.executable, "-c", CHILD, kafka_bootstrap, topic], stdout=subprocess.PIPE, text=True)
    try:
        assert gateway.stdout is not None
        pid = int(gateway.stdout.readline())
        gateway.kill()  # -9: the writer sees its pipe close
        gateway.wait(10)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # a zombie (its parent is gone, init reaps it) counts as ended
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"

        _wait(gone, 15)
    finally:
        if gateway.poll() is None:
            gateway.kill()
        if gateway.stdout is not None:
            gateway.stdout.close()
    assert sorted(_records(kafka_bootstrap, topic, 200)) == sorted(f"k{i}" for i in range(200))


def test_a_writer_process_counts_what_kafka_never_took() -> None:
    """No broker at all: the writer process's records time out and the gateway counts them
    (reported over the pipe), and close ends the child."""
    writer = WriterProcess("127.0.0.1:9", "t", "/cdl/gateway/test", producer_config={"message.timeout.ms": 300})
    logger = InferenceLog(None, "t", writer=writer)
    before = _count(LOG_DROPPED, reason="kafka")
    request, _ = _pair(1)
    for i in range(30):
        logger.offer("affine", 2, f"r{i}", request, b"", 0.001, "UNAVAILABLE")
    _wait(lambda: _count(LOG_DROPPED, reason="kafka") - before == 30, timeout_s=20)
    pid = writer.pid
    assert pid is not None
    logger.close()
    assert writer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_writer_process_ignores_the_group_sigterm_and_ends_with_the_log(
    kafka_bootstrap: str, topic_factory: Any
) -> None:
    """SIGTERM reaches the gateway's whole process group: the child keeps running until the
    gateway closes the log, and then flushes everything it took."""
    topic = topic_factory("logged")
    writer = WriterProcess(kafka_bootstrap, topic, "/cdl/gateway/test")
    logger = InferenceLog(None, topic, writer=writer)
    request, response = _pair(2)
    try:
        pid = writer.pid
        assert pid is not None
        sent = _count(LOG_SENT)
        logger.offer("affine", 2, "t0", request, response, 0.001, "OK")
        _wait(lambda: _count(LOG_SENT) > sent)  # it runs its loop: its handlers are set
        os.kill(pid, signal.SIGTERM)
        for i in range(1, 100):
            logger.offer("affine", 2, f"t{i}", request, response, 0.001, "OK")
        _wait(lambda: logger.pending() == 0)
        assert writer.pid == pid and writer.restarts == 0
    finally:
        logger.close()
    assert sorted(_records(kafka_bootstrap, topic, 100)) == sorted(f"t{i}" for i in range(100))
