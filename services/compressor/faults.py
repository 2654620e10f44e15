"""The demo's one-shot fault: a version whose Triton entry fails on real inputs.

``cdl demo`` shows a bad candidate rolled back with no failed client request. It
asks for one by dropping a file ``<model>.failing`` in the compressor's
``demo_fault_dir``: the next version of that model that the compressor handles
gets, in its Triton entry, a model that loads and answers the gateway's warm-up
(zeros) but fails on any real input. The file is taken (renamed) when used, the
version's ``compression.json`` says ``demo_fault: failing``, and its reason says
so too, so the version stays traceable. With ``demo_fault_dir`` empty (the
default outside the demo) there is no fault to take.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["failing_onnx", "take_fault"]


def failing_onnx(
    input_dims: tuple[int, ...],
    n_out: int,
    input_name: str = "input",
    output_name: str = "output",
    integer_input: bool = False,
) -> bytes:
    """A model that answers zeros for all-zero inputs (so it loads and warms up) but fails on
    any input with a value >= 1: the largest value, as an integer, indexes a one-row table
    (ONNX Runtime: index out of bounds)."""
    table = np.zeros((1, n_out), dtype=np.float32)
    cast = [helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT)] if integer_input else []
    nodes = [
        *cast,
        helper.make_node("Flatten", ["as_float" if integer_input else input_name], ["flat"], axis=1),
        helper.make_node("ReduceMax", ["flat"], ["m"], keepdims=0, axes=[1]),
        helper.make_node("Cast", ["m"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["T", "idx"], [output_name], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "failing",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.INT64 if integer_input else TensorProto.FLOAT, ["batch", *input_dims]
            )
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(table, "T")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def take_fault(fault_dir: str, model: str, version: int) -> str:
    """The fault asked for ``model`` (``"failing"``), taken so it applies once; ``""`` if none."""
    if not fault_dir:
        return ""
    flag = Path(fault_dir) / f"{model}.failing"
    taken = flag.with_name(f"{model}.failing.taken-v{version}")
    if taken.exists():  # this version took it before (a retried or restarted job): it keeps it
        return "failing"
    try:
        os.replace(flag, taken)
    except FileNotFoundError:
        return ""
    return "failing"
