"""``modrt.load(bundle) -> Model``: the public face of the runtime.

    model = modrt.load("out/", provider="auto")
    out = model.run(tokens=tokens)           # recurrent: logits, next_token, modules, h_last
    out = model.run(x=x)                     # feed-forward: y (or logits, label), modules
    ref = model.run_dense(tokens=tokens)     # the dense baseline graph(s), same outputs

``modules`` holds the routing decisions, int32 (B, T, L, K) for a recurrent bundle and
(B, L, K) for a feed-forward one. Routed and dense outputs agree row for row (within
float tolerance) and their ``modules`` are equal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from modrt import bundle
from modrt._exceptions import BundleError, InputError
from modrt.runtime import auto, errors, host
from modrt.runtime import signature as sig
from modrt.runtime.auto import STRATEGIES, AutoConfig
from modrt.runtime.pipeline import Pipeline
from modrt.runtime.providers import PROVIDERS, ProviderConfig
from modrt.runtime.sessions import SessionConfig, Sessions


class Model:
    """A loaded bundle: one session per graph, and the layers run routed (or dense)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: bundle.Manifest,
        sessions: Sessions,
        strategy: str = "host",
        layers: dict[str, auto.ByBatch] | None = None,
    ):
        self.directory = Path(directory)
        self.manifest = manifest
        self.sessions = sessions
        self.strategy = strategy  # as asked: auto | host | graph | fused
        m = manifest
        self.K = max(l.k for l in m.layers)
        # Per layer, the strategy (and built layer) for each batch range; see auto.py.
        self._routed: dict[str, auto.ByBatch] = layers if layers is not None else {
            l.name: auto.fixed("host", l, host.HostLayer(l, sessions)) for l in m.layers}
        self._dense: dict[str, host.DenseLayer] = {
            l.name: host.DenseLayer(l, sessions[m.dense[l.name]])
            for l in m.layers if l.name in m.dense}
        if len({l.k for l in m.layers}) != 1:
            raise BundleError(f"{self.directory}: layers with different K are not supported by the runtime yet")
        self.pipeline = p = Pipeline(m, sessions)
        self._layer_names = layer_names = p.layer_names  # in the order they run
        entry = p.pre[0] if p.pre else sessions[m.layer(layer_names[0]).controller]
        self.input = entry.spec.inputs[0]  # the one tensor a user feeds (besides state)
        exit_ = p.post[-1] if p.post else sessions[m.layer(layer_names[-1]).module_graphs[0]]
        self.output = exit_.spec.outputs[0]
        # What run() takes and returns (the server's metadata and validation too).
        state = [self._state_dim(l) for l in m.layers] if m.topology == "recurrent" else None
        self.signature = sig.derive(m, self.input, self.output, state)
        self._argmax = next((t.name for t in self.signature.outputs if t.name in sig.ARGMAX_OUTPUT.values()), None)
        # The per-call path is hot (a small layer runs in ~20 µs): settle what can be once.
        self._trt = sessions.provider == PROVIDERS["tensorrt"]
        # _features' shortcut: a float32 batch of the input's fixed row shape (not raw pixels)
        self._tail = (tuple(self.input.shape[1:]) if -1 not in self.input.shape[1:] and self.input.dtype == "float32"
                      else None)
        # run()'s shortcut: (input name, D, the layer's cache .get, its entry(), output name, layer name)
        self._fast = None
        if (p.single and not self._trt and len(self.input.shape) == 2 and self.input.shape[1] > 0
                and self._argmax is None):
            layer = self._routed[layer_names[0]]
            self._fast = (self.input.name, self.input.shape[1], layer.cache.get, layer.entry, self.output.name,
                          f"layer {layer_names[0]}")

    # --- public --------------------------------------------------------------------

    @property
    def provider(self) -> str:
        """The execution provider the sessions run on, e.g. ``CPUExecutionProvider``."""
        return self.sessions.used

    @property
    def topology(self) -> str:
        return self.manifest.topology

    def run(self, tokens: Any = None, *, h: Any = None, **inputs: Any) -> dict[str, Any]:
        """Routed inference: only the selected modules run. See the module docstring."""
        fast = self._fast
        if fast is not None and tokens is None and h is None and len(inputs) == 1:
            # One feed-forward layer, a well-formed float32 batch: the ~20 µs small-layer
            # call must not pay ~2 µs of Python for checks the general path makes.
            name, D, cached, entry, out_name, where = fast
            x = inputs.get(name)
            if type(x) is _ND and x.dtype is _F32 and x.ndim == 2:  # (ORT takes any strides)
                B, d = x.shape
                if d == D and B:
                    f = (cached(B) or entry(B))[1]
                    try:
                        y, a = f({name: x}, None)
                    except Exception as exc:  # errors.running's conversion, inline on this hot path
                        raise errors.convert(where, exc) from exc
                    # (B, 1, K) int32; graph and fused give int32 already
                    return {out_name: y, "modules": (a if a.dtype is _I32 else a.astype(_I32))[:, None]}
        return self._run(self._routed, tokens, h, inputs)

    def strategy_for(self, batch: int) -> str:
        """The strategy the modular layers run at this batch size: ``fused``, or
        ``layer0:fused,layer1:host`` when layers differ."""
        picks = {name: layer.strategy_for(batch) for name, layer in self._routed.items()}
        if len(set(picks.values())) == 1:
            return next(iter(picks.values()))
        return ",".join(f"{n}:{s}" for n, s in picks.items())

    @property
    def choice(self) -> dict[str, str]:
        """Per layer, which strategy runs which batch sizes (what ``auto`` chose)."""
        return {name: layer.describe() for name, layer in self._routed.items()}

    def run_checked(self, feeds: dict[str, np.ndarray], outputs: set[str] | frozenset[str] | None = None
                    ) -> dict[str, Any]:
        """Routed inference on ``feeds`` that ``signature.check`` returned (or such feeds
        merged along the batch axis, as the server's batcher does): they are not validated
        again. Anything else: use ``run``. Returns the signature's outputs (``h_last`` as
        (B, L, H)); with ``outputs``, at least those: a language model's logits are then
        kept only when asked for (``next_token`` alone is taken chunk by chunk, so a long
        request never holds its (B, T, V) logits)."""
        if self.manifest.topology == "recurrent":
            h = feeds.get("h")
            hs = None if h is None else [np.ascontiguousarray(h[:, i]) for i in range(h.shape[1])]
            out = self._run(self._routed, feeds["tokens"], hs, {}, checked=True, want=outputs)
            hl = out["h_last"]
            out["h_last"] = hl[:, None] if isinstance(hl, np.ndarray) else np.stack(hl, 1)
            return out
        return self._run(self._routed, None, None, feeds, checked=True)

    def run_dense(self, tokens: Any = None, *, h: Any = None, **inputs: Any) -> dict[str, Any]:
        """The dense baseline graph(s) instead of the modules; same outputs."""
        missing = [l.name for l in self.manifest.layers if l.name not in self._dense]
        if missing:
            raise InputError(f"the bundle has no dense graph for layer(s) {missing}")
        return self._run(self._dense, tokens, h, inputs)

    def zero_state(self, batch: int) -> np.ndarray | list[np.ndarray]:
        """Initial recurrent state: zeros (B, H), a list of them for several layers."""
        hs = [np.zeros((batch, self._state_dim(l)), np.float32) for l in self.manifest.layers]
        return hs[0] if len(hs) == 1 else hs

    def __repr__(self) -> str:
        m = self.manifest
        layers = ", ".join(f"{l.name}: M={l.modules} K={l.k} {l.combine} [{self.choice[l.name]}]"
                           for l in m.layers)
        return (f"Model({str(self.directory)!r}, {m.topology}, {layers}, "
                f"provider={self.provider}, strategy={self.strategy})")

    # --- internals -----------------------------------------------------------------

    def _state_dim(self, layer: bundle.LayerSpec) -> int:
        spec = self.sessions[layer.controller].spec
        return next(t.shape[-1] for t in spec.inputs if t.name == layer.state)

    def _run(self, layers: dict, tokens: Any, h: Any, inputs: dict[str, Any], checked: bool = False,
             want: set[str] | frozenset[str] | None = None) -> dict[str, Any]:
        if self.manifest.topology == "recurrent":
            if inputs:
                raise InputError(f"unexpected inputs {sorted(inputs)}; a recurrent bundle takes tokens= (and h=)")
            tok = tokens if checked else self._tokens(tokens)
            self._check_profile(*tok.shape)
            h0 = h if checked and h is not None else self._h0(h, tok.shape[0])
            stack = [_pick(layers[s], tok.shape[0]) for s in self._layer_names]
            argmax = self._argmax is not None and (want is None or self._argmax in want)
            head = "all" if want is None or "logits" in want else "argmax" if argmax else "none"
            logits, modules, h_last = self.pipeline.run_recurrent(stack, tok, h0, head=head)
            out = {"modules": modules, "h_last": h_last[0] if len(h_last) == 1 else h_last}
            if head == "argmax":
                out[self._argmax] = logits
            elif head == "all":
                out["logits"] = logits
                if self._argmax is not None:
                    out[self._argmax] = logits.argmax(-1)
            return out
        if tokens is not None or h is not None:
            raise InputError(f"a feed-forward bundle takes {self.input.name}=, not tokens= or h=")
        x = inputs[self.input.name] if checked else self._features(inputs)
        B = x.shape[0]
        if self._trt:
            self._check_profile(B, 1)
        y, modules = self.pipeline.feedforward([_pick(layers[s], B) for s in self._layer_names], x, self.input.name)
        out = {self.output.name: y, "modules": modules}
        if self._argmax is not None:
            out[self._argmax] = y.argmax(-1)
        return out

    def _check_profile(self, batch: int, seq: int) -> None:
        """TensorRT engines are built for a range of shapes; refuse what lies outside it."""
        if self.sessions.provider != PROVIDERS["tensorrt"]:
            return
        cfg = self.sessions.provider_config
        if batch > cfg.max_batch or seq > cfg.max_seq:
            raise InputError(
                f"batch {batch} x time {seq} is outside the TensorRT profile (max batch "
                f"{cfg.max_batch}, max time {cfg.max_seq}); load with a larger ProviderConfig")

    def _tokens(self, tokens: Any) -> np.ndarray:
        if tokens is None:
            raise InputError("tokens= is required: int64 (batch, time) token ids")
        return self.signature.check({"tokens": tokens})["tokens"]

    def _h0(self, h: Any, batch: int) -> list[np.ndarray]:
        layers = self.manifest.layers
        if h is None:
            return [np.zeros((batch, self._state_dim(l)), np.float32) for l in layers]
        if isinstance(h, np.ndarray) and h.ndim == 3:  # (B, L, H), as the signature's h and h_last
            h = list(h.swapaxes(0, 1)) if h.shape[1] == len(layers) else [h]
        hs = [h] if len(layers) == 1 and not isinstance(h, list | tuple) else list(h)
        if len(hs) != len(layers):
            raise InputError(f"h: {len(hs)} states for {len(layers)} layers")
        out = []
        for l, s in zip(layers, hs, strict=True):
            s = np.asarray(s)
            want = (batch, self._state_dim(l))
            if s.shape != want:
                raise InputError(f"h for layer {l.name} must have shape {want}, got {s.shape}")
            out.append(np.ascontiguousarray(s, dtype=np.float32))
        return out

    def _features(self, inputs: dict[str, Any]) -> np.ndarray:
        name = self.input.name
        if len(inputs) == 1 and name in inputs:  # the common case, checked cheaply
            x = inputs[name]
            if (type(x) is np.ndarray and x.dtype == np.float32 and x.shape[1:] == self._tail
                    and x.shape[0] > 0 and x.flags.c_contiguous):
                return x
        return self.signature.check(inputs)[name]


