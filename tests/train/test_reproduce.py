"""``modrt reproduce ptb``: which runs are done, the table it writes, and a real (short) run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modrt.train import reproduce as rp


def _finish(run, test_ppl: float, valid_ppl: float = 200.0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "train", "step": 10, "loss": 5.0},
             {"kind": "test", "step": 2490, "epoch": 6, "valid_ppl": valid_ppl, "test_ppl": test_ppl,
              "minutes": 21.5, "usage_exp_entropy": 14.2, "modules_in_use": 15}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_table_is_the_papers():
    """The paper's 12 cells, then EM once more per column under the paper's joint E-step
    score, and EM's word-table E-step at (15,1)."""
    assert len(rp.TABLE) == 17 and len({c.name for c in rp.TABLE}) == 17
    cells = {(c.key, c.column): c.paper for c in rp.TABLE}
    assert len(cells) == 17
    assert [c.name for c in rp.TABLE if c.key == "em-word"] == ["em-word-M15K1"]
    assert cells[("em", "15,1")] == 229.651 and cells[("reinforce", "15,3")] == 274.060
    assert {(c.modules, c.k) for c in rp.TABLE if c.method == "noisy-topk"} == {(15, 4), (5, 4)}
    assert {(c.modules, c.k) for c in rp.TABLE if c.method == "dense"} == {(1, 1), (3, 3)}
    joint = [c for c in rp.TABLE if c.key == "em-joint"]
    assert [c.name for c in joint] == ["em-joint-M15K1", "em-joint-M5K1", "em-joint-M15K3", "em-joint-M5K3"]
    assert all(c.method == "em" and c.prior_weight == 1.0 and cells[("em", c.column)] == c.paper for c in joint)
    assert all(c.prior_weight == 0.0 for c in rp.TABLE if c.key != "em-joint")


def test_each_em_row_trains_with_its_own_score(tmp_path, monkeypatch):
    """The subprocess command: the E-step score is passed explicitly for both EM rows (so the
    protocol does not follow train's default), and not at all for the other methods."""
    seen = []
    monkeypatch.setattr(rp.subprocess, "run", lambda cmd: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    by = {c.name: c for c in rp.TABLE}
    for name in ("em-M5K1", "em-joint-M5K1", "reinforce-M5K1", "em-word-M15K1"):
        assert rp._train(by[name], tmp_path / name, 6, 1, "cpu", 0, None, 1, True) == 0
    em, joint, rf, word = seen
    assert em[em.index("--prior-weight") + 1] == "0.0" and joint[joint.index("--prior-weight") + 1] == "1.0"
    assert joint[joint.index("--method") + 1] == "em" and joint[joint.index("--out") + 1].endswith("em-joint-M5K1")
    assert "--prior-weight" not in rf
    assert word[word.index("--e-step") + 1] == "word" and "--prior-weight" not in word
    assert word[word.index("--capacity") + 1] == "1.2" and word[word.index("--a-star-init") + 1] == "hash"


def test_finished_reads_the_last_test_record(tmp_path):
    assert rp.finished(tmp_path / "none") is None
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert rp.finished(tmp_path / "partial") is None
    _finish(tmp_path / "done", 230.0)
    assert rp.finished(tmp_path / "done")["test_ppl"] == 230.0


def test_dry_run_and_table_from_finished_runs(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _finish(runs / "em-M15K1", 225.5)
    _finish(runs / "reinforce-M15K1", 241.0)
    (runs / "em-M5K1").mkdir()
    (runs / "em-M5K1" / "ckpt.pt").write_bytes(b"x")
    (runs / "em-M5K1" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 500, "steps_per_s": 0.5}) + "\n" + '{"kind": "tra')  # a line being written
    cmd = [sys.executable, "-m", "modrt", "reproduce", "ptb", "--out", str(runs), "--results", str(results)]
    p = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert "done: test 225.5" in lines["em-M15K1"] and "partial" in lines["em-M5K1"]
    assert "step 500/2490, ~66 min left at 0.50 steps/s" in lines["em-M5K1"]
    assert "not started" in lines["dense-M3K3"]
    rows = [rp.row(c, rp.finished(runs / c.name), 6, 1) for c in rp.TABLE if rp.finished(runs / c.name)]
    rp.write_table(results, rows, 6, 1)
    table = json.loads((results / "ptb_table.json").read_text())
    assert [(r["method"], r["modules"], r["k"]) for r in table] == [("em", 15, 1), ("reinforce", 15, 1)]
    for r in table:
        assert {"method", "modules", "k", "valid_ppl", "test_ppl", "minutes", "usage_exp_entropy"} <= set(r)
    md = (results / "ptb_table.md").read_text()
    em_row = next(line for line in md.splitlines() if line.startswith("| EM modular |"))
    assert "**225.5** (229.7)" in em_row and "– (236.8)" in em_row
    joint_row = next(line for line in md.splitlines() if line.startswith("| EM modular, paper's joint"))
    assert "– (229.7)" in joint_row
    assert table[0]["prior_weight"] == 0.0 and "prior_weight" not in table[1]


