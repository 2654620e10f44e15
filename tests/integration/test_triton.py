"""A tiny ONNX model, written as a repository entry in MinIO, served by real Triton."""

from __future__ import annotations

import uuid

import numpy as np
import tritonclient.grpc as tgrpc
from onnx import TensorProto, helper, numpy_helper

from cdl.store import ObjectStore
from cdl.triton import ModelSpec, TensorSpec, write_entry


def _affine_onnx(w: np.ndarray, b: np.ndarray) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["output"])],
        "affine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_onnx_entry_in_minio_loads_and_answers(object_store: ObjectStore, triton_grpc: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    name = f"tiny_{uuid.uuid4().hex[:8]}"
    spec = ModelSpec(name, (TensorSpec("input", "float32", (4,)),), (TensorSpec("output", "float32", (3,)),), 16)
    uri = write_entry(object_store, spec, 1, _affine_onnx(w, b))
    assert uri == f"s3://cdl-triton/{name}/1/"
    assert object_store.exists("cdl-triton", f"{name}/config.pbtxt")

    client = tgrpc.InferenceServerClient(triton_grpc)
    client.load_model(name)
    assert client.is_model_ready(name, "1")

    x = rng.normal(size=(5, 4)).astype(np.float32)
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(name, [inp], outputs=[tgrpc.InferRequestedOutput("output")])
    got = result.as_numpy("output")
    np.testing.assert_allclose(got, x @ w + b, rtol=1e-5, atol=1e-5)

    meta = client.get_model_metadata(name)
    assert [i.name for i in meta.inputs] == ["input"]
    client.unload_model(name)
