"""The transport-neutral path: a decoded Request through DataPlane.run, no HTTP body."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modrt._exceptions import InputError
from modrt.serve import codec
from modrt.serve.batcher import BatchConfig
from modrt.serve.dataplane import DataPlane
from modrt.serve.request import Request


def test_run_takes_a_neutral_request_and_equals_the_runtime(lm_model):
    plane = DataPlane(lm_model, "lm", BatchConfig())
    tok = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    req = Request(tok, plane.choose_outputs([("next_token", None), ("modules", True)], False), id="r1")

    async def main():
        await plane.start()
        try:
            return await plane.run(req)
        finally:
            await plane.stop()

    res = asyncio.run(main())
    want = lm_model.run(tokens=tok)
    assert res.id == "r1" and [(n, d, b) for n, d, _, b in res.outputs] == [
        ("next_token", "INT64", False), ("modules", "INT32", True)]
    np.testing.assert_array_equal(res.outputs[0][2], want["next_token"])
    np.testing.assert_array_equal(res.outputs[1][2], want["modules"])
    body, headers = codec.encode("lm", "1", res)  # the HTTP front-end's encoding of it
    assert headers["content-type"] == "application/octet-stream"
    assert body.endswith(want["modules"].astype("<i4").tobytes())


def test_front_end_checks_refuse_before_decoding(lm_model):
    plane = DataPlane(lm_model, "lm", BatchConfig())
    with pytest.raises(InputError, match="takes exactly one input"):
        plane.check_input(["tokens", "h"], "INT64", [1, 3])
    with pytest.raises(InputError, match="datatype FP32"):
        plane.check_input(["tokens"], "FP32", [1, 3])
    with pytest.raises(InputError, match="must have shape"):
        plane.check_input(["tokens"], "INT64", [3])
    with pytest.raises(InputError, match="requested twice"):
        plane.choose_outputs([("logits", None), ("logits", True)], False)
    with pytest.raises(InputError, match="unknown output 'h_last'"):
        plane.choose_outputs([("h_last", None)], False)
    assert plane.choose_outputs(None, True) == [(t.name, True) for t in plane.outputs]
