"""The routed runtime: a bundle's graphs as ONNX Runtime sessions, modules run only for
the rows routed to them (DESIGN.md §6). numpy + onnxruntime only; never torch.

    providers.py   --provider auto|tensorrt|cuda|cpu -> ORT providers and their options
    sessions.py    one session per graph, thread settings, ORT errors -> modrt errors
    host.py        the host strategy: route -> dispatch -> modules -> combine, per step
    model.py       load(bundle) -> Model with run() / run_dense()
"""

from modrt.runtime.model import STRATEGIES, Model, load
from modrt.runtime.providers import ProviderConfig
from modrt.runtime.sessions import SessionConfig

__all__ = ["Model", "load", "ProviderConfig", "SessionConfig", "STRATEGIES"]
