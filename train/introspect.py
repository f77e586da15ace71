"""``modrt inspect CKPT``: what the controller learned, as plots and a short summary.

    training.png        loss / perplexity, controller exp(entropy) per example and of
                        the batch average, and each module's share of selections, over
                        training (from metrics.jsonl, or the checkpoint's copy)
    modules_words.png   P(module | word read) for the most frequent words of a split,
                        under the deterministic (greedy) routing used at inference
    summary.txt         the figures behind the plots and each module's top words (by
                        lift: P(module | word) / P(module), among words seen often enough)
    inspect.json        the same numbers, for scripts
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from modrt._exceptions import ModrtError


def _metrics(ckpt_path: Path, ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    path = ckpt_path.parent / "metrics.jsonl"
    if path.is_file():
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ModrtError(f"{path}: not valid JSON lines ({exc})") from exc
    return list(ckpt.get("metrics", []))


def routing_counts(model, tokens: np.ndarray, batch: int = 10, bptt: int = 35) -> dict[str, Any]:
    """Greedy routing over a token stream: counts[m, w] of module m chosen while reading word w,
    and the controller's mean per-example and batch-averaged entropies (nats)."""
    import torch

    from modrt.train import data, routing
    from modrt.train import model as lm

    cfg = model.cfg
    stream = data.batchify(tokens, batch)
    counts = np.zeros((cfg.modules, cfg.vocab_size), dtype=np.int64)
    ent_ex = ent_b = 0.0
    n = 0
    model.eval()
    h = model.init_hidden(batch)
    with torch.no_grad():
        for w in range(data.num_windows(stream, bptt)):
            x, _ = data.window(stream, w, bptt)
            out = model(x, h, lm.greedy_policy())
            h = out.h_last
            a = out.a.numpy()  # (T, B, K)
            words = np.broadcast_to(x.numpy()[..., None], a.shape)
            # A module drawn in two slots of one step counts once.
            for j in range(a.shape[-1]):
                first = np.ones(a.shape[:2], bool) if j == 0 else (a[..., j:j + 1] != a[..., :j]).all(-1)
                np.add.at(counts, (a[..., j][first], words[..., j][first]), 1)
            if out.log_probs is not None:
                ex, b = routing.entropies(out.log_probs)
                ent_ex += float(ex) * x.numel()
                ent_b += float(b) * x.numel()
                n += x.numel()
    return {"counts": counts, "entropy_example": ent_ex / n if n else 0.0,
            "entropy_batch": ent_b / n if n else 0.0}


def top_words(counts: np.ndarray, vocab: list[str], min_count: int, n: int) -> list[list[tuple[str, float, int]]]:
    """Per module: its ``n`` words of highest lift P(m | w) / P(m), among words read at least
    ``min_count`` times (and by module m at least 3 times); (word, lift, times m read it)."""
    per_word = counts.sum(0)  # (V,)
    p_m = counts.sum(1) / max(counts.sum(), 1)  # (M,)
    ok = per_word >= min_count
    out = []
    for m in range(counts.shape[0]):
        if p_m[m] == 0:
            out.append([])
            continue
        # At least 3 readings by module m too: one stray selection of a rare word is no signal.
        lift = np.where(ok & (counts[m] >= 3), counts[m] / np.maximum(per_word, 1) / p_m[m], -1.0)
        best = [i for i in np.argsort(-lift, kind="stable")[:n] if lift[i] > 0]
        out.append([(vocab[i], round(float(lift[i]), 2), int(counts[m, i])) for i in best])
    return out


def plot_training(metrics: list[dict[str, Any]], modules: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if m.get("kind") == "train"]
    valid = [m for m in metrics if m.get("kind") == "valid"]
    fig, ax = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    steps = [m["step"] for m in train]
    ax[0].plot(steps, [m["ppl"] for m in train], label="train (M-step, a*)" if train else None)
    if valid:
        ax[0].plot([m["step"] for m in valid], [m["ppl"] for m in valid], "o-", label="valid (greedy)")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("perplexity")
    ax[0].legend()
    ax[0].set_title(title)
    ax[1].plot(steps, [m["exp_entropy_example"] for m in train], label="per example")
    ax[1].plot(steps, [m["exp_entropy_batch"] for m in train], label="of the batch average")
    ax[1].axhline(modules, color="grey", ls=":", lw=1, label=f"M = {modules}")
    ax[1].set_ylabel("controller exp(entropy)")
    ax[1].set_ylim(0, modules * 1.05 + 0.5)
    ax[1].legend()
    usage = np.array([m["module_usage"] for m in train], dtype=float) if train else np.zeros((0, modules))
    if len(usage):
        share = usage / np.maximum(usage.sum(1, keepdims=True), 1)
        # Distinct colours for up to 20 modules (the default cycle repeats after 10).
        cmap = plt.get_cmap("tab20" if modules > 10 else "tab10")
        colors = [cmap(i % cmap.N) for i in range(modules)]
        ax[2].stackplot(steps, share.T, labels=[f"m{i}" for i in range(modules)], colors=colors)
        if modules <= 16:
            ax[2].legend(ncol=min(modules, 8), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax[2].set_ylabel("share of selections")
    ax[2].set_xlabel("training step")
    ax[2].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(counts: np.ndarray, vocab: list[str], words: int, title: str, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_word = counts.sum(0)
    top = [int(i) for i in np.argsort(-per_word, kind="stable")[:words] if per_word[i] > 0]
    p = counts[:, top] / np.maximum(per_word[top], 1)  # (M, words): P(module | word)
    M = counts.shape[0]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(top) + 2), max(3, 0.3 * M + 1.5)))
    # The colour scale ends at the largest share so weak preferences stay visible.
    im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(p.max()), 1e-6))
    ax.set_xticks(range(len(top)), [vocab[i] for i in top], rotation=90, fontsize=8)
    ax.set_yticks(range(M), [f"m{i}" for i in range(M)], fontsize=8)
    ax.set_xlabel("word read at the step (most frequent first)")
    ax.set_ylabel("module")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="P(module | word)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [vocab[i] for i in top]


