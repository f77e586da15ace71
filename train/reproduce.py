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

import subprocess
import sys
from pathlib import Path

import click

from modrt._exceptions import ModrtError
from modrt.train.locks import claim, held  # noqa: F401 - held: reproduce's name for the lock probe
from modrt.train.ptb_table import (  # noqa: F401 - reproduce's names for the table's, as before the split
    COLUMNS,
    EPOCHS,
    METHOD_LABEL,
    METHOD_ORDER,
    METHOD_STYLE,
    SEED,
    TABLE,
    WINDOWS_PER_EPOCH,
    Config,
    _last,
    _records,
    curves,
    entry_name,
    finished,
    markdown,
    progress,
    recorded,
    row,
    row_key,
    run_state,
    table_rows,
    write_table,
)


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
            where = "" if on_disk[c.name] else f" ({results / 'ptb_table.json'})"
            s = f"done: test {rec['test_ppl']}{where}" if rec else run_state(out, c.name, total)
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
        cmd += c.args  # EM: explicit, so the protocol does not follow train's default
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
    for name in ("data", "device", "steps", "seed"):
        if src(name) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} does not go with --size small")
    defaults = {p.name: p.default for p in small.ptb_small.params}
    ctx.invoke(small.ptb_small,
               out=out if src("out") is not click.core.ParameterSource.DEFAULT else defaults["out"],
               results=results, only=(), seeds=small._seeds(ctx, None, seeds or defaults["seeds"]),
               epochs=epochs if src("epochs") is not click.core.ParameterSource.DEFAULT else defaults["epochs"],
               threads=threads if src("threads") is not click.core.ParameterSource.DEFAULT else defaults["threads"],
               table_only=table_only, dry_run=ctx.params["dry_run"])


def _register_small() -> None:
    from modrt.train.cifar_table import cifar10
    from modrt.train.small import ptb_small

    reproduce.add_command(ptb_small)
    reproduce.add_command(cifar10)


_register_small()
