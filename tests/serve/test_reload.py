"""Reloading a served bundle without a restart (the model repository extension and
``--watch``): a load under traffic loses no request and answers from the new bundle after
it; a bundle that does not load is refused while the old one serves."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

import modrt
from modrt import synthetic_lm
from modrt.serve.batcher import BatchConfig
from modrt.serve.dataplane import DataPlane

VOCAB = 40
X = np.random.default_rng(7).integers(0, VOCAB, (1, 6))
BODY = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 6], "data": X.ravel().tolist()}],
        "outputs": [{"name": "next_token"}]}


def build(path, seed):
    return synthetic_lm.build(path, vocab=VOCAB, modules=4, k=1, embedding=8, hidden=12, seed=seed)


def answer(model) -> list[int]:
    return model.run(tokens=X)["next_token"].ravel().tolist()


@pytest.fixture
def bundles(tmp_path):
    served, new = build(tmp_path / "served", 1), build(tmp_path / "new", 2)
    old_answer, new_answer = answer(modrt.load(served)), answer(modrt.load(new))
    assert old_answer != new_answer  # the two bundles are told apart by their answers
    return served, new, old_answer, new_answer


def plane_for(directory) -> DataPlane:
    def loader():
        return modrt.load(directory, provider="cpu", threads=1)

    return DataPlane(loader(), "lm", BatchConfig(max_batch=8, max_queue_delay_us=500), loader=loader)


def test_a_load_under_traffic_loses_no_request_and_answers_from_the_new_bundle(bundles, server_thread):
    served, new, old_answer, new_answer = bundles
    with server_thread(plane_for(served)) as s:
        stop, log = threading.Event(), []

        def traffic():
            with httpx.Client(base_url=s.url, timeout=30) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = c.post("/v2/models/lm/infer", json=BODY)
                    got = r.json()["outputs"][0]["data"] if r.status_code == 200 else None
                    log.append((t0, time.monotonic(), r.status_code, got))

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        shutil.copytree(new, served, dirs_exist_ok=True)  # the new bundle on disk, then load it
        load_started = time.monotonic()
        r = httpx.post(f"{s.url}/v2/repository/models/lm/load", timeout=60)
        loaded_at = time.monotonic()
        assert r.status_code == 200, r.text
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        cfg = httpx.get(f"{s.url}/v2/models/lm/config").json()
    assert cfg["parameters"]["bundle_version"] == r.json()["bundle_version"]
    assert log and all(status == 200 for *_, status, _ in log), [x for x in log if x[2] != 200][:3]
    before = [got for _, done, _, got in log if done < load_started]  # answered before the load began
    after = [got for t0, _, _, got in log if t0 > loaded_at]  # sent after it returned
    assert all(got in (old_answer, new_answer) for *_, got in log)
    assert before and all(got == old_answer for got in before)
    assert after and all(got == new_answer for got in after)


def test_a_bundle_that_does_not_load_is_refused_and_the_old_one_serves(bundles, server_thread):
    served, _, old_answer, _ = bundles
    with server_thread(plane_for(served)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        version = c.get("/v2/models/lm/config").json()["parameters"]["bundle_version"]
        graph = next(served.glob("*.onnx"))
        good = graph.read_bytes()
        graph.write_bytes(good[: len(good) // 2])  # a half-written graph
        r = c.post("/v2/repository/models/lm/load")
        assert r.status_code == 400
        assert f"refused (version {version} keeps serving)" in r.json()["error"] and "checksum" in r.json()["error"]
        assert c.post("/v2/models/lm/infer", json=BODY).json()["outputs"][0]["data"] == old_answer
        r = c.post("/v2/repository/models/lm/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and "load takes no parameters" in r.json()["error"]
        graph.write_bytes(good)
        assert c.post("/v2/repository/models/lm/load").status_code == 200
        assert c.post("/v2/repository/models/nope/load").status_code == 404


def test_unload_load_and_the_index_with_tritonclient(bundles, server_thread):
    served, _, old_answer, _ = bundles
    with server_thread(plane_for(served)) as s:
        c = tc.InferenceServerClient(f"127.0.0.1:{s.port}")
        assert c.get_model_repository_index() == [{"name": "lm", "version": "1", "state": "READY", "reason": ""}]
        c.unload_model("lm")
        assert not c.is_model_ready("lm") and c.is_server_live()
        assert c.get_model_repository_index()[0]["state"] == "UNAVAILABLE"
        r = httpx.post(f"{s.url}/v2/models/lm/infer", json=BODY)
        assert r.status_code == 503 and "unloaded" in r.json()["error"]
        c.load_model("lm")
        assert c.is_model_ready("lm")
        assert httpx.post(f"{s.url}/v2/models/lm/infer", json=BODY).json()["outputs"][0]["data"] == old_answer
        with pytest.raises(InferenceServerException, match="load takes no parameters"):
            c.load_model("lm", config="{}")


def test_watch_swaps_in_a_changed_bundle_and_keeps_the_old_one_when_the_new_is_broken(bundles):
    served, new, old_answer, new_answer = bundles
    p = subprocess.Popen([sys.executable, "-m", "modrt", "serve", str(served), "--port", "0", "--watch", "0.2",
                          "--provider", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+", p.stderr.readline()).group(0)
        with httpx.Client(base_url=url, timeout=30) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)

            def wait_for(cond) -> bool:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if cond():
                        return True
                    time.sleep(0.1)
                return False

            name = c.get("/v2/models/stats").json()["model_stats"][0]["name"]
            path = f"/v2/models/{name}/infer"
            assert c.post(path, json=BODY).json()["outputs"][0]["data"] == old_answer
            first = c.get(f"/v2/models/{name}/config").json()["parameters"]["bundle_version"]
            shutil.copytree(new, served, dirs_exist_ok=True)
            (served / "manifest.json").touch()
            assert wait_for(lambda: c.post(path, json=BODY).json()["outputs"][0]["data"] == new_answer)
            second = c.get(f"/v2/models/{name}/config").json()["parameters"]["bundle_version"]
            assert second != first
            (served / "manifest.json").write_text("{not json")  # a broken bundle: logged, the new one serves
            time.sleep(1.0)
            assert c.post(path, json=BODY).json()["outputs"][0]["data"] == new_answer
            assert c.get(f"/v2/models/{name}/config").json()["parameters"]["bundle_version"] == second
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    log = p.stderr.read()
    assert "now serving version" in log and "refused" in log, log
