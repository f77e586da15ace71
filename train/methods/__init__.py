"""Training methods behind one interface: a window in, named losses out.

Each method owns its state (EM: the a* memory, its E-step schedule and variant; REINFORCE:
its reward baseline; noisy top-k: its balance losses) and puts it in the checkpoint::

    method = build(model, model_cfg, train_cfg, windows)
    losses = method.losses(window)      # Losses(nll, aux={name: scalar}, out, info)
    losses.total.backward(); optimiser step
    method.after_step(window, losses)   # e.g. REINFORCE's baseline update
    ckpt["method"] = method.state()     # method.load_state(ckpt["method"]) to resume

``Trainer.train_step`` is window -> method -> backward -> log, for every method.
"""

from __future__ import annotations

import torch

from modrt.train import model as lm
from modrt.train.config import ModelConfig, TrainConfig
from modrt.train.methods.base import Losses, Method, Window, nll_of, stats


def build(model: lm.ModularLM, mcfg: ModelConfig, tcfg: TrainConfig, windows: int,
          train_tokens: torch.Tensor | None = None) -> Method:
    from modrt.train.methods import dense, em, hash, noisy_topk, reinforce

    cls = {"em": em.EM, "reinforce": reinforce.Reinforce, "noisy-topk": noisy_topk.NoisyTopK,
           "dense": dense.Dense, "hash": hash.Hash}[mcfg.method]
    if cls is hash.Hash:
        return cls(model, mcfg, tcfg, windows, train_tokens)
    return cls(model, mcfg, tcfg, windows)


__all__ = ["Losses", "Method", "Window", "build", "nll_of", "stats"]
