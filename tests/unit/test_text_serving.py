"""A text model's Triton entry takes texts: the runner tokenizes them with the version's own
tokenizer exactly as training did (run here outside Triton, with a stand-in for
triton_python_backend_utils)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdl.datasets import Task
from cdl.ml.core import build_seeded, fit_preprocessor, hyperparameters
from cdl.ml.models import Family, ModelConfig
from cdl.ml.preprocess import Preprocessor
from cdl.triton import ModelSpec, TensorSpec, render_config
from services.compressor.variants import Served, export_onnx, run, served_input

TEXTS = ["The quick brown fox", "jumps over the lazy dog", "", "numpy arrays, dtypes and don't", "ünïcode wörds"]


class _Tensor:
    def __init__(self, name: str, arr: np.ndarray) -> None:
        self.name, self.arr = name, arr

    def as_numpy(self) -> np.ndarray:
        return self.arr


class _Response:
    def __init__(self, output_tensors: list[_Tensor]) -> None:
        self.outputs = output_tensors


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Any:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor  # type: ignore[attr-defined]
    pb.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32}[t]  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda req, name: req[name]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    path = Path(__file__).resolve().parents[2] / "cdl" / "_triton_runner.py"
    spec = importlib.util.spec_from_file_location("cdl_runner_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "ngrams,lowercase,subwords,max_tokens",
    [(1, True, 0, 8), (2, True, 0, 8), (2, False, 0, 8), (2, True, 5, 8), (2, True, 5, 200), (1, False, 3, 200)],
)
def test_the_runner_tokenizes_as_training_does(
    runner: Any, ngrams: int, lowercase: bool, subwords: int, max_tokens: int
) -> None:
    pre = Preprocessor.for_text(2**15, ngrams, max_tokens=max_tokens, lowercase=lowercase, subwords=subwords)
    want = pre.transform(TEXTS)
    assert np.array_equal(runner.hash_tokens(TEXTS, 2**15, ngrams, max_tokens, lowercase, subwords), want)
    as_bytes = [t.encode() for t in TEXTS]  # what Triton hands the runner: UTF-8 bytes
    assert np.array_equal(runner.hash_tokens(as_bytes, 2**15, ngrams, max_tokens, lowercase, subwords), want)
    if subwords and max_tokens > 100:  # the words' subwords came after the words and word n-grams
        assert (want > 0).sum(1).max() > len(TEXTS[0].split()) * 3


def test_a_text_entry_takes_texts_and_answers_as_the_model(runner: Any, tmp_path: Path) -> None:
    texts = np.array(TEXTS * 3, dtype=object)
    hp = hyperparameters(Family.TEXT)
    pre = fit_preprocessor(Family.TEXT, Task.TEXT, texts, hp)
    config = ModelConfig(Family.TEXT, (), 3, hp)
    served = Served(build_seeded(config, 0).eval(), config, pre).eval()
    ids = served_input(config, pre, texts)
    blob = export_onnx(served, ids)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(blob)
    (tmp_path / "1" / "tokenizer.json").write_text(json.dumps(pre.to_json()))
    spec = ModelSpec("docs", (TensorSpec("text", "string", (1,)),), (TensorSpec("logits", "float32", (3,)),))
    assert 'name: "text"\n    data_type: TYPE_STRING\n    dims: [ 1 ]' in render_config(spec)
    model_config = {
        "input": [{"name": "text", "data_type": "TYPE_STRING"}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32"}],
        "parameters": {"intra_op_thread_count": {"string_value": "2"}},  # as Triton gives config.pbtxt's
    }
    model = runner.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(model_config), "model_repository": str(tmp_path), "model_version": "1"}
    )
    assert model.session.get_session_options().intra_op_num_threads == 2
    # two requests in one dynamic batch, texts as Triton gives them: bytes, [batch, 1]
    first = np.array([t.encode() for t in texts[:4]], dtype=object).reshape(-1, 1)
    second = np.array([t.encode() for t in texts[4:]], dtype=object).reshape(-1, 1)
    responses = model.execute([{"text": _Tensor("text", first)}, {"text": _Tensor("text", second)}])
    got = np.concatenate([r.outputs[0].arr for r in responses])
    np.testing.assert_allclose(got, run(blob, ids), atol=1e-5)
