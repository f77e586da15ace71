"""modrt.export: a training checkpoint -> a bundle of per-module ONNX graphs (torch + onnx)."""
