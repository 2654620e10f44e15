"""Triton python-backend model that runs an ONNX file with ONNX Runtime.

The Triton server shipped in the nvidia-pytriton wheel bundles only the python
backend, so locally every repository entry carries this file as ``model.py``
next to ``model.onnx``. Production Triton uses the ``onnxruntime_onnx``
platform with the same ``model.onnx`` instead (see cdl.triton).

A text model's version directory also holds ``tokenizer.json`` (its
``cdl.ml.preprocess.Preprocessor``, kind ``hash_tokens``): the entry's input is
then a BYTES tensor of texts, ``[batch, 1]``, which this runner turns into the
hashed token ids the ONNX file takes (``hash_tokens`` below, the same function as
``Preprocessor.transform``; tests/unit/test_text_serving.py holds them equal).
The tokenizer is per version (the tuner may change n-grams), so a canary's
requests are tokenized by the version that answers them.

This file runs inside Triton's python stub; it imports only numpy,
onnxruntime and triton_python_backend_utils.
"""

# mypy: ignore-errors
# ruff: noqa
import json
import os
import re
import zlib

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


TOKEN_RE = re.compile(r"[\w']+")


def hash_tokens(texts, buckets, ngrams, max_tokens, lowercase, subwords=0):
    """Texts (str or UTF-8 bytes) -> int64 ids ``[len(texts), max_tokens]``, 0 = padding
    (cdl.ml.preprocess.Preprocessor's hashing, which this must equal: a test holds them)."""
    out = np.zeros((len(texts), max_tokens), dtype=np.int64)
    for i, text in enumerate(texts):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        text = str(text)
        tokens = TOKEN_RE.findall(text.lower() if lowercase else text)
        grams = list(tokens)
        for n in range(2, ngrams + 1):
            grams += [" ".join(tokens[j : j + n]) for j in range(len(tokens) - n + 1)]
        if subwords >= 3:
            for token in tokens:
                w = "<" + token + ">"
                for n in range(3, subwords + 1):
                    grams += ["#" + w[j : j + n] for j in range(len(w) - n + 1)]
                if len(grams) >= max_tokens:
                    break
        ids = [1 + zlib.crc32(g.encode()) % (buckets - 1) for g in grams[:max_tokens]]
        out[i, : len(ids)] = ids
    return out


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        # the entry's intra_op_thread_count (cdl.triton.render_config), as the onnxruntime backend reads it
        threads = int(config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value", "1"))
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])})] + providers
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.tokenizer = None
        tok = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        if os.path.exists(tok):
            with open(tok) as f:
                t = json.load(f)
            self.tokenizer = (
                int(t["buckets"]),
                int(t["ngrams"]),
                int(t["max_tokens"]),
                bool(t["lowercase"]),
                int(t.get("subwords", 0)),
            )
            self.onnx_input = self.session.get_inputs()[0].name

    def execute(self, requests):
        # Dynamic batching hands over several requests: run them as one batch.
        arrays = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            first = None
            for name in self.inputs:
                arr = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                arrays[name].append(arr)
                first = arr if first is None else first
            sizes.append(first.shape[0])
        feed = {name: np.concatenate(parts, axis=0) for name, parts in arrays.items()}
        if self.tokenizer is not None:  # texts [batch, 1] -> token ids [batch, max_tokens]
            texts = feed[self.inputs[0]].reshape(len(feed[self.inputs[0]]), -1)[:, 0]
            feed = {self.onnx_input: hash_tokens(list(texts), *self.tokenizer)}
        results = self.session.run(self.outputs, feed)
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, res[start : start + size].astype(self.out_dtypes[name], copy=False))
                for name, res in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
