"""A Python-backend model that runs its ``model.onnx`` with ONNX Runtime, for Triton builds
without the onnxruntime backend (``modrt export-triton --onnx-backend python``; the
``tritonserver`` that the ``nvidia-pytriton`` wheel ships has only the Python backend).

Same inputs, outputs and ``config.pbtxt`` fields as the ``onnxruntime_onnx`` model it
stands in for; requests of one shape are run as one batch. Written as ``<model>/1/model.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count", "1"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(feeds):
            groups.setdefault(tuple(v.shape[1:] for v in f.values()), []).append(i)
        responses = [None] * len(requests)
        for idx in groups.values():
            batch = {n: np.concatenate([feeds[i][n] for i in idx]) if len(idx) > 1 else feeds[idx[0]][n]
                     for n in self.inputs}
            try:
                out = self.session.run(self.outputs, batch)
            except Exception as exc:  # noqa: BLE001 - returned to the caller as its error
                for i in idx:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
                continue
            lo = 0
            for i in idx:
                n = next(iter(feeds[i].values())).shape[0]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(v[lo:lo + n]))
                           for name, v in zip(self.outputs, out, strict=True)]
                responses[i] = pb_utils.InferenceResponse(tensors)
                lo += n
        return responses
