"""A model's signature: what ``Model.run`` takes and returns, derived once from the bundle.

    sig = model.signature
    sig.inputs    (Tensor("tokens", "int64", (-1, -1), bounds=(0, 10000)),
                  Tensor("h", "float32", (-1, 1, 256), optional=True))
    sig.outputs   (Tensor("logits", "float32", (-1, -1, 10000)),
                   Tensor("next_token", "int64", (-1, -1), derived="argmax of logits"),
                   Tensor("modules", "int32", (-1, -1, 1, 1), derived="the routing decisions"),
                   Tensor("h_last", "float32", (-1, 1, 256), derived="the state after the last step"))
    feeds = sig.check({"tokens": t})   # validated once: names, dtype kind, shape, bounds
    sig.shape_of("logits", (2, 35))    # (2, 35, 10000): an output's shape for an input shape

The outputs a graph does not compute are declared by the bundle's task: a language model
(``task.kind == "language-model"``) answers ``next_token``, a classifier
(``"classification"``) ``label`` - both the argmax of ``logits`` over its last axis;
every model answers ``modules`` (B, [T,] L, K). A recurrent model (whose layers share one
state size H) also takes an optional ``h`` (B, L, H), the state to start from (zeros when
left out), and answers ``h_last`` (B, L, H), the state after the last step: feeding it back
as ``h`` with the next tokens continues the stream exactly. Servers take their metadata and
their validation from here, so a new topology needs no server change. ``-1`` in a shape:
any size; in an output, the i-th ``-1`` is the i-th axis of the first input (batch, then
time). (A bundle without a task kind whose feed-forward output is named ``logits`` is
read as a classifier, as before kinds were recorded.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modrt._exceptions import InputError
from modrt.bundle import Manifest, TensorSpec

# task kind -> the output derived as argmax(logits, -1)
ARGMAX_OUTPUT = {"language-model": "next_token", "classification": "label"}


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, numpy dtype name, shape (-1: any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bounds: tuple[int, int] | None = None  # integer inputs: values in [lo, hi)
    values: str = "values"  # what its values are called in an error (e.g. "token ids")
    derived: str | None = None  # an output modrt computes beside the graphs, and how
    optional: bool = False  # an input a caller may leave out

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a model (``Model.signature``), and ``check`` of its inputs."""

    topology: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def input(self) -> Tensor:
        """The one tensor a caller must feed (tokens, or the features)."""
        return self.inputs[0]

    def output(self, name: str) -> Tensor:
        for t in self.outputs:
            if t.name == name:
                return t
        raise InputError(f"unknown output {name!r}; the model has {[t.name for t in self.outputs]}")

    def describe_inputs(self) -> str:
        return ", ".join(f"{t.name!r} ({t.describe()}{', optional' if t.optional else ''})" for t in self.inputs)

    def check_names(self, names: list[str]) -> None:
        """``names`` are the model's inputs: each known, once, every required one given."""
        known = {t.name for t in self.inputs}
        required = [t.name for t in self.inputs if not t.optional]
        if len(set(names)) != len(names) or not set(names) <= known or not set(required) <= set(names):
            raise InputError(f"this model takes {self.describe_inputs()}; got {list(names) or 'none'}")

    def check_shape(self, name: str, shape: tuple[int, ...] | list[int]) -> Tensor:
        """The input ``name`` exists, and ``shape`` fits it (rank, fixed sizes, no empty axis)."""
        want = self.inputs[0] if name == self.inputs[0].name else next((t for t in self.inputs if t.name == name), None)
        if want is None:
            raise InputError(f"this model takes {self.describe_inputs()}; got {name!r}")
        ws = want.shape
        ok = len(shape) == len(ws)
        if ok:
            for w, g in zip(ws, shape, strict=True):  # lengths are equal here
                if w != -1 and w != g:
                    ok = False
                    break
        if not ok:
            raise InputError(f"input {name!r} must have shape {list(ws)} (-1: any; a {len(ws)}-D "
                             f"array), got {list(shape)}")
        if 0 in shape:
            raise InputError(f"input {name!r}: shape {list(shape)} is empty")
        return want

    def check_batch(self, shapes: Mapping[str, tuple[int, ...] | list[int]]) -> None:
        """Every input given has the first input's batch size (axis 0)."""
        first = self.input
        B = shapes[first.name][0]
        for name, shape in shapes.items():
            if shape[0] != B:
                raise InputError(f"input {name!r} has batch size {shape[0]}, {first.name!r} has {B}")

    def lead(self, shape: tuple[int, ...] | list[int]) -> list[int]:
        """The sizes of the first input's -1 axes in ``shape``: batch (and time)."""
        return [int(g) for w, g in zip(self.input.shape, shape, strict=True) if w == -1]

    def positions(self, shape: tuple[int, ...] | list[int]) -> int:
        """Positions the first input of ``shape`` asks the model to compute: rows x time steps
        of a language model, rows of a feed-forward one (the product of its -1 axes)."""
        return math.prod(self.lead(shape))

    def shape_of(self, output: str, shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """The shape of ``output`` when the first input has ``shape``."""
        lead = iter(self.lead(shape))
        return tuple(next(lead) if d == -1 else d for d in self.output(output).shape)

    def check(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` validated: the declared names (optional ones may be left out), the
        dtype kind (integer ids, floating features), the shapes, one batch size, the
        bounds and finite floats; returned contiguous in the declared dtypes. Raises InputError naming what is
        wrong."""
        self.check_names(list(inputs))
        out = {}
        for want in self.inputs:
            if want.name not in inputs:
                continue
            x = np.asarray(inputs[want.name])
            self.check_shape(want.name, x.shape)
            kind = np.dtype(want.dtype).kind
            if kind in "iu" and not np.issubdtype(x.dtype, np.integer):
                raise InputError(f"input {want.name!r} must be integers, got {x.dtype}")
            if kind == "f" and not np.issubdtype(x.dtype, np.floating):
                raise InputError(f"input {want.name!r} must be floating point, got {x.dtype}")
            self.check_bounds(want, x)
            out[want.name] = np.ascontiguousarray(x, dtype=want.dtype)
        self.check_batch({k: v.shape for k, v in out.items()})
        return out

    @staticmethod
    def check_bounds(t: Tensor, x: np.ndarray) -> None:
        """The values: token ids within the vocabulary, floats finite."""
        if not x.size:
            return
        if x.dtype.kind == "f":
            if not np.isfinite(x).all():
                raise InputError(f"input {t.name!r} holds NaN or infinite values")
            return
        if t.bounds is None:
            return
        lo, hi = int(x.min()), int(x.max())
        if lo < t.bounds[0] or hi >= t.bounds[1]:
            raise InputError(f"{t.values} must be in [{t.bounds[0]}, {t.bounds[1]}), "
                             f"got values in [{lo}, {hi}]")


def derive(manifest: Manifest, first: TensorSpec, last: TensorSpec, state: list[int] | None = None) -> Signature:
    """The signature of a bundle whose first graph takes ``first`` and whose last graph
    gives ``last`` (the ends of its stages); ``state``: a recurrent bundle's state size per
    layer (``h`` and ``h_last`` are declared when they are all one size)."""
    L, K = len(manifest.layers), max(l.k for l in manifest.layers)
    kind = manifest.task.get("kind")
    routing = "the routing decisions: module ids per layer and slot"
    after: list[Tensor] = []
    if manifest.topology == "recurrent":
        V = int(last.shape[-1])
        inputs: tuple[Tensor, ...] = (
            Tensor("tokens", "int64", (-1, -1), bounds=(0, V) if V > 0 else None, values="token ids"),)
        if state and len(set(state)) == 1 and state[0] > 0:
            inputs += (Tensor("h", "float32", (-1, L, state[0]), optional=True),)
            after.append(Tensor("h_last", "float32", (-1, L, state[0]),
                                derived="the state after the last step, per layer: feed it back as h to go on"))
        outs = [Tensor("logits", "float32", (-1, -1, V))]
        lead: tuple[int, ...] = (-1, -1)
    else:
        if first.dtype == "uint8":  # raw pixels, normalised by the bundle's first graph
            inputs = (Tensor(first.name, "uint8", (-1, *first.shape[1:]), bounds=(0, 256), values="pixel values"),)
        else:
            inputs = (Tensor(first.name, "float32", (-1, *first.shape[1:])),)
        outs = [Tensor(last.name, "float32", (-1, *last.shape[1:]))]
        lead = (-1,)
        if kind is None and last.name == "logits":
            kind = "classification"
    argmax = ARGMAX_OUTPUT.get(kind or "")
    if argmax is not None and outs[0].name == "logits":
        outs.append(Tensor(argmax, "int64", lead, derived="argmax of logits over its last axis"))
    outs.append(Tensor("modules", "int32", (*lead, L, K), derived=routing))
    return Signature(manifest.topology, inputs, (*outs, *after))


def random_rows(t: Tensor, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random rows for a feed-forward input: N(0, 1) features, or uniform values
    within an integer input's bounds (raw pixels: 0..255)."""
    shape = (batch, *t.shape[1:])
    if np.dtype(t.dtype).kind in "iu":
        lo, hi = t.bounds or (0, 2)
        return rng.integers(lo, hi, shape).astype(t.dtype)
    return rng.standard_normal(shape).astype(t.dtype)


__all__ = ["ARGMAX_OUTPUT", "Signature", "Tensor", "derive", "random_rows"]
