"""``REPO/kserve/``: KServe ``InferenceService`` manifests for the repository and for
``modrt serve``, and the Dockerfile of modrt's serving image.

    triton.yaml      the Triton repository (``modelFormat: triton``, ``protocolVersion: v2``,
                     ``storageUri``: where REPO/models/ is uploaded)
    modrt.yaml       ``modrt serve`` as a custom predictor: the bundle downloaded by KServe's
                     storage initializer to /mnt/models (``STORAGE_URI``), port 8080,
                     readiness and liveness on the v2 health endpoints
    Dockerfile       that image, built from a modrt checkout:
                     ``docker build -f REPO/kserve/Dockerfile -t IMAGE .``

Both services speak the KServe v2 protocol, so one client talks to either. YAML is
written by hand (no YAML dependency): every value is a plain scalar or quoted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PORT = 8080


def _dns(name: str) -> str:
    """A Kubernetes resource name (RFC 1123 label) from a model name."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (s or "modrt")[:50]


def _yaml(value: Any, indent: int = 0) -> str:
    pad = "  " * indent
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:\n{_yaml(v, indent + 1)}")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
    else:
        for item in value:
            body = _yaml(item, indent + 1) if isinstance(item, dict | list) else f"{pad}  {_scalar(item)}\n"
            out.append(f"{pad}- {body.lstrip()}")
    return "".join(out)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[]"
    if isinstance(v, dict):
        return "{}"
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def triton_service(name: str, storage_uri: str, opts) -> dict[str, Any]:
    resources = {"limits": {"cpu": "2", "memory": "4Gi", **({"nvidia.com/gpu": "1"} if opts.gpu or opts.tensorrt
                                                            else {})}}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": f"{_dns(name)}-triton",
                     "annotations": {"modrt/routing-model": name}},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "triton"},
            "protocolVersion": "v2",
            "runtime": "kserve-tritonserver",
            "storageUri": storage_uri,
            "resources": resources,
        }}},
    }


def modrt_service(name: str, bundle_uri: str, opts) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "periodSeconds": 5, "failureThreshold": 3}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": f"{_dns(name)}-modrt"},
        "spec": {"predictor": {"containers": [{
            "name": "kserve-container",
            "image": opts.image,
            "args": ["/mnt/models", "--host", "0.0.0.0", "--port", str(PORT), "--model-name", name,
                     "--provider", "auto"],
            "env": [{"name": "STORAGE_URI", "value": bundle_uri}],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}],
            "readinessProbe": probe,
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT}, "periodSeconds": 10},
            "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
        }]}},
    }


DOCKERFILE = """\
# modrt serve: the KServe v2 HTTP server for a modrt bundle (the predictor of modrt.yaml).
# Build from a modrt checkout:   docker build -f {repo}/kserve/Dockerfile -t {image} .
# KServe's storage initializer downloads the bundle (STORAGE_URI) to /mnt/models.
FROM python:3.11-slim
WORKDIR /opt/modrt
COPY pyproject.toml README.md ./
COPY modrt modrt
COPY export export
COPY serve serve
COPY train train
RUN pip install --no-cache-dir '.[serve]'
EXPOSE {port}
ENTRYPOINT ["modrt", "serve"]
CMD ["/mnt/models", "--host", "0.0.0.0", "--port", "{port}"]
"""


def write(directory: Path, name: str, repo_name: str, bundle_name: str, opts) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    storage = opts.storage_uri or f"s3://CHANGE-ME/{repo_name}/models"
    bundle_uri = opts.bundle_uri or f"s3://CHANGE-ME/{bundle_name}"
    (directory / "triton.yaml").write_text(_yaml(triton_service(name, storage, opts)))
    (directory / "modrt.yaml").write_text(_yaml(modrt_service(name, bundle_uri, opts)))
    (directory / "Dockerfile").write_text(DOCKERFILE.format(repo=repo_name, image=opts.image, port=PORT))


__all__ = ["write", "triton_service", "modrt_service", "PORT"]
