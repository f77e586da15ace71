"""``modrt reproduce ptb-small``: the capacity-limited protocol, several seeds, mean ± sd.

At E = H = 32 (no dropout) a dense GRU LM is capacity-limited on PTB, so extra modules
can pay (docs/design-notes.md, "The small size"). Every row of ``ROWS`` is trained once
per seed with ``modrt train ptb`` in ``OUT/<row>-s<seed>`` (resumed from its checkpoint
when interrupted; finished runs are skipped), then the table is written from whatever
runs under ``OUT`` have finished, grouped by configuration over seeds:

    results/ptb_table_small.json   one object per finished run
    results/ptb_table_small.md     mean ± sd per configuration
    results/ptb_table_small.png    test perplexity per configuration, error bars (sd)

Each run's configuration is read back from its checkpoint, not from its directory name.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import click

from modrt._exceptions import ModrtError
from modrt.train.config import WORD_SUBSAMPLE
from modrt.train.ptb_table import WORD_VARIANT

SIZE = ["--embedding", "32", "--hidden", "32", "--dropout", "0"]
JOINT = ["--prior-weight", "1"]
WORD = ["--method", "em", *WORD_VARIANT]  # EM over a hash-started, capped word table (below)
# name -> (M, K, modrt train ptb arguments). Dense (1,1) and (3,3) are the references.
ROWS = {
    "dense-M1K1": (1, 1, ["--method", "dense"]),
    "dense-M3K3": (3, 3, ["--method", "dense"]),
    "hash-M15K1": (15, 1, ["--method", "hash"]),
    "hash-M5K1": (5, 1, ["--method", "hash"]),
    "hash-M15K3": (15, 3, ["--method", "hash"]),
    "hash-M5K3": (5, 3, ["--method", "hash"]),
    # The paper's baselines in every column of the table (noisy top-k at the column's k).
    "reinforce-M15K1": (15, 1, ["--method", "reinforce"]),
    "noisy-topk-M15K1": (15, 1, ["--method", "noisy-topk"]),
    "reinforce-M5K1": (5, 1, ["--method", "reinforce"]),
    "noisy-topk-M5K1": (5, 1, ["--method", "noisy-topk"]),
    "reinforce-M15K3": (15, 3, ["--method", "reinforce"]),
    "noisy-topk-M15K3": (15, 3, ["--method", "noisy-topk"]),
    "reinforce-M5K3": (5, 3, ["--method", "reinforce"]),
    "noisy-topk-M5K3": (5, 3, ["--method", "noisy-topk"]),
    "em-window-M15K1": (15, 1, ["--method", "em", *JOINT]),
    "em-window-balance-M15K1": (15, 1, ["--method", "em", *JOINT, "--balance-rate", "0.3"]),
    "em-position-M15K1": (15, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples", "4"]),
    "em-position-balance-M15K1": (15, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples", "4",
                                          "--balance-rate", "0.3"]),
    "em-warm-position-balance-M15K1": (15, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples",
                                               "4", "--balance-rate", "0.3", "--warm-start", "100"]),
    "em-warm-position-balance-M5K1": (5, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples",
                                             "4", "--balance-rate", "0.3", "--warm-start", "100"]),
    # a* starts from hash routing's table, not at random (docs/design-notes.md, "E-step variants")
    "em-hash-position-balance-M15K1": (15, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples",
                                               "4", "--balance-rate", "0.3", "--a-star-init", "hash"]),
    "em-hash-position-balance-M5K1": (5, 1, ["--method", "em", *JOINT, "--e-step", "position", "--samples",
                                             "4", "--balance-rate", "0.3", "--a-star-init", "hash"]),
    # a* is a word -> module table, hash-started, capped at 1.2x an even share, after a
    # 100-step dense warm start; the E-step moves a word's entry (docs/design-notes.md,
    # "E-step variants"). Likelihood score: a table is predictable from its word.
    "em-word-hash-cap-warm-M15K1": (15, 1, [*WORD]),
    "em-word-hash-cap-warm-M5K1": (5, 1, [*WORD]),
    # The ablation: the same with S=1 (no candidate), so the table stays hash's and only the
    # controller learns it; against hash routing, what the learned router costs, and against
    # the row above, what the E-step's moves bring.
    "em-word-hash-fixed-warm-M15K1": (15, 1, ["--method", "em", "--e-step", "word", "--samples", "1",
                                              "--warm-start", "100", "--a-star-init", "hash"]),
    # The paper's joint score on the table: a word's gain also counts the controller's
    # log p(module | x) ratio, so the table moves towards what the controller can predict.
    "em-word-hash-cap-warm-joint-M15K1": (15, 1, [*WORD, *JOINT]),
    "em-word-hash-cap-warm-joint-M5K1": (5, 1, [*WORD, *JOINT]),
    # The same with the prior's weight raised 0 -> 1 over the first epoch (415 steps) after
    # the warm start: does the joint score cost less when the table is not pulled towards an
    # untrained controller early?
    "em-word-hash-cap-warm-joint-anneal-M5K1": (5, 1, [*WORD, *JOINT, "--prior-anneal", "415"]),
    # The ablation of the word E-step's subsampling: every position scored.
    "em-word-hash-cap-warm-all-M5K1": (5, 1, [*WORD, "--word-subsample", "0"]),
    # The ablation of the reused forward: the E-step first, the M-step on the moved table.
    "em-word-hash-cap-warm-first-M5K1": (5, 1, [*WORD, "--no-word-reuse"]),
    "em-word-hash-cap-warm-all-M15K3": (15, 3, [*WORD, "--word-subsample", "0"]),
    "em-word-hash-cap-warm-M15K3": (15, 3, [*WORD]),
    "em-word-hash-cap-warm-M5K3": (5, 3, [*WORD]),
}


def variant(train_config: dict, method: str) -> str:
    """A run's EM variant as one name (e.g. ``position+balance+joint``); '' for other methods."""
    if method != "em":
        return ""
    parts = [train_config.get("e_step", "window")]
    if train_config.get("samples") == 1:  # no candidate besides a*: the E-step never changes it
        parts.append("fixed")
    if train_config.get("balance_rate"):
        parts.append("balance")
    if train_config.get("capacity"):
        parts.append(f"capacity {train_config['capacity']:g}")
    if train_config.get("word_subsample", WORD_SUBSAMPLE) == 0:  # the word E-step scores every position
        parts.append("all positions")
    if not train_config.get("word_reuse", True):  # the E-step's own forward, then the M-step on its moves
        parts.append("E first")
    if train_config.get("warm_start"):
        parts.append("warm")
    if train_config.get("prior_anneal"):
        parts.append("anneal")
    if train_config.get("a_star_init", "random") != "random":
        parts.append(f"{train_config['a_star_init']}-init")
    pw = train_config.get("prior_weight") or 0
    parts.append("likelihood" if not pw else "joint" if pw == 1 else f"joint {pw:g}")  # the score's prior weight
    return "+".join(parts)