def test_the_committed_table_is_kept_and_extended(tmp_path):
    """From a checkout without the run directories (a fresh clone), configurations already in
    ptb_table.json under the same protocol count as done: the dry run says so, nothing is
    trained again, and a new run's row joins them in TABLE's order (with its curve), while
    entries of another protocol are dropped and trained anew."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    by = {c.name: c for c in rp.TABLE}
    committed = [rp.row(by[n], {"valid_ppl": 150.0, "test_ppl": 140.0 + i, "minutes": 90.0, "step": 2490,
                                 "usage_exp_entropy": 2.0, "modules_in_use": 3}, 6, 1)
                 for i, n in enumerate(c.name for c in rp.TABLE[:12])]
    committed[0]["epochs"] = 3  # another protocol: not kept
    results.mkdir()
    (results / "ptb_table.json").write_text(json.dumps(committed))
    kept = rp.recorded(results, 6, 1, 0)
    assert set(kept) == {c.name for c in rp.TABLE[1:12]}
    assert rp.recorded(results, 6, 2, 0) == {} and rp.recorded(tmp_path / "nowhere", 6, 1, 0) == {}
    _finish(runs / "em-joint-M5K1", 170.0)
    with open(runs / "em-joint-M5K1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "valid", "step": 415, "epoch": 1, "ppl": 268.0}) + "\n")
    rows = rp.table_rows(runs, kept, 6, 1)
    assert [rp.row_key(r) + f"-M{r['modules']}K{r['k']}" for r in rows] == [c.name for c in rp.TABLE[1:12]] + [
        "em-joint-M5K1"]
    assert rows[-1]["prior_weight"] == 1.0 and rows[-1]["valid_curve"] == [[1, 268.0]]
    cmd = [sys.executable, "-m", "modrt", "reproduce", "ptb", "--out", str(runs), "--results", str(results)]
    p = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert "done: test 141.0 (" in lines["reinforce-M15K1"] and "not started" in lines["em-M15K1"]
    assert "done: test 170.0" in lines["em-joint-M5K1"] and "(" not in lines["em-joint-M5K1"].split("done")[1]
    p = subprocess.run(cmd + ["--table-only", "--data", str(tmp_path / "no-ptb-here")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and not (runs / "em-M15K1").exists(), p.stderr  # trains nothing
    assert [r["test_ppl"] for r in json.loads((results / "ptb_table.json").read_text())] == [
        140.0 + i for i in range(1, 12)] + [170.0]
    # Every remaining configuration held by "another process": the real command trains nothing,
    # rewrites the table from the kept entries and the finished run, and draws the curves.
    locks = [rp.claim(runs, c.name) for c in rp.TABLE if c.name not in kept and c.name != "em-joint-M5K1"]
    try:
        p = subprocess.run(cmd + ["--quiet", "--data", str(tmp_path / "no-ptb-here")], capture_output=True, text=True,
                           timeout=120)
    finally:
        for lock in locks:
            lock.close()
    assert p.returncode == 0, p.stderr
    assert "reinforce-M15K1:" not in p.stdout + p.stderr  # kept, so never claimed or trained
    assert "em-M15K1: another process is training it; skipped" in p.stdout + p.stderr  # other protocol: not kept
    table = json.loads((results / "ptb_table.json").read_text())
    assert len(table) == 12 and table[-1]["test_ppl"] == 170.0 and table[0]["test_ppl"] == 141.0
    md = (results / "ptb_table.md").read_text()
    assert "**170.0** (236.8)" in next(x for x in md.splitlines() if x.startswith("| EM modular, paper's joint"))
    assert (results / "ptb_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_plot_every_run_by_column(tmp_path):
    """Validation perplexity per epoch, a panel per column: dense (1,1) is the reference in
    both K=1 panels, an unfinished run is drawn as far as it got, a run with no epoch yet is
    left out, and write_table draws the PNG beside the table."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    _finish(runs / "em-M15K1", 225.5)
    _finish(runs / "dense-M1K1", 240.0)
    with open(runs / "em-M15K1" / "metrics.jsonl", "a") as f:
        for e, ppl in [(1, 400.0), (2, 300.5)]:
            f.write(json.dumps({"kind": "valid", "step": 415 * e, "epoch": e, "ppl": ppl}) + "\n")
    with open(runs / "dense-M1K1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "valid", "step": 415, "epoch": 1, "ppl": 350.0}) + "\n")
    (runs / "reinforce-M5K3").mkdir(parents=True)
    (runs / "reinforce-M5K3" / "metrics.jsonl").write_text(
        json.dumps({"kind": "valid", "step": 415, "epoch": 1, "ppl": 380.0}) + "\n" + '{"kind": "val')
    (runs / "em-M5K1").mkdir()
    (runs / "em-M5K1" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 50}) + "\n")
    series = rp.curves(runs, tmp_path / "c.png")
    assert series == {("em", "15,1"): [(1, 400.0), (2, 300.5)], ("dense", "15,1"): [(1, 350.0)],
                      ("dense", "5,1"): [(1, 350.0)], ("reinforce", "5,3"): [(1, 380.0)]}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rp.curves(tmp_path / "empty", tmp_path / "none.png") == {}
    assert not (tmp_path / "none.png").exists()
    rows = [rp.row(c, rp.finished(runs / c.name), 6, 1) for c in rp.TABLE if rp.finished(runs / c.name)]
    rp.write_table(results, rows, 6, 1, runs)
    assert (results / "ptb_curves.png").stat().st_size > 10_000
    # Without the run directories the table's entries draw them: a kept curve as it was, an
    # entry from before curves were kept as its final point alone.
    by = {c.name: c for c in rp.TABLE}
    kept = rp.row(by["em-M15K1"], rp.finished(runs / "em-M15K1"), 6, 1, runs / "em-M15K1")
    old = rp.row(by["reinforce-M15K1"], {"valid_ppl": 137.0, "test_ppl": 131.0, "minutes": 14.0, "step": 2490}, 6, 1)
    series = rp.curves(tmp_path / "gone", tmp_path / "d.png", [kept, old])
    assert series == {("em", "15,1"): [(1, 400.0), (2, 300.5)], ("reinforce", "15,1"): [(6, 137.0)]}
    assert (tmp_path / "d.png").is_file()


