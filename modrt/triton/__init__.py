"""Triton Inference Server: a model repository that routes, written from a bundle
(``modrt export-triton``), and KServe manifests beside it. See ``repository``."""

from modrt.triton.repository import Options, validate, write

__all__ = ["Options", "validate", "write"]
