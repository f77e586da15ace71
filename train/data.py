"""Batchify a token stream into parallel streams and BPTT windows (as pytorch/examples).

    stream of N tokens:  a b c d e f g h i j k l m n o p q r s t u v w x   (N = 24)
    batchify(B=4):       column b is the b-th quarter of the stream
        ┌ a g m s ┐
        │ b h n t │      data: (N // B, B); the tail that does not fill a row is dropped
        │ c i o u │
        │ d j p v │
        │ e k q w │
        └ f l r x ┘
    window(i, T=2):      x = data[i : i+T], y = data[i+1 : i+1+T]   (y is x shifted by one)

Window w (rows w*T ...) of stream b is one training example with the stable index
n = w * B + b: the key of the a* memory. The last window may be shorter than T.
"""

from __future__ import annotations

import numpy as np
import torch


def batchify(tokens: np.ndarray, batch: int) -> torch.Tensor:
    """(N,) -> (N // B, B) long."""
    n = len(tokens) // batch
    return torch.from_numpy(tokens[: n * batch].reshape(batch, n).T.copy()).long()


def num_windows(data: torch.Tensor, bptt: int) -> int:
    return (data.shape[0] - 1 + bptt - 1) // bptt


def window(data: torch.Tensor, w: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of window w: two (T_w, B) tensors, T_w = bptt except at the end."""
    i = w * bptt
    t = min(bptt, data.shape[0] - 1 - i)
    return data[i : i + t], data[i + 1 : i + 1 + t]
