"""The KServe v2 / Open Inference Protocol gRPC messages, built at import into a private
descriptor pool.

The spec's ``grpc_predict_v2.proto`` (package ``inference``, service
``GRPCInferenceService``), the six RPCs modrt serves: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer. Message names and field numbers are the spec's,
which Triton's ``grpc_service.proto`` extends, so ``tritonclient.grpc`` and KServe clients
talk to it unchanged (``tests/serve/test_grpc.py`` compares every field with
tritonclient's own descriptors).

Why not protoc's generated ``_pb2`` module: it registers ``inference.*`` in protobuf's
*default* pool, where tritonclient's (or KServe's) generated module registers the same
names, so a process importing both fails ("duplicate symbol"); and generated code pins the
protobuf runtime to at least the protoc that wrote it. A private pool has neither problem.

    from modrt.serve.grpc_proto import pb
    req = pb.ModelInferRequest(model_name="ptb")
"""

from __future__ import annotations

from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
BOOL, INT64, UINT64, INT32, UINT32, FLOAT, DOUBLE, STRING, BYTES = (
    F.TYPE_BOOL, F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_FLOAT, F.TYPE_DOUBLE,
    F.TYPE_STRING, F.TYPE_BYTES)
REPEATED = "repeated"
PARAMS = "map<string, InferParameter>"  # a map field of InferParameter values

# message -> [(field, number, type or message name or PARAMS, REPEATED or "")], nested messages
# under "Outer.Inner"; InferParameter's fields form the oneof ``parameter_choice``.
MESSAGES: dict[str, list[tuple]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, BOOL, "")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, BOOL, "")],
    "ModelReadyRequest": [("name", 1, STRING, ""), ("version", 2, STRING, "")],
    "ModelReadyResponse": [("ready", 1, BOOL, "")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, STRING, ""), ("version", 2, STRING, ""),
                               ("extensions", 3, STRING, REPEATED)],
    "ModelMetadataRequest": [("name", 1, STRING, ""), ("version", 2, STRING, "")],
    "ModelMetadataResponse": [("name", 1, STRING, ""), ("versions", 2, STRING, REPEATED), ("platform", 3, STRING, ""),
                              ("inputs", 4, "ModelMetadataResponse.TensorMetadata", REPEATED),
                              ("outputs", 5, "ModelMetadataResponse.TensorMetadata", REPEATED)],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, STRING, ""), ("datatype", 2, STRING, ""),
                                             ("shape", 3, INT64, REPEATED)],
    "InferParameter": [("bool_param", 1, BOOL, ""), ("int64_param", 2, INT64, ""), ("string_param", 3, STRING, ""),
                       ("double_param", 4, DOUBLE, ""), ("uint64_param", 5, UINT64, "")],
    "InferTensorContents": [("bool_contents", 1, BOOL, REPEATED), ("int_contents", 2, INT32, REPEATED),
                            ("int64_contents", 3, INT64, REPEATED), ("uint_contents", 4, UINT32, REPEATED),
                            ("uint64_contents", 5, UINT64, REPEATED), ("fp32_contents", 6, FLOAT, REPEATED),
                            ("fp64_contents", 7, DOUBLE, REPEATED), ("bytes_contents", 8, BYTES, REPEATED)],
    "ModelInferRequest": [("model_name", 1, STRING, ""), ("model_version", 2, STRING, ""), ("id", 3, STRING, ""),
                          ("parameters", 4, PARAMS, ""),
                          ("inputs", 5, "ModelInferRequest.InferInputTensor", REPEATED),
                          ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", REPEATED),
                          ("raw_input_contents", 7, BYTES, REPEATED)],
    "ModelInferRequest.InferInputTensor": [("name", 1, STRING, ""), ("datatype", 2, STRING, ""),
                                           ("shape", 3, INT64, REPEATED), ("parameters", 4, PARAMS, ""),
                                           ("contents", 5, "InferTensorContents", "")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, STRING, ""), ("parameters", 2, PARAMS, "")],
    "ModelInferResponse": [("model_name", 1, STRING, ""), ("model_version", 2, STRING, ""), ("id", 3, STRING, ""),
                           ("parameters", 4, PARAMS, ""),
                           ("outputs", 5, "ModelInferResponse.InferOutputTensor", REPEATED),
                           ("raw_output_contents", 6, BYTES, REPEATED)],
    "ModelInferResponse.InferOutputTensor": [("name", 1, STRING, ""), ("datatype", 2, STRING, ""),
                                             ("shape", 3, INT64, REPEATED), ("parameters", 4, PARAMS, ""),
                                             ("contents", 5, "InferTensorContents", "")],
}
SERVICE = "inference.GRPCInferenceService"
RPCS = {  # name -> (request, response)
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="modrt/grpc_predict_v2.proto", package="inference", syntax="proto3")
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full in MESSAGES:  # outer messages come before their nested ones in MESSAGES
        outer, _, inner = full.rpartition(".")
        msg = protos[outer].nested_type.add(name=inner) if outer else fd.message_type.add(name=full)
        protos[full] = msg
    for full, fields in MESSAGES.items():
        msg = protos[full]
        if full == "InferParameter":
            msg.oneof_decl.add(name="parameter_choice")
        for name, number, kind, label in fields:
            f = msg.field.add(name=name, number=number, json_name=_camel(name),
                              label=F.LABEL_REPEATED if label == REPEATED else F.LABEL_OPTIONAL)
            if kind == PARAMS:  # map<string, InferParameter>: a nested XxxEntry message, repeated
                entry = msg.nested_type.add(name=_camel(name, upper=True) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=STRING, label=F.LABEL_OPTIONAL, json_name="key")
                entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, type_name=".inference.InferParameter",
                                label=F.LABEL_OPTIONAL, json_name="value")
                f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f".inference.{full}.{entry.name}"
            elif isinstance(kind, str):
                f.type, f.type_name = F.TYPE_MESSAGE, f".inference.{kind}"
            else:
                f.type = kind
            if full == "InferParameter":
                f.oneof_index = 0
    svc = fd.service.add(name=SERVICE.rpartition(".")[2])
    for rpc, (req, resp) in RPCS.items():
        svc.method.add(name=rpc, input_type=f".inference.{req}", output_type=f".inference.{resp}")
    return fd


def _camel(name: str, upper: bool = False) -> str:
    parts = name.split("_")
    head = parts[0].capitalize() if upper else parts[0]
    return head + "".join(p.capitalize() for p in parts[1:])


POOL = descriptor_pool.DescriptorPool()
FILE = POOL.Add(_file())
pb = SimpleNamespace(**{
    full.replace(".", "_"): message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{full}"))
    for full in MESSAGES})

__all__ = ["MESSAGES", "POOL", "RPCS", "SERVICE", "pb"]
