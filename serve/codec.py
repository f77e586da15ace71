"""The v2 HTTP/REST bodies <-> the transport-neutral ``Request`` / ``Response``.

    decode(plane, body, header_length) -> Request    JSON header (+ binary tensor data)
    encode(model, version, response) -> (body, headers)

Decoding checks everything about the request header (names, datatypes, shapes, the outputs,
the size of the work and of the answer; through ``plane.check_header``, which knows the
model) before it touches the tensor data, so a bad request allocates nothing. The binary layout itself is
``binary.py``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError

from modrt._exceptions import InputError
from modrt.serve import binary
from modrt.serve.protocol import InferenceRequest
from modrt.serve.request import Request, Response


def decode(plane, body: bytes, header_length: str | None = None) -> Request:
    """A validated request: its inputs decoded, its outputs chosen. Raises InputError (413:
    PayloadTooLargeError for work over the server's limit)."""
    header, tail = binary.split_body(body, header_length)
    obj = binary.parse_json(header)
    try:
        req = InferenceRequest.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"invalid inference request: {_pydantic_message(exc)}") from None
    outputs = plane.check_header([(i.name, i.datatype, i.shape) for i in req.inputs], *_requested(req))
    feeds, used = {}, 0  # the header is sound: now the data
    for inp in req.inputs:
        feeds[inp.name], used = binary.decode_input(inp, tail, used)  # binary tensors back to back, in order
    if used != len(tail):
        raise InputError(f"{len(tail) - used} bytes of binary data after the tensors were not used")
    plane.check_values(feeds)
    return Request(feeds, outputs, req.id)


def _requested(req: InferenceRequest) -> tuple[list[tuple[str, bool | None]] | None, bool]:
    """([(output name, binary? or None: the default)] or None: all, the default)."""
    default = req.parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InputError("parameter binary_data_output must be a boolean")
    if req.outputs is None:
        return None, default
    out = []
    for o in req.outputs:
        b = o.parameters.get("binary_data")
        if b is not None and not isinstance(b, bool):
            raise InputError(f"output {o.name!r}: parameter binary_data must be a boolean")
        if "classification" in o.parameters:
            raise InputError("the classification extension is not supported")
        out.append((o.name, b))
    return out, default


def encode(model: str, version: str, response: Response) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the infer response: JSON outputs, binary ones after the header."""
    payload: list[np.ndarray] = []
    outputs: list[dict[str, Any]] = []
    for name, datatype, arr, as_binary in response.outputs:
        o: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if as_binary:
            o["parameters"] = {"binary_data_size": arr.nbytes}
            payload.append(arr)
        else:
            o["data"] = binary.tensor_json(arr)
        outputs.append(o)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if response.id is not None:
        doc["id"] = response.id
    return binary.encode_response(doc, payload)


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


__all__ = ["decode", "encode"]
