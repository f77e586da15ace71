"""Malformed requests (in the spirit of Triton's HTTP QA tests): each gets a 4xx JSON
``{"error": ...}``, and the server keeps answering."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from modrt.serve.batcher import BatchConfig
from modrt.serve.binary import HEADER
from modrt.serve.dataplane import DataPlane

from .conftest import ServerThread


def tok(shape=(1, 3), data=(1, 2, 3), datatype="INT64", **extra) -> dict:
    return {"name": "tokens", "datatype": datatype, "shape": list(shape), "data": list(data), **extra}


def js(obj) -> bytes:
    return json.dumps(obj).encode()


GOOD = {"inputs": [tok()]}
RAW = np.arange(3, dtype="<i8").tobytes()
BIN_HEAD = js({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3],
                            "parameters": {"binary_data_size": 24}}]})

CASES = {
    "bad json": (b"{not json", {}),
    "json array": (b"[1, 2]", {}),
    "empty body": (b"", {}),
    "no inputs": (js({}), {}),
    "unknown field": (js({**GOOD, "bogus": 1}), {}),
    "unknown input": (js({"inputs": [{**tok(), "name": "x"}]}), {}),
    "two inputs": (js({"inputs": [tok(), tok()]}), {}),
    "unknown datatype": (js({"inputs": [tok(datatype="FP128")]}), {}),
    "wrong datatype": (js({"inputs": [tok(datatype="FP32")]}), {}),
    "float data for INT64": (js({"inputs": [tok(data=(1.5, 2, 3))]}), {}),
    "string data": (js({"inputs": [tok(data=("a", "b", "c"))]}), {}),
    "wrong rank": (js({"inputs": [tok(shape=(3,))]}), {}),
    "count mismatch": (js({"inputs": [tok(shape=(1, 4))]}), {}),
    "negative dimension": (js({"inputs": [tok(shape=(-1, 3))]}), {}),
    "zero dimension": (js({"inputs": [tok(shape=(0, 3), data=())]}), {}),
    "byte size overflows": (js({"inputs": [tok(shape=(2**40, 2**40))]}), {}),
    "ragged data": (js({"inputs": [tok(shape=(2, 2), data=([1, 2], [3]))]}), {}),
    "token id too large": (js({"inputs": [tok(data=(1, 2, 40))]}), {}),
    "token id negative": (js({"inputs": [tok(data=(1, -2, 3))]}), {}),
    "int64 overflow": (js({"inputs": [tok(data=(1, 2, 2**70))]}), {}),
    "missing data": (js({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3]}]}), {}),
    "unknown output": (js({**GOOD, "outputs": [{"name": "h_state"}]}), {}),
    "duplicate outputs": (js({**GOOD, "outputs": [{"name": "logits"}, {"name": "logits"}]}), {}),
    "non-bool binary_data": (js({**GOOD, "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}),
                             {}),
    "nested parameters": (js({**GOOD, "parameters": {"a": {"b": 1}}}), {}),
    "nested 101 deep": (b'{"inputs": [], "x": ' + b"[" * 101 + b"]" * 101 + b"}", {}),
    "nested 100000 deep": (b"[" * 100000 + b"]" * 100000, {}),
    "header length beyond body": (BIN_HEAD + RAW, {HEADER: str(len(BIN_HEAD) + 1000)}),
    "header length beyond INT_MAX": (BIN_HEAD + RAW, {HEADER: str(2**31 + 5)}),
    "header length not a number": (BIN_HEAD + RAW, {HEADER: "abc"}),
    "header length zero": (BIN_HEAD + RAW, {HEADER: "0"}),
    "binary data short": (BIN_HEAD + RAW[:-8], {HEADER: str(len(BIN_HEAD))}),
    "binary data left over": (BIN_HEAD + RAW + b"xx", {HEADER: str(len(BIN_HEAD))}),
    "binary size wrong for shape": (BIN_HEAD.replace(b"24", b"16") + RAW[:16], {HEADER: str(len(BIN_HEAD))}),
}


@pytest.mark.parametrize("body,headers", list(CASES.values()), ids=list(CASES))
def test_malformed_request_gets_400_and_server_lives(client, body, headers):
    r = client.post("/v2/models/lm/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert client.get("/v2/health/live").status_code == 200


def test_good_binary_request_for_contrast(client):
    r = client.post("/v2/models/lm/infer", content=BIN_HEAD + RAW, headers={HEADER: str(len(BIN_HEAD))})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path", [
    ("POST", "/v2/models/nope/infer"), ("GET", "/v2/models/nope"), ("GET", "/v2/models/nope/ready"),
    ("GET", "/v2/models/nope/config"), ("GET", "/v2/models/nope/stats"), ("GET", "/v2/models/lm/versions/7"),
    ("GET", "/v3/anything"), ("GET", "/"),
])
def test_unknown_models_and_routes_are_404(client, method, path):
    r = client.request(method, path, json=GOOD)
    assert r.status_code == 404 and "error" in r.json(), r.text


def test_bad_request_does_not_disturb_its_batch(client, lm_model):
    """Good and bad requests sent together: the good ones all succeed with right answers."""
    import concurrent.futures as cf

    x = np.array([[1, 2, 3]], np.int64)
    good = js({"inputs": [tok(data=x.ravel().tolist())], "outputs": [{"name": "next_token"}]})
    bad = js({"inputs": [tok(data=(1, 2, 99))]})
    with cf.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda b: client.post("/v2/models/lm/infer", content=b), [good, bad] * 8))
    want = lm_model.run(tokens=x)["next_token"].ravel().tolist()
    assert [r.status_code for r in rs] == [200, 400] * 8
    assert all(r.json()["outputs"][0]["data"] == want for r in rs[::2])


def test_over_size_limit_is_413(lm_model):
    with ServerThread(DataPlane(lm_model, "lm", BatchConfig()), max_request_bytes=1000) as s, \
            httpx.Client(base_url=s.url, timeout=20) as c:
        big = js({"inputs": [tok(shape=(1, 500), data=[1] * 500)]})
        r = c.post("/v2/models/lm/infer", content=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks():  # no Content-Length: the limit applies while streaming
            yield big[:600]
            yield big[600:]

        r = c.post("/v2/models/lm/infer", content=chunks())
        assert r.status_code == 413
        assert c.post("/v2/models/lm/infer", json=GOOD).status_code == 200


def test_not_ready_is_503(lm_model):
    plane = DataPlane(lm_model, "lm", BatchConfig())
    with ServerThread(plane) as s, httpx.Client(base_url=s.url, timeout=20) as c:
        plane.ready = False
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/lm/ready").status_code == 503
        r = c.post("/v2/models/lm/infer", json=GOOD)
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert c.get("/v2/health/live").status_code == 200
        plane.ready = True
        assert c.post("/v2/models/lm/infer", json=GOOD).status_code == 200


def test_request_after_the_batcher_stopped_is_503_not_500(lm_model):
    """The shutdown race: a request that passed the readiness check while the batcher stops."""
    import asyncio

    from modrt.serve.errors import NotReadyError, status_of

    plane = DataPlane(lm_model, "lm", BatchConfig())

    async def main():
        await plane.start()
        await plane.batcher.stop()  # readiness still says True: the window of the race
        assert plane.ready
        with pytest.raises(NotReadyError) as e:
            await plane.infer("lm", js(GOOD))
        return e.value

    assert status_of(asyncio.run(main())) == 503


@pytest.mark.parametrize("case,needle", [
    ("int64 overflow", "values outside the range of INT64"),
    ("float data for INT64", "data of kind float64 is not INT64"),
])
def test_malformed_values_are_named_for_what_they_are(client, case, needle):
    body, headers = CASES[case]
    r = client.post("/v2/models/lm/infer", content=body, headers=headers)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_string_shape_dimensions_are_refused(client):
    """Strict types, as Triton: "shape": [1, "3"] is not a shape."""
    r = client.post("/v2/models/lm/infer", content=js({"inputs": [
        {"name": "tokens", "datatype": "INT64", "shape": [1, "3"], "data": [1, 2, 3]}]}))
    assert r.status_code == 400 and "inputs.0.shape.1" in r.json()["error"], r.text
