"""The bundle loader refuses every kind of corrupt bundle with one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modrt import bundle
from modrt._exceptions import BundleError


@pytest.fixture
def good(ff_bundle, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(ff_bundle(modules=3, k=2), d)
    return d


def edit_manifest(d: Path, change) -> None:
    p = d / "manifest.json"
    raw = json.loads(p.read_text())
    change(raw)
    p.write_text(json.dumps(raw))


def refuse(d: Path, *needles: str) -> str:
    with pytest.raises(BundleError) as info:
        bundle.load(d)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_good_bundle_loads_and_round_trips(good):
    m = bundle.load(good)
    assert m.topology == "feedforward" and m.layers[0].k == 2
    assert m.graphs["layer0.controller"].outputs[0].shape == (-1, 2, 3)
    assert bundle.Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_missing_manifest(good):
    (good / "manifest.json").unlink()
    refuse(good, "manifest.json", "missing")


def test_missing_directory(tmp_path):
    refuse(tmp_path / "nope", "nope", "no such bundle directory")


def test_bad_json(good):
    (good / "manifest.json").write_text("{not json")
    refuse(good, "manifest.json", "not valid JSON")


def test_missing_graph_file(good):
    (good / "layer0.module1.onnx").unlink()
    refuse(good, "layer0.module1.onnx", "missing")


def test_wrong_checksum(good):
    with open(good / "layer0.module2.onnx", "ab") as f:
        f.write(b"\0")
    refuse(good, "layer0.module2.onnx", "wrong checksum")


def test_unknown_format(good):
    edit_manifest(good, lambda r: r.update(format="other-bundle"))
    refuse(good, "manifest.json", "format")


def test_unknown_schema_version(good):
    edit_manifest(good, lambda r: r.update(schema_version=99))
    refuse(good, "manifest.json", "schema version 99")


def test_dtype_mismatch(good):
    edit_manifest(good, lambda r: r["graphs"]["layer0.module0"]["inputs"][0].update(dtype="int64"))
    refuse(good, "layer0.module0.onnx", "input 'x' is float32", "manifest says int64")


def test_shape_mismatch(good):
    edit_manifest(good, lambda r: r["graphs"]["layer0.dense"]["outputs"][0].update(shape=[-1, 999]))
    refuse(good, "layer0.dense.onnx", "output 'y'", "[-1, 999]")


def test_renamed_input(good):
    edit_manifest(good, lambda r: r["graphs"]["layer0.controller"]["inputs"][0].update(name="z"))
    refuse(good, "layer0.controller.onnx", "manifest says ['z']")


def test_path_leaving_the_bundle(good):
    shutil.copy(good / "layer0.module0.onnx", good.parent / "x.onnx")  # exists, still refused
    edit_manifest(good, lambda r: r["graphs"]["layer0.module0"].update(file="../x.onnx"))
    refuse(good, "'../x.onnx'", "leaves the bundle directory")


def test_not_an_onnx_file(good):
    p = good / "layer0.module0.onnx"
    p.write_bytes(b"definitely not protobuf \xff\xff\xff")
    edit_manifest(good, lambda r: r["graphs"]["layer0.module0"].update(sha256=bundle.sha256_file(p)))
    refuse(good, "layer0.module0.onnx", "not an ONNX model")


def test_invalid_manifest_content(good):
    edit_manifest(good, lambda r: r["layers"][0].update(k=7))
    refuse(good, "manifest.json", "invalid manifest", "k (7)")


def _set(path: str, value):
    """An edit of the manifest at a /-separated path (list indices as integers)."""
    def change(raw):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        obj = raw
        for p in parents:
            obj = obj[p]
        obj[last] = value
    return change


@pytest.mark.parametrize("path,value,needles", [
    ("graphs", [], ["graphs must be a non-empty object"]),
    ("graphs", {}, ["graphs must be a non-empty object"]),
    ("graphs/layer0.controller/file", 123, ["graphs.layer0.controller.file must be a string", "123"]),
    ("graphs/layer0.controller/inputs/0/shape", [-1, "8"], ["inputs[0].shape must be a list of integers"]),
    ("graphs/layer0.controller/inputs/0/shape", [-1, True], ["inputs[0].shape must be a list of integers"]),
    ("task", "ptb", ["task must be an object", '"ptb"']),
    ("layers", {}, ["layers must be a non-empty list"]),
    ("layers/0/modules", "3", ["layers[0].modules must be a positive integer"]),
    ("layers/0/module_graphs", "layer0.module0", ["layers[0].module_graphs must be a non-empty list"]),
    ("stages", [1], ["stages must be a non-empty list of strings"]),
    ("dense", [], ["dense must be an object"]),
    ("opset", 17.5, ["opset must be an integer"]),
])
def test_hand_edited_manifest_types_are_one_line_each(good, path, value, needles):
    edit_manifest(good, _set(path, value))
    refuse(good, "manifest.json", *needles)


def test_a_checkpoint_given_as_a_bundle_says_so(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"PK\x03\x04")
    refuse(ckpt, "a file, not a bundle directory", "modrt export CKPT OUT/")
