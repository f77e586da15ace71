"""A transport-neutral inference request and response: what ``DataPlane.run`` takes and
gives, whatever carried it (the HTTP/REST JSON and binary bodies decode to it in
``codec.py``; another protocol front-end decodes to the same).

A request holds its input tensors already decoded and validated against the model's
signature (the front-end checks the header through ``DataPlane.check_header`` before it
decodes any data: names, datatypes, shapes, and the size of the work and of the answer),
and the outputs asked for, each with whether the client wants it as binary data (a hint the
HTTP front-end honours; others may ignore it).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Request(NamedTuple):
    inputs: dict[str, np.ndarray]  # the model's inputs (an optional one may be absent), decoded and checked
    outputs: list[tuple[str, bool]]  # (output name, binary?) in the order to answer them
    id: str | None = None


class Response(NamedTuple):
    outputs: list[tuple[str, str, np.ndarray, bool]]  # (name, protocol datatype, array, binary?)
    id: str | None = None


__all__ = ["Request", "Response"]
