"""The PyTorch eager peer of ``modrt bench --checkpoint``: the model a training checkpoint
holds, run as the training code runs it. Registered as the ``modrt.peers`` entry point
``torch-checkpoint`` (pyproject.toml), so the torch-free core finds it without importing
the training package (DESIGN.md §2's direction).
"""

from __future__ import annotations

import numpy as np

from modrt.peers import Peer
from modrt.runtime.model import Model


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
