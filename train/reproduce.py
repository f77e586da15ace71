"""``modrt reproduce ptb``: the paper's Penn Treebank table under one fixed protocol.

Every configuration of Kirsch et al. (2018), Table 1 (DESIGN.md §3) is trained with
``modrt train ptb`` in its own run directory, one after another, with the same sizes,
epochs, seed and data. Each run is a subprocess, so an interruption loses at most the
steps since that run's last checkpoint: running the command again skips finished
configurations and resumes the unfinished one from its ``ckpt.pt``. Several processes may
run the command side by side (one per core, ``--threads 1``): each configuration is
claimed with a lock file under ``OUT/.locks`` while it trains, and a process skips the
ones another holds. After every configuration the table is rewritten:

    results/ptb_table.json   one object per finished configuration
    results/ptb_table.md     our test perplexity beside the paper's
    results/ptb_curves.png   validation perplexity per epoch, a panel per column
                             (unfinished runs too, so far as they got)

Noisy top-k is trained with k=4, as in the paper's table ("noisy top-k (k=4)"), and its
figures sit in the columns of its M (the paper's (15,1) and (5,1) columns).

EM is trained twice per column: with our E-step score log p(y|x,a) (``--prior-weight 0``,
the default of ``modrt train ptb``) and with the paper's joint score log p(y|x,a) +
log p(a|x) (``--prior-weight 1``, rows ``em-joint``), so the table shows the method as the
paper states it beside the departure docs/design-notes.md argues for. Both are compared
with the paper's one EM figure per column.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from modrt._exceptions import ModrtError
from modrt.train.locks import claim, held


@dataclass(frozen=True)
class Config:
    method: str
    modules: int
    k: int
    column: str  # the paper's (M,K) column this figure belongs to
    paper: float  # the paper's test perplexity
    prior_weight: float = 0.0  # EM only: the E-step score's weight on log p(a|x) (1: the paper's joint)

    @property
    def key(self) -> str:
        """The table's row: the method, or ``em-joint`` for EM under the paper's joint score."""
        return "em-joint" if self.method == "em" and self.prior_weight else self.method

    @property
    def name(self) -> str:
        return f"{self.key}-M{self.modules}K{self.k}"


# Kirsch, Kunze & Barber (NeurIPS 2018), Table 1: PTB test perplexity.
# In run order: column by column, so early runs already compare methods at (15,1).
TABLE = (
    Config("em", 15, 1, "15,1", 229.651),
    Config("reinforce", 15, 1, "15,1", 240.760),
    Config("noisy-topk", 15, 4, "15,1", 422.636),
    Config("dense", 1, 1, "15,1", 247.408),
    Config("em", 5, 1, "5,1", 236.809),
    Config("reinforce", 5, 1, "5,1", 240.450),
    Config("noisy-topk", 5, 4, "5,1", 338.275),
    Config("em", 15, 3, "15,3", 246.493),
    Config("reinforce", 15, 3, "15,3", 274.060),
    Config("dense", 3, 3, "15,3", 241.294),
    Config("em", 5, 3, "5,3", 236.314),
    Config("reinforce", 5, 3, "5,3", 267.585),
    # EM as the paper scores its E-step (joint log p(y, a|x)); last, as it is not our default.
    Config("em", 15, 1, "15,1", 229.651, prior_weight=1.0),
    Config("em", 5, 1, "5,1", 236.809, prior_weight=1.0),
    Config("em", 15, 3, "15,3", 246.493, prior_weight=1.0),
    Config("em", 5, 3, "5,3", 236.314, prior_weight=1.0),
)
COLUMNS = ("15,1", "5,1", "15,3", "5,3")
# The table's rows (Config.key), in order.
METHOD_ORDER = ("em", "em-joint", "reinforce", "noisy-topk", "dense")
METHOD_LABEL = {"em": "EM modular", "em-joint": "EM modular, paper's joint E-step score",
                "reinforce": "REINFORCE", "noisy-topk": "noisy top-k (k=4)", "dense": "dense baseline"}

# The protocol: every configuration trains with these (and the ModelConfig/TrainConfig
# defaults for everything else: E=128, H=256, T=35, B=64, Adam 1e-3, S=10, E-step on every
# visit scored by the likelihood - see docs/design-notes.md, "E-step").
EPOCHS = 6
SEED = 1
WINDOWS_PER_EPOCH = 415  # PTB's training text in 35-step windows of 64 streams


def finished(run: Path) -> dict | None:
    """The run's final test record, or None if it has not finished."""
    return _last(run, "test")


