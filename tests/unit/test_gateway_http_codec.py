"""REST/HTTP v2 bodies to and from the gRPC messages (services/gateway/dataplane/http_codec.py): JSON and
binary tensors, every datatype, and hostile bodies that must be an InvalidInputError and
nothing else."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from cdl.errors import InvalidInputError
from services.gateway.dataplane.http_codec import (
    DTYPES,
    InferBody,
    infer_request,
    infer_response,
    message_json,
    response_message,
)


def _req(body: InferBody) -> Any:
    return service_pb2.ModelInferRequest.FromString(body.request)


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_json_data_of_every_fixed_size_datatype_becomes_raw_contents(datatype: str) -> None:
    dtype = DTYPES[datatype]
    values = [True, False, True, True] if datatype == "BOOL" else [0, 1, 2, 3]
    if dtype.kind == "f":
        values = [0.5, -1.25, 2.0, 3.0]
    if dtype.kind == "i":
        values = [0, -1, 2, -3]
    doc = {
        "id": "r",
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": datatype, "data": [values[:2], values[2:]]}],
    }
    req = _req(infer_request("m", "3", json.dumps(doc).encode(), None))
    assert (req.model_name, req.model_version, req.id) == ("m", "3", "r")
    assert list(req.inputs[0].shape) == [2, 2] and req.inputs[0].datatype == datatype
    np.testing.assert_array_equal(np.frombuffer(req.raw_input_contents[0], dtype), np.array(values, dtype))


def test_bytes_and_binary_tensors_and_parameters() -> None:
    x = np.arange(6, dtype=np.float32)
    head = json.dumps({
        "parameters": {"binary_data_output": True, "priority": 2},
        "inputs": [
            {"name": "a", "shape": [6], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
            {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["hé", ""]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False, "classification": 2}}, {"name": "z"}],
    }).encode()  # fmt: skip
    body = infer_request("m", "", head + x.tobytes(), len(head))
    req = _req(body)
    assert req.raw_input_contents[0] == x.tobytes()
    assert req.raw_input_contents[1] == struct.pack("<I", 3) + "hé".encode() + struct.pack("<I", 0)
    assert req.parameters["priority"].int64_param == 2 and "binary_data_output" not in req.parameters
    assert req.outputs[0].parameters["classification"].int64_param == 2
    assert body.binary == {"y": False} and body.binary_default is True
    strings = json.dumps({"parameters": {"binary_data_output": "false"},
                          "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
                          "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}).encode()  # fmt: skip
    body = infer_request("m", "", strings, None)
    assert body.binary == {"y": False} and body.binary_default is False  # only JSON true asks for binary
    big = json.dumps({"parameters": {"seq": 2**63 + 1}, "inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                      "data": [1]}]}).encode()  # fmt: skip
    assert _req(infer_request("m", "", big, None)).parameters["seq"].uint64_param == 2**63 + 1


def test_a_response_is_json_or_json_and_binary_as_asked() -> None:
    resp = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="r")
    resp.outputs.add(name="y", datatype="FP32", shape=[2])
    resp.outputs.add(name="s", datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(np.array([1.5, -2], np.float32).tobytes())
    resp.raw_output_contents.append(struct.pack("<I", 2) + b"ok")
    data = resp.SerializeToString()
    body, length = infer_response(data, InferBody(b"", {}, False))
    assert length is None
    doc = json.loads(body)
    assert doc["outputs"][0]["data"] == [1.5, -2.0] and doc["outputs"][1]["data"] == ["ok"] and doc["id"] == "r"
    body, length = infer_response(data, InferBody(b"", {"s": False}, True))
    assert length is not None
    doc = json.loads(body[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8} and "data" not in doc["outputs"][0]
    assert body[length:] == np.array([1.5, -2], np.float32).tobytes()


def test_an_answer_is_read_back_into_the_response_it_was_made_of() -> None:
    """What the native lane served over REST is logged as the gRPC path logs it: the answer's
    body read back is the response it was written from (JSON data and binary outputs alike)."""
    resp = service_pb2.ModelInferResponse(model_name="m", model_version="2", id="r")
    resp.parameters["sequence"].int64_param = 3
    resp.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    resp.outputs.add(name="s", datatype="BYTES", shape=[1])
    resp.outputs.add(name="i", datatype="INT64", shape=[1])
    resp.raw_output_contents.append(np.array([[1.5, -2], [0, 3]], np.float32).tobytes())
    resp.raw_output_contents.append(struct.pack("<I", 2) + b"ok")
    resp.raw_output_contents.append(np.array([-7], np.int64).tobytes())
    data = resp.SerializeToString()
    for binary, per_output in ((False, {}), (True, {}), (False, {"y": True}), (True, {"s": False})):
        body, length = infer_response(data, InferBody(b"", per_output, binary))
        again = service_pb2.ModelInferResponse.FromString(response_message(body, length))
        assert again == resp, (binary, per_output)
    for bad, length in ((b"{", None), (b"[]", None), (b'{"outputs": [{"name": "y", "datatype": "FP32", '
                        b'"shape": [2], "parameters": {"binary_data_size": 8}}]}', None),
                        (b'{"outputs": [{"name": "y", "datatype": "FP99", "shape": [1], "data": [1]}]}', None),
                        (b"{}", 5)):  # fmt: skip
        with pytest.raises(InvalidInputError):
            response_message(bad, length)


def test_messages_become_tritons_json_with_integers_as_numbers() -> None:
    stats = service_pb2.ModelStatisticsResponse()
    s = stats.model_stats.add(name="m", version="1", inference_count=2**40, last_inference=5)
    s.inference_stats.success.count = 3
    s.response_stats["k"].success.ns = 7
    doc = message_json(stats)
    assert doc["model_stats"][0]["inference_count"] == 2**40
    assert doc["model_stats"][0]["inference_stats"]["success"]["count"] == 3
    assert doc["model_stats"][0]["response_stats"]["k"]["success"]["ns"] == 7
    empty = service_pb2.ModelStatisticsResponse()
    e = empty.model_stats.add(name="m", version="1")
    e.inference_stats.fail.SetInParent()
    doc = message_json(empty)["model_stats"][0]
    assert doc["inference_count"] == 0 and doc["inference_stats"]["fail"] == {"count": 0, "ns": 0}
    assert doc["batch_stats"] == [] and "success" not in doc["inference_stats"]  # set fields only, defaults too
    meta = service_pb2.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    assert message_json(meta)["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]


HOSTILE = [
    b"",
    b"{",
    b"null",
    b'"x"',
    b'{"inputs": {}}',
    b'{"inputs": [1]}',
    b'{"inputs": [{"name": "x"}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1e999]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [NaN]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}',
    b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": []}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{}]}',
    b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
    b"\xff\xfe",
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1' + b"0" * 400 + b"]}]}",
    b'{"parameters": {"p": 1180591620717411303424},'
    b' "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    b'{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}',
    b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
    b' "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}]}',
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_are_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        infer_request("m", "", body, None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400)))
def test_any_bytes_are_a_request_or_invalid_input(body: bytes, length: int | None) -> None:
    with contextlib.suppress(InvalidInputError):
        infer_request("m", "", body, length)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"inputs": st.lists(st.dictionaries(
    st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values, max_size=5), max_size=3)},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values}))  # fmt: skip
def test_any_json_is_a_request_or_invalid_input(doc: dict[str, Any]) -> None:
    with contextlib.suppress(InvalidInputError):
        infer_request("m", "", json.dumps(doc).encode(), None)
