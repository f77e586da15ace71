"""``modrt reproduce cifar10``: EM vs the dense network of equal active width vs REINFORCE vs
noisy top-k on CIFAR-10, several seeds, train and test accuracy per epoch.

The paper's claim to check (Kirsch et al. 2018, §4.2): modular layers raise *training*
accuracy over the non-modular baseline; test accuracy depends on the controller. Every row
of ``ROWS`` is trained once per seed with ``modrt train cifar10`` in ``OUT/<row>-s<seed>``
(resumed when interrupted, finished runs skipped), then from the finished runs:

    results/cifar10_table.json   one object per finished run (per-epoch curves included)
    results/cifar10_table.md     mean ± sd per configuration
    results/cifar10_table.png    train (subset) and test accuracy per epoch, one line per run

Sizes: ``--size demo`` (default here) is the official demo's network (4 layers x 5 modules
of 8 filters), which one CPU core trains in minutes an epoch; ``--size default`` the wide
inference network (M=8 of 64-128 filters), about 10x the arithmetic; ``--size mid`` M=8 of
16-16-32-32 filters, between the two (routing still pays at inference there, and its dense
network cannot fit the training set as the wide one does).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import click

from modrt._exceptions import ModrtError
from modrt.train.small import _msd, _seeds, finished, merged, show_plan, train_missing, variant

# One epoch of CIFAR-10's 50,000 training images in batches of 128: the warm start's dense phase.
EPOCH_STEPS = 391
# EM with the image analogue of the variant the PTB issue settled (the word table has no
# image counterpart): the paper's joint score, so that a* moves towards what the controller
# predicts from the image, a BASE-style cap per layer so that it cannot collapse onto the
# modules the controller prefers, and a warm start of one dense epoch copied into every module.
EM_CAP_WARM = ["--method", "em", "--prior-weight", "1", "--capacity", "1.2", "--warm-start", str(EPOCH_STEPS)]

# name -> (M, K, modrt train cifar10 arguments), at the official demo's size (--size demo).
# Dense (1,1) has the active width of a K=1 row; dense (2,2) that of noisy top-k's k=2 (with
# k=1 its gate gets no gradient).
ROWS = {
    "dense-M1K1": (1, 1, ["--method", "dense"]),
    "dense-M2K2": (2, 2, ["--method", "dense"]),
    "em-M5K1": (5, 1, ["--method", "em"]),
    # The paper's joint E-step score (our default scores by the likelihood alone).
    "em-joint-M5K1": (5, 1, ["--method", "em", "--prior-weight", "1"]),
    "em-cap-warm-joint-M5K1": (5, 1, EM_CAP_WARM),
    # The same with the likelihood-only score.
    "em-cap-warm-M5K1": (5, 1, [*EM_CAP_WARM[:2], *EM_CAP_WARM[4:]]),
    # The same with a* started from the controller's own choice (within the cap).
    "em-ctrl-cap-warm-joint-M5K1": (5, 1, [*EM_CAP_WARM, "--a-star-init", "controller"]),
    # The same with controllers that read a 4x4 grid of their layer's input, not its global
    # average (layer 0's controller otherwise sees three numbers, the mean colour).
    "em-ctrl-cap-warm-joint-pool4-M5K1": (5, 1, [*EM_CAP_WARM, "--a-star-init", "controller",
                                                  "--controller-pool", "4"]),
    "reinforce-M5K1": (5, 1, ["--method", "reinforce"]),
    "noisy-topk-M5K2": (5, 2, ["--method", "noisy-topk"]),
}
# The same at the default (wide) size: M=8 modules of 64, 64, 128, 128 filters.
WIDE = {
    "wide-dense-M1K1": (1, 1, ["--method", "dense"]),
    # S=4 candidates: at this width an E-step candidate costs a third of a training step.
    "wide-em-cap-warm-joint-M8K1": (8, 1, [*EM_CAP_WARM, "--samples", "4"]),
    # The demo size's best row (controller-started a*, controllers reading a 4x4 grid) here.
    "wide-em-ctrl-cap-warm-joint-pool4-M8K1": (8, 1, [*EM_CAP_WARM, "--samples", "4", "--a-star-init", "controller",
                                                       "--controller-pool", "4"]),
}
# Between the two (--size mid, ImageModelConfig.mid: the default's M=8 at 16-16-32-32
# filters): routing still pays at inference and the dense network is capacity-limited
# (results/cifar10_bench.md, "Module width"; results/README.md).
MID = {
    "mid-dense-M1K1": (1, 1, ["--method", "dense"]),
    "mid-em-ctrl-cap-warm-joint-pool4-M8K1": (8, 1, WIDE["wide-em-ctrl-cap-warm-joint-pool4-M8K1"][2]),
}
SIZE_ROWS = {"demo": ROWS, "mid": MID, "default": WIDE}  # name: modrt train cifar10 --size
ALL_ROWS = {**ROWS, **MID, **WIDE}


def run_row(run: Path) -> dict | None:
    """A finished run's cifar10_table.json entry, or None."""
    done = finished(run)
    if done is None:
        return None
    recs, rec, ckpt = done
    m, t = ckpt["model_config"], ckpt["train_config"]
    # The training log's batch accuracy over the last epoch: under the selection each method
    # trains with (EM: a*, which the E-step chose seeing the label; REINFORCE: its draws;
    # noisy top-k: its noisy gates), augmented images when on; the usual running figure.
    last = [r["acc"] for r in recs if r.get("kind") == "train" and r.get("epoch") == t["epochs"] - 1 and "acc" in r]
    return {
        "run": run.name, "method": m["method"], "modules": m["modules"], "k": m["k"], "seed": t["seed"],
        "channels": list(m["channels"]), "epochs": t["epochs"], "steps": rec["step"], "augment": t["augment"],
        "prior_weight": t["prior_weight"] if m["method"] == "em" else None,
        # images have the one E-step; S when not the default's
        "variant": image_variant(m, t),
        "controller_pool": m.get("controller_pool", 1),
        "train_acc": rec["train_acc"], "test_acc": rec["test_acc"],
        "train_acc_fit": statistics.mean(last) if last else None,
        "usage_exp_entropy": rec.get("usage_exp_entropy"), "modules_in_use": rec.get("modules_in_use"),
        "controller_exp_entropy": rec.get("controller_exp_entropy"), "minutes": rec["minutes"],
        "curve": [{"epoch": r["epoch"], "test_acc": r["test_acc"], "train_acc_subset": r["train_acc_subset"]}
                  for r in recs if r.get("kind") == "valid"],
    }


