"""The ``modrt`` command line.

Sub-commands live in their own packages and are imported only when invoked, so
``modrt --help`` is fast and works without torch. Every ``ModrtError`` a command raises
is printed as one red line (exit 1); click's usage errors exit 2. The parameter types the
sub-commands share (``--provider``, ``--strategy``) are in ``modrt._cli_types``: a
sub-command imports them from there, never from this module, which dispatches to it.
"""

from __future__ import annotations

import importlib

import click

from modrt._exceptions import ModrtError
from modrt._version import __version__


class UserError(click.ClickException):
    """A ModrtError shown as one red line, no traceback."""

    def show(self, file=None) -> None:  # noqa: D401 - click's signature
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


class LazyGroup(click.Group):
    """A click group whose sub-commands are ``"module:attribute"`` strings, imported on use."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # name -> (import path, one-line help shown in the parent's --help)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            target, _ = self.lazy[name]
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import the sub-commands (torch): use the stored lines.
        rows = [(name, self.lazy[name][1]) for name in sorted(self.lazy)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModrtError as exc:
            raise UserError(str(exc)) from exc


@click.group(
    cls=LazyGroup,
    lazy={
        "train": ("modrt.train.cli:train", "Train a modular network with EM (or a baseline)."),
        "bench": ("modrt.bench:bench", "Measure routed vs dense vs peers on a bundle (or --synthetic)."),
        "export": ("modrt.export.cli:export", "Export a checkpoint to a bundle of per-module ONNX graphs."),
        "export-triton": ("modrt.triton.cli:export_triton",
                          "A Triton model repository that routes (BLS), and KServe manifests, from a bundle."),
        "eval": ("modrt.evaluate:eval_command", "Perplexity (PTB) or accuracy (CIFAR-10) of a bundle, without torch."),
        "inspect": ("modrt.train.introspect:inspect_command", "Plot module use: the words or classes each serves."),
        "reproduce": ("modrt.train.reproduce:reproduce", "Train and tabulate a paper table (ptb, ptb-small, cifar10)."),
        "serve": ("modrt.serve.cli:serve", "Serve a bundle over HTTP (KServe v2 protocol, dynamic batching)."),
        "bundle": ("modrt.bundle_cli:bundle_group", "Verify a bundle (checksums, parity), replace a graph, diff two."),
        "quantize": ("modrt.quantize:command", "An int8 copy of a bundle (modules, head, dense), parity-checked."),
    },
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="modrt")
def cli() -> None:
    """modrt: modular networks (Kirsch, Kunze & Barber, NeurIPS 2018) from training to serving.

    \b
    modrt train ptb              learn modules with EM on Penn Treebank
    modrt train cifar10          ... or on CIFAR-10 images (modular conv layers)
    modrt export CKPT OUT/       per-module ONNX graphs + controller + manifest
    modrt eval OUT/              perplexity or accuracy from the bundle alone (no torch)
    modrt bench OUT/             routed vs dense latency, one run
    modrt serve OUT/ --port 9000 KServe v2 HTTP server (tritonclient talks to it)
    """


def main() -> None:
    cli(prog_name="modrt")


if __name__ == "__main__":
    main()