def finished(run: Path) -> tuple[list[dict], dict, dict] | None:
    """A finished run's metrics records, its final (test) record and its checkpoint; None
    while it has no test record, or has trained again since its last one (continued with
    ``--resume --epochs N``). Shared by the PTB and CIFAR-10 tables."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    test = [i for i, r in enumerate(recs) if r.get("kind") == "test"]
    if not test or any(r.get("kind") in ("train", "valid") for r in recs[test[-1] + 1:]):
        return None  # not finished, or continued (--resume --epochs N) past its last test
    import torch

    return recs, recs[test[-1]], torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)


def run_row(run: Path) -> dict | None:
    """A finished run's ptb_table_small.json entry, or None."""
    done = finished(run)
    if done is None:
        return None
    recs, rec, ckpt = done
    m, t = ckpt["model_config"], ckpt["train_config"]
    return {
        "run": run.name, "method": m["method"], "variant": variant(t, m["method"]), "modules": m["modules"],
        "k": m["k"], "seed": t["seed"], "embedding": m["embedding"], "hidden": m["hidden"], "epochs": t["epochs"],
        "steps": rec["step"], "valid_ppl": rec["valid_ppl"], "test_ppl": rec["test_ppl"],
        "usage_exp_entropy": rec.get("usage_exp_entropy"), "modules_in_use": rec.get("modules_in_use"),
        "controller_exp_entropy": rec.get("controller_exp_entropy"), "minutes": rec["minutes"],
        "valid_curve": [[r["epoch"], r["ppl"]] for r in recs if r.get("kind") == "valid"],
    }


