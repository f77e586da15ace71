"""Routing for a modular layer in numpy: scores -> selection -> dispatch -> combine.

The numpy twin of ``modrt.train.routing`` (torch), used by the ONNX runtime; tests keep
the two equal. Axis letters used throughout modrt:

    B  batch rows          T  time steps        M  modules
    K  controller slots    D  features          R  routed rows (sum over modules)

The controller gives K independent softmaxes over the M modules (one per slot, as in
the official libmodular code). A selection ``a`` is (B, K) module ids. A module drawn
in two slots counts once: the layer combines the *distinct* selected modules (sum, or
mean over the distinct ones; DESIGN.md §3).

Dispatch groups the (row, module) pairs by module with one argsort, so module m serves
the contiguous block ``rows[offsets[m]:offsets[m+1]]`` of a gathered input. Combine is
the inverse: every row knows where its (at most K) module outputs sit in that block
(``Dispatch.slots``), so combining is K gathers and adds, never a scatter over rows
(``np.add.at`` measured 20-50x slower at B=64).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

COMBINE_RULES = ("sum", "mean", "gate")


class Dispatch(NamedTuple):
    """Rows grouped by module: module m serves ``rows[offsets[m]:offsets[m+1]]``."""

    rows: np.ndarray  # (R,) int64 row ids sorted by module (stable in row order)
    offsets: list[int]  # (M+1,) start of each module's group in ``rows``
    distinct: np.ndarray  # (B,) int64 number of distinct modules each row uses
    # (B, K) int64: where row b's j-th distinct module output sits in the routed block
    # (0 <= slots < R); a slot repeating a module points at index R, a zero pad row.
    slots: np.ndarray


def greedy(log_probs: np.ndarray) -> np.ndarray:
    """The most probable selection: the argmax of each slot. (B, K, M) -> (B, K) int64."""
    return log_probs.argmax(axis=-1)


def top_k(log_probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable modules of one distribution, most probable first (ties: the
    lower module id first, as ONNX TopK). (B, 1, M) -> (B, k) int64."""
    lp = log_probs[:, 0]
    if k == 1:
        return lp.argmax(axis=-1)[:, None]
    return np.argsort(-lp, axis=-1, kind="stable")[:, :k]


def select(log_probs: np.ndarray, k: int, selection: str) -> np.ndarray:
    """The manifest's selection rule: "slots" (argmax per slot) or "topk". -> (B, K) int64."""
    return greedy(log_probs) if selection == "slots" else top_k(log_probs, k)


