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
    req = Request({"tokens": tok}, plane.choose_outputs([("next_token", None), ("modules", True)], False), id="r1")

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
    plane = DataPlane(lm_model, "lm", BatchConfig(), max_tokens=100, max_response_bytes=2**20)
    H = lm_model.zero_state(1).shape[1]
    ok = [("tokens", "INT64", [2, 3]), ("h", "FP32", [2, 1, H])]
    assert plane.check_header(ok, None, False) == [(t.name, False) for t in plane.outputs]
    for inputs, match in [([("tokens", "INT64", [1, 3]), ("x", "FP32", [1])], r"model 'lm': this model takes 'tokens'"),
                          ([("h", "FP32", [1, 1, H])], r"takes 'tokens' .*'h' .*optional\); got \['h'\]"),
                          ([("tokens", "INT64", [1, 3])] * 2, "got \\['tokens', 'tokens'\\]"),
                          ([("tokens", "FP32", [1, 3])], "datatype FP32"),
                          ([("tokens", "INT64", [3])], "must have shape"),
                          ([("tokens", "INT64", [1, -3])], "negative dimension"),
                          ([("tokens", "INT64", [2, 3]), ("h", "FP32", [1, 1, H])], "batch size 1, 'tokens' has 2")]:
        with pytest.raises(InputError, match=match):
            plane.check_header(inputs, None, False)
    with pytest.raises(InputError, match="requested twice"):
        plane.choose_outputs([("logits", None), ("logits", True)], False)
    with pytest.raises(InputError, match="unknown output 'h_state'"):
        plane.choose_outputs([("h_state", None)], False)
    assert plane.choose_outputs(None, True) == [(t.name, True) for t in plane.outputs]


def test_work_and_answer_limits_are_checked_from_the_header(lm_model):
    """--max-tokens: 413 before decoding; --max-response-bytes: 400 naming the way out,
    estimated from the shapes (JSON ~16 bytes a float, binary 4)."""
    from modrt.serve.errors import PayloadTooLargeError

    plane = DataPlane(lm_model, "lm", BatchConfig(), max_tokens=100, max_response_bytes=40 * 50 * 4 + 2000)
    assert plane.batch_config.max_cost == 100  # a batch is capped as a request is
    with pytest.raises(PayloadTooLargeError, match=r"shape \[1, 101\] asks for 101 positions; .* at most 100"):
        plane.check_header([("tokens", "INT64", [1, 101])], [("next_token", None)], False)
    with pytest.raises(PayloadTooLargeError, match="asks for 102 positions"):
        plane.check_header([("tokens", "INT64", [2, 51])], [("next_token", None)], False)
    tok = [("tokens", "INT64", [1, 50])]  # 50 positions x V=40 logits
    assert plane.check_header(tok, [("logits", True)], False) == [("logits", True)]  # 8000 bytes binary
    with pytest.raises(InputError, match=r"up to 0\.0 MiB \(logits\).*only next_token.*binary data"):
        plane.check_header(tok, [("logits", False)], False)  # ~32000 bytes as JSON
    assert plane.check_header(tok, [("next_token", False)], False) == [("next_token", False)]