def _records(run: Path, kind: str) -> list[dict]:
    """The run's metrics records of this kind, in order; a line still being written is skipped."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def _last(run: Path, kind: str) -> dict | None:
    """The run's last metrics record of this kind, or None."""
    recs = _records(run, kind)
    return recs[-1] if recs else None


def progress(run: Path) -> tuple[int, float | None] | None:
    """(last logged step, its steps/s) of an unfinished run, or None if it logged none."""
    last = _last(run, "train")
    return None if last is None else (int(last["step"]), last.get("steps_per_s"))


def row(cfg: Config, rec: dict, epochs: int, seed: int, run: Path | None = None) -> dict:
    """One finished configuration's entry of ptb_table.json. EM entries also carry the
    E-step score's ``prior_weight`` (0: log p(y|x,a); 1: the paper's joint); given its run
    directory, the entry keeps the validation perplexity per epoch (``valid_curve``), so
    the table and its curves outlive the run directories."""
    out = {
        "method": cfg.method, "modules": cfg.modules, "k": cfg.k, "column": cfg.column,
        "valid_ppl": rec["valid_ppl"], "test_ppl": rec["test_ppl"], "minutes": rec["minutes"],
        "usage_exp_entropy": rec.get("usage_exp_entropy"), "modules_in_use": rec.get("modules_in_use"),
        "steps": rec["step"], "epochs": epochs, "seed": seed, "paper_test_ppl": cfg.paper,
    }
    if cfg.method == "em":
        out["prior_weight"] = cfg.prior_weight
    if run is not None:
        out["valid_curve"] = [[int(r["epoch"]), float(r["ppl"])] for r in _records(run, "valid")]
    return out


def recorded(results: Path, epochs: int, seed: int, steps: int) -> dict[str, dict]:
    """The entries of an existing ``results/ptb_table.json`` trained under this protocol
    (same epochs and seed; with ``steps``, stopped at that step), by configuration name.
    The committed table is the record: a configuration in it is not trained again when
    its run directory is absent (a fresh clone), and it stays in the rewritten table."""
    path = results / "ptb_table.json"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    names = {c.name for c in TABLE}
    out = {}
    for r in entries if isinstance(entries, list) else []:
        try:
            name = entry_name(r)
            same = r["epochs"] == epochs and r["seed"] == seed and (not steps or r["steps"] == steps)
        except (KeyError, TypeError):
            continue
        if same and name in names:
            out[name] = r
    return out


def table_rows(out: Path, kept: dict[str, dict], epochs: int, seed: int) -> list[dict]:
    """The table in TABLE's order: each configuration's finished run under ``out``, else its
    entry ``kept`` from the existing table."""
    rows = []
    for c in TABLE:
        rec = finished(out / c.name)
        if rec is not None:
            rows.append(row(c, rec, epochs, seed, out / c.name))
        elif c.name in kept:
            rows.append(kept[c.name])
    return rows


def row_key(r: dict) -> str:
    """The table row (Config.key) of a ptb_table.json entry."""
    return "em-joint" if r["method"] == "em" and r.get("prior_weight") else r["method"]


def entry_name(r: dict) -> str:
    """The configuration (Config.name) of a ptb_table.json entry."""
    return f"{row_key(r)}-M{r['modules']}K{r['k']}"


