"""``ckpt.pt``: everything to resume a run exactly and to export it (DESIGN.md §4).

One ``torch.save`` file readable with ``torch.load(path, weights_only=True)``: only
tensors, numbers, strings, lists, tuples and dicts inside. Written atomically: a temp file
in the same directory, fsync, then ``os.replace``, so an interrupted write never leaves a
broken ``ckpt.pt``.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modrt._exceptions import CheckpointError
from modrt._version import __version__

FORMAT = "modrt-checkpoint"
# 2: the method's own state under "method" (EM's a* memory, REINFORCE's baseline).
VERSION = 2


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "modrt_version": __version__, **state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _reason(exc: Exception, limit: int = 160) -> str:
    """torch.load's failure in one short line: its unpickler's own line when it gives one
    (the rest is advice about weights_only), else its first sentence, cut at a word."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = next((x for x in lines if "Unpickler error" in x), lines[0].split(". ")[0])
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a modrt checkpoint; any fault is one ``CheckpointError`` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a modrt checkpoint (not a PyTorch file: torch.save writes a zip "
                              "archive, and modrt train writes ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes make the unpickler raise anything
        raise CheckpointError(f"{path}: not a modrt checkpoint ({_reason(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a modrt checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt.get('version')}, this modrt "
            f"({__version__}) reads version {VERSION}"
        )
    for key in ("model_config", "train_config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    task = task_of(ckpt)
    meta = "classes" if task == "cifar10" else "vocab"
    if meta not in ckpt:
        raise CheckpointError(f"{path}: checkpoint lacks '{meta}'")
    return ckpt


def task_of(ckpt: dict[str, Any]) -> str:
    """The task a checkpoint's model config belongs to: "ptb" or "cifar10"."""
    cfg = ckpt.get("model_config")
    return cfg.get("task", "ptb") if isinstance(cfg, dict) else "ptb"


def model_config(ckpt: dict[str, Any]):
    """The checkpoint's model config object (``ModelConfig`` or ``ImageModelConfig``); a
    config this modrt cannot build raises TypeError or ValueError."""
    from modrt.train.config import ImageModelConfig, ModelConfig

    cls = ImageModelConfig if task_of(ckpt) == "cifar10" else ModelConfig
    return cls(**ckpt["model_config"])


def build_model(cfg):
    """The untrained model of a config: ``ModularLM`` or ``ModularConvNet``."""
    from modrt.train.config import ImageModelConfig

    if isinstance(cfg, ImageModelConfig):
        from modrt.train.conv import ModularConvNet

        return ModularConvNet(cfg)
    from modrt.train.model import ModularLM

    return ModularLM(cfg)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """The model a checkpoint holds, rebuilt from its config (eval mode), and the checkpoint.
    Used by training (``--resume``), export and inspect; any fault is one ``CheckpointError``."""
    ckpt = load(path, map_location)
    try:
        model = build_model(model_config(ckpt))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: model does not rebuild from its config ({str(exc)[:200]})") from exc
    return model.eval(), ckpt


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