@pytest.mark.slow
def test_short_reproduction_of_the_dense_column(tmp_path, ptb_dir):
    """Two real runs end to end (dense (1,1) and (3,3)), a few steps each; then resume is a no-op."""
    cmd = [sys.executable, "-m", "modrt", "reproduce", "ptb", "--only", "dense", "--steps", "3", "--quiet",
           "--epochs", "1", "--data", str(ptb_dir), "--out", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    table = json.loads((tmp_path / "results" / "ptb_table.json").read_text())
    assert [(r["modules"], r["k"], r["steps"]) for r in table] == [(1, 1, 3), (3, 3, 3)]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "training" not in again.stderr  # nothing left to train


def test_a_configuration_another_process_trains_is_skipped(tmp_path):
    """Two `reproduce` processes side by side: one skips what the other holds, trains nothing
    twice, and says so; the dry run shows it as training."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    for c in rp.TABLE:
        if c.name != "dense-M3K3":
            _finish(runs / c.name, 200.0)
    lock = rp.claim(runs, "dense-M3K3")
    assert lock is not None and rp.claim(runs, "dense-M3K3") is None  # exclusive
    assert rp.held(runs, "dense-M3K3") and not rp.held(runs, "dense-M1K1")
    cmd = [sys.executable, "-m", "modrt", "reproduce", "ptb", "--out", str(runs), "--results", str(results),
           "--quiet", "--data", str(tmp_path / "no-ptb-here")]
    try:
        p = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "training (another process)" in next(x for x in p.stdout.splitlines() if x.startswith("dense-M3K3"))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "dense-M3K3: another process is training it; skipped" in p.stdout + p.stderr
        assert "still training in another process: dense-M3K3" in p.stdout
        assert not (runs / "dense-M3K3").exists()  # not started twice
        assert len(json.loads((results / "ptb_table.json").read_text())) == 16
    finally:
        lock.close()
    again = rp.claim(runs, "dense-M3K3")  # released with its holder
    assert again is not None
    again.close()


def test_size_small_is_ptb_small(tmp_path):
    """`reproduce ptb --size small` runs the small-size protocol (ptb-small); options of the
    default size that it cannot honour are usage errors, one line each."""
    from click.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(rp.reproduce, ["ptb", "--size", "small", "--table-only", "--out", str(tmp_path / "runs"),
                                       "--results", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    assert "0 finished runs" in res.output
    assert json.loads((tmp_path / "res" / "ptb_table_small.json").read_text()) == []
    for args, msg in [(["--size", "small", "--only", "dense"], "modrt reproduce ptb-small --only ROW"),
                      (["--size", "small", "--steps", "5"], "--steps does not go with --size small"),
                      (["--seeds", "1,2"], "--seeds goes with --size small"),
                      (["--size", "small", "--seeds", "x"], "comma-separated list of integers")]:
        res = runner.invoke(rp.reproduce, ["ptb", *args, "--table-only", "--out", str(tmp_path / "r2"),
                                           "--results", str(tmp_path / "res2")])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)


def test_cifar10_table_from_finished_runs(tmp_path):
    """`modrt reproduce cifar10 --table-only` groups finished runs by configuration over seeds."""
    import json

    from click.testing import CliRunner

    from modrt.cli import cli
    from modrt.train import checkpoint

    for method, M, K, seed, acc in [("dense", 1, 1, 1, 0.5), ("dense", 1, 1, 2, 0.52), ("em", 5, 1, 1, 0.4)]:
        run = tmp_path / "runs" / f"{method}-M{M}K{K}-s{seed}"
        run.mkdir(parents=True)
        mc = {"channels": [8, 8], "modules": M, "k": K, "method": method, "task": "cifar10"}
        checkpoint.save(run / "ckpt.pt", {"model_config": mc, "model": {}, "classes": ["a"],
                                          "train_config": {"seed": seed, "epochs": 2, "augment": False,
                                                           "prior_weight": 0.0}})
        recs = [{"kind": "valid", "epoch": e, "test_acc": acc - 0.1 / e, "train_acc_subset": acc} for e in (1, 2)]
        # the training log: epoch 0's batches, then the last epoch's (the fit figure's)
        recs += [{"kind": "train", "epoch": e, "acc": acc + 0.1 * e + d} for e in (0, 1) for d in (0.0, 0.02)]
        recs.append({"kind": "test", "step": 10, "train_acc": acc, "test_acc": acc - 0.01, "minutes": 1.0,
                     "usage_exp_entropy": float(M), "modules_in_use": M, "controller_exp_entropy": 1.0})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(cli, ["reproduce", "cifar10", "--out", str(tmp_path / "runs"), "--results",
                                   str(tmp_path / "res"), "--table-only"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "res" / "cifar10_table.json").read_text())
    assert {r["method"] for r in rows} == {"dense", "em"} and len(rows) == 3
    assert {"method", "modules", "k", "seed", "train_acc", "test_acc", "usage_exp_entropy", "minutes"} <= rows[0].keys()
    md = (tmp_path / "res" / "cifar10_table.md").read_text()
    assert "| dense (1,1), 8-8 filters, 2 ep | 2 | 51.0 ± 1.4 | 62.0 ± 1.4 |" in md  # fit: mean of 0.1 + acc + (0, .02)
    assert rows[2]["train_acc_fit"] == pytest.approx(0.51)
    assert "em likelihood (5,1), 8-8 filters, 2 ep: train accuracy -11.0 points over dense" in res.output
    assert (tmp_path / "res" / "cifar10_table.png").stat().st_size > 1000
    # A recorded run whose directory is gone stays in the table; an EM run of another width
    # is not compared with the 8-8 dense network.
    import shutil

    shutil.rmtree(tmp_path / "runs" / "em-M5K1-s1")
    run = tmp_path / "runs" / "wide-em-M8K1-s1"
    run.mkdir()
    mc = {"channels": [64, 64], "modules": 8, "k": 1, "method": "em", "task": "cifar10", "controller_pool": 4}
    checkpoint.save(run / "ckpt.pt", {"model_config": mc, "model": {}, "classes": ["a"], "train_config": {
        "seed": 1, "epochs": 2, "augment": False, "prior_weight": 1.0, "capacity": 1.2, "warm_start": 391,
        "samples": 4}})
    recs = [{"kind": "valid", "epoch": 1, "test_acc": 0.6, "train_acc_subset": 0.6},
            {"kind": "test", "step": 10, "train_acc": 0.7, "test_acc": 0.6, "minutes": 1.0, "usage_exp_entropy": 7.0,
             "modules_in_use": 8, "controller_exp_entropy": 1.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(cli, ["reproduce", "cifar10", "--out", str(tmp_path / "runs"), "--results",
                                   str(tmp_path / "res"), "--table-only"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "res" / "cifar10_table.json").read_text())
    assert [r["run"] for r in rows] == ["dense-M1K1-s1", "dense-M1K1-s2", "em-M5K1-s1", "wide-em-M8K1-s1"]
    md = (tmp_path / "res" / "cifar10_table.md").read_text()
    assert ("| em capacity 1.2+warm+joint+S=4+controller pool 4x4 (8,1), 64-64 filters, 2 ep | 1 | 70.0 | - |"
            in md)  # no training log
    assert rows[-1]["controller_pool"] == 4 and rows[0]["controller_pool"] == 1
    assert "(8,1)" not in res.output and "em likelihood (5,1)" in res.output


def _finished_run(run, test_ppl: float, minutes: float, ckpt: dict) -> None:
    """A PTB run directory as a finished run leaves it: a test record and a checkpoint."""
    import torch

    run.mkdir(parents=True)
    recs = [{"kind": "valid", "step": 5, "epoch": 1, "ppl": 300.0},
            {"kind": "test", "step": 5, "epoch": 1, "valid_ppl": 300.0, "test_ppl": test_ppl, "minutes": minutes}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    torch.save(ckpt, run / "ckpt.pt")


def test_small_table_keeps_recorded_runs_whose_directories_are_gone(tmp_path):
    """``modrt reproduce ptb-small`` rewrites results/ptb_table_small.json from the runs it
    finds *and* the rows the table already held: seed 2 trained in a new checkout does not
    erase seed 1; a run found again replaces its recorded row."""

    from modrt.train import small

    out, results = tmp_path / "runs", tmp_path / "results"
    _finished_run(out / "dense-M1K1-s2", 280.0, 1.0,
                  {"model_config": {"method": "dense", "modules": 1, "k": 1, "embedding": 32, "hidden": 32},
                   "train_config": {"seed": 2, "epochs": 1}})
    old = {"run": "dense-M1K1-s1", "method": "dense", "variant": "", "modules": 1, "k": 1, "seed": 1,
           "embedding": 32, "hidden": 32, "epochs": 1, "steps": 5, "valid_ppl": 310.0, "test_ppl": 290.0,
           "usage_exp_entropy": 1.0, "modules_in_use": 1, "controller_exp_entropy": 1.0, "minutes": 1.0,
           "valid_curve": [[1, 310.0]]}
    stale = {**old, "run": "dense-M1K1-s2", "seed": 2, "test_ppl": 999.0}
    results.mkdir()
    (results / "ptb_table_small.json").write_text(json.dumps([old, stale]))
    rows = small.write(out, results)
    assert [(r["run"], r["test_ppl"]) for r in rows] == [("dense-M1K1-s1", 290.0), ("dense-M1K1-s2", 280.0)]
    assert json.loads((results / "ptb_table_small.json").read_text()) == rows
    md = (results / "ptb_table_small.md").read_text()
    assert "| 2 |" in md  # one configuration, two seeds: mean ± sd


def test_the_targets_section_judges_each_column_from_the_runs():
    """The small table's targets: per column the best EM by mean test perplexity, judged
    against dense (K,K) by the two sds combined, REINFORCE and noisy top-k by sign with one
    seed, and the EM configurations that meet margin, no collapse and decision at once."""
    from modrt.train import small

    def runs(method, M, K, ppls, variant="", usage=None, ctrl=1.0):
        return [{"run": f"{method}{variant}-M{M}K{K}-s{i}", "method": method, "variant": variant, "modules": M,
                 "k": K, "seed": i, "epochs": 6, "test_ppl": p, "usage_exp_entropy": usage or M,
                 "controller_exp_entropy": ctrl, "valid_ppl": p + 10, "modules_in_use": M, "minutes": 1.0}
                for i, p in enumerate(ppls, 1)]

    rows = (runs("dense", 1, 1, [240.0, 236.0, 238.0])                       # 238 ± 2
            + runs("em", 15, 1, [230.0, 231.0, 229.0], "a", usage=14.0, ctrl=2.5)   # 230 ± 1: below, undecided
            + runs("em", 15, 1, [233.0, 234.0, 232.0], "b", usage=12.0, ctrl=1.1)   # 233 ± 1: below, decided
            + runs("em", 15, 1, [235.0, 236.0, 234.0], "c", usage=3.0, ctrl=1.0)    # 235 ± 1: within 3, collapsed
            + runs("reinforce", 15, 1, [225.0])                                     # one seed, lower
            + runs("em", 5, 1, [236.0, 237.0, 235.0], "a", usage=5.0, ctrl=1.0))    # 236 ± 1: within 3
    lines = [l for l in small.targets(rows) if l.startswith("| (")]
    assert len(lines) == 2  # no dense (3,3): the K=3 columns are left out
    c15, c5 = ([c.strip() for c in l.strip("|").split("|")] for l in lines)
    assert c15[0] == "(15,1)" and c15[1] == "dense: 238.0 ± 2.0 (3)"
    assert c15[2].startswith("em a (15,1), 6 ep: 230.0 ± 1.0 (3)")
    assert c15[3] == "yes"                       # 8 > 2 + 1
    assert c15[4] == "no (1 seed) (225.0)"       # REINFORCE lower, one seed
    assert c15[5] == "–"                         # no noisy top-k run
    assert c15[7] == "em b (15,1), 6 ep"         # a is undecided, c is within the margin and collapsed
    assert c5[3] == "no" and c5[7] == "none"     # 2 < 2 + 1
    assert "## The issue's targets per column" in small.markdown(rows)


def test_a_run_trained_to_another_length_keeps_the_recorded_one(tmp_path):
    """The same row and seed trained for 10 epochs (another --out) is another run: it joins
    the table beside the recorded 5-epoch run instead of replacing it."""
    import torch

    from modrt.train import small

    out, results = tmp_path / "runs", tmp_path / "results"
    run = out / "dense-M1K1-s1"
    run.mkdir(parents=True)
    recs = [{"kind": "test", "step": 10, "epoch": 10, "valid_ppl": 250.0, "test_ppl": 240.0, "minutes": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    torch.save({"model_config": {"method": "dense", "modules": 1, "k": 1, "embedding": 32, "hidden": 32},
                "train_config": {"seed": 1, "epochs": 10}}, run / "ckpt.pt")
    five = {"run": "dense-M1K1-s1", "method": "dense", "variant": "", "modules": 1, "k": 1, "seed": 1,
            "embedding": 32, "hidden": 32, "epochs": 5, "steps": 5, "valid_ppl": 310.0, "test_ppl": 290.0,
            "usage_exp_entropy": 1.0, "modules_in_use": 1, "controller_exp_entropy": 1.0, "minutes": 1.0}
    results.mkdir()
    (results / "ptb_table_small.json").write_text(json.dumps([five]))
    rows = small.write(out, results)
    assert [(r["epochs"], r["test_ppl"]) for r in rows] == [(5, 290.0), (10, 240.0)]
    md = (results / "ptb_table_small.md").read_text()
    assert "dense (1,1), 5 ep | 1 |" in md and "dense (1,1), 10 ep | 1 |" in md


def test_a_run_continued_past_its_test_is_not_finished(tmp_path):
    """A run resumed with more epochs keeps its old test record in metrics.jsonl; until it
    writes a new one it is not finished (the tables must not give it the old figures)."""
    import torch

    from modrt.train import small

    run = tmp_path / "dense-M1K1-s1"
    run.mkdir()
    recs = [{"kind": "valid", "step": 5, "epoch": 1, "ppl": 300.0},
            {"kind": "test", "step": 5, "epoch": 1, "valid_ppl": 300.0, "test_ppl": 280.0, "minutes": 1.0}]
    torch.save({"model_config": {}, "train_config": {"epochs": 2}}, run / "ckpt.pt")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert small.finished(run)[1]["test_ppl"] == 280.0
    more = [{"kind": "train", "step": 6, "epoch": 1, "loss": 5.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + more))
    assert small.finished(run) is None
    done = [{"kind": "test", "step": 10, "epoch": 2, "valid_ppl": 290.0, "test_ppl": 270.0, "minutes": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + more + done))
    assert small.finished(run)[1]["test_ppl"] == 270.0


def test_dry_run_lists_each_row_and_seed_and_trains_nothing(tmp_path):
    """``reproduce ptb-small --dry-run`` (and ``ptb --size small --dry-run``) says, per row x
    seed, what a run would do: done (its test figure), trained by another process (its
    lock is held), partial (resumed from its checkpoint, with its step and time left) or
    not started, and names a run the table recorded whose directory is gone. It starts
    no training and leaves every file as it was."""
    import torch
    from click.testing import CliRunner

    from modrt.train import small
    from modrt.train.locks import claim

    out, results = tmp_path / "runs", tmp_path / "results"
    _finished_run(out / "dense-M1K1-s1", 280.25, 1.5, {"model_config": {}, "train_config": {}})
    partial = out / "dense-M1K1-s2"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text(
        json.dumps({"kind": "valid", "step": 415, "epoch": 1, "loss": 6.3, "ppl": 544.61}) + "\n"
        + json.dumps({"kind": "train", "step": 400, "epoch": 0, "loss": 6.0, "steps_per_s": 2.0}) + "\n")
    torch.save({}, partial / "ckpt.pt")
    row = {"run": "dense-M3K3-s1", "method": "dense", "epochs": 6, "test_ppl": 251.3, "minutes": 12.25}
    results.mkdir()
    (results / "ptb_table_small.json").write_text(json.dumps([row, {**row, "run": "dense-M3K3-s2", "epochs": 2}]))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    lock = claim(out, "dense-M1K1-s3")  # another process trains seed 3
    try:
        res = CliRunner().invoke(small.ptb_small, ["--out", str(out), "--results", str(results), "--dry-run",
                                                   "--only", "dense-M1K1", "--only", "dense-M3K3", "--seeds", "1,2,3"])
    finally:
        lock.close()
    assert res.exit_code == 0, res.output
    lines = dict(line.split(None, 1) for line in res.output.strip().splitlines())
    assert lines["dense-M1K1-s1"] == "done: test ppl 280.2, 1.5 min"
    # 6 epochs of 415 windows; 2090 steps left at 2 steps/s: ~17 minutes
    assert lines["dense-M1K1-s2"] == ("partial (will resume), step 400/2490, ~17 min left at 2.00 steps/s; "
                                      "epoch 1: valid ppl 544.6")
    assert lines["dense-M1K1-s3"] == "training (another process)"
    table = results / "ptb_table_small.json"
    assert lines["dense-M3K3-s1"] == f"done: test ppl 251.3, 12.2 min (recorded in {table})"
    assert lines["dense-M3K3-s2"] == "not started"  # recorded at 2 epochs, not the 6 asked for
    assert len(lines) == 6
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".locks" not in p.parts} == before
    via_ptb = CliRunner().invoke(rp.reproduce, ["ptb", "--size", "small", "--dry-run", "--seeds", "1",
                                                "--out", str(out), "--results", str(results)])
    assert via_ptb.exit_code == 0, via_ptb.output
    assert "dense-M1K1-s1" in via_ptb.output and "done: test ppl 280.2" in via_ptb.output
    assert len(via_ptb.output.strip().splitlines()) == len(small.ROWS)


def test_cifar10_dry_run_names_the_size_rows(tmp_path):
    """``reproduce cifar10 --dry-run`` lists the rows of the size asked for (demo by
    default, wide-* with --size default), each seed, and a recorded run's accuracy."""
    from click.testing import CliRunner

    from modrt.train import cifar_table

    results = tmp_path / "results"
    results.mkdir()
    row = {"run": "wide-dense-M1K1-s1", "method": "dense", "epochs": 3, "test_acc": 0.7166, "minutes": 15.0}
    (results / "cifar10_table.json").write_text(json.dumps([row]))
    partial = tmp_path / "runs" / "wide-dense-M1K1-s2"  # a long run's figures after its last epoch
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 800, "epoch": 2, "steps_per_s": 4.0}) + "\n"
        + json.dumps({"kind": "valid", "step": 782, "epoch": 2, "test_acc": 0.6915, "train_acc_subset": 0.721}) + "\n")
    (partial / "ckpt.pt").write_bytes(b"")
    args = ["--out", str(tmp_path / "runs"), "--results", str(results), "--dry-run"]
    res = CliRunner().invoke(cifar_table.cifar10, [*args, "--size", "default", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    lines = dict(line.split(None, 1) for line in res.output.strip().splitlines())
    assert set(lines) == {f"{n}-s{s}" for n in cifar_table.WIDE for s in (1, 2)}
    assert lines["wide-dense-M1K1-s1"].startswith("done: test acc 71.7%, 15.0 min (recorded in")
    # 3 epochs of 391 batches; 373 steps left at 4 steps/s: ~2 minutes
    assert lines["wide-dense-M1K1-s2"] == ("partial (will resume), step 800/1173, ~2 min left at 4.00 steps/s; "
                                           "epoch 2: train 72.1% (10k subset), test 69.2%")
    assert lines["wide-em-cap-warm-joint-M8K1-s1"] == "not started"
    demo = CliRunner().invoke(cifar_table.cifar10, args)
    assert len(demo.output.strip().splitlines()) == 2 * len(cifar_table.ROWS)
    mid = CliRunner().invoke(cifar_table.cifar10, [*args, "--size", "mid"])
    assert {line.split()[0] for line in mid.output.strip().splitlines()} == {
        f"{n}-s{s}" for n in cifar_table.MID for s in (1, 2)}
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"wide-dense-M1K1-s2"}  # nothing started


def test_a_run_the_table_records_is_not_trained_again(tmp_path, monkeypatch):
    """A run the table records at the epochs asked for, with no directory under --out (seed
    1 trained in an earlier checkout), is left as recorded; the same run recorded at other
    epochs, or with a directory here (resumed), is trained."""
    from modrt.train import small

    out, table = tmp_path / "runs", tmp_path / "t.json"
    table.write_text(json.dumps([{"run": "a-s1", "epochs": 6}, {"run": "a-s2", "epochs": 3},
                                 {"run": "a-s3", "epochs": 6}]))
    (out / "a-s3").mkdir(parents=True)  # a directory here: its own state decides
    calls = []

    def fake_run(cmd):
        calls.append(cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[cmd.index("--resume") + 1])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(small.subprocess, "run", fake_run)
    small.train_missing("ptb", out, {"a": (1, 1, ["--method", "dense"])}, (), [1, 2, 3], 6, 1, lambda: None,
                        lambda run: None, table)
    assert calls == [str(out / "a-s2"), str(out / "a-s3")]


def test_cifar10_mid_rows_train_the_default_network_at_their_width(tmp_path, monkeypatch):
    """``--size mid`` rows run ``modrt train cifar10 --size mid`` (the default's M=8, K=1
    at 16-16-32-32 filters)."""
    from click.testing import CliRunner

    from modrt.train import cifar_table, small

    calls = []
    monkeypatch.setattr(small.subprocess, "run", lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    res = CliRunner().invoke(cifar_table.cifar10, ["--size", "mid", "--seeds", "1", "--epochs", "2",
                                                   "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert [c[c.index("--out") + 1] for c in calls] == [str(tmp_path / "runs" / f"{n}-s1") for n in cifar_table.MID]
    for c in calls:
        assert c[c.index("--size") + 1] == "mid"
        assert c[c.index("--epochs") + 1] == "2"
    em = calls[1]
    assert em[em.index("--method") + 1] == "em" and em[em.index("--modules") + 1] == "8"