def markdown(rows: list[dict], epochs: int, seed: int) -> str:
    by = {(row_key(r), r["column"]): r for r in rows}
    paper = {(c.key, c.column): c for c in TABLE}
    lines = [
        "# Penn Treebank test perplexity: ours (paper)",
        "",
        f"Protocol: every configuration trained {epochs} epochs, seed {seed}, E=128, H=256, T=35, B=64, "
        "Adam 1e-3, EM with S=10 and the E-step on every visit, scored by log p(y|x,a) (EM modular, our "
        "default) or by the paper's log p(y|x,a) + log p(a|x) (joint), on the same data; "
        "written by `modrt reproduce ptb`. Lower is better. "
        "A dash: not run yet. Paper: Kirsch, Kunze & Barber (NeurIPS 2018), Table 1; its EM figure "
        "stands beside both EM rows.",
        "",
        "| method | (M,K)=(15,1) | (5,1) | (15,3) | (5,3) |",
        "|---|---|---|---|---|",
    ]
    for method in METHOD_ORDER:
        cells = []
        for col in COLUMNS:
            c = paper.get((method, col))
            if c is None:
                cells.append("")
                continue
            r = by.get((method, col))
            ours = f"**{r['test_ppl']:.1f}**" if r else "–"
            label = f"({c.modules},{c.k}) " if c.method in ("dense", "noisy-topk") else ""
            cells.append(f"{label}{ours} ({c.paper:.1f})")
        lines.append(f"| {METHOD_LABEL[method]} | " + " | ".join(cells) + " |")
    lines += ["", "| run | valid ppl | test ppl | minutes | modules in use | exp usage entropy |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {row_key(r)} M={r['modules']} K={r['k']} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | "
                     f"{r['minutes']:.1f} | {r['modules_in_use']}/{r['modules']} | {r['usage_exp_entropy']} |")
    return "\n".join(lines) + "\n"


def write_table(results: Path, rows: list[dict], epochs: int, seed: int, out: Path | None = None) -> None:
    """The table's JSON and Markdown, and (given the runs' parent ``out``) its curves."""
    results.mkdir(parents=True, exist_ok=True)
    (results / "ptb_table.json").write_text(json.dumps(rows, indent=1) + "\n")
    (results / "ptb_table.md").write_text(markdown(rows, epochs, seed))
    if out is not None:
        curves(out, results / "ptb_curves.png", rows)


METHOD_STYLE = {"em": ("tab:red", "o-"), "em-joint": ("tab:purple", "v-."), "reinforce": ("tab:blue", "s-"),
                "noisy-topk": ("tab:green", "^-"), "dense": ("black", "D--")}


