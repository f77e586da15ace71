"""``modrt export CKPT OUT/``."""

from __future__ import annotations

from pathlib import Path

import click

from modrt._exceptions import ModrtError


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it already holds a bundle.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The data set for the parity check: Penn Treebank (a directory) or CIFAR-10 (a directory or "
                   "tarball), as the checkpoint's task needs (default: as `modrt train`).")
@click.option("--parity-tokens", type=click.IntRange(min=200), default=2000, show_default=True,
              help="PTB: validation tokens on which PyTorch and ONNX Runtime are compared.")
@click.option("--parity-images", type=click.IntRange(min=50), default=1000, show_default=True,
              help="CIFAR-10: test images on which PyTorch and ONNX Runtime are compared.")
@click.option("--image-input", type=click.Choice(["image", "pixels"]), default="image", show_default=True,
              help="CIFAR-10: what the bundle takes. 'image': the normalised float32 (B, 3, 32, 32) picture; "
                   "'pixels': raw uint8 (B, 32, 32, 3) RGB, normalised by the bundle's first graph.")
@click.option("--only", "only", metavar="GRAPH", default=None,
              help="Re-export just this graph (e.g. layer0.module3; with its layer's dense baseline, which holds "
                   "it too) into the existing bundle OUT, whose other graphs must be what CKPT exports (checked "
                   "by sha256); parity is then marked stale.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(ckpt: Path, out: Path, force: bool, data: Path | None, parity_tokens: int, parity_images: int,
           image_input: str, only: str | None, quiet: bool) -> None:
    """Export a training checkpoint to a bundle: manifest.json + per-module ONNX graphs.

    \b
    PTB graphs: embedding, the controller, each of the M modules (a GRU cell that
    takes only the rows routed to it), the dense step (every module on every
    row, combined by masking: the baseline), and the head.
    CIFAR-10 graphs, per modular layer: its controller, each conv module
    (dynamic batch), its dense baseline; the max pools between layers and the
    head (pool, global average, linear); the manifest records the input image,
    its normalisation and the class names.
    Every graph is checked against PyTorch under ONNX Runtime, then the whole
    model on real data (validation text, test images); the figures go into
    manifest.json ("parity").
    """
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModrtError("export needs PyTorch: pip install 'modrt[train]'") from exc
    from modrt.export.exporter import export as run_export

    if only is not None:
        from modrt.export.exporter import export_only

        done = export_only(ckpt, out, only)
        click.echo(f"re-exported {', '.join(done)} into {out}; parity is stale: modrt bundle verify {out} --data ...")
        return

    m = run_export(ckpt, out, force=force, progress=not quiet, data=data, parity_tokens=parity_tokens,
                   parity_images=parity_images, image_input=image_input)
    p = m.parity
    layer = m.layers[0]
    shape = f"M={layer.modules}, K={layer.k}, {layer.combine}" + (f", {len(m.layers)} layers" if len(m.layers) > 1
                                                                  else "")
    if m.task.get("name") == "cifar10":
        figures = (f"parity on {p['images']} test images: accuracy torch {p['acc_torch']:.4f}, routed "
                   f"{p['acc_routed']:.4f}, dense {p['acc_dense']:.4f}; routing agreement {p['routing_agreement']:.4f}")
    else:
        figures = (f"parity on {p['tokens']} validation tokens: ppl torch {p['ppl_torch']:.3f}, routed "
                   f"{p['ppl_routed']:.3f}, dense {p['ppl_dense']:.3f}")
    click.echo(f"exported {len(m.graphs)} graphs ({shape}) to {out}; {figures}; max |logit diff| routed "
               f"{p['logits_max_abs_diff_routed']:.2e}, dense {p['logits_max_abs_diff_dense']:.2e}")
