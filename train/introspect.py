"""``modrt inspect CKPT``: what the controller learned, as plots and a short summary.

    training.png        loss / perplexity (accuracy for images), controller exp(entropy)
                        per example and of the batch average, and each module's share of
                        selections, over training (from metrics.jsonl, or the checkpoint's copy)
    modules_words.png   PTB: P(module | word read) for the most frequent words of a split,
                        under the deterministic (greedy) routing used at inference
    modules_classes.png CIFAR-10: P(module | class) per modular layer, greedy routing
    modules_examples.png CIFAR-10: per module of one layer, the test images its controller
                        is surest of among those routed to it
    summary.txt         the figures behind the plots and each module's top words / classes
                        (by lift: P(module | x) / P(module))
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
    if any("acc" in m for m in train):  # an image classifier: accuracy, not perplexity
        ax[0].plot(steps, [m.get("acc") for m in train], label="train batches (M-step)")
        if valid:
            vs = [m["step"] for m in valid]
            ax[0].plot(vs, [m.get("test_acc") for m in valid], "o-", label="test (greedy)")
            ax[0].plot(vs, [m.get("train_acc_subset") for m in valid], "s--", label="train subset (greedy)")
        ax[0].set_ylabel("accuracy")
    else:
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
    if usage.ndim == 3:  # images: (steps, layers, M) -> summed over the layers
        usage = usage.sum(1)
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


def image_routing(model, images: np.ndarray, batch: int = 250) -> dict[str, Any]:
    """Greedy routing of normalised images (N, 3, H, W): the selections (N, L, K), each
    selected module's controller log-probability (N, L, K), and the mean entropies."""
    import torch

    from modrt.train import model as lm
    from modrt.train import routing

    sel, conf, ent_ex, ent_b = [], [], 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            out = model(torch.from_numpy(images[lo:lo + batch]), lm.greedy_policy())
            a = out.a.permute(1, 0, 2)  # (B, L, K)
            sel.append(a.numpy())
            if out.log_probs is not None:
                lp = out.log_probs.permute(1, 0, 2, 3)  # (B, L, K, M)
                slots = lp.shape[2]
                picked = lp.gather(3, a[:, :, :slots, None]).squeeze(3) if slots == a.shape[2] else \
                    lp[:, :, 0].gather(2, a)  # top-k: one distribution, k picks
                conf.append(picked.numpy())
                ex, b = routing.entropies(out.log_probs)
                ent_ex += float(ex) * len(a)
                ent_b += float(b) * len(a)
            else:
                conf.append(np.zeros(a.shape, np.float32))
    n = len(images)
    return {"a": np.concatenate(sel), "confidence": np.concatenate(conf), "entropy_example": ent_ex / n,
            "entropy_batch": ent_b / n}


def class_counts(a: np.ndarray, labels: np.ndarray, modules: int, classes: int) -> np.ndarray:
    """counts[l, m, c]: images of class c that layer l routed to module m (a module drawn
    in two slots counts once)."""
    N, L, K = a.shape
    counts = np.zeros((L, modules, classes), np.int64)
    for j in range(K):
        first = np.ones((N, L), bool) if j == 0 else (a[..., j:j + 1] != a[..., :j]).all(-1)
        for li in range(L):
            np.add.at(counts[li], (a[:, li, j][first[:, li]], labels[first[:, li]]), 1)
    return counts


