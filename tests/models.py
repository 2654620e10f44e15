"""Tiny ONNX models written as Triton repository entries, for tests that need something to serve."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from onnx import TensorProto, helper, numpy_helper

from cdl.signing import Signer
from cdl.store import BlobStore, ObjectStore
from cdl.triton import TRITON_BUCKET, ModelSpec, TensorSpec, runner_source, write_entry
from services.compressor import faults


def affine_onnx(w: npt.NDArray[np.float32], b: npt.NDArray[np.float32], repeat: int = 1) -> bytes:
    """``output = input @ w + b`` (``repeat`` > 1 adds that many extra square matmuls of zeros
    folded back in, to make a slower model with the same answers)."""
    nodes = [helper.make_node("MatMul", ["input", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["out0"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    last = "out0"
    if repeat > 1:
        big = np.zeros((w.shape[1], w.shape[1]), dtype=np.float32)
        inits.append(numpy_helper.from_array(big, "Z"))
        for k in range(repeat):
            nodes.append(helper.make_node("MatMul", [last, "Z"], [f"z{k}"]))
            nodes.append(helper.make_node("Add", [last, f"z{k}"], [f"out{k + 1}"]))
            last = f"out{k + 1}"
    nodes.append(helper.make_node("Identity", [last], ["output"]))
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", w.shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def failing_onnx(n_in: int, n_out: int) -> bytes:
    """A model that answers zeros (so it loads and warms up) but fails on any input >= 1."""
    return faults.failing_onnx((n_in,), n_out)


def write_onnx(
    store: BlobStore, name: str, version: int, onnx_bytes: bytes, n_in: int, n_out: int, signer: Signer | None = None
) -> str:
    """Write any ``input`` [batch, n_in] -> ``output`` [batch, n_out] float model as version
    ``version`` (signed by ``signer`` if one is given)."""
    spec = ModelSpec(name, (TensorSpec("input", "float32", (n_in,)),), (TensorSpec("output", "float32", (n_out,)),), 16)
    return write_entry(store, spec, version, onnx_bytes, signer=signer)


def write_affine(
    store: BlobStore,
    name: str,
    version: int,
    w: npt.NDArray[np.float32],
    b: npt.NDArray[np.float32],
    repeat: int = 1,
    max_batch_size: int = 16,
    signer: Signer | None = None,
) -> str:
    """Write version ``version`` of an affine model as a repository entry (signed by
    ``signer`` if one is given); returns its URI."""
    spec = ModelSpec(
        name,
        (TensorSpec("input", "float32", (w.shape[0],)),),
        (TensorSpec("output", "float32", (w.shape[1],)),),
        max_batch_size,
    )
    return write_entry(store, spec, version, affine_onnx(w, b, repeat), signer=signer)


def write_slow_affine(
    store: ObjectStore,
    name: str,
    version: int,
    w: npt.NDArray[np.float32],
    b: npt.NDArray[np.float32],
    delay_s: float,
) -> str:
    """An affine version whose runner waits ``delay_s`` before each batch: the same answers,
    slower by a wait that takes no CPU (work would slow the stable version's requests as much
    on a busy machine). Test entries run in the python backend, whose ``model.py`` is per version."""
    uri = write_affine(store, name, version, w, b)
    source = runner_source()
    hook = "    def execute(self, requests):\n"
    assert hook in source
    slow = source.replace(hook, f"{hook}        __import__('time').sleep({delay_s!r})\n", 1)
    store.put_bytes(TRITON_BUCKET, f"{name}/{version}/model.py", slow.encode(), "text/x-python")
    return uri
