"""The IngestService gRPC servicer (thin transport over the registry and records)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
from confluent_kafka import KafkaError, Message

from cdl.datasets import DatasetSpec, Task
from cdl.errors import InvalidInputError
from cdl.events import CONTENT_PROTOBUF, Event, encode
from cdl.kafka import Producer
from cdl.v1 import events_pb2, ingest_pb2, ingest_pb2_grpc
from services.ingest.records import Reason, RecordError, clean, parse
from services.ingest.registry import DatasetRegistry

__all__ = ["IngestServicer", "spec_from_proto", "spec_to_proto"]

_TASKS = {
    ingest_pb2.TASK_TABULAR_CLASSIFICATION: Task.TABULAR,
    ingest_pb2.TASK_IMAGE_CLASSIFICATION: Task.IMAGE,
    ingest_pb2.TASK_TEXT_CLASSIFICATION: Task.TEXT,
    ingest_pb2.TASK_REGRESSION: Task.REGRESSION,
}
_TASK_ENUM = {v: k for k, v in _TASKS.items()}


def spec_from_proto(p: ingest_pb2.DatasetSpec) -> DatasetSpec:
    if p.task not in _TASKS:
        raise InvalidInputError("invalid dataset spec: task must be set", dataset=p.name)
    return DatasetSpec(
        name=p.name,
        task=_TASKS[p.task],
        labels=tuple(p.labels),
        input_shape=tuple(int(d) for d in p.input_shape),
        dtype=p.dtype or "float32",
        min_text_length=p.cleaning.min_text_length,
        lowercase_text=p.cleaning.lowercase_text,
        min_new_records=p.policy.min_new_records,
        max_interval_s=p.policy.max_interval_s,
        holdout_fraction=p.holdout_fraction or 0.2,
        family=p.family,
    )


def spec_to_proto(s: DatasetSpec) -> ingest_pb2.DatasetSpec:
    return ingest_pb2.DatasetSpec(
        name=s.name,
        task=_TASK_ENUM[s.task],
        input_shape=list(s.input_shape),
        dtype=s.dtype,
        labels=list(s.labels),
        cleaning=ingest_pb2.CleaningRules(min_text_length=s.min_text_length, lowercase_text=s.lowercase_text),
        policy=ingest_pb2.RetrainPolicy(min_new_records=s.min_new_records, max_interval_s=s.max_interval_s),
        holdout_fraction=s.holdout_fraction,
        family=s.family,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, registry: DatasetRegistry, producer: Producer, source: str, raw_topic: str) -> None:
        self._raw_topic = raw_topic
        self._registry = registry
        self._producer = producer
        self._source = source

    def RegisterDataset(  # noqa: N802 - gRPC method name
        self, request: ingest_pb2.RegisterDatasetRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.RegisterDatasetResponse:
        spec, created = self._registry.register(spec_from_proto(request.spec))
        return ingest_pb2.RegisterDatasetResponse(dataset=self._dataset(spec), created=created)

    def GetDataset(  # noqa: N802
        self, request: ingest_pb2.GetDatasetRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.GetDatasetResponse:
        spec = self._registry.get(request.name, refresh=True)
        return ingest_pb2.GetDatasetResponse(dataset=self._dataset(spec))

    def ListDatasets(  # noqa: N802
        self, request: ingest_pb2.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.ListDatasetsResponse:
        return ingest_pb2.ListDatasetsResponse(
            datasets=[self._dataset(self._registry.get(name, refresh=True)) for name in self._registry.names()]
        )

    def _dataset(self, spec: DatasetSpec) -> ingest_pb2.Dataset:
        return ingest_pb2.Dataset(
            spec=spec_to_proto(spec),
            schema_hash=spec.schema_hash,
            latest_version=self._registry.latest_version(spec.name),
        )

    def Ingest(  # noqa: N802
        self, request_iterator: Iterator[events_pb2.Record], context: grpc.ServicerContext
    ) -> ingest_pb2.IngestResponse:
        acks: list[ingest_pb2.IngestAck] = []
        lock = threading.Lock()
        pending = 0

        def delivered(ack: ingest_pb2.IngestAck) -> object:
            def cb(err: KafkaError | None, msg: Message) -> None:
                with lock:
                    if err is not None:
                        ack.accepted = False
                        ack.code = "UNAVAILABLE"
                        ack.reason = f"broker did not acknowledge: {err}"
                    else:
                        ack.accepted = True
                        ack.partition = int(msg.partition() or 0)
                        ack.offset = int(msg.offset() or 0)

            return cb

        for record in request_iterator:
            ack = ingest_pb2.IngestAck(id=record.id)
            acks.append(ack)
            value = record.SerializeToString()
            try:
                spec = self._registry.lookup(record.dataset)
                if spec is None:
                    raise RecordError(Reason.UNKNOWN_DATASET, "dataset is not registered", dataset=record.dataset)
                clean(parse(value, CONTENT_PROTOBUF), spec, allow_unlabelled=True)
            except RecordError as exc:
                ack.accepted = False
                ack.code = "INVALID_ARGUMENT"
                ack.reason = str(exc)
                continue
            event = Event(record, source=self._source, key=record.dataset)
            key, _, headers = encode(event)
            self._producer.send_raw(self._raw_topic, value, key, headers, on_delivery=delivered(ack))  # type: ignore[arg-type]
            pending += 1
        if pending:
            self._producer.flush()
        accepted = sum(1 for a in acks if a.accepted)
        return ingest_pb2.IngestResponse(accepted=accepted, rejected=len(acks) - accepted, acks=acks)
