"""KServe v2 / Open Inference Protocol wire shapes, as pydantic models.

Each model's docstring quotes the JSON shape the spec gives for it (kserve's
``docs/predict-api/v2/required_api.md`` and Triton's protocol extensions). Handlers build
these and FastAPI publishes them in the OpenAPI document; the infer route reads its body
by hand (JSON header + binary tensor data), so its request model is used for validation
of the parsed header and for the OpenAPI schema only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modrt._exceptions import InputError

# A parameter value: "$parameters": {"name": bool | number | string}.
Scalar = bool | int | float | str


class DtypeTable(dict):
    """Protocol datatype name -> numpy dtype; an unknown name raises InputError (a 400)."""

    def __missing__(self, key: str):
        raise InputError(f"datatype {key!r} is not supported; supported: {sorted(self)}")

    def name_of(self, dtype: np.dtype) -> str:
        for name, dt in self.items():
            if np.dtype(dt) == np.dtype(dtype):
                return name
        raise InputError(f"numpy dtype {np.dtype(dtype)} has no protocol datatype")


# The spec's tensor data types (BYTES, a length-prefixed string type, is not served here).
DTYPES = DtypeTable({
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
})


class ErrorResponse(BaseModel):
    """``{"error": $string}``: the body of every non-200 answer (tritonclient reads ``error``)."""

    error: str


class ServerMetadata(BaseModel):
    """``{"name": $string, "version": $string, "extensions": [$string, ...]}``"""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    """``{"name": $string, "datatype": $string, "shape": [$number, ...]}``; -1: any size."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``{"name", "versions": [$string], "platform", "inputs": [$metadata_tensor],
    "outputs": [$metadata_tensor]}``"""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    """``{"name": $string, "shape": [$number], "datatype": $string, "parameters": $parameters,
    "data": $tensor_data}``; with ``parameters.binary_data_size`` the data follows the JSON
    header instead (binary tensor data extension)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "shape": [1, "3"] is refused, as Triton does

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    """``{"name": $string, "parameters": $parameters}``; ``parameters.binary_data: true`` asks
    for the tensor as binary data after the JSON header."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Scalar] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """``{"id": $string, "parameters": $parameters, "inputs": [$request_input],
    "outputs": [$request_output]}``; ``parameters.binary_data_output: true`` makes every
    output binary unless it says otherwise."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Scalar] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """``{"name", "shape", "datatype", "parameters", "data"}``; a binary output has
    ``parameters.binary_data_size`` and no ``data``."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Scalar] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """``{"model_name", "model_version", "id", "parameters", "outputs": [$response_output]}``"""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Scalar] | None = None
    outputs: list[ResponseOutput]


class StatDuration(BaseModel):
    """``{"count": $number, "ns": $number}`` (Triton statistics extension)."""

    count: int = 0
    ns: int = 0


class InferStats(BaseModel):
    """``{"success", "fail", "queue", "compute_input", "compute_infer", "compute_output"}``"""

    success: StatDuration
    fail: StatDuration
    queue: StatDuration
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class BatchStats(BaseModel):
    """``{"batch_size": $number, "compute_input", "compute_infer", "compute_output"}``"""

    batch_size: int
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class ModelStats(BaseModel):
    """``{"name", "version", "last_inference", "inference_count", "execution_count",
    "inference_stats": $inference_stats, "batch_stats": [$batch_stats]}``"""

    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStats
    batch_stats: list[BatchStats]


class StatsResponse(BaseModel):
    """``{"model_stats": [$model_stat]}``"""

    model_stats: list[ModelStats]


class ModelConfig(BaseModel):
    """A Triton-style model configuration (the parts a client reads): name, platform,
    max_batch_size, input/output, dynamic_batching."""

    name: str
    platform: str
    max_batch_size: int
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    dynamic_batching: dict[str, Any]
    parameters: dict[str, Any]


__all__ = [
    "DTYPES", "BatchStats", "DtypeTable", "ErrorResponse", "InferStats", "InferenceRequest",
    "InferenceResponse", "ModelConfig", "ModelMetadata", "ModelStats", "RequestInput", "RequestOutput",
    "ResponseOutput", "ServerMetadata", "StatDuration", "StatsResponse", "TensorMetadata",
]
