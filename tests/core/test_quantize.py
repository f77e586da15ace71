"""``modrt quantize`` (modrt/quantize.py): int8 module graphs, head and dense; the float
controller keeps routing exact on feed-forward bundles; the result is a valid bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import modrt
from modrt import bench, quantize
from modrt.cli import cli


@pytest.fixture(scope="module")
def ff(tmp_path_factory):
    from modrt import synthetic

    return synthetic.build(tmp_path_factory.mktemp("ff") / "b", modules=8, k=2, dims=(32, 64, 32), seed=3)


def test_int8_bundle_routes_exactly_and_stays_close(ff, tmp_path):
    out = tmp_path / "int8"
    rec = quantize.quantize(ff, out, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    prec = {n: g["precision"] for n, g in m["graphs"].items()}
    assert prec["layer0.controller"] == "float32"
    assert all(prec[f"layer0.module{i}"] == "int8" for i in range(8)) and prec["layer0.dense"] == "int8"
    assert m["parity"]["int8"]["routing_agreement"] == 1.0 == rec["routing_agreement"]
    for name in ("layer0.module0", "layer0.dense"):  # really int8 ops, and the file's sha in the manifest
        ops = {n.op_type for n in onnx.load(str(out / m["graphs"][name]["file"])).graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    f, q = modrt.load(ff, strategy="host"), modrt.load(out, strategy="host")  # load() checks every sha256
    x = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float32)
    a, b = f.run(x=x), q.run(x=x)
    np.testing.assert_array_equal(a["modules"], b["modules"])
    assert np.abs(a["y"] - b["y"]).max() <= 0.05 * np.abs(a["y"]).max()
    # the dense graph's controller stayed float: it routes as the routed path does
    np.testing.assert_array_equal(q.run_dense(x=x)["modules"], b["modules"])
    got = modrt.load(out, strategy="graph").run(x=x)  # the composed graph runs int8 modules too
    np.testing.assert_array_equal(got["modules"], b["modules"])
    assert np.abs(got["y"] - b["y"]).max() <= 0.05 * np.abs(a["y"]).max()
    with pytest.raises(modrt.ModrtError, match="module graphs are int8"):  # MoE's kernel takes float weights
        modrt.load(out, strategy="fused")


def test_controller_flag_and_the_cli(ff, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(ff), str(tmp_path / "q"), "--controller", "-q"])
    assert r.exit_code == 0, r.output
    assert "quantized 10 graphs to int8" in r.output and "routing agreement" in r.output
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert m["graphs"]["layer0.controller"]["precision"] == "int8" and m["parity"]["int8"]["controller_quantised"]
    r = CliRunner().invoke(cli, ["quantize", str(ff), str(tmp_path / "q")])
    assert r.exit_code == 1 and "exists and is not empty (pass --force" in r.output
    r = CliRunner().invoke(cli, ["quantize", str(ff), str(ff)])
    assert r.exit_code == 1 and "another directory" in r.output
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "nope"), str(tmp_path / "q2")])
    assert r.exit_code == 1 and "error:" in r.output and not (tmp_path / "q2").exists()


def test_bench_measures_int8_against_float_side_by_side(ff, tmp_path):
    out = tmp_path / "int8"
    quantize.quantize(ff, out, progress=False)
    report = bench.run(out, bench.BenchConfig(batches=(4,), seconds=0.02, warmup=1, torch=False, ort_moe=False),
                       progress=False, against=ff)
    r = report["results"][0]
    assert r["ref_routed"] and r["ref_dense"] and report["config"]["precision"] == ["float32", "int8"]
    table = bench.format_table(report)
    assert "ref_routed/routed" in table and "ref_dense/dense" in table and f"ref_* = {ff}" in table
    assert "int8: routed and dense quantise activations per call" in table


def test_a_bad_precision_in_the_manifest_is_one_line(ff, tmp_path):
    import shutil

    d = tmp_path / "b"
    shutil.copytree(ff, d)
    m = json.loads((d / "manifest.json").read_text())
    m["graphs"]["layer0.module0"]["precision"] = "int4"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(modrt.BundleError, match=r"graphs.layer0.module0.precision must be one of"):
        modrt.load(d)