def plot_class_heatmaps(counts: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, M, C = counts.shape
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L + 1.5, 0.35 * M + 2.6), squeeze=False)
    for li, ax in enumerate(axes[0]):
        p = counts[li] / np.maximum(counts[li].sum(0, keepdims=True), 1)  # P(module | class)
        im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(C), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(M), [f"m{i}" for i in range(M)], fontsize=7)
        ax.set_title(f"layer {li}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="P(module | class)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_examples(pixels: np.ndarray, a: np.ndarray, conf: np.ndarray, layer: int, per_module: int,
                  modules: int, title: str, path: Path) -> None:
    """Per module of ``layer``: the images routed to it whose selection the controller was
    surest of (highest log-probability), in a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(modules, per_module, figsize=(per_module * 0.9 + 0.8, modules * 0.9 + 0.6),
                             squeeze=False)
    for m in range(modules):
        hit = (a[:, layer] == m)  # (N, K)
        score = np.where(hit, conf[:, layer], -np.inf).max(1)
        order = [i for i in np.argsort(-score, kind="stable")[:per_module] if np.isfinite(score[i])]
        for j, ax in enumerate(axes[m]):
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < len(order):
                ax.imshow(pixels[order[j]])
        axes[m][0].set_ylabel(f"m{m}", rotation=0, labelpad=14, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def inspect_images(ckpt: Path, model, state: dict[str, Any], out: Path, split: str, images: int, layer: int | None,
                   data: Path | None) -> None:
    """``modrt inspect`` of a CIFAR-10 checkpoint."""
    from modrt.data import cifar10

    cfg = model.cfg
    ds = cifar10.load(data)
    if split == "train":
        pixels, labels = ds.train_images, ds.train_labels
    else:  # CIFAR-10 has no validation split: valid and test both mean the test images
        pixels, labels, split = ds.test_images, ds.test_labels, "test"
    if images:  # evenly spaced (a copy stored class by class would otherwise give one class)
        pick = np.linspace(0, len(labels) - 1, min(images, len(labels))).astype(np.int64)
        pixels, labels = pixels[pick], labels[pick]
    layer = cfg.layers - 1 if layer is None else layer
    if not 0 <= layer < cfg.layers:
        raise ModrtError(f"--layer {layer}: the network has layers 0..{cfg.layers - 1}")
    title = f"{cfg.method} M={cfg.modules} K={cfg.k}, step {state.get('step')}"
    plot_training(_metrics(ckpt, state), cfg.modules, title, out / "training.png")
    r = image_routing(model, cifar10.normalise(pixels, cfg.mean, cfg.std))
    classes = list(state.get("classes") or cifar10.CLASSES)
    counts = class_counts(r["a"], labels, cfg.modules, len(classes))
    plot_class_heatmaps(counts, classes, f"{title}: P(module | class), {len(labels)} {split} images",
                        out / "modules_classes.png")
    plot_examples(pixels, r["a"], r["confidence"], layer, 8, cfg.modules,
                  f"{title}: layer {layer}, the images each module's controller is surest of",
                  out / "modules_examples.png")
    use = counts.sum(2)  # (L, M)
    share = use / np.maximum(use.sum(1, keepdims=True), 1)
    ent = [float(math.exp(-(s[s > 0] * np.log(s[s > 0])).sum())) for s in share]
    p_m = share  # (L, M)
    per_class = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # P(m | c)
    lift = per_class / np.maximum(p_m[:, :, None], 1e-12)
    report = {
        "checkpoint": ckpt.name, "method": cfg.method, "modules": cfg.modules, "k": cfg.k, "layers": cfg.layers,
        "step": state.get("step"), "split": split, "images": int(len(labels)),
        "module_share": [[round(float(x), 4) for x in row] for row in share],
        "modules_in_use": [int((u > 0).sum()) for u in use],
        "usage_exp_entropy": [round(e, 3) for e in ent],
        "controller_exp_entropy_example": round(math.exp(r["entropy_example"]), 3),
        "controller_exp_entropy_batch": round(math.exp(r["entropy_batch"]), 3),
        "top_classes": [{f"m{m}": [classes[c] for c in np.argsort(-lift[li, m])[:3]
                                   if use[li, m] and lift[li, m, c] > 1]
                         for m in range(cfg.modules)} for li in range(cfg.layers)],
    }
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"{title} on {len(labels)} {split} images (greedy routing)",
             f"controller exp(entropy): per example {report['controller_exp_entropy_example']}, "
             f"of the batch average {report['controller_exp_entropy_batch']}"]
    for li in range(cfg.layers):
        lines += ["", f"layer {li}: modules in use {report['modules_in_use'][li]}/{cfg.modules}, exp(entropy) of "
                      f"module use {report['usage_exp_entropy'][li]}",
                  "module  share   classes it takes more than its share of (by lift P(m|c)/P(m))"]
        for m in range(cfg.modules):
            tops = ", ".join(f"{classes[c]} ({lift[li, m, c]:.2f})" for c in np.argsort(-lift[li, m])[:3]
                             if use[li, m] and lift[li, m, c] > 1) or "-"
            lines.append(f"m{m:<5}  {share[li, m] * 100:5.1f}%  {tops}")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    click.echo(text, nl=False)
    click.echo(f"wrote {out / 'training.png'}, {out / 'modules_classes.png'}, {out / 'modules_examples.png'}, "
               "summary.txt, inspect.json")


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
@click.option("--images", type=click.IntRange(min=0), default=2000, show_default=True,
              help="CIFAR-10: images of the split measured, evenly spaced (0: all).")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="CIFAR-10: the modular layer whose example grid is drawn  [default: the last].")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="PTB directory, or CIFAR-10 (a directory or tarball), as the checkpoint's task needs "
                   "(default: as for modrt train).")
def inspect_command(ckpt: Path, out: Path | None, split: str, tokens: int, words: int, min_count: int,
                    images: int, layer: int | None, data: Path | None) -> None:
    """Plot what a trained modular network's controller does.

    \b
    Writes training.png (perplexity or accuracy, controller exp(entropy) per
    example and of the batch average, module shares over training),
    summary.txt and inspect.json, and
      PTB:      modules_words.png (which modules serve which frequent words);
      CIFAR-10: modules_classes.png (P(module | class) per layer) and
                modules_examples.png (per module of --layer, the test images
                its controller is surest of). valid = test for CIFAR-10.
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
    if cfg.task == "cifar10":
        inspect_images(ckpt, model, state, out, split, images, layer, data)
        return
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