@click.command("inspect", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the PNGs and summary go.  [default: <ckpt dir>/inspect]")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="valid", show_default=True,
              help="Text the routing is measured on.")
@click.option("--tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Use only the first N tokens of the split (0: all).")
@click.option("--words", type=click.IntRange(min=1), default=40, show_default=True,
              help="Most frequent words shown in the heatmap.")
@click.option("--min-count", type=click.IntRange(min=1), default=20, show_default=True,
              help="A module's top words are chosen among words read at least this often.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="PTB directory (default: as for modrt train ptb).")
def inspect_command(ckpt: Path, out: Path | None, split: str, tokens: int, words: int, min_count: int,
                    data: Path | None) -> None:
    """Plot what a trained modular network's controller does.

    \b
    Writes training.png (perplexity, controller exp(entropy) per example and of
    the batch average, module shares over training), modules_words.png (which
    modules serve which frequent words), summary.txt and inspect.json.
    """
    try:
        import matplotlib  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModrtError(f"modrt inspect needs PyTorch and matplotlib: pip install 'modrt[train]' "
                         f"({exc.name} is missing)") from exc
    from modrt.data import ptb
    from modrt.train.checkpoint import load_model

    model, state = load_model(ckpt)  # one-line errors for missing / wrong checkpoints
    cfg = model.cfg
    out = out or ckpt.parent / "inspect"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModrtError(f"--out {out}: cannot create ({exc.strerror or exc})") from exc
    corpus = ptb.load(data)
    if list(corpus.vocab) != list(state["vocab"]):
        raise ModrtError(f"{ckpt}: its vocabulary is not this PTB data's")
    ids = corpus.split(split)
    if tokens:
        ids = ids[:tokens]
    if len(ids) < 20:
        raise ModrtError(f"--tokens {tokens}: too few tokens to measure routing")
    metrics = _metrics(ckpt, state)
    title = f"{cfg.method} M={cfg.modules} K={cfg.k}, step {state.get('step')}"
    plot_training(metrics, cfg.modules, title, out / "training.png")
    r = routing_counts(model, ids, batch=min(10, max(1, len(ids) // 40)))
    counts = r["counts"]
    vocab = list(state["vocab"])
    shown = plot_heatmap(counts, vocab, words, f"{title}: P(module | word), {split}", out / "modules_words.png")
    use = counts.sum(1)
    share = use / max(use.sum(), 1)
    nz = share[share > 0]
    usage_exp_entropy = float(math.exp(-(nz * np.log(nz)).sum()))
    tops = top_words(counts, vocab, min_count, 8)
    report = {
        "checkpoint": ckpt.name, "method": cfg.method, "modules": cfg.modules, "k": cfg.k,
        "step": state.get("step"), "split": split, "tokens": int(len(ids)),
        "module_share": [round(float(s), 4) for s in share],
        "modules_in_use": int((use > 0).sum()),
        "usage_exp_entropy": round(usage_exp_entropy, 3),
        "controller_exp_entropy_example": round(math.exp(r["entropy_example"]), 3),
        "controller_exp_entropy_batch": round(math.exp(r["entropy_batch"]), 3),
        "heatmap_words": shown,
        "top_words": {f"m{m}": [w for w, _, _ in t] for m, t in enumerate(tops)},
    }
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"{title} on {len(ids)} {split} tokens (greedy routing)",
        f"modules in use: {report['modules_in_use']}/{cfg.modules}; exp(entropy) of module use "
        f"{report['usage_exp_entropy']} of {cfg.modules}",
        f"controller exp(entropy): per example {report['controller_exp_entropy_example']}, "
        f"of the batch average {report['controller_exp_entropy_batch']}",
        "",
        f"module  share   top words by lift P(m|w)/P(m) (words read >= {min_count} times)",
    ]
    for m in range(cfg.modules):
        t = ", ".join(f"{w} ({lift})" for w, lift, _ in tops[m]) or "-"
        lines.append(f"m{m:<5}  {share[m] * 100:5.1f}%  {t}")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    click.echo(text, nl=False)
    click.echo(f"wrote {out / 'training.png'}, {out / 'modules_words.png'}, summary.txt, inspect.json")
