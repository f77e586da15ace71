"""Request and response bodies: a JSON header, optionally followed by binary tensor data.

Binary tensor data extension (Triton ``protocol/extension_binary_data.md``, adopted by
KServe): when a body carries binary tensors, the HTTP header
``Inference-Header-Content-Length`` gives the byte length of the JSON part; the tensors
follow it back to back, in the order of the inputs (outputs) that carry
``"parameters": {"binary_data_size": N}``, each little-endian, row-major, no padding.

Everything here raises ``InputError`` (a 400) on a malformed body and never allocates
more than the body already holds: shapes are checked against the byte counts first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from modrt._exceptions import InputError
from modrt.serve.protocol import DTYPES, RequestInput

HEADER = "Inference-Header-Content-Length"
MAX_DEPTH = 100  # JSON nesting deeper than this is refused (Triton's parser limit too)
INT64_MAX = 2**63 - 1


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of a request body; the tail is empty without the header."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise InputError(f"{HEADER} must be an integer, got {header_length[:40]!r}") from None
    if not 0 < n <= len(body):
        raise InputError(f"{HEADER} is {n}, but the request body has {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def parse_json(header: bytes) -> dict[str, Any]:
    """The JSON object of an inference request; depth above ``MAX_DEPTH`` is refused."""
    try:
        obj = orjson.loads(header)  # refuses nesting over 1024 levels itself, without recursing in Python
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise InputError(f"JSON is nested more than {MAX_DEPTH} levels deep") from None
        raise InputError(f"malformed JSON in request body: {exc}") from None
    if not isinstance(obj, dict):
        raise InputError(f"the request body must be a JSON object, got {type(obj).__name__}")
    if header.count(b"[") + header.count(b"{") > MAX_DEPTH:  # fewer brackets cannot nest that deep
        _check_depth(obj)
    return obj


def _check_depth(obj: Any) -> None:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            raise InputError(f"JSON is nested more than {MAX_DEPTH} levels deep")
        children = o.values() if isinstance(o, dict) else o
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))


def element_count(shape: list[int], name: str) -> int:
    """Elements in ``shape``; negative dimensions and int64 overflow are refused."""
    if any(d < 0 for d in shape):
        raise InputError(f"input {name!r}: shape {shape} has a negative dimension")
    n = 1
    for d in shape:
        n *= d
        if n > INT64_MAX:
            raise InputError(f"input {name!r}: shape {shape} has more elements than int64 can count")
    return n


def decode_input(inp: RequestInput, tail: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One request tensor as numpy, from JSON ``data`` or the binary tail at ``offset``.

    Returns the array and the offset of the next binary tensor.
    """
    dtype = np.dtype(DTYPES[inp.datatype])
    count = element_count(inp.shape, inp.name)
    if count * dtype.itemsize > INT64_MAX:
        raise InputError(f"input {inp.name!r}: shape {inp.shape} of {inp.datatype} overflows int64 bytes")
    size = inp.parameters.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise InputError(f"input {inp.name!r} has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InputError(f"input {inp.name!r}: binary_data_size must be a non-negative integer")
        if size != count * dtype.itemsize:
            raise InputError(f"input {inp.name!r}: binary_data_size {size} != {count} elements x "
                             f"{dtype.itemsize} bytes of {inp.datatype} for shape {inp.shape}")
        if offset + size > len(tail):
            raise InputError(f"input {inp.name!r}: binary data needs {size} bytes at offset {offset}, "
                             f"the body has {len(tail) - offset} left")
        arr = np.frombuffer(tail[offset:offset + size], dtype=dtype.newbyteorder("<")).astype(dtype)
        return arr.reshape(inp.shape), offset + size
    if inp.data is None:
        raise InputError(f"input {inp.name!r} has neither 'data' nor binary_data_size")
    return _from_json(inp.data, dtype, inp, count), offset


def _from_json(data: Any, dtype: np.dtype, inp: RequestInput, count: int) -> np.ndarray:
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"input {inp.name!r}: data is not a (regular) array of numbers: {exc}") from None
    if raw.size != count:
        raise InputError(f"input {inp.name!r}: {raw.size} data elements for shape {inp.shape} "
                         f"({count} elements)")
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.size and dtype.kind in "iu" and raw.dtype.kind == "f" and np.isfinite(raw).all() \
            and (raw == np.floor(raw)).all() and np.abs(raw).max() >= 2.0**63:
        # JSON parsers read integers beyond 64 bits as floats: say what is wrong with them
        raise InputError(f"input {inp.name!r}: values outside the range of {inp.datatype}")
    if raw.size and raw.dtype.kind not in allowed:
        raise InputError(f"input {inp.name!r}: data of kind {raw.dtype} is not {inp.datatype}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise InputError(f"input {inp.name!r}: values outside the range of {inp.datatype}")
    return raw.astype(dtype).reshape(inp.shape)


def encode_response(response: dict[str, Any], binary: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer response: JSON, then the binary outputs in order."""
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"content-type": "application/json"}
    little = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for a in binary]
    body = b"".join([header, *(a.tobytes() for a in little)])
    return body, {"content-type": "application/octet-stream", HEADER: str(len(header))}


def tensor_json(arr: np.ndarray) -> np.ndarray:
    """A tensor's ``data`` in JSON: flattened row-major, as the spec allows. (orjson writes
    the array itself: float32 in its shortest round-trip form, ~10 bytes an element where a
    Python float list takes ~19, and ~3x faster.)"""
    return np.ascontiguousarray(arr).ravel()


# Upper bounds of one element's bytes in a JSON response ("-3.4028235e+38," is 15).
JSON_BYTES = {"float32": 16, "int64": 21, "int32": 12, "float64": 25, "bool": 6}