def image_variant(model_config: dict, train_config: dict) -> str:
    """``variant`` for an image run: images have the one E-step (no "window"); S when not the
    default's; the controllers' pooling grid when not global."""
    method = model_config["method"]
    parts = [p for p in variant(train_config, method).split("+") if p and p != "window"]
    if method == "em" and train_config.get("samples", 10) != 10:
        parts.append(f"S={train_config['samples']}")
    if (pool := model_config.get("controller_pool", 1)) != 1:
        parts.append(f"controller pool {pool}x{pool}")
    return "+".join(parts)


def label(r: dict) -> str:
    """A run's configuration without its seed or width: e.g. ``em capacity 1.2+warm+joint (8,1)``."""
    v = f" {r['variant']}" if r.get("variant") else ""
    return f"{r['method']}{v} ({r['modules']},{r['k']})"


def group(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        width = "-".join(str(c) for c in r["channels"])
        out.setdefault(f"{label(r)}, {width} filters, {r['epochs']} ep", []).append(r)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["# CIFAR-10: modular conv layers, mean ± sd over seeds", "",
             "Written by `modrt reproduce cifar10` from the finished runs. Accuracy in % under greedy routing, "
             "clean images (train: all 50,000 training images after the last epoch). Usage exp entropy: exp "
             "of the entropy of module use on the test images, per layer, averaged over layers (M = no "
             "collapse); controller exp entropy: exp of its mean per-image entropy (1 = decided). Train acc "
             "(fit): the training log's batch accuracy over the last epoch, under the selection the method "
             "trains with (EM: a*, chosen by the E-step seeing the label; '-': not logged when the run was "
             "recorded).", "",
             "| configuration | seeds | train acc | train acc (fit) | test acc | modules in use | usage exp entropy "
             "| controller exp entropy | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in group(rows).items():
        fit = [100 * r["train_acc_fit"] for r in rs if r.get("train_acc_fit") is not None]
        fit = _msd(fit) if fit else "-"
        lines.append(f"| {name} | {len(rs)} | {_msd([100 * r['train_acc'] for r in rs])} | {fit} | "
                     f"{_msd([100 * r['test_acc'] for r in rs])} | {_msd([r['modules_in_use'] for r in rs])} | "
                     f"{_msd([r['usage_exp_entropy'] for r in rs])} | {_msd([r['controller_exp_entropy'] for r in rs])}"
                     f" | {_msd([r['minutes'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def curve_name(r: dict) -> str:
        return f"{label(r)}, {'-'.join(str(c) for c in r['channels'])}"

    names = list(dict.fromkeys(curve_name(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2 + 0.16 * len(names)), sharey=True)
    colors = {}
    palette = plt.get_cmap("tab20")  # one colour per configuration (tab10 repeats after ten)
    for r in rows:
        name = curve_name(r)
        first = name not in colors
        color = colors.setdefault(name, palette(len(colors) % 20))
        ep = [c["epoch"] for c in r["curve"]]
        for ax, key in zip(axes, ("train_acc_subset", "test_acc"), strict=True):
            ax.plot(ep, [100 * c[key] for c in r["curve"]], "o-", color=color, ms=3, alpha=0.8,
                    label=name if first else None)
    for ax, title in zip(axes, ("train accuracy (10,000-image subset)", "test accuracy"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, not one tick each
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle("CIFAR-10, modular conv layers (one line per run)")
    # the legend under both panels, where it hides no curve
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.11 * len(names) / 6, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, results: Path) -> list[dict]:
    rows = merged(out, results / "cifar10_table.json", run_row)
    (results / "cifar10_table.md").write_text(markdown(rows))
    if rows:
        plot(rows, results / "cifar10_table.png")
    return rows


def summary(rows: list[dict]) -> str:
    """The paper's claim on these runs, in one line per modular row."""
    groups = group(rows)

    def width(r):  # the dense network of equal active width: same filters, K, epochs
        return tuple(r["channels"]), r["k"], r["epochs"]

    dense = {width(rs[0]): statistics.mean(r["train_acc"] for r in rs) for rs in groups.values()
             if rs[0]["method"] == "dense"}
    lines = []
    for name, rs in groups.items():
        if rs[0]["method"] == "dense" or width(rs[0]) not in dense:
            continue
        gain = 100 * (statistics.mean(r["train_acc"] for r in rs) - dense[width(rs[0])])
        lines.append(f"{name}: train accuracy {gain:+.1f} points over dense of equal active width")
    return "\n".join(lines)


@click.command("cifar10", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/cifar10"),
              show_default=True, help="Parent directory of the runs.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where cifar10_table.{json,md,png} are written.")
@click.option("--only", multiple=True, type=click.Choice(list(ALL_ROWS)),
              help="Train only these rows (repeatable; of any size).")
@click.option("--seeds", default="1,2", show_default=True, callback=_seeds, help="Comma-separated seeds.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Epochs per run.")
@click.option("--size", type=click.Choice(list(SIZE_ROWS)), default="demo", show_default=True,
              help="Which rows to train: the demo network's (modrt train cifar10 --size demo), the default "
                   "wide one's (the rows named wide-*), or the mid one's (mid-*).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="CIFAR-10 (modrt train cifar10 --data).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="CPU threads per run; run the command once per core, side by side, to use more.")
@click.option("--table-only", is_flag=True, help="Rewrite the table from the finished runs; train nothing.")
@click.option("--dry-run", is_flag=True,
              help="List each row x seed's state (done, training elsewhere, partial, not started); train nothing.")
def cifar10(out: Path, results: Path, only: tuple[str, ...], seeds: list[int], epochs: int, size: str,
            data: Path | None, threads: int, table_only: bool, dry_run: bool = False) -> None:
    """Train the CIFAR-10 table: every row once per seed, then mean ± sd and the curves.

    \b
    Measured on one core of a 2-core CPU, two other trainings sharing it: --size demo
    EM (S=10) ~5 steps/s (1.3 min an epoch of 391 batches of 128), dense ~28 steps/s;
    --size default EM (S=4) ~1.65 steps/s (4 min an epoch), dense ~4.2 (1.5 min).

    A run the table records at these epochs (trained in an earlier checkout, or under
    another --out) is not trained again; delete its row from cifar10_table.json to retrain it.
    """
    if dry_run:
        show_plan(out, ALL_ROWS, only or tuple(SIZE_ROWS[size]), seeds, epochs, EPOCH_STEPS,
                  results / "cifar10_table.json",
                  lambda rec: f"test acc {100 * rec['test_acc']:.1f}%, {rec['minutes']:.1f} min")
        return
    if not table_only:
        data_args = ["--data", str(data)] if data else []
        rows = {n: (M, K, [*args, "--size", sz, *data_args]) for sz, table in SIZE_ROWS.items()
                for n, (M, K, args) in table.items()}
        train_missing("cifar10", out, rows, only or tuple(SIZE_ROWS[size]), seeds, epochs, threads,
                      lambda: write(out, results), run_row, results / "cifar10_table.json")
    rows = write(out, results)
    click.echo(f"{len(rows)} finished runs; table: {results / 'cifar10_table.md'}")
    if rows:
        click.echo(summary(rows))
    if any(r["test_acc"] != r["test_acc"] for r in rows):
        raise ModrtError("a run reported a non-finite accuracy")