_ND = np.ndarray
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)


def _pick(layer, batch: int):
    """The built layer a ``ByBatch`` (or ``DenseLayer``) runs at this batch size: chosen
    once per call, not per time step."""
    return layer.pick(batch) if isinstance(layer, auto.ByBatch) else layer


def load(
    path: str | os.PathLike,
    provider: str = "auto",
    strategy: str = "auto",
    *,
    threads: int = 0,
    thread_pool: str = "session",
    verify: bool = True,
    provider_config: ProviderConfig | None = None,
    session_config: SessionConfig | None = None,
    auto_config: AutoConfig | None = None,
) -> Model:
    """Validate a bundle and create its sessions, once.

    ``provider``: auto | tensorrt | cuda | cpu (auto: TensorRT, then CUDA, then CPU).
    ``strategy``: how modular layers run (DESIGN.md §6): ``host`` (numpy routing over
    per-module sessions), ``graph`` (one composed ONNX graph per layer, routing inside),
    ``fused`` (ORT's MoE op, feed-forward MLP modules), or ``auto`` (the default: measure
    those that apply, keep the fastest per layer and batch range, cache the choice; see
    ``modrt.runtime.auto``). ``threads``: intra-op threads per session (0: all cores).
    ``provider_config``/``session_config``/``auto_config`` give full control and override
    the plain arguments.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy {strategy!r} unknown; choose one of {', '.join(STRATEGIES)}")
    manifest = bundle.load(path, verify=verify)
    try:
        pcfg = provider_config or ProviderConfig(name=provider)
        scfg = session_config or SessionConfig(threads=threads, thread_pool=thread_pool)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    sessions = Sessions(path, manifest, pcfg, scfg)
    layers = auto.choose(path, manifest, sessions, scfg, strategy, auto_config)
    return Model(path, manifest, sessions, strategy, layers)


__all__ = ["Model", "load", "STRATEGIES", "AutoConfig"]
