"""A real uvicorn server, real clients (tritonclient.http, httpx, a raw socket): outputs
equal the in-process runtime's."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

import modrt
from modrt import synthetic_lm
from modrt.serve.batcher import BatchConfig
from modrt.serve.binary import HEADER
from modrt.serve.dataplane import DataPlane

VOCAB = 40


def tokens(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t), dtype=np.int64)


def triton(server) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=20, network_timeout=20)


def test_health_and_metadata_with_tritonclient(lm_server):
    c = triton(lm_server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("lm")
    assert not c.is_model_ready("nope")
    meta = c.get_model_metadata("lm")
    assert meta["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "h", "datatype": "FP32", "shape": [-1, 1, 12]}]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, -1, VOCAB]},
        {"name": "next_token", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "modules", "datatype": "INT32", "shape": [-1, -1, 1, 2]},
        {"name": "h_last", "datatype": "FP32", "shape": [-1, 1, 12]},
    ]
    cfg = c.get_model_config("lm")
    assert cfg["input"][1] == {"name": "h", "data_type": "TYPE_FP32", "dims": [1, 12], "optional": True}
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    assert c.get_model_config("lm")["max_batch_size"] == 16


def test_versioned_routes_with_tritonclient(lm_server):
    """The spec's per-version routes: tritonclient's model_version argument works."""
    c = triton(lm_server)
    assert c.is_model_ready("lm", "1") and not c.is_model_ready("lm", "2")
    assert c.get_model_metadata("lm", "1")["versions"] == ["1"]
    r = httpx.get(f"{lm_server.url}/v2/models/lm/versions/2/ready")
    assert r.status_code == 404 and "version '2'" in r.json()["error"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_equals_runtime(lm_server, lm_model, binary):
    x = tokens(3, 7, seed=1)
    inp = tc.InferInput("tokens", list(x.shape), "INT64")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "next_token", "modules")]
    res = triton(lm_server).infer("lm", [inp], outputs=outs, request_id="req-7")
    ref = lm_model.run(tokens=x)
    assert res.get_response()["id"] == "req-7"
    np.testing.assert_allclose(res.as_numpy("logits"), ref["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("next_token"), ref["next_token"])
    np.testing.assert_array_equal(res.as_numpy("modules"), ref["modules"])
    assert res.as_numpy("modules").dtype == np.int32


def test_tritonclient_all_outputs_binary_by_default(lm_server, lm_model):
    x = tokens(1, 4, seed=2)
    inp = tc.InferInput("tokens", [1, 4], "INT64")
    inp.set_data_from_numpy(x)
    res = triton(lm_server).infer("lm", [inp])  # no outputs named: binary_data_output=true
    assert {o["name"] for o in res.get_response()["outputs"]} == {"logits", "next_token", "modules", "h_last"}
    np.testing.assert_array_equal(res.as_numpy("next_token"), lm_model.run(tokens=x)["next_token"])


def test_tritonclient_sees_errors(lm_server):
    inp = tc.InferInput("tokens", [1, 2], "INT64")
    inp.set_data_from_numpy(np.array([[1, VOCAB]], np.int64))
    with pytest.raises(InferenceServerException, match=r"token ids must be in \[0, 40\)") as e:
        triton(lm_server).infer("lm", [inp])
    assert e.value.status() == "400"


def test_tritonclient_statistics(lm_server):
    c = triton(lm_server)
    inp = tc.InferInput("tokens", [2, 3], "INT64")
    inp.set_data_from_numpy(tokens(2, 3))
    c.infer("lm", [inp])
    stats = c.get_inference_statistics("lm")["model_stats"][0]
    assert stats["name"] == "lm" and stats["inference_count"] >= 2 and stats["execution_count"] >= 1
    s = stats["inference_stats"]
    assert s["success"]["count"] >= 1 and s["queue"]["ns"] > 0 and s["compute_infer"]["ns"] > 0
    assert stats["batch_stats"] and all(b["batch_size"] >= 1 for b in stats["batch_stats"])


def test_httpx_json_and_binary_response(client, lm_model):
    x = tokens(2, 5, seed=3)
    body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [2, 5], "data": x.tolist()}],
            "outputs": [{"name": "next_token"}, {"name": "logits", "parameters": {"binary_data": True}}]}
    r = client.post("/v2/models/lm/infer", json=body)
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER])
    head = json.loads(r.content[:n])
    ref = lm_model.run(tokens=x)
    nt, lg = head["outputs"]
    assert nt["data"] == ref["next_token"].ravel().tolist()
    assert lg["parameters"]["binary_data_size"] == ref["logits"].nbytes
    got = np.frombuffer(r.content[n:], "<f4").reshape(lg["shape"])
    np.testing.assert_allclose(got, ref["logits"], rtol=1e-5, atol=1e-6)


def test_binary_request_over_raw_socket(lm_server, lm_model):
    x = tokens(1, 6, seed=4)
    head = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 6],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "next_token"}]}).encode()
    body = head + x.astype("<i8").tobytes()
    req = (f"POST /v2/models/lm/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
           f"{HEADER}: {len(head)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", lm_server.port), timeout=20) as s:
        s.sendall(req)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status, _, payload = raw.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), raw[:300]
    out = json.loads(payload)["outputs"][0]
    assert out["data"] == lm_model.run(tokens=x)["next_token"].ravel().tolist()


def test_concurrent_mixed_lengths_equal_alone(lm_server, lm_model):
    """Dynamic batching merges concurrent requests; each answer equals the request run alone."""
    shapes = [(1, 3), (2, 5), (1, 3), (3, 5), (1, 8), (2, 3), (1, 5), (4, 8)] * 3
    xs = [tokens(b, t, seed=i) for i, (b, t) in enumerate(shapes)]
    c = triton(lm_server)
    before = c.get_inference_statistics("lm")["model_stats"][0]["execution_count"]

    def one(x):
        inp = tc.InferInput("tokens", list(x.shape), "INT64")
        inp.set_data_from_numpy(x)
        with triton(lm_server) as cl:
            return cl.infer("lm", [inp])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, xs))
    for x, res in zip(xs, results, strict=True):
        ref = lm_model.run(tokens=x)
        np.testing.assert_allclose(res.as_numpy("logits"), ref["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res.as_numpy("modules"), ref["modules"])
    after = c.get_inference_statistics("lm")["model_stats"][0]["execution_count"]
    assert after - before <= len(xs)


def test_feedforward_server(ff_server, ff_model):
    c = triton(ff_server)
    meta = c.get_model_metadata("synthetic")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["y", "modules"]
    assert meta["outputs"][1]["shape"] == [-1, 1, 1]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    for binary in (False, True):
        inp = tc.InferInput("x", [5, 8], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = c.infer("synthetic", [inp], outputs=[tc.InferRequestedOutput("y", binary_data=binary),
                                                   tc.InferRequestedOutput("modules", binary_data=binary)])
        ref = ff_model.run(x=x)
        np.testing.assert_allclose(res.as_numpy("y"), ref["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res.as_numpy("modules"), ref["modules"])


def test_metrics_count_requests_batches_and_routing(client):
    x = tokens(1, 4)
    client.post("/v2/models/lm/infer", json={"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 4],
                                                          "data": x.ravel().tolist()}]})
    client.post("/v2/models/lm/infer", content=b"{")
    text = client.get("/metrics").text
    version = client.get("/v2/models/lm/config").json()["parameters"]["bundle_version"]
    assert len(version) == 12
    assert f'modrt_requests_total{{model="lm",version="{version}"}}' in text
    assert 'modrt_request_failures_total{code="400",model="lm"}' in text
    assert "modrt_batch_size_bucket" in text and "modrt_request_duration_seconds_bucket" in text
    sel = [line for line in text.splitlines() if line.startswith("modrt_module_selections_total{")]
    assert sel and all('layer="layer0"' in line and f'version="{version}"' in line for line in sel)


def test_openapi_describes_the_routes(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for p in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{name}", "/v2/models/{name}/ready",
              "/v2/models/{name}/config", "/v2/models/{name}/infer", "/v2/models/{name}/stats", "/metrics"):
        assert p in paths, p
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InferenceRequest")
    assert "InferenceRequest" in doc["components"]["schemas"] and "RequestInput" in doc["components"]["schemas"]
    assert {"200", "400", "404", "413", "503"} <= set(infer["responses"])


def test_topk_gate_bundle_serves(tmp_path, server_thread):
    """A noisy top-k bundle (selection "topk", combine "gate") through a live server: the
    routing decisions and logits equal the runtime's, and the runtime equals the dense graph."""
    model = modrt.load(synthetic_lm.build(tmp_path / "topk", vocab=VOCAB, modules=6, k=2, embedding=8,
                                          hidden=12, combine="gate", selection="topk", seed=2),
                       provider="cpu", threads=1)
    x = tokens(3, 7, seed=5)
    ref, dense = model.run(tokens=x), model.run_dense(tokens=x)
    np.testing.assert_array_equal(ref["modules"], dense["modules"])
    with server_thread(DataPlane(model, "topk", BatchConfig(max_batch=8, max_queue_delay_us=1000))) as s:
        c = triton(s)
        assert c.is_model_ready("topk")
        inp = tc.InferInput("tokens", [3, 7], "INT64")
        inp.set_data_from_numpy(x)
        res = c.infer("topk", [inp], outputs=[tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("modules")])
        np.testing.assert_array_equal(res.as_numpy("modules"), ref["modules"])
        assert res.as_numpy("modules").shape == (3, 7, 1, 2)
        np.testing.assert_allclose(res.as_numpy("logits"), ref["logits"], rtol=1e-5, atol=1e-6)


