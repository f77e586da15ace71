"""The PTB model cut into the bundle's graphs (contracts in ``modrt.bundle``).

Each graph is a small ``nn.Module`` wrapper traced by ``torch.onnx.export`` from its own
sample input, so no module can go missing because a sample did not route to it (the
known failure of tracing a routed model whole).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modrt.train.model import ModularLM

OPSET = 17
SAMPLE_BATCH = 3  # odd, so no dimension is mistaken for another
SAMPLE_T = 5


class GraphDef(NamedTuple):
    name: str
    module: nn.Module
    args: tuple[torch.Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]  # tensor name -> {axis: symbolic name}


class Embedding(nn.Module):
    def __init__(self, model: ModularLM):
        super().__init__()
        self.embed = model.embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, E)
        return self.embed(tokens)


class Head(nn.Module):
    def __init__(self, model: ModularLM):
        super().__init__()
        self.head = model.head

    def forward(self, hs: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        return self.head(hs)


class Controller(nn.Module):
    """log-softmax per slot. For the dense method (no controller), slot k always picks
    module k (M = K): every module runs, as in training."""

    def __init__(self, model: ModularLM):
        super().__init__()
        self.layer = model.layer
        K, M = model.cfg.k, model.cfg.modules
        self.register_buffer("fixed", torch.full((K, M), -1e9).fill_diagonal_(0.0))

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # -> (B, K, M)
        if self.layer.controller is not None:
            return self.layer.scores(e, h)
        # Both inputs stay in the graph (the controller contract is (e, h)); x*0 is not
        # folded away, and costs nothing next to the modules.
        zero = (e[:, :1] * 0 + h[:, :1] * 0).unsqueeze(-1)  # (B, 1, 1)
        return F.log_softmax(self.fixed.unsqueeze(0) + zero, dim=-1)


class Module(nn.Module):
    def __init__(self, cell: nn.GRUCell):
        super().__init__()
        self.cell = cell

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # (R, E), (R, H) -> (R, H)
        return self.cell(e, h)


class DenseStep(nn.Module):
    """One step as a plain export of the whole layer runs it: every module on every row,
    the selected ones combined by masking. Same outputs as routing, M times the work."""

    def __init__(self, model: ModularLM):
        super().__init__()
        self.controller = Controller(model)
        self.cells = model.layer.cells
        self.rule = model.cfg.combine
        self.m = model.cfg.modules
        self.k = model.cfg.k
        self.topk = model.cfg.selection == "topk"

    def forward(self, e: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = self.controller(e, h)  # (B, K, M), or (B, 1, M) for "topk"
        outs = torch.stack([cell(e, h) for cell in self.cells], 1)  # (B, M, H)
        if self.topk:  # noisy top-k at inference: the k most probable, weighted by their softmax
            if torch.onnx.is_in_onnx_export():  # ONNX TopK: ties go to the lower index
                top, a = lp[:, 0].topk(self.k, dim=-1)  # (B, k)
            else:  # eager (parity checks): the same order; torch.topk breaks ties otherwise
                top, a = torch.sort(lp[:, 0], dim=-1, descending=True, stable=True)
                top, a = top[:, : self.k], a[:, : self.k]
            w = torch.zeros_like(lp[:, 0]).scatter(1, a, F.softmax(top, dim=-1))  # (B, M)
            return (outs * w.unsqueeze(-1)).sum(1), a
        a = lp.argmax(-1)  # (B, K)
        mask = F.one_hot(a, self.m).amax(1).to(e.dtype)  # (B, M): distinct selected modules
        h_new = (outs * mask.unsqueeze(-1)).sum(1)  # (B, H)
        if self.rule == "mean":
            h_new = h_new / mask.sum(1, keepdim=True)
        return h_new, a


def graph_defs(model: ModularLM, layer: str = "layer0") -> Iterator[GraphDef]:
    cfg = model.cfg
    B, T, E, H = SAMPLE_BATCH, SAMPLE_T, cfg.embedding, cfg.hidden
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    e, h = torch.randn(B, E, generator=gen), torch.randn(B, H, generator=gen)
    batch = {0: "batch"}
    yield GraphDef("embedding", Embedding(model), (tokens,), ["tokens"], ["emb"],
                   {"tokens": {0: "batch", 1: "time"}, "emb": {0: "batch", 1: "time"}})
    yield GraphDef(f"{layer}.controller", Controller(model), (e, h), ["e", "h"], ["log_probs"],
                   {"e": batch, "h": batch, "log_probs": batch})
    for m, cell in enumerate(model.layer.cells):
        # Its own sample rows (R = 4 here), independent of any routing decision.
        r = 4 + m % 3
        yield GraphDef(f"{layer}.module{m}", Module(cell),
                       (torch.randn(r, E, generator=gen), torch.randn(r, H, generator=gen)),
                       ["e", "h"], ["h_new"], {"e": {0: "rows"}, "h": {0: "rows"}, "h_new": {0: "rows"}})
    yield GraphDef(f"{layer}.dense", DenseStep(model), (e, h), ["e", "h"], ["h_new", "selection"],
                   {"e": batch, "h": batch, "h_new": batch, "selection": batch})
    yield GraphDef("head", Head(model), (torch.randn(B, T, H, generator=gen),), ["hs"], ["logits"],
                   {"hs": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}})


def to_onnx(g: GraphDef) -> bytes:
    """Export one graph (TorchScript-based exporter: fast, dynamic axes, opset 17)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(g.module.eval(), g.args, buf, input_names=g.inputs, output_names=g.outputs,
                          dynamic_axes=g.dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    return buf.getvalue()


# --- the CIFAR-10 network (modrt.train.conv) ----------------------------------------------
# Stages: layer0, pool0, layer1, pool1, ..., layer{L-1}, head. Layer l's controller and
# modules take its input (layer0: "image", the normalised (B, 3, H, W) picture; later
# layers "x"); the pools and the head are the glue. Only the batch axis is dynamic.

IMAGE_SAMPLE_ROWS = 3


class ImageController(nn.Module):
    """A conv layer's controller: log-softmax (B, K, M) of its pooled input ((B, 1, M) for
    noisy top-k, no noise at inference). Dense (no controller): slot k picks module k."""

    def __init__(self, layer, k: int, modules: int):
        super().__init__()
        self.layer = layer
        self.register_buffer("fixed", torch.full((k, modules), -1e9).fill_diagonal_(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.controller is not None:
            return self.layer.scores(x)
        zero = (x.mean(dim=(1, 2, 3)) * 0).view(-1, 1, 1)  # keeps the input in the graph
        return F.log_softmax(self.fixed.unsqueeze(0) + zero, dim=-1)


class ImageDense(nn.Module):
    """A conv layer as a plain export runs it: every block on every row, the selected ones
    combined by masking (or weighted by the gates). Same outputs as routing, M times the work."""

    def __init__(self, layer, k: int, modules: int, combine: str):
        super().__init__()
        self.controller = ImageController(layer, k, modules)
        self.blocks = layer.blocks
        self.m, self.k, self.rule = modules, k, combine
        self.topk = layer.selection == "topk"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = self.controller(x)
        outs = torch.stack([b(x) for b in self.blocks], 1)  # (B, M, C, H, W)
        if self.topk:
            if torch.onnx.is_in_onnx_export():
                top, a = lp[:, 0].topk(self.k, dim=-1)
            else:
                top, a = torch.sort(lp[:, 0], dim=-1, descending=True, stable=True)
                top, a = top[:, : self.k], a[:, : self.k]
            w = torch.zeros_like(lp[:, 0]).scatter(1, a, F.softmax(top, dim=-1))  # (B, M)
            return (outs * w.view(*w.shape, 1, 1, 1)).sum(1), a
        a = lp.argmax(-1)
        mask = F.one_hot(a, self.m).amax(1).to(x.dtype)  # (B, M) distinct selected modules
        y = (outs * mask.view(*mask.shape, 1, 1, 1)).sum(1)
        if self.rule == "mean":
            y = y / mask.sum(1).view(-1, 1, 1, 1)
        return y, a


class Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return F.max_pool2d(x, 2)


class ImageHead(nn.Module):
    """The last layer's pool, the global average pool and the linear head -> logits (B, classes)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(x, 2).mean(dim=(2, 3)))


class Pixels(nn.Module):
    """Raw pixels in, the network's input out: uint8 (B, H, W, C) RGB -> (pixels / 255 -
    mean) / std per channel, (B, C, H, W) float32 (``modrt.data.cifar10.normalise``)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return ((p.float() / 255.0 - self.mean) / self.std).permute(0, 3, 1, 2).contiguous()


def image_graph_defs(model, pixels: bool = False) -> Iterator[GraphDef]:
    """The graphs of a ``ModularConvNet`` in stage order (``image_stages``); ``pixels``: a
    first graph taking raw uint8 pixels (B, H, W, C) and normalising them."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    size, cin = cfg.image, cfg.in_channels
    batch = {0: "batch"}
    if pixels:
        p = torch.randint(0, 256, (IMAGE_SAMPLE_ROWS, size, size, cin), dtype=torch.uint8, generator=gen)
        yield GraphDef("pixels", Pixels(cfg.mean, cfg.std), (p,), ["pixels"], ["image"],
                       {"pixels": batch, "image": batch})
    for li, layer in enumerate(model.layers):
        name = "image" if li == 0 else "x"
        x = torch.randn(IMAGE_SAMPLE_ROWS, cin, size, size, generator=gen)
        yield GraphDef(f"layer{li}.controller", ImageController(layer, cfg.k, cfg.modules), (x,), [name],
                       ["log_probs"], {name: batch, "log_probs": batch})
        for m, block in enumerate(layer.blocks):
            r = 4 + m % 3
            yield GraphDef(f"layer{li}.module{m}", block, (torch.randn(r, cin, size, size, generator=gen),),
                           [name], ["y"], {name: {0: "rows"}, "y": {0: "rows"}})
        yield GraphDef(f"layer{li}.dense", ImageDense(layer, cfg.k, cfg.modules, cfg.combine), (x,), [name],
                       ["y", "selection"], {name: batch, "y": batch, "selection": batch})
        cin = cfg.channels[li]
        x = torch.randn(IMAGE_SAMPLE_ROWS, cin, size, size, generator=gen)
        if li < cfg.layers - 1:
            yield GraphDef(f"pool{li}", Pool(), (x,), ["x"], ["pooled"], {"x": batch, "pooled": batch})
        else:
            yield GraphDef("head", ImageHead(model.head), (x,), ["x"], ["logits"], {"x": batch, "logits": batch})
        size //= 2


def image_stages(layers: int, pixels: bool = False) -> tuple[str, ...]:
    names: list[str] = ["pixels"] if pixels else []
    for li in range(layers):
        names.append(f"layer{li}")
        names.append(f"pool{li}" if li < layers - 1 else "head")
    return tuple(names)


def defs_of(model, pixels: bool = False) -> Iterator[GraphDef]:
    """The graphs of any trained model: the PTB LM's or the image network's (``pixels``:
    with the raw-pixel input graph first)."""
    from modrt.train.conv import ModularConvNet

    return image_graph_defs(model, pixels) if isinstance(model, ModularConvNet) else graph_defs(model)
