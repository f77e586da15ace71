"""Training methods behind one interface: a batch of examples in, named losses out.

Each method owns its state (EM: the a* memory, its E-step schedule and variant; REINFORCE:
its reward baseline; noisy top-k: its balance losses) and puts it in the checkpoint::

    method = build(model, model_cfg, train_cfg, examples, positions)
    losses = method.losses(batch)       # a Window (PTB) or Images -> Losses(nll, aux, out, info)
    losses.total.backward(); optimiser step
    method.after_step(batch, losses)    # e.g. REINFORCE's baseline update
    ckpt["method"] = method.state()     # method.load_state(ckpt["method"]) to resume

``Trainer.train_step`` is batch -> method -> backward -> log, for every method and task
(``tasks``: PTB windows, CIFAR-10 images); the models give the methods one view
(``run_examples``, ``example_log_likelihood``, ``module_lists``).
"""

from __future__ import annotations

import torch

from modrt.train.config import TrainConfig
from modrt.train.methods.base import Batch, Images, Losses, Method, Window, stats


def build(model, mcfg, tcfg: TrainConfig, examples: int, positions: int,
          train_tokens: torch.Tensor | None = None) -> Method:
    """The run's method for ``model`` (``lm.ModularLM`` or ``conv.ModularConvNet``);
    ``examples`` N and ``positions`` P size EM's a* memory (N, P, K)."""
    from modrt.train.methods import dense, em, hash, noisy_topk, reinforce

    cls = {"em": em.EM, "reinforce": reinforce.Reinforce, "noisy-topk": noisy_topk.NoisyTopK,
           "dense": dense.Dense, "hash": hash.Hash}[mcfg.method]
    if cls in (hash.Hash, em.EM):  # hash routing's table; EM's a* start from it (--a-star-init hash)
        return cls(model, mcfg, tcfg, examples, positions, train_tokens)
    return cls(model, mcfg, tcfg, examples, positions)


__all__ = ["Batch", "Images", "Losses", "Method", "Window", "build", "stats"]
