"""``modrt export-triton OUT/ REPO/``: a Triton model repository that routes."""

from __future__ import annotations

from pathlib import Path

import click

from modrt._exceptions import InputError
from modrt.triton.repository import MODELS, ONNX_BACKENDS, RECURRENT_MODES, Options, write


@click.command("export-triton", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", metavar="OUT/", type=click.Path(file_okay=False))
@click.argument("repo", metavar="REPO/", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="The routing model's name, what clients call [default: the task name].")
@click.option("--prefix", default="", help="Put before every graph's model name (several bundles in one repository).")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size of every model (a module gets at most this many rows).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="instance_group count of every model.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads per model instance (0: all cores).")
@click.option("--gpu", is_flag=True, help="KIND_GPU instances for the ONNX models (the router stays on the CPU).")
@click.option("--tensorrt", is_flag=True,
              help="The TensorRT accelerator on every ONNX model: engine cache, optimisation profile up to "
                   "--max-batch (implies --gpu).")
@click.option("--fp16", is_flag=True, help="TensorRT precision FP16 (with --tensorrt).")
@click.option("--trt-cache", default="/tmp/triton-trt-cache", show_default=True,
              help="Where TensorRT engines and the timing cache are kept on the Triton host.")
@click.option("--max-seq", default=512, show_default=True, type=click.IntRange(min=1),
              help="TensorRT profile: the longest time axis of a language model's embedding and head.")
@click.option("--queue-delay-us", default=100, show_default=True, type=click.IntRange(min=0),
              help="Dynamic batching: how long a model waits to gather requests.")
@click.option("--recurrent", type=click.Choice(RECURRENT_MODES), default="local", show_default=True,
              help="Recurrent bundles: 'local' runs the recurrent layers' controller and modules inside the "
                   "router with ONNX Runtime (one process, no hops per time step); 'bls' calls the controller "
                   "and the selected modules as Triton models at every time step.")
@click.option("--onnx-backend", type=click.Choice(ONNX_BACKENDS), default="onnxruntime", show_default=True,
              help="'python': serve each ONNX graph with a Python-backend model running ONNX Runtime, for a "
                   "Triton without the onnxruntime backend (e.g. the nvidia-pytriton wheel's).")
@click.option("--storage-uri", default=None, help="Where REPO/models/ will be uploaded (kserve/triton.yaml).")
@click.option("--bundle-uri", default=None, help="Where OUT/ will be uploaded (kserve/modrt.yaml).")
@click.option("--image", default="modrt-serve:latest", show_default=True,
              help="The modrt serve image of kserve/modrt.yaml (built from kserve/Dockerfile).")
@click.option("--force", is_flag=True, help="Replace REPO/ if it holds a repository modrt wrote.")
def export_triton(bundle_dir, repo, force, **options) -> None:
    """Write a Triton model repository from bundle OUT/ into REPO/models/, and KServe
    manifests into REPO/kserve/.

    \b
    Every ONNX graph (each module, controller, glue, head, dense baseline) becomes a
    model of its own (platform onnxruntime_onnx), so each module can be placed and scaled
    on its own. A routing model (Python backend) runs the controller, groups rows by
    module and calls only the selected modules with BLS, concurrently, and answers what
    `modrt serve` answers (logits, label / next_token, modules, h_last). Every config is
    checked against Triton's ModelConfig schema (when tritonclient is installed) and each
    ONNX model's dims and datatypes against its graph.

    \b
    tritonserver --model-repository REPO/models
    kubectl apply -f REPO/kserve/triton.yaml     (after uploading REPO/models)
    """
    if not Path(bundle_dir, "manifest.json").is_file():
        raise InputError(f"{bundle_dir}: no manifest.json; not a modrt bundle (make one with `modrt export`)")
    if Path(repo).resolve() == Path(bundle_dir).resolve():
        raise InputError("REPO/ must differ from the bundle OUT/")
    res = write(bundle_dir, repo, Options(**options), force=force)
    models = Path(repo) / MODELS
    click.echo(f"wrote {models}: routing model {res['router']!r} + {len(res['models'])} ONNX models"
               + (f"; {res['checked']} configs parsed as Triton ModelConfig" if res["checked"] else
                  "; configs not parsed (install tritonclient[grpc] to check them)"))
    click.echo(f"wrote {Path(repo) / 'kserve'}: triton.yaml, modrt.yaml, Dockerfile")
    click.echo(f"serve: tritonserver --model-repository {models}   (model {res['router']!r})")
