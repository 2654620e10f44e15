"""bench/text: does cdl's text model reach a TF-IDF + logistic-regression baseline?

Data: docstring paragraphs of the installed numpy, scikit-learn and torch, labelled by
package (cdl_tools/textdata.py: 800 per package, nothing downloaded). The split is ingest's:
a record is in the holdout when the hash of its id is under 0.2.

- **baseline**: scikit-learn ``TfidfVectorizer`` (word 1-2 grams, sublinear tf) and
  ``LogisticRegression``, its C chosen by 3-fold cross-validation on the train split
  (1, 10 or 100), scored on the holdout;
- **cdl**: the trainer's text model (hashed word 1-2 grams and 3-5 character subwords,
  TF-IDF-weighted EmbeddingBag, linear) trained
  through the shared training core with the family's default hyperparameters, exported
  to ONNX and compressed as the compressor does (FP32 and dynamic INT8), and scored on
  the holdout **as served**: raw texts tokenized by the Triton runner's tokenizer
  (cdl/_triton_runner.py), then the ONNX file in ONNX Runtime.

The cdl model is trained with ``CDL_BENCH_TEXT_SEEDS`` (5) seeds (each its own validation
part and training seed); the variant scored is the one the compressor's own ``choose`` picks
with its default settings (accuracy budget, objective, latency runs). Prints the accuracies and sizes per seed, and last
``RESULT text_accuracy value=<median served cdl accuracy> baseline=<TF-IDF + LR> goal=>=1.0``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench._common import machine, result
from cdl.datasets import DatasetSpec, Task, holdout_member
from cdl.ml.core import TrainSplit, fit, hyperparameters
from cdl.ml.models import Family
from cdl_tools.textdata import PACKAGES, doc_paragraphs

DATASET = "docs"
#: cdl models trained (seeds 0..SEEDS-1: the validation part and the training seed); the median counts
SEEDS = int(os.environ.get("CDL_BENCH_TEXT_SEEDS", "5"))


def served_tokenizer() -> object:
    """``hash_tokens`` from the Triton runner, loaded outside Triton."""
    import importlib.util
    import types

    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    path = Path(__file__).resolve().parent.parent / "cdl" / "_triton_runner.py"
    spec = importlib.util.spec_from_file_location("cdl_triton_runner", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.hash_tokens


def main() -> None:
    import torch
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    from services.compressor.compressor import choose
    from services.compressor.settings import CompressorSettings
    from services.compressor.variants import Served, export_onnx, int8_dynamic_variant, measure, served_input

    compressor = CompressorSettings()  # its accuracy budget, objective and latency runs

    print(f"machine: {machine()}")
    pairs = doc_paragraphs()
    texts = np.array([t for t, _ in pairs], dtype=object)
    labels = np.array([PACKAGES.index(p) for _, p in pairs])
    hold = np.array([holdout_member(DATASET, f"doc-{i}", 0.2) for i in range(len(pairs))])
    print(f"{len(pairs)} paragraphs, {int(hold.sum())} in the holdout; classes {', '.join(PACKAGES)}")

    t0 = time.perf_counter()
    grid = GridSearchCV(
        make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": [1.0, 10.0, 100.0]},
        cv=3,
    )
    grid.fit(list(texts[~hold]), labels[~hold])
    baseline = float((grid.predict(list(texts[hold])) == labels[hold]).mean())
    print(
        f"TF-IDF + LR: holdout accuracy {baseline:.4f} (C={grid.best_params_['logisticregression__C']}, "
        f"{time.perf_counter() - t0:.1f}s)"
    )

    spec = DatasetSpec(name=DATASET, task=Task.TEXT, labels=PACKAGES)
    hash_tokens = served_tokenizer()
    train_idx = np.flatnonzero(~hold)
    chosen: list[float] = []
    int8: list[float] = []
    for seed in range(SEEDS):  # the trainer's validation part and its training seed
        order = np.random.default_rng(seed).permutation(len(train_idx))
        n_val = max(1, int(len(order) * 0.1))
        val, tr = train_idx[order[:n_val]], train_idx[order[n_val:]]
        split = TrainSplit(texts[tr], labels[tr], texts[val], labels[val], texts[hold], labels[hold])
        t0 = time.perf_counter()
        fitted = fit(spec, split, hyperparameters(Family.TEXT), seed=seed, device="cpu")
        pre, config = fitted.preprocessor, fitted.config
        took = time.perf_counter() - t0
        served = Served(fitted.module.eval(), config, pre).eval()
        ids_train = served_input(config, pre, texts[hold])
        fp32 = export_onnx(served, ids_train)
        ids = hash_tokens(list(texts[hold]), pre.buckets, pre.ngrams, pre.max_tokens, pre.lowercase, pre.subwords)  # type: ignore[operator]
        assert np.array_equal(ids, ids_train), "the runner tokenizes differently from training"
        with torch.no_grad():
            reference = served(torch.from_numpy(ids)).numpy().argmax(1)
        measured = [
            measure(name, blob, ids, labels[hold], reference, compressor.latency_runs)
            for name, blob in (("fp32", fp32), ("int8-dynamic", int8_dynamic_variant(fp32)))
        ]
        # what the compressor would choose of them, by its own rule and settings
        pick, _ = choose(measured, compressor.accuracy_budget, compressor.objective)
        chosen.append(pick.accuracy)
        int8.append(next(m.accuracy for m in measured if m.name == "int8-dynamic"))
        print(
            f"seed {seed}: trained in {took:.1f}s, {len(fitted.result.history)} epochs; as served: "
            + ", ".join(f"{m.name} {m.accuracy:.4f} ({m.size_bytes / 1e6:.2f} MB)" for m in measured)
            + f"; chosen {pick.name}"
        )
    med_chosen, med_int8 = statistics.median(chosen), statistics.median(int8)
    print(f"median over {SEEDS} seeds: chosen variant {med_chosen:.4f}, int8 {med_int8:.4f}")
    print(result("text_accuracy_int8", med_int8, baseline, op=">=", goal=1.0))
    print(result("text_accuracy", med_chosen, baseline, op=">=", goal=1.0))


if __name__ == "__main__":
    main()