def test_a_client_continues_a_token_stream_with_h_and_h_last(lm_server, lm_model):
    """Two requests, the second sending the first's h_last as h (binary and JSON), answer
    what one request for all the tokens answers."""
    x = tokens(2, 10, seed=5)
    whole = lm_model.run(tokens=x)
    c = triton(lm_server)

    def infer(toks, h=None, binary=True):
        inp = [tc.InferInput("tokens", list(toks.shape), "INT64")]
        inp[0].set_data_from_numpy(toks, binary_data=binary)
        if h is not None:
            inp.append(tc.InferInput("h", list(h.shape), "FP32"))
            inp[1].set_data_from_numpy(h, binary_data=binary)
        outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "h_last")]
        return c.infer("lm", inp, outputs=outs)

    for binary in (True, False):
        a = infer(x[:, :6], binary=binary)
        h = a.as_numpy("h_last")
        assert h.shape == (2, 1, 12) and h.dtype == np.float32
        b = infer(x[:, 6:], h, binary=binary)
        np.testing.assert_allclose(np.concatenate([a.as_numpy("logits"), b.as_numpy("logits")], 1), whole["logits"],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.as_numpy("h_last")[:, 0], whole["h_last"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="'h' has batch size 1, 'tokens' has 2"):
        infer(x[:, :6], np.zeros((1, 1, 12), np.float32))


def test_long_requests_are_refused_before_they_run_and_next_token_alone_needs_no_logits(lm_model, server_thread):
    plane = DataPlane(lm_model, "lm", BatchConfig(max_batch=4, max_queue_delay_us=0), max_tokens=3000,
                      max_response_bytes=2**20)
    with server_thread(plane) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        def post(t: int, outputs=None):
            body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, t], "data": [1] * t}]}
            if outputs is not None:
                body["outputs"] = [{"name": n} for n in outputs]
            return c.post("/v2/models/lm/infer", json=body)

        r = post(3001, ["next_token"])
        assert r.status_code == 413 and "3001 positions" in r.json()["error"] and "--max-tokens" in r.json()["error"]
        r = post(3000)  # every output as JSON: logits 3000 x 40 floats, ~1.9 MiB
        assert r.status_code == 400 and "--max-response-bytes" in r.json()["error"]
        r = post(3000, ["next_token"])
        assert r.status_code == 200, r.text
        got = r.json()["outputs"]
        assert [o["name"] for o in got] == ["next_token"] and got[0]["shape"] == [1, 3000]
        want = lm_model.run(tokens=np.ones((1, 3000), np.int64))["next_token"]
        np.testing.assert_array_equal(np.array(got[0]["data"]).reshape(1, 3000), want)
        assert s.plane.stats.response().model_stats[0].inference_stats.fail.count == 2


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compression_both_ways(lm_server, lm_model, algorithm):
    x = tokens(2, 5, seed=3)
    inp = tc.InferInput("tokens", list(x.shape), "INT64")
    inp.set_data_from_numpy(x, binary_data=False)
    outs = [tc.InferRequestedOutput(n, binary_data=False) for n in ("logits", "next_token")]
    res = triton(lm_server).infer("lm", [inp], outputs=outs, request_compression_algorithm=algorithm,
                                  response_compression_algorithm=algorithm)
    want = lm_model.run(tokens=x)
    np.testing.assert_allclose(res.as_numpy("logits"), want["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.as_numpy("next_token"), want["next_token"])


def test_compressed_bodies_are_bounded_and_bad_encodings_refused(client):
    import gzip
    import zlib

    good = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]})
    r = client.post("/v2/models/lm/infer", content=gzip.compress(good.encode()),
                    headers={"content-encoding": "gzip", "accept-encoding": "gzip;q=0, deflate"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "deflate"  # httpx decoded it
    assert r.json()["outputs"][1]["name"] == "next_token"
    bomb = gzip.compress(b" " * (2 << 20))  # 2 MiB of spaces in ~2 KB: over the 1 MiB limit once inflated
    assert len(bomb) < 10_000
    cases = [(bomb, "gzip", 413, "once decompressed"),
             (b"not gzip at all", "gzip", 400, "cannot be decompressed"),
             (gzip.compress(good.encode())[:-12], "gzip", 400, "truncated"),
             (zlib.compress(good.encode()) + b"xx", "deflate", 400, "2 bytes after the end"),
             (good.encode(), "br", 415, "Content-Encoding 'br' is not supported")]
    for body, enc, status, msg in cases:
        r = client.post("/v2/models/lm/infer", content=body, headers={"content-encoding": enc})
        assert r.status_code == status and msg in r.json()["error"], (enc, r.text)
    assert client.get("/v2/health/ready").status_code == 200