def curves(out: Path, path: Path, rows: list[dict] = ()) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Plot every run's validation perplexity per epoch, one panel per column of the paper's
    table, each method's line labelled with its test perplexity (or "training"). Dense
    (1,1) is drawn in both K=1 panels and dense (3,3) in both K=3 panels, as the
    reference a modular layer has to beat. A configuration with no run under ``out`` is
    drawn from its table entry in ``rows``: its ``valid_curve``, or (an entry written
    before the table kept curves) its final validation perplexity alone, as one point
    labelled "final only". Returns the plotted points {(row, column): [(epoch, valid
    ppl), ...]} (row: Config.key); draws nothing if no run has finished an epoch, or if
    matplotlib is missing."""
    entries = {entry_name(r): r for r in rows}
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    labels: dict[tuple[str, str], str] = {}
    for col in COLUMNS:
        k = int(col.split(",")[1])
        for c in TABLE:
            if not (c.column == col or (c.method == "dense" and c.k == k)):
                continue
            points = [(int(r["epoch"]), float(r["ppl"])) for r in _records(out / c.name, "valid")]
            done = finished(out / c.name)
            note = ""
            if not points and c.name in entries:
                done = entry = entries[c.name]
                points = [(int(e), float(p)) for e, p in entry.get("valid_curve") or []]
                if not points:
                    points, note = [(int(entry["epochs"]), float(entry["valid_ppl"]))], " (final only)"
            if not points:
                continue
            series[(c.key, col)] = points
            labels[(c.key, col)] = (f"{METHOD_LABEL[c.key]} ({c.modules},{c.k}): "
                                    + (f"test {done['test_ppl']:.1f}" if done else "training") + note)
    if not series:
        return series
    try:
        import matplotlib
    except ImportError:
        return series
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(e for points in series.values() for e, _ in points)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey=True)
    for ax, col in zip(axes.flat, COLUMNS, strict=True):
        ax.set_xlim(0.7, last + 0.3)  # every panel on the same epochs, also one with final points only
        ax.set_xticks(range(1, last + 1))
        drawn = [m for m in METHOD_ORDER if (m, col) in series]
        for method in drawn:
            color, style = METHOD_STYLE[method]
            ax.plot(*zip(*series[(method, col)], strict=True), style, color=color, label=labels[(method, col)], ms=4)
        ax.set_title(f"(M,K) = ({col})")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("epoch")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run has finished an epoch yet", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation perplexity (greedy routing)")
    fig.suptitle("Penn Treebank: validation perplexity per epoch (modrt reproduce ptb)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def reproduce() -> None:
    """Reproduce a table of the paper under one fixed protocol."""


@reproduce.command("ptb")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/reproduce"),
              show_default=True, help="Parent directory of the per-configuration runs.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where ptb_table.json, ptb_table.md and ptb_curves.png are written.")
@click.option("--only", "only", multiple=True, type=click.Choice(METHOD_ORDER),
              help="Train only these rows (repeatable; em-joint: EM under the paper's joint E-step score). "
                   "The table keeps every finished run.")
@click.option("--epochs", type=click.IntRange(min=1), default=EPOCHS, show_default=True,
              help="Epochs per configuration (the protocol; change it only for a separate table).")
@click.option("--seed", type=int, default=SEED, show_default=True, help="Seed of every configuration.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="PTB directory (default: as for modrt train ptb).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop every run after this many steps (0: the protocol's epochs). A smoke test, not the table.")
@click.option("--dry-run", is_flag=True, help="List the configurations and their state, train nothing.")
@click.option("--table-only", is_flag=True,
              help="Rewrite the table and curves from the finished runs (and the table's entries), train nothing.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="CPU threads per run (0: PyTorch's default). 1 when the machine does other work too.")
@click.option("--quiet", "-q", is_flag=True, help="No per-run progress bars.")
@click.option("--size", type=click.Choice(["default", "small"]), default="default", show_default=True,
              help="small: the capacity-limited protocol (E = H = 32, no dropout, --seeds): the same as "
                   "`modrt reproduce ptb-small`, which has its options (--only takes its row names).")
@click.option("--seeds", default=None, help="--size small: comma-separated seeds [default: 1,2,3].")
@click.pass_context
def ptb(ctx: click.Context, out: Path, results: Path, only: tuple[str, ...], epochs: int, seed: int,
        data: Path | None, device: str, steps: int, threads: int, dry_run: bool, table_only: bool, quiet: bool,
        size: str, seeds: str | None) -> None:
    """Train every configuration of the paper's PTB table and write the table.

    \b
    EM and REINFORCE at (M,K) = (15,1), (5,1), (15,3), (5,3); noisy top-k (k=4) at
    M = 15 and 5; dense baselines (1,1) and (3,3): the paper's 12 cells. Then EM
    again in each column with the paper's joint E-step score (--prior-weight 1;
    the first EM row uses our default, the likelihood alone): 16 runs of
    `modrt train ptb` with the same sizes, epochs and seed. Interrupt at any
    time (Ctrl-C): running the same command again skips finished runs and
    resumes the current one from its checkpoint. To use two cores, run it twice
    side by side with --threads 1: each process skips the configurations the
    other is training.

    Budget on a 2-core CPU at one thread per run: about 12-65 minutes for dense,
    REINFORCE and noisy top-k, 90-125 for EM (its E-step scores S=10 candidate
    selections per window). Writes ptb_table.json, ptb_table.md and ptb_curves.png
    (validation perplexity per epoch, a panel per column) under --results.
    """
    if size == "small":
        _small(ctx, out, results, only, epochs, seeds, threads, table_only)
        return
    if seeds is not None:
        raise click.UsageError("--seeds goes with --size small (the default size runs one --seed)")
    from tqdm import tqdm

    todo = [c for c in TABLE if not only or c.key in only]
    kept = recorded(results, epochs, seed, steps)
    on_disk = {c.name: finished(out / c.name) for c in TABLE}
    state = {name: rec or kept.get(name) for name, rec in on_disk.items()}
    if dry_run:
        total = steps or epochs * WINDOWS_PER_EPOCH
        for c in TABLE:
            rec = state[c.name]
            at = None if rec else progress(out / c.name)
            where = "" if on_disk[c.name] else f" ({results / 'ptb_table.json'})"
            s = (f"done: test {rec['test_ppl']}{where}" if rec else
                 "training (another process)" if held(out, c.name) else
                 "partial (will resume)" if (out / c.name / "ckpt.pt").exists() else
                 "started, no checkpoint yet" if at else "not started")
            if at is not None:
                step, rate = at
                s += f", step {step}/{total}"
                if rate:
                    s += f", ~{(total - step) / rate / 60:.0f} min left at {rate:.2f} steps/s"
            click.echo(f"{c.name:<22} paper {c.paper:>8.3f}   {s}")
        return
    write_table(results, table_rows(out, kept, epochs, seed), epochs, seed, out)
    if table_only:
        click.echo(f"table: {results / 'ptb_table.md'}")
        return
    bar = tqdm(todo, desc="reproduce ptb", unit="run", dynamic_ncols=True, position=0)
    busy = []
    for c in bar:
        bar.set_postfix_str(c.name)
        run = out / c.name
        if state[c.name] is not None:
            continue
        lock = claim(out, c.name)
        if lock is None:
            busy.append(c.name)
            bar.write(f"{c.name}: another process is training it; skipped")
            continue
        with lock:
            if finished(run) is None:  # another process may have finished it meanwhile
                rc = _train(c, run, epochs, seed, device, steps, data, threads, quiet)
                if rc == 130:
                    bar.close()
                    click.echo(f"modrt: interrupted during {c.name}; run the same command again to resume", err=True)
                    raise SystemExit(130)
            else:
                rc = 0
        rec = finished(run)
        if rc != 0 or rec is None:
            raise ModrtError(f"{c.name} failed (exit {rc}); its run directory is {run}")
        # Re-read every run from disk: another `reproduce` process may have finished some.
        rows = table_rows(out, kept, epochs, seed)
        state = {x.name: finished(out / x.name) or kept.get(x.name) for x in TABLE}
        write_table(results, rows, epochs, seed, out)
        bar.write(f"{c.name}: valid {rec['valid_ppl']}, test {rec['test_ppl']} (paper {c.paper}), "
                  f"{rec['minutes']} min")
    bar.close()
    if busy:
        click.echo(f"still training in another process: {', '.join(busy)}; the table gains them when it finishes")
    click.echo(f"table: {results / 'ptb_table.md'}")


def _train(c: Config, run: Path, epochs: int, seed: int, device: str, steps: int, data: Path | None,
           threads: int, quiet: bool) -> int:
    """One configuration as a ``modrt train ptb`` subprocess (resumed from its checkpoint if
    there is one); its exit code, 130 when interrupted."""
    cmd = [sys.executable, "-m", "modrt", "train", "ptb"]
    if (run / "ckpt.pt").exists():
        cmd += ["--resume", str(run / "ckpt.pt"), "--device", device]
    else:
        cmd += ["--method", c.method, "--modules", str(c.modules), "--k", str(c.k)]
        if c.method == "em":  # explicit, so the protocol does not follow train's default
            cmd += ["--prior-weight", str(c.prior_weight)]
        cmd += ["--epochs", str(epochs), "--seed", str(seed), "--device", device,
                "--out", str(run), "--force", "--steps", str(steps)]
    if data is not None:
        cmd += ["--data", str(data)]
    if threads:
        cmd += ["--threads", str(threads)]
    if quiet:
        cmd.append("--quiet")
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return 130


def _small(ctx: click.Context, out: Path, results: Path, only: tuple[str, ...], epochs: int,
           seeds: str | None, threads: int, table_only: bool) -> None:
    """``reproduce ptb --size small``: run ``ptb-small`` with the options both have."""
    from modrt.train import small

    src = ctx.get_parameter_source
    if only:
        raise click.UsageError("--only with --size small: use `modrt reproduce ptb-small --only ROW` "
                               f"(rows: {', '.join(small.ROWS)})")
    for name in ("data", "device", "steps", "dry_run", "seed"):
        if src(name) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} does not go with --size small")
    defaults = {p.name: p.default for p in small.ptb_small.params}
    ctx.invoke(small.ptb_small,
               out=out if src("out") is not click.core.ParameterSource.DEFAULT else defaults["out"],
               results=results, only=(), seeds=small._seeds(ctx, None, seeds or defaults["seeds"]),
               epochs=epochs if src("epochs") is not click.core.ParameterSource.DEFAULT else defaults["epochs"],
               threads=threads if src("threads") is not click.core.ParameterSource.DEFAULT else defaults["threads"],
               table_only=table_only)


def _register_small() -> None:
    from modrt.train.small import ptb_small

    reproduce.add_command(ptb_small)


_register_small()
