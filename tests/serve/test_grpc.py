"""The KServe v2 gRPC front-end with real clients (tritonclient.grpc, a raw grpc channel):
the same answers, checks and batcher as HTTP."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from modrt.serve.batcher import BatchConfig
from modrt.serve.dataplane import DataPlane
from modrt.serve.grpc_proto import MESSAGES, POOL, SERVICE, pb

VOCAB = 40


@pytest.fixture(scope="module")
def server(lm_model, server_thread):
    plane = DataPlane(lm_model, "lm", BatchConfig(max_batch=16, max_queue_delay_us=2000), max_tokens=500)
    with server_thread(plane, grpc=True) as s:
        yield s


def client(server) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(f"127.0.0.1:{server.grpc.port}")


def tokens(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t), dtype=np.int64)


def infer_input(name: str, x: np.ndarray, datatype: str) -> tg.InferInput:
    i = tg.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x)
    return i


def test_every_message_matches_tritonclients_on_the_wire():
    """Names, numbers, types, labels and message types of every field equal Triton's
    grpc_service.proto (a superset of the v2 spec): tritonclient speaks to us unchanged."""
    def repeated(f) -> bool:
        return f.is_repeated if hasattr(type(f), "is_repeated") else f.label == f.LABEL_REPEATED

    def fields(desc):
        return {f.name: (f.number, f.type, repeated(f), f.message_type.full_name if f.message_type else None)
                for f in desc.fields}

    for full in MESSAGES:
        ours = POOL.FindMessageTypeByName(f"inference.{full}")
        theirs = triton_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{full}")
        assert fields(ours) == fields(theirs), full
    svc = POOL.FindServiceByName(SERVICE)
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in svc.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)


def test_health_and_metadata(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("lm") and c.is_model_ready("lm", "1")
    assert not c.is_model_ready("nope") and not c.is_model_ready("lm", "2")
    meta = c.get_model_metadata("lm", as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("tokens", "INT64", ["-1", "-1"]), ("h", "FP32", ["-1", "1", "12"])]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "next_token", "modules", "h_last"]
    assert "binary_tensor_data" in c.get_server_metadata(as_json=True)["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as e:
        c.get_model_metadata("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_infer_equals_the_runtime_and_a_stream_continues(server, lm_model, compression):
    x = tokens(3, 8, seed=2)
    want = lm_model.run(tokens=x)
    c = client(server)
    res = c.infer("lm", [infer_input("tokens", x[:, :5], "INT64")], request_id="g-1",
                  outputs=[tg.InferRequestedOutput(n) for n in ("next_token", "modules", "h_last")],
                  compression_algorithm=compression)
    assert res.get_response().id == "g-1"
    assert [o.name for o in res.get_response().outputs] == ["next_token", "modules", "h_last"]  # no logits asked
    np.testing.assert_array_equal(res.as_numpy("modules"), want["modules"][:, :5])
    h = res.as_numpy("h_last")
    rest = c.infer("lm", [infer_input("tokens", x[:, 5:], "INT64"), infer_input("h", h, "FP32")],
                   compression_algorithm=compression)  # every output
    np.testing.assert_allclose(rest.as_numpy("logits"), want["logits"][:, 5:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([res.as_numpy("next_token"), rest.as_numpy("next_token")], 1),
                                  want["next_token"])


def test_typed_contents_through_a_raw_channel(server, lm_model):
    """A client that sends InferTensorContents instead of raw bytes (KServe's python client
    may): decoded the same; a count that does not fit the shape is INVALID_ARGUMENT."""
    x = tokens(2, 4, seed=4)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc.port}") as ch:
        call = ch.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                              response_deserializer=pb.ModelInferResponse.FromString)
        req = pb.ModelInferRequest(model_name="lm", outputs=[pb.ModelInferRequest_InferRequestedOutputTensor(
            name="next_token")])
        inp = req.inputs.add(name="tokens", datatype="INT64", shape=[2, 4])
        inp.contents.int64_contents.extend(x.ravel().tolist())
        res = call(req, timeout=20)
        got = np.frombuffer(res.raw_output_contents[0], "<i8").reshape(list(res.outputs[0].shape))
        np.testing.assert_array_equal(got, lm_model.run(tokens=x)["next_token"])
        del inp.contents.int64_contents[-1]
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=20)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "7 values in contents.int64_contents" in \
            e.value.details()


def test_bad_requests_keep_their_meaning_and_the_server_lives(server):
    c = client(server)
    cases = [
        ([infer_input("tokens", np.zeros((1, 3), np.int32), "INT32")], "INVALID_ARGUMENT", "datatype INT32"),
        ([infer_input("tokens", np.full((1, 3), VOCAB), "INT64")], "INVALID_ARGUMENT", r"token ids must be in \[0, 40"),
        ([infer_input("tokens", np.zeros((1, 501), np.int64), "INT64")], "RESOURCE_EXHAUSTED", "501 positions"),
        ([infer_input("tokens", np.zeros((2, 3), np.int64), "INT64"), infer_input("h", np.zeros((1, 1, 12),
          np.float32), "FP32")], "INVALID_ARGUMENT", "batch size 1"),
        ([infer_input("x", np.zeros((1, 3), np.float32), "FP32")], "INVALID_ARGUMENT", "takes 'tokens'"),
    ]
    for inputs, code, match in cases:
        with pytest.raises(InferenceServerException, match=match) as e:
            c.infer("lm", inputs)
        assert e.value.status() == f"StatusCode.{code}"
    with pytest.raises(InferenceServerException) as e:  # over --max-request-bytes (1 MiB here): gRPC refuses it
        c.infer("lm", [infer_input("h", np.zeros((30000, 1, 12), np.float32), "FP32"),
                       infer_input("tokens", np.zeros((30000, 1), np.int64), "INT64")])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException, match="unknown output 'h_state'"):
        c.infer("lm", [infer_input("tokens", np.zeros((1, 3), np.int64), "INT64")],
                outputs=[tg.InferRequestedOutput("h_state")])
    assert c.is_server_ready()


def test_grpc_and_http_requests_share_one_batcher(server):
    """Both front-ends answer from one data plane: its statistics count both."""
    before = server.plane.stats.response().model_stats[0].inference_count
    client(server).infer("lm", [infer_input("tokens", tokens(2, 3), "INT64")])
    body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert httpx.post(f"{server.url}/v2/models/lm/infer", json=body, timeout=20).status_code == 200
    assert server.plane.stats.response().model_stats[0].inference_count == before + 3
