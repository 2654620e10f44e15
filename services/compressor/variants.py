"""ONNX export, compressed variants and their measurements (transport-free)."""

from __future__ import annotations

import io
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cdl.errors import PermanentError
from cdl.ml import objective
from cdl.ml.family import get_family
from cdl.ml.models import ModelConfig
from cdl.ml.preprocess import Preprocessor

__all__ = [
    "INPUT",
    "OUTPUT",
    "Measured",
    "Served",
    "export_onnx",
    "fp16_variant",
    "int8_dynamic_variant",
    "int8_static_variant",
    "measure",
    "parity",
]

INPUT, OUTPUT = "input", "logits"


class Served(nn.Module):
    """The model as served: raw features in (standardisation baked in), logits out (a
    regression's value, in the target's units: the target's scaling baked in too).

    ``dtype``: the dataset's. A uint8 dataset's model takes uint8 (an image stays a quarter of
    its float32 size from the client to Triton, as it was in Kafka and in the shards) and casts
    to float32 as its first step; any other tensor dataset's takes float32."""

    def __init__(self, module: nn.Module, config: ModelConfig, pre: Preprocessor, dtype: str = "float32") -> None:
        super().__init__()
        self.module = module
        self.cast = dtype == "uint8" and pre.kind == "standardize"
        self.standardize = pre.kind == "standardize"
        if self.standardize:
            shape = (1, *config.input_shape) if pre.per_feature else (1,)
            mean = torch.tensor(pre.mean, dtype=torch.float32).reshape(shape)
            std = torch.tensor(pre.std, dtype=torch.float32).reshape(shape)
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        self.target = (pre.target_mean, pre.target_std) if pre.scales_target else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast:
            x = x.to(torch.float32)
        if self.standardize:
            mean: torch.Tensor = self.get_buffer("mean")
            std: torch.Tensor = self.get_buffer("std")
            x = (x - mean) / std
        out: torch.Tensor = self.module(x)
        if self.target is not None:
            out = out * self.target[1] + self.target[0]
        return out


def served_dtype(dtype: str) -> str:
    """The served model's input dtype for a dataset of ``dtype``: uint8 stays, the rest float32."""
    return "uint8" if dtype == "uint8" else "float32"


def served_input(
    config: ModelConfig, pre: Preprocessor, raw: npt.NDArray[Any], dtype: str = "float32"
) -> npt.NDArray[Any]:
    """What a client sends for ``raw`` data of a dataset of ``dtype``: features as the served
    model takes them (:func:`served_dtype`), text as hashed ids."""
    if get_family(config.family).text_input:
        return pre.transform(raw)
    return np.asarray(raw, dtype=served_dtype(dtype)).reshape(len(raw), *config.input_shape)


def export_onnx(served: Served, example: npt.NDArray[Any]) -> bytes:
    """Export with a dynamic batch dimension (opset 17)."""
    served.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but exact for these models
        torch.onnx.export(
            served,
            (torch.from_numpy(example[:2]),),
            buf,  # type: ignore[arg-type]  # accepts file objects at runtime
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buf.getvalue()


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run(model: bytes, x: npt.NDArray[Any], batch: int = 256) -> npt.NDArray[np.float32]:
    sess = _session(model)
    outs = [np.asarray(sess.run([OUTPUT], {INPUT: x[i : i + batch]})[0]) for i in range(0, len(x), batch)]
    result: npt.NDArray[np.float32] = np.concatenate(outs).astype(np.float32)
    return result


def parity(model: bytes, served: Served, x: npt.NDArray[Any], tolerance: float) -> float:
    """Largest |ONNX - PyTorch| logit difference; raises when above ``tolerance``."""
    with torch.no_grad():
        expected = served.eval()(torch.from_numpy(x)).numpy()
    got = run(model, x)
    diff = float(np.max(np.abs(got - expected))) if len(x) else 0.0
    if not diff <= tolerance:
        raise PermanentError(
            f"ONNX export does not match PyTorch: max |diff| {diff:.3g} > tolerance {tolerance:g}", samples=len(x)
        )
    return diff


# --------------------------------------------------------------------------- variants


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after the producers of its inputs (converters may append out of order)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def slim(model_bytes: bytes) -> bytes:
    """Drop what serving does not need: shape annotations, doc strings, long node and tensor names.

    Graph inputs, outputs and initializers keep their names; everything between
    is renamed ``t<n>``. For small models this overhead is a sizeable part of an
    INT8 file.
    """
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    del graph.value_info[:]
    model.doc_string = ""
    graph.doc_string = ""
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renamed:
            renamed[name] = f"t{len(renamed)}"
        return renamed[name]

    _toposort(graph)
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def int8_dynamic_variant(fp32: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="cdl-compress-") as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


class _Calibration:
    def __init__(self, x: npt.NDArray[Any], batch: int = 32) -> None:
        self._batches = [x[i : i + batch] for i in range(0, len(x), batch)]

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        return {INPUT: self._batches.pop(0)} if self._batches else None

    def rewind(self) -> None:  # pragma: no cover - API of CalibrationDataReader
        return None


def int8_static_variant(fp32: bytes, calibration: npt.NDArray[Any], operator_format: bool = False) -> bytes:
    """Static INT8 calibrated on training samples, per-channel weights.

    ``operator_format`` picks QOperator (QLinearConv/QLinearMatMul: fast for
    convolutions) instead of QDQ (Quantize/DequantizeLinear pairs around float
    ops: often faster for small matrix products); the compressor builds both.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.inner = _Calibration(calibration)

        def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
            return self.inner.get_next()

    with tempfile.TemporaryDirectory(prefix="cdl-compress-") as d:
        tmp = Path(d)
        src, pre, dst = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QOperator if operator_format else QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        return dst.read_bytes()


def fp16_variant(fp32: bytes) -> bytes:
    """FP16 weights and compute, FP32 inputs/outputs (for GPU serving)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_from_string(fp32)
    converted = convert_float_to_float16(model, keep_io_types=True)
    return bytes(converted.SerializeToString())


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    name: str
    size_bytes: int
    accuracy: float
    latency_p50_ms_b1: float
    latency_p99_ms_b1: float
    latency_p50_ms_b32: float
    latency_p99_ms_b32: float
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _latency(sess: ort.InferenceSession, x: npt.NDArray[Any], runs: int) -> tuple[float, float]:
    for _ in range(min(10, runs)):
        sess.run([OUTPUT], {INPUT: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure(
    name: str,
    model: bytes,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    reference: npt.NDArray[Any],
    runs: int,
    regression: bool = False,
) -> Measured:
    """Size, the holdout score (accuracy, or R²: :mod:`cdl.ml.objective`), agreement with the
    PyTorch model's outputs ``reference`` (top-1 agreement, or the R² of the variant's values
    against PyTorch's), and CPU latency (1 thread)."""
    out = run(model, x)
    agreement = (
        objective.score(out, reference[:, 0], True)
        if regression
        else float((out.argmax(1) == reference.argmax(1)).mean())
    )
    sess = _session(model)
    b1 = x[:1]
    b32 = x[np.arange(32) % len(x)]
    p50_1, p99_1 = _latency(sess, b1, runs)
    p50_32, p99_32 = _latency(sess, b32, max(20, runs // 4))
    return Measured(
        name=name,
        size_bytes=len(model),
        accuracy=objective.score(out, y, regression),
        latency_p50_ms_b1=p50_1,
        latency_p99_ms_b1=p99_1,
        latency_p50_ms_b32=p50_32,
        latency_p99_ms_b32=p99_32,
        top1_agreement=agreement,
    )
