"""The PTB table of ``modrt reproduce ptb``: its configurations (``TABLE``, the protocol),
reading finished runs, and writing ptb_table.{json,md} and ptb_curves.png.

``reproduce.py`` holds the command that trains the runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    method: str
    modules: int
    k: int
    column: str  # the paper's (M,K) column this figure belongs to
    paper: float  # the paper's test perplexity
    prior_weight: float = 0.0  # EM only: the E-step score's weight on log p(a|x) (1: the paper's joint)
    e_step: str = "window"  # EM only: the E-step variant (docs/design-notes.md, "E-step variants")

    @property
    def key(self) -> str:
        """The table's row: the method, ``em-joint`` for EM under the paper's joint score,
        ``em-word`` for EM with the word-table E-step."""
        return _key(self.method, self.prior_weight, self.e_step)

    @property
    def args(self) -> list[str]:
        """``modrt train ptb`` arguments beyond method, M and K (EM's score and variant)."""
        if self.method != "em":
            return []
        if self.e_step == "word":  # the small size's winning variant, as in small.ROWS
            return list(WORD_VARIANT)
        return ["--prior-weight", str(self.prior_weight)]

    @property
    def name(self) -> str:
        return f"{self.key}-M{self.modules}K{self.k}"


def _key(method: str, prior_weight: float, e_step: str) -> str:
    if method != "em":
        return method
    return "em-word" if e_step == "word" else "em-joint" if prior_weight else "em"


# EM's word-table E-step, hash-started, capped, after a dense warm start (small.ROWS'
# em-word-hash-cap-warm rows): the variant that beat dense at the small size.
WORD_VARIANT = ("--e-step", "word", "--samples", "4", "--capacity", "1.2", "--warm-start", "100",
                "--a-star-init", "hash")

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
    # The small size's winning EM variant at the default size (one seed, issue 13).
    Config("em", 15, 1, "15,1", 229.651, e_step="word"),
)
COLUMNS = ("15,1", "5,1", "15,3", "5,3")
# The table's rows (Config.key), in order.
METHOD_ORDER = ("em", "em-joint", "em-word", "reinforce", "noisy-topk", "dense")
METHOD_LABEL = {"em": "EM modular", "em-joint": "EM modular, paper's joint E-step score",
                "em-word": "EM modular, word-table E-step",
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


def epoch_figures(rec: dict) -> str:
    """A run's after-epoch record in a few words: PTB's validation perplexity, or an image
    run's train (10,000-image subset) and test accuracy."""
    if "test_acc" in rec:
        return (f"epoch {rec['epoch']}: train {100 * rec['train_acc_subset']:.1f}% (10k subset), "
                f"test {100 * rec['test_acc']:.1f}%")
    return f"epoch {rec['epoch']}: valid ppl {rec['ppl']:.1f}"


def run_state(out: Path, name: str, total_steps: int) -> str:
    """``--dry-run``'s line for the unfinished run ``OUT/NAME``: trained by another process
    (its lock held), partial (resumed from its checkpoint), started with no checkpoint yet,
    or not started; with its last logged step of ``total_steps``, the time left at its
    rate and its last epoch's figures (``epoch_figures``)."""
    from modrt.train.locks import held

    run = out / name
    at = progress(run)
    state = ("training (another process)" if held(out, name) else
             "partial (will resume)" if (run / "ckpt.pt").exists() else
             "started, no checkpoint yet" if at else "not started")
    if at is not None:
        step, rate = at
        state += f", step {step}/{total_steps}"
        if rate and step < total_steps:
            state += f", ~{(total_steps - step) / rate / 60:.0f} min left at {rate:.2f} steps/s"
    last = _last(run, "valid")
    if last is not None:
        state += f"; {epoch_figures(last)}"
    return state


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
        out["e_step"] = cfg.e_step
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
    return _key(r["method"], r.get("prior_weight", 0.0), r.get("e_step", "window"))


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


METHOD_STYLE = {"em": ("tab:red", "o-"), "em-joint": ("tab:purple", "v-."), "em-word": ("tab:orange", "P-"),
                "reinforce": ("tab:blue", "s-"),
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