def group(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        v = f" {r['variant']}" if r["variant"] else ""
        out.setdefault(f"{r['method']}{v} ({r['modules']},{r['k']}), {r['epochs']} ep", []).append(r)
    return out


def _msd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


# The columns (M, K); each is held against dense (K, K), the same active width.
COLUMNS = [(15, 1), (5, 1), (15, 3), (5, 3)]


def _stat(rs: list[dict], key: str) -> tuple[float, float | None]:
    """Mean and sd of ``key`` over a configuration's runs (sd None for one run)."""
    xs = [r[key] for r in rs if r.get(key) is not None]
    if not xs:
        return math.nan, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _below(a: list[dict], b: list[dict]) -> str:
    """Whether ``a``'s mean test perplexity is below ``b``'s by more than their two sds
    combined (the issue's margin): 'yes', 'no', or 'yes (1 seed)' / 'no (1 seed)' when
    either side has one run and the margin cannot be judged."""
    (ma, sa), (mb, sb) = _stat(a, "test_ppl"), _stat(b, "test_ppl")
    if sa is None or sb is None:
        return f"{'yes' if ma < mb else 'no'} (1 seed)"
    return "yes" if mb - ma > sa + sb else "no"


def _cell(name: str, rs: list[dict]) -> str:
    m, sd = _stat(rs, "test_ppl")
    return f"{name}: {m:.1f}" + (f" ± {sd:.1f}" if sd is not None else "") + f" ({len(rs)})"


def targets(rows: list[dict]) -> list[str]:
    """Per column, the issue's targets judged from the finished runs: the best EM
    configuration by mean test perplexity, against dense of equal active width, REINFORCE
    and noisy top-k at the same (M, K); and whether any EM configuration meets the
    perplexity margin, no collapse (usage exp entropy >= M/2) and a decided controller (exp
    entropy <= 2) at once."""
    groups = group(rows)

    def of(method: str, M: int, K: int) -> dict[str, list[dict]]:
        return {n: rs for n, rs in groups.items()
                if rs[0]["method"] == method and rs[0]["modules"] == M and rs[0]["k"] == K}

    def best(gs: dict[str, list[dict]]) -> tuple[str, list[dict]] | None:
        return min(gs.items(), key=lambda kv: _stat(kv[1], "test_ppl")[0]) if gs else None

    lines = ["", "## The issue's targets per column (computed from the runs above)", "",
             "Best EM = the EM configuration with the lowest mean test perplexity in the column (seeds in "
             "brackets). *Below* = lower by more than the two standard deviations combined; with one seed "
             "only the sign is known. *All three* = an EM configuration that is below dense, keeps usage "
             "exp entropy >= M/2 and has controller exp entropy <= 2.", "",
             "| column | dense (K,K) | best EM | below dense | below REINFORCE | below noisy top-k "
             "| hash | EM meeting all three |", "|---|---|---|---|---|---|---|---|"]
    for M, K in COLUMNS:
        ems = of("em", M, K)
        ref = best(of("dense", K, K))
        top = best(ems)
        if ref is None or top is None:
            continue
        name, rs = top
        vs = {}
        for method in ("reinforce", "noisy-topk"):
            b = best(of(method, M, K))
            vs[method] = "–" if b is None else f"{_below(rs, b[1])} ({_stat(b[1], 'test_ppl')[0]:.1f})"
        h = best(of("hash", M, K))
        good = [n for n, g in ems.items() if _below(g, ref[1]) == "yes"
                and _stat(g, "usage_exp_entropy")[0] >= M / 2 and _stat(g, "controller_exp_entropy")[0] <= 2]
        lines.append(f"| ({M},{K}) | {_cell('dense', ref[1])} | {_cell(name, rs)} | {_below(rs, ref[1])} | "
                     f"{vs['reinforce']} | {vs['noisy-topk']} | {'–' if h is None else _cell('hash', h[1])} | "
                     f"{'; '.join(good) if good else 'none'} |")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["# Penn Treebank at the small size (E = H = 32, no dropout): mean ± sd over seeds", "",
             "Written by `modrt reproduce ptb-small` from the finished runs. Test perplexity under greedy "
             "routing; usage exp entropy: exp of the entropy of module use on test text (M = no collapse); "
             "controller exp entropy: exp of its mean per-example entropy (1 = decided).", "",
             "| configuration | seeds | valid ppl | test ppl | modules in use | usage exp entropy "
             "| controller exp entropy | minutes |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in group(rows).items():
        lines.append(f"| {name} | {len(rs)} | {_msd([r['valid_ppl'] for r in rs])} | "
                     f"{_msd([r['test_ppl'] for r in rs])} | {_msd([r['modules_in_use'] for r in rs])} | "
                     f"{_msd([r['usage_exp_entropy'] for r in rs])} | {_msd([r['controller_exp_entropy'] for r in rs])}"
                     f" | {_msd([r['minutes'] for r in rs])} |")
    lines += targets(rows)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    names = list(groups)
    means = [statistics.mean(r["test_ppl"] for r in groups[n]) for n in names]
    sds = [statistics.stdev([r["test_ppl"] for r in groups[n]]) if len(groups[n]) > 1 else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    colors = ["black" if n.startswith("dense") else "tab:red" if n.startswith("em") else "tab:blue" for n in names]
    ax.barh(range(len(names)), means, xerr=sds, color=colors, alpha=0.7, capsize=4)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    lo = min(means) - 3 * max(sds + [1.0])
    ax.set_xlim(max(0.0, lo * 0.95), max(m + s for m, s in zip(means, sds, strict=True)) * 1.02)
    ax.set_xlabel("test perplexity (greedy routing; bars: sd over seeds)")
    ax.set_title("PTB, small size (E = H = 32)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recorded(path: Path) -> list[dict]:
    """The runs a table already holds (``ptb_table_small.json``); [] when there is none."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "run" in r] if isinstance(rows, list) else []


def merged(out: Path, path: Path, row_of) -> list[dict]:
    """The rows (``row_of(run)``) of the finished runs under ``out`` and those the table at
    ``path`` already recorded (a run measured on another machine, or in an earlier checkout
    whose run directories are gone, stays in it; a finished run under ``out`` replaces its
    recorded row), sorted by run name; written back to ``path``. A run is its directory's
    name and its epochs: the same row trained to another length (``--epochs``, under
    another ``--out``) is another run and keeps the recorded one."""
    def key(r: dict) -> tuple[str, int]:
        return r["run"], r["epochs"]

    found = [r for run in sorted(p for p in out.iterdir() if p.is_dir()) if (r := row_of(run))] if out.is_dir() else []
    keys = {key(r) for r in found}
    rows = sorted([r for r in recorded(path) if key(r) not in keys] + found, key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def write(out: Path, results: Path) -> list[dict]:
    """The small table (``merged``) as json, markdown and plot."""
    rows = merged(out, results / "ptb_table_small.json", run_row)
    (results / "ptb_table_small.md").write_text(markdown(rows))
    if rows:
        plot(rows, results / "ptb_table_small.png")
    return rows


def recorded_elsewhere(table: Path, epochs: int):
    """``run -> its row`` in the table at ``table`` when the table records that run at
    ``epochs`` and it has no directory here (trained in an earlier checkout or under another
    ``--out``), else None: the runs ``train_missing`` leaves as recorded."""
    kept = {r["run"]: r for r in recorded(table) if r.get("epochs") == epochs}
    return lambda run: None if run.exists() else kept.get(run.name)


def train_missing(task: str, out: Path, rows: dict, only: tuple[str, ...], seeds: list[int], epochs: int,
                  threads: int, after_each, finished, table: Path) -> None:
    """Train every row x seed of ``rows`` (name -> (M, K, ``modrt train TASK`` arguments))
    that has not finished (``finished(run)`` is None) in ``OUT/<name>-s<seed>``: resumed
    from its checkpoint when one is there; a run another process holds (``locks.claim``)
    is left to it, and so is one the table at ``table`` records at these epochs without a
    directory here (trained in an earlier checkout or under another ``--out``: the table
    keeps it, ``merged``). ``after_each()`` after every run (rewrites the table)."""
    from modrt.train.locks import claim

    kept = recorded_elsewhere(table, epochs)
    for name in only or rows:
        M, K, args = rows[name]
        for seed in seeds:
            run = out / f"{name}-s{seed}"
            if finished(run) is not None or kept(run) is not None:
                continue
            lock = claim(out, run.name)
            if lock is None:
                continue
            with lock:
                cmd = [sys.executable, "-m", "modrt", "train", task, "--threads", str(threads), "--quiet"]
                if (run / "ckpt.pt").exists():
                    cmd += ["--resume", str(run / "ckpt.pt")]
                else:
                    cmd += [*args, "--modules", str(M), "--k", str(K), "--epochs", str(epochs),
                            "--seed", str(seed), "--out", str(run), "--force"]
                rc = subprocess.run(cmd).returncode
            if rc != 0:
                raise ModrtError(f"{run.name} failed (exit {rc}); its run directory is {run}")
            after_each()


def show_plan(out: Path, rows: dict, only: tuple[str, ...], seeds: list[int], epochs: int, epoch_steps: int,
              table: Path, describe) -> None:
    """``--dry-run``: what ``train_missing`` would do with each row x seed, one line each:
    done (``describe(test record)``), being trained by another process, partial (resumed
    from its checkpoint, with its step and the time left at its last logged rate) or not
    started; a run with no directory here that the table at ``table`` records at these
    epochs is done (``describe(its row)``), as ``train_missing`` leaves it. Trains
    nothing, takes no lock."""
    from modrt.train.ptb_table import run_state

    kept = recorded_elsewhere(table, epochs)
    width = max(len(f"{n}-s{s}") for n in (only or rows) for s in seeds)
    for name in only or rows:
        for seed in seeds:
            run = out / f"{name}-s{seed}"
            done, row = finished(run), kept(run)
            state = (f"done: {describe(done[1])}" if done is not None else
                     f"done: {describe(row)} (recorded in {table})" if row is not None else
                     run_state(out, run.name, epochs * epoch_steps))
            click.echo(f"{run.name:<{width}}  {state}")


def _seeds(ctx, param, value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma-separated list of integers, e.g. 1,2,3") from None
    if not seeds:
        raise click.BadParameter("give at least one seed")
    return seeds


@click.command("ptb-small", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/small"),
              show_default=True, help="Parent directory of the runs.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where ptb_table_small.{json,md,png} are written.")
@click.option("--only", multiple=True, type=click.Choice(list(ROWS)), help="Train only these rows (repeatable).")
@click.option("--seeds", default="1,2,3", show_default=True, callback=_seeds, help="Comma-separated seeds.")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True, help="Epochs per run.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="CPU threads per run; run the command once per core, side by side, to use more.")
@click.option("--table-only", is_flag=True, help="Rewrite the table from the finished runs; train nothing.")
@click.option("--dry-run", is_flag=True,
              help="List each row x seed's state (done, training elsewhere, partial, not started); train nothing.")
def ptb_small(out: Path, results: Path, only: tuple[str, ...], seeds: list[int], epochs: int, threads: int,
              table_only: bool, dry_run: bool = False) -> None:
    """Train the small-size table (E = H = 32): every row once per seed, then mean ± sd.

    \b
    Measured cost on one core of a 2-core CPU: a dense step ~0.5-0.9 s at this size
    (the 10,000-word softmax dominates, not Python), so dense (1,1) takes ~7 min an
    epoch; EM with the window E-step (S=10) ~2.8 s a step, the position E-step (S=4)
    ~1.6 s, the word E-step (S=4) ~0.4-0.5 s (a 6-epoch run ~13-16 min): the full table (33 rows
    x 3 seeds x 6 epochs) is about 2.5 core-days; REINFORCE and noisy top-k runs ~11-16 min.

    A run the table records at these epochs (trained in an earlier checkout, or under
    another --out) is not trained again; delete its row from ptb_table_small.json to retrain it.
    """
    if dry_run:
        from modrt.train.ptb_table import WINDOWS_PER_EPOCH

        show_plan(out, ROWS, only, seeds, epochs, WINDOWS_PER_EPOCH, results / "ptb_table_small.json",
                  lambda rec: f"test ppl {rec['test_ppl']:.1f}, {rec['minutes']:.1f} min")
        return
    if not table_only:
        train_missing("ptb", out, {n: (M, K, [*args, *SIZE]) for n, (M, K, args) in ROWS.items()}, only, seeds,
                      epochs, threads, lambda: write(out, results), run_row, results / "ptb_table_small.json")
    rows = write(out, results)
    click.echo(f"{len(rows)} finished runs; table: {results / 'ptb_table_small.md'}")
    if rows and not math.isfinite(min(r["test_ppl"] for r in rows)):
        raise ModrtError("a run reported a non-finite test perplexity")
