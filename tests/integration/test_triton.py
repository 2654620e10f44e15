"""A tiny ONNX model, written as a repository entry in MinIO, served by real Triton."""

from __future__ import annotations

import uuid

import numpy as np
import tritonclient.grpc as tgrpc

from cdl.store import ObjectStore
from cdl.triton import ModelSpec, TensorSpec, write_entry
from tests.models import affine_onnx


def test_onnx_entry_in_minio_loads_and_answers(object_store: ObjectStore, triton_grpc: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    name = f"tiny_{uuid.uuid4().hex[:8]}"
    spec = ModelSpec(name, (TensorSpec("input", "float32", (4,)),), (TensorSpec("output", "float32", (3,)),), 16)
    uri = write_entry(object_store, spec, 1, affine_onnx(w, b))
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
