"""Click parameter types the sub-commands share (``modrt bench``, ``eval``, ``serve``).

Their own module so that a sub-command takes them without importing ``modrt.cli`` (which
dispatches to the sub-commands) or another sub-command. Imports click only: the
strategy names are read from their owner, ``modrt.runtime.auto.STRATEGIES``, when a value
is checked or the help is drawn, not at import.
"""

from __future__ import annotations

import click


class OneLineUsageError(click.UsageError):
    """A usage error (exit 2) shown as one red line, without click's usage banner."""

    def show(self, file=None) -> None:  # noqa: D401 - click's signature
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


class ProviderType(click.ParamType):
    """``--provider auto|tensorrt|cuda|cpu``; anything else is a usage error (exit 2) that
    lists what this onnxruntime build offers."""

    name = "provider"
    CHOICES = ("auto", "tensorrt", "cuda", "cpu")

    def convert(self, value, param, ctx):
        v = str(value).lower()
        if v in self.CHOICES:
            return v
        try:
            import onnxruntime

            have = ", ".join(onnxruntime.get_available_providers())
        except ImportError:
            have = "none (onnxruntime is not installed)"
        self.fail(f"{value!r} is not one of {', '.join(self.CHOICES)} (this onnxruntime offers: {have})",
                  param, ctx)

    def get_metavar(self, param, ctx=None):  # noqa: D102 - click API
        return "[auto|tensorrt|cuda|cpu]"


def _strategies() -> tuple[str, ...]:
    from modrt.runtime.auto import STRATEGIES

    return STRATEGIES  # auto | host | graph | fused


class StrategyType(click.ParamType):
    """``--strategy auto|host|graph|fused``; anything else: one line, exit 2."""

    name = "strategy"

    def convert(self, value, param, ctx):
        v = str(value).lower()
        choices = _strategies()
        if v in choices:
            return v
        raise OneLineUsageError(f"--strategy {value!r} unknown; choose one of {', '.join(choices)}", ctx)

    def get_metavar(self, param, ctx=None):  # noqa: D102 - click API
        return "[" + "|".join(_strategies()) + "]"


PROVIDER = ProviderType()
STRATEGY = StrategyType()
STRATEGY_HELP = ("How modular layers run: auto (measure at load, keep the fastest per batch range, cached), "
                 "host (numpy over per-module sessions), graph (one composed ONNX graph per layer), "
                 "fused (ORT's MoE op, MLP modules).")

__all__ = ["OneLineUsageError", "PROVIDER", "ProviderType", "STRATEGY", "STRATEGY_HELP", "StrategyType"]