def gates(log_probs: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Combine weights of rule "gate": the selected modules' probabilities renormalised
    over them, i.e. the softmax of their logits. (B, 1, M), (B, K) -> (B, K) float, in
    ascending module id per row (the order of ``Dispatch.slots``)."""
    ids = np.sort(a, axis=1) if a.shape[1] > 1 else a
    sel = np.take_along_axis(log_probs[:, 0], ids, axis=1)  # (B, K)
    w = np.exp(sel - sel.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return w


def dispatch(a: np.ndarray, modules: int) -> Dispatch:
    """Group rows by the distinct modules they selected (argsort + offsets, no row loop).

    ``a`` is (B, K) integer module ids in [0, M). Rows inside one module's group keep
    batch order, as in the torch twin.
    """
    B, K = a.shape
    a = a.astype(np.int64, copy=False)
    if K == 1:
        flat = a[:, 0]  # (B,)
        rows = np.argsort(flat, kind="stable")  # (R=B,)
        counts = np.bincount(flat, minlength=modules)  # (M,)
        slots = np.empty(B, dtype=np.int64)
        slots[rows] = np.arange(B)
        distinct = np.ones(B, dtype=np.int64)
        return Dispatch(rows, _offsets(counts), distinct, slots.reshape(B, 1))
    s = np.sort(a, axis=1)  # (B, K) duplicates now adjacent
    keep = np.empty((B, K), dtype=bool)
    keep[:, 0] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=keep[:, 1:])  # a repeated module counts once
    # One key per kept (row, module) pair, module-major then row, all distinct (so no
    # stable sort needed); repeats get the largest key and sort last.
    key = s * B
    key += np.arange(B)[:, None]
    np.putmask(key, ~keep, modules * B)
    flat = key.ravel()  # (B*K,)
    order = flat.argsort()
    R = int(np.count_nonzero(keep))
    rows = order[:R] // K  # (R,) flat (row, slot) index -> row
    counts = np.bincount(flat[order[:R]] // B, minlength=modules)  # (M,)
    pos = np.empty(B * K, dtype=np.int64)
    pos[order] = np.arange(B * K)
    slots = pos.reshape(B, K)
    np.putmask(slots, ~keep, R)  # the zero pad row
    return Dispatch(rows, _offsets(counts), keep.sum(1), slots)


def _offsets(counts: np.ndarray) -> list[int]:
    offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets.tolist()


def combine(
    y: np.ndarray, d: Dispatch, batch: int, rule: str, out: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Put module outputs back in batch order and combine. (R, D) or (R+1, D) -> (B, D);
    any trailing shape, e.g. feature maps (R, C, H, W) -> (B, C, H, W).

    ``y`` holds the routed block (module m's rows at ``offsets[m]:offsets[m+1]``). With
    K > 1 and a row that drew one module twice, a zero row at index R is needed: pass
    ``y`` with R+1 rows (its last row is overwritten with zeros) to avoid a copy.
    Rule "gate" needs ``weights`` (B, K) from ``gates`` (ascending module id, like
    ``Dispatch.slots``; its selections are distinct, ``top_k``).
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine rule {rule!r} unknown; choose one of {COMBINE_RULES}")
    B, K = d.slots.shape
    assert B == batch, (B, batch)
    R = d.rows.shape[0]
    if out is None:
        out = np.empty((batch, *y.shape[1:]), dtype=y.dtype)
    per_row = (-1, *([1] * (y.ndim - 1)))  # a (B,) column broadcast over each row's features
    if rule == "gate":
        w = weights.astype(out.dtype, copy=False)
        np.take(y, d.slots[:, 0], axis=0, out=out, mode="clip")
        out *= w[:, 0].reshape(per_row)
        for j in range(1, K):
            out += np.take(y, d.slots[:, j], axis=0, mode="clip") * w[:, j].reshape(per_row)
        return out
    if K == 1:
        # Each row has one module: a gather. mode="clip" skips numpy's bounds-check buffer.
        np.take(y, d.slots[:, 0], axis=0, out=out, mode="clip")
        return out  # one distinct module: mean == sum
    if R < B * K and y.shape[0] == R:  # some row repeats a module: needs the pad row
        y = np.concatenate([y, np.zeros((1, *y.shape[1:]), dtype=y.dtype)])
    elif y.shape[0] > R:
        y[R] = 0
    # A loop over the K slots (not rows): K gathers and adds beat one (B, K, D) gather
    # and a sum over the middle axis.
    np.take(y, d.slots[:, 0], axis=0, out=out, mode="clip")
    tmp = np.empty_like(out)
    for j in range(1, K):
        np.take(y, d.slots[:, j], axis=0, out=tmp, mode="clip")
        out += tmp
    if rule == "mean":
        out /= d.distinct.reshape(per_row).astype(out.dtype)
    return out


def one_hot_counts(a: np.ndarray, modules: int) -> np.ndarray:
    """How many (row, slot) selections each module got. (..., K) -> (M,)."""
    return np.bincount(a.reshape(-1), minlength=modules)


def mlp_reference(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, x: np.ndarray,
                  a: np.ndarray, rule: str, activation: str = "relu") -> np.ndarray:
    """A routed layer of two-layer MLP modules (w1 (M, D, H), b1 (M, H), w2 (M, H, D_out),
    b2 (M, D_out)) in plain numpy, row by row over each row's distinct modules (sum or
    mean), float64: the simplest statement of what every strategy computes, against which
    the fused strategy, the MoE peer and the tests check themselves."""
    out = np.zeros((x.shape[0], w2.shape[2]), np.float64)
    for r in range(x.shape[0]):
        mods = sorted(set(a[r].tolist()))  # a module drawn in two slots counts once
        for m in mods:
            h = x[r] @ w1[m] + b1[m]
            h = np.maximum(h, 0) if activation == "relu" else h
            out[r] += h @ w2[m] + b2[m]
        if rule == "mean":
            out[r] /= len(mods)
    return out


__all__ = ["COMBINE_RULES", "Dispatch", "mlp_reference", "greedy", "top_k", "select", "gates", "dispatch", "combine",
           "one_hot_counts"]
