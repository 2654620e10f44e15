"""Triton python-backend model that runs an ONNX file with ONNX Runtime.

The Triton server shipped in the nvidia-pytriton wheel bundles only the python
backend, so locally every repository entry carries this file as ``model.py``
next to ``model.onnx``. Production Triton uses the ``onnxruntime_onnx``
platform with the same ``model.onnx`` instead (see cdl.triton).

This file runs inside Triton's python stub; it imports only numpy,
onnxruntime and triton_python_backend_utils.
"""

# mypy: ignore-errors
# ruff: noqa
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        threads = int(os.environ.get("CDL_ORT_THREADS", "1"))
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])})] + providers
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

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
