"""``modrt bench``'s PyTorch eager peers: the model a training checkpoint holds
(``--checkpoint``), and a bundle's own two-layer MLP modules. Registered as the
``modrt.peers`` entry points ``torch-checkpoint`` and ``torch-mlp`` (pyproject.toml), so the
torch-free core finds them by name without importing torch or the training package
(DESIGN.md §1-2).
"""

from __future__ import annotations

import numpy as np

from modrt.peers import Peer
from modrt.runtime.model import Model
from modrt.synthetic import Weights


def make_torch_checkpoint(ckpt: str, model: Model, threads: int) -> tuple[Peer | None, str]:
    """PyTorch eager: the model a training checkpoint holds (``ModularLM`` with its head, or
    ``ModularConvNet``), greedy routing, inference mode, as the training code runs it (only
    the selected modules on their rows). (None, reason) without torch; ModrtError when the
    checkpoint is not the bundle's (its outputs differ from the routed ones on a probe)."""
    import torch

    from modrt._exceptions import InputError
    from modrt.train import checkpoint
    from modrt.train.model import greedy_policy

    torch.set_num_threads(threads or torch.get_num_threads())
    net, _ = checkpoint.load_model(ckpt)
    policy = greedy_policy()
    if model.topology == "recurrent":
        def run(tokens: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                x = torch.from_numpy(tokens).t()  # (T, B)
                out = net(x, net.init_hidden(x.shape[1]), policy)
                return net.head(out.hs).transpose(0, 1).numpy()  # (B, T, V)

        probe = {"tokens": np.random.default_rng(0).integers(0, model.output.shape[-1], (2, 5), dtype=np.int64)}
        key = "logits"
    else:
        from modrt.runtime.signature import random_rows

        image = model.manifest.task.get("image", {})
        raw = model.signature.input.dtype == "uint8"  # raw pixels: normalised as the bundle does

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(x)
                if raw:
                    mean, std = torch.tensor(image["mean"]), torch.tensor(image["std"])
                    t = ((t.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
                return net(t, policy).logits.numpy()

        probe = {model.input.name: random_rows(model.signature.input, 4, np.random.default_rng(0))}
        key = model.output.name
    try:
        got = run(next(iter(probe.values())))
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"--checkpoint {ckpt}: its model does not take this bundle's inputs "
                         f"({str(exc)[:160]})") from exc
    want = model.run(**probe)[key]
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3):
        raise InputError(f"--checkpoint {ckpt}: not the checkpoint this bundle was exported from "
                         "(its outputs differ from the routed ones)")
    return run, ""


def make_torch_mlp(w: Weights, k: int, combine: str, threads: int) -> tuple[Peer | None, str]:
    """PyTorch eager from a bundle's own numpy weights (two-layer MLP modules), greedy
    routing, only the selected modules on their rows."""
    import torch

    torch.set_num_threads(threads)
    M, D, H = w.w1.shape
    ctrl = torch.nn.Linear(D, k * M)
    experts = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, w.w2.shape[2]))
        for _ in range(M))
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    with torch.no_grad():  # nn.Linear stores (out, in): the transpose of x @ W
        ctrl.weight.copy_(t(w.wc.T))
        ctrl.bias.copy_(t(w.bc))
        for m, e in enumerate(experts):
            e[0].weight.copy_(t(w.w1[m].T))
            e[0].bias.copy_(t(w.b1[m]))
            e[2].weight.copy_(t(w.w2[m].T))
            e[2].bias.copy_(t(w.b2[m]))

    def run(x_np: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(x_np)
            B = x.shape[0]
            lp = torch.log_softmax(ctrl(x).view(B, k, M), dim=-1)  # (B, K, M)
            a = lp.argmax(-1)  # (B, K)
            mask = torch.zeros(B, M, dtype=torch.bool).scatter_(1, a, True)  # (B, M)
            out = x.new_zeros(B, w.w2.shape[2])
            for m in range(M):
                rows = mask[:, m].nonzero().squeeze(1)
                if rows.numel():
                    out.index_add_(0, rows, experts[m](x[rows]))
            if combine == "mean":
                out /= mask.sum(1, keepdim=True)
            return out.numpy()

    return run, ""
