"""``modrt bundle verify`` and ``modrt bundle diff`` on exported PTB bundles."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from modrt import quantize
from modrt.cli import cli

from .conftest import PTB


def test_verify_measures_the_recorded_parity_again(bundles, tmp_path):
    _, src = bundles["k1"]
    r = CliRunner().invoke(cli, ["bundle", "verify", str(src), "--data", str(PTB)])
    assert r.exit_code == 0, r.output
    assert "ok    routed perplexity:" in r.output and "ok    dense perplexity:" in r.output
    d = tmp_path / "edited"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["parity"]["ppl_routed"] *= 1.01  # a record that no longer matches the graphs
    (d / "manifest.json").write_text(json.dumps(m))
    r = CliRunner().invoke(cli, ["bundle", "verify", str(d), "--data", str(PTB)])
    assert r.exit_code == 1 and "FAIL  routed perplexity" in r.output and "1 check(s) failed" in r.output
    graph = next(d.glob("layer0.module*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10])
    r = CliRunner().invoke(cli, ["bundle", "verify", str(d)])
    assert r.exit_code == 1 and "wrong checksum" in r.output and "Traceback" not in r.output


def test_verify_an_int8_bundle_and_diff(bundles, tmp_path):
    _, src = bundles["k1"]
    q = tmp_path / "int8"
    quantize.quantize(src, q, force=True, data=PTB, parity_tokens=1000, progress=False)
    r = CliRunner().invoke(cli, ["bundle", "verify", str(q), "--data", str(PTB)])
    assert r.exit_code == 0 and "ok    int8 perplexity:" in r.output, r.output
    r = CliRunner().invoke(cli, ["bundle", "diff", str(src), str(q), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert "head" in d["changed"] and "layer0.controller" not in d["changed"] and d["precision"]["head"] == [
        "float32", "int8"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    r = CliRunner().invoke(cli, ["bundle", "diff", str(src), str(copy)])
    assert r.exit_code == 0 and r.output.strip() == "same graphs"
    r = CliRunner().invoke(cli, ["bundle", "diff", str(src), str(src)])
    assert r.exit_code == 1 and "two different bundle directories" in r.output


def test_replace_one_graph_atomically_then_verify_measures_the_stale_parity(bundles, tmp_path, monkeypatch):
    import os

    import modrt
    from modrt import bundle_cli

    _, src = bundles["k1"]
    d = tmp_path / "b"
    shutil.copytree(src, d)
    q = tmp_path / "int8"
    quantize.quantize(src, q, force=True, data=PTB, parity_tokens=1000, progress=False)
    new = q / json.loads((q / "manifest.json").read_text())["graphs"]["layer0.module3"]["file"]
    r = CliRunner().invoke(cli, ["bundle", "replace", str(d), "layer0.module3", str(q / "head.onnx")])
    assert r.exit_code == 1 and "differ from graph 'layer0.module3'" in r.output  # the head's I/O: refused
    r = CliRunner().invoke(cli, ["bundle", "replace", str(d), "layer0.nope", str(new)])
    assert r.exit_code == 1 and "no graph 'layer0.nope'" in r.output
    # a crash at the manifest's rename: the bundle on disk is the old one, and it loads
    real = os.replace

    def crash(a, b):
        if str(b).endswith("manifest.json"):
            raise OSError("power cut")
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash)
    before = json.loads((d / "manifest.json").read_text())
    try:
        bundle_cli.replace_graph(d, "layer0.module3", new)
    except OSError:
        pass
    monkeypatch.setattr(os, "replace", real)
    assert json.loads((d / "manifest.json").read_text()) == before
    modrt.load(d)
    r = CliRunner().invoke(cli, ["bundle", "replace", str(d), "layer0.module3", str(new)])
    assert r.exit_code == 0 and "parity is stale" in r.output, r.output
    m = json.loads((d / "manifest.json").read_text())
    assert m["graphs"]["layer0.module3"]["precision"] == "int8" and "stale" in m["parity"]
    modrt.load(d)  # checksums hold
    r = CliRunner().invoke(cli, ["bundle", "verify", str(d), "--data", str(PTB)])
    assert r.exit_code == 0 and "parity was stale" in r.output, r.output
    m = json.loads((d / "manifest.json").read_text())
    assert "stale" not in m["parity"] and m["parity"]["remeasured"]
    r = CliRunner().invoke(cli, ["bundle", "diff", str(src), str(d), "--json"])
    assert json.loads(r.output)["changed"] == ["layer0.module3"]


def test_export_only_one_graph_equals_a_full_export_of_it(bundles, tmp_path):
    import torch

    from modrt.export.exporter import export

    ckpt, src = bundles["k1"]
    tuned = tmp_path / "tuned.pt"  # the checkpoint with module 3 changed, as after fine-tuning it alone
    state = torch.load(ckpt, weights_only=True)
    for k in state["model"]:
        if k.startswith("layer.cells.3."):
            state["model"][k] = state["model"][k] + 0.01
    torch.save(state, tuned)
    full = tmp_path / "full"
    export(tuned, full, progress=False, data=PTB, parity_tokens=400)
    d = tmp_path / "b"
    shutil.copytree(src, d)
    r = CliRunner().invoke(cli, ["export", str(tuned), str(d), "--only", "head"])
    assert r.exit_code == 1 and "layer0.module3, layer0.dense are not what" in r.output  # would mix models
    r = CliRunner().invoke(cli, ["export", str(tuned), str(d), "--only", "layer0.module3"])
    assert r.exit_code == 0 and "parity is stale" in r.output, r.output
    m, f = (json.loads((x / "manifest.json").read_text()) for x in (d, full))
    got = (d / m["graphs"]["layer0.module3"]["file"]).read_bytes()
    assert got == (full / f["graphs"]["layer0.module3"]["file"]).read_bytes()
    assert m["graphs"]["layer0.module3"]["sha256"] == f["graphs"]["layer0.module3"]["sha256"]
    assert "layer0.module3, layer0.dense" in r.output
    r = CliRunner().invoke(cli, ["bundle", "diff", str(d), str(full), "--json"])
    assert json.loads(r.output)["changed"] == []  # the bundle is now the tuned checkpoint's, graph for graph
    r = CliRunner().invoke(cli, ["export", str(tuned), str(d), "--only", "layer0.nope"])
    assert r.exit_code == 1 and "no graph 'layer0.nope'" in r.output
