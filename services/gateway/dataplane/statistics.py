"""``ModelStatistics`` through the gateway: Triton's statistics of the routed models, summed
over the Triton servers behind it.

A client (perf_analyzer, a Model-Analyzer-style tool, a dashboard) asks the gateway as
it would ask one Triton. The gateway asks every ready server and returns one
``ModelStatisticsResponse``: one entry per (model, version) the routing table holds,
whose counts and durations are the sums over the servers (``last_inference`` the latest;
``batch_stats`` summed per batch size, ``response_stats`` per key; ``memory_usage``
as the first server reports it). Models and versions Triton holds that no route names
(being loaded, or no longer served) are left out: the gateway answers for what it serves.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2

from cdl.errors import InvalidInputError

__all__ = ["merge", "parse_request"]

_SUMMED_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
    }
)
_LATEST = "last_inference"
#: repeated messages summed per the value of a key field; other repeated messages are kept from the first
_KEYED = {"batch_stats": "batch_size"}
_KEYS = frozenset(_KEYED.values())


def parse_request(data: bytes) -> tuple[str, str]:
    """The model name and version a ``ModelStatisticsRequest`` asks for ("" for all)."""
    try:
        req = service_pb2.ModelStatisticsRequest.FromString(data)
    except DecodeError:
        raise InvalidInputError("malformed ModelStatisticsRequest") from None
    return req.name, req.version


def _add(into: Message, other: Message) -> None:
    """Add ``other``'s counts and durations to ``into`` (a message of the same type)."""
    for fd, value in other.ListFields():
        if fd.message_type is not None:
            target = getattr(into, fd.name)
            if fd.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    _add(target[key], item)
            elif fd.is_repeated:
                key = _KEYED.get(fd.name)
                if key is None:
                    if not len(target):
                        target.extend(value)
                    continue
                by_key = {getattr(m, key): m for m in target}
                for item in value:
                    mine = by_key.get(getattr(item, key))
                    if mine is None:
                        target.add().CopyFrom(item)
                    else:
                        _add(mine, item)
            else:
                target.SetInParent()  # present in the answer (a zero count too): present in the sum
                _add(target, value)
        elif fd.name == _LATEST:
            setattr(into, fd.name, max(getattr(into, fd.name), value))
        elif fd.type in _SUMMED_TYPES and not fd.is_repeated and fd.name not in _KEYS:
            setattr(into, fd.name, getattr(into, fd.name) + value)
        elif not getattr(into, fd.name):
            setattr(into, fd.name, value)


def merge(answers: Iterable[bytes], served: dict[str, set[str]]) -> bytes:
    """One ``ModelStatisticsResponse`` from the servers' ``answers``, of the versions in ``served``
    (model name -> version strings), in model then version order."""
    merged: dict[tuple[str, str], Message] = {}
    for data in answers:
        for stats in service_pb2.ModelStatisticsResponse.FromString(data).model_stats:
            if stats.version not in served.get(stats.name, ()):
                continue
            key = (stats.name, stats.version)
            mine = merged.get(key)
            if mine is None:
                merged[key] = mine = service_pb2.ModelStatistics(name=stats.name, version=stats.version)
            _add(mine, stats)
    out = service_pb2.ModelStatisticsResponse()
    for key in sorted(merged, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else -1)):
        out.model_stats.add().CopyFrom(merged[key])
    return bytes(out.SerializeToString())
