"""``modrt bench --sweep``: CSV, PNG and the break-even width (tiny widths, no timing asserted)."""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from modrt.bench import sweep
from modrt.cli import cli


def test_sweep_writes_csv_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sw"
    res = CliRunner().invoke(cli, ["bench", "--sweep", "--widths", "8,16", "--sweep-configs", "4:1,3:2",
                                   "--batch", "1,3", "--seconds", "0.01", "--warmup", "1", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "sw.csv").open()))
    assert len(rows) == 2 * 2 * 2 and set(rows[0]) == set(sweep.CSV_FIELDS)
    assert {(r["modules"], r["k"], r["width"], r["batch"]) for r in rows} == {
        (m, k, w, b) for m, k in (("4", "1"), ("3", "2")) for w in ("8", "16") for b in ("1", "3")}
    assert all(r["strategy"] in ("host", "graph", "fused") for r in rows)
    assert (tmp_path / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "break-even vs dense, M=4 K=1 batch 1: routed is faster" in res.output


def test_break_even_is_where_routing_stays_faster():
    def rows(ratios):
        return [{"modules": 16, "k": 1, "batch": 1, "width": w, "routed_over_dense": r}
                for w, r in zip((64, 128, 256, 512), ratios, strict=True)]

    assert sweep.break_even(rows([1.5, 0.9, 1.1, 0.5])) == {(16, 1, 1): 512}
    assert sweep.break_even(rows([0.9, 0.8, 0.7, 0.5])) == {(16, 1, 1): 64}
    assert sweep.break_even(rows([1.5, 1.2, 1.1, 1.0])) == {(16, 1, 1): None}
    moe = [{**r, "routed_over_ort_moe": r["routed_over_dense"]} for r in rows([1.5, 0.9, 0.8, 0.5])]
    assert sweep.break_even(moe, "routed_over_ort_moe") == {(16, 1, 1): 128}


@pytest.mark.parametrize("args,msg", [
    (["--sweep", "--synthetic"], "--sweep builds its own bundles"),
    (["--sweep", "--widths", "0,8"], "--widths must be"),
    (["--sweep", "--sweep-configs", "4-1"], "M:K pairs"),
    (["--sweep", "--sweep-configs", "2:3"], "need 1 <= K <= M"),
    (["--sweep", "--out", "/no/such/dir/sw"], "does not exist"),
])
def test_sweep_user_errors_are_one_line(args, msg):
    res = CliRunner().invoke(cli, ["bench", *args, "-q"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0], res.output
