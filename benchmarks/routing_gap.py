"""What a trained PTB model loses to its controller, on validation text.

For every window three routings are scored side by side on the same hidden state:

    greedy    the controller's argmax at every step: what `modrt eval` and the runtime serve
    sampled   one draw from the controller
    oracle    the best of the greedy selection and S-1 draws, picked by log p(y|x,a) - with
              the targets in hand, as EM's E-step picks the a* the modules are trained on;
              not deployable (it reads the next words)

A large greedy-vs-oracle gap says the modules are good at what the E-step assigns them
but the controller cannot tell from the history which that is. For a run of the word
E-step (``--e-step word``) a fourth routing is scored,

    table     each word's entry in the learned word -> modules table: the a* the modules
              were trained on, a function of the input word (deployable, but not a
              controller graph of the bundle format)

with how often the controller's greedy choice agrees with it.

    python benchmarks/routing_gap.py runs/reproduce/em-M15K1/ckpt.pt --samples 10 --tokens 20000
"""

from __future__ import annotations

import math
from pathlib import Path

import click
import torch

from modrt.data import ptb
from modrt.train import data
from modrt.train import model as lm
from modrt.train.checkpoint import load_model
from modrt.train.methods import em


@click.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--samples", default=10, show_default=True, help="S: candidates per window for the oracle.")
@click.option("--tokens", default=20_000, show_default=True, help="Validation tokens to score (0: all).")
@click.option("--batch", default=10, show_default=True, help="Parallel streams.")
@click.option("--threads", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--data", "data_dir", default=None, help="PTB directory.")
def main(ckpt: Path, samples: int, tokens: int, batch: int, threads: int, seed: int, data_dir: str | None) -> None:
    torch.set_num_threads(threads)
    model, state = load_model(ckpt)
    if not model.cfg.routed:
        raise click.UsageError(f"{ckpt}: a dense model has no controller to measure")
    corpus = ptb.load(data_dir)
    ids = corpus.split("valid")
    ids = ids[:tokens] if tokens else ids
    stream = data.batchify(ids, batch)
    bptt = state["train_config"]["bptt"]  # the windows it was trained on
    gen = torch.Generator().manual_seed(seed)
    h = model.init_hidden(batch)
    ll = {"greedy": 0.0, "sampled": 0.0, "oracle": 0.0}
    table = (state.get("method") or {}).get("table")
    if table is not None:
        ll["table"] = 0.0
    count, differ, positions, agree = 0, 0, 0, 0
    h_table = h
    with torch.no_grad():
        for w in range(data.num_windows(stream, bptt)):
            x, y = data.window(stream, w, bptt)
            out = model(x, h, lm.greedy_policy())
            r = em.e_step(model, x, y, h, out.a, samples, gen, prior_weight=0.0)  # candidate 0: greedy
            ll["greedy"] += float(r.scores[0].sum())
            ll["sampled"] += float(r.scores[1].sum())
            ll["oracle"] += float(r.scores.max(0).values.sum())
            differ += int((r.best != out.a).any(-1).sum())
            if table is not None:  # its own state: the table's path through the text
                a = table[x]
                by_table = model(x, h_table, lm.given(a))
                ll["table"] += float(model.token_log_likelihood(by_table.hs, y).sum())
                agree += int((a.sort(-1).values == out.a.sort(-1).values).all(-1).sum())
                h_table = by_table.h_last
            positions += out.a.shape[0] * out.a.shape[1]
            count += y.numel()
            h = out.h_last
    cfg = model.cfg
    click.echo(f"{ckpt} ({cfg.method} M={cfg.modules} K={cfg.k}, step {state.get('step')}): "
               f"{count} validation tokens, S={samples}")
    for name, v in ll.items():
        click.echo(f"  {name:<8} ppl {math.exp(-v / count):9.2f}")
    click.echo(f"  the oracle's selection differs from the greedy one at {differ / positions:.1%} of positions")
    if table is not None:
        click.echo(f"  the controller's greedy choice is the word table's at {agree / positions:.1%} of positions")


if __name__ == "__main__":
    main()
