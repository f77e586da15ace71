"""The routed runtime: a bundle's graphs as ONNX Runtime sessions, modules run only for
the rows routed to them (DESIGN.md §6). numpy + onnxruntime only; never torch.

    providers.py   --provider auto|tensorrt|cuda|cpu -> ORT providers and their options
    sessions.py    one session per graph, thread settings, ORT errors -> modrt errors
    host.py        the host strategy: route -> dispatch -> modules -> combine, per step
    graph.py       the graph strategy: controller + modules composed into one ONNX graph
    fused.py       the fused strategy: ORT's com.microsoft.MoE op over packed MLP experts
    loop.py        graph-loop: a recurrent layer's composed step inside an ONNX Loop over time
    auto.py        strategy choice per layer and batch range, measured at load, cached
    model.py       load(bundle) -> Model with run() / run_dense()
"""

from modrt.runtime.auto import AutoConfig
from modrt.runtime.model import STRATEGIES, Model, load
from modrt.runtime.providers import ProviderConfig
from modrt.runtime.sessions import SessionConfig

__all__ = ["AutoConfig", "Model", "load", "ProviderConfig", "SessionConfig", "STRATEGIES"]
