"""Training on several processes: ``torchrun --nproc-per-node N -m modrt.train ptb ...``.

One trainer, one method code path; what changes with the world size is kept here:

    World          rank, size, device; the sums and gathers the trainer and EM need
                   (one process: every one of them is the identity, no process group)
    wrap(model)    DistributedDataParallel over the model's gradient-carrying forward
                   (``run_scored``), gloo on CPU and NCCL on CUDA

How a global batch is split. PTB: rank r owns streams [rB/W, (r+1)B/W) of the B
parallel streams, for the whole run (the recurrent state carries across windows), so it
sees the same windows of the same streams as one process does. Images: rank r takes
rows [rn/W, (r+1)n/W) of each global batch of n images (the epoch's permutation and the
augmentation are drawn for the global batch, as one process draws them). Each rank's
losses are means over its rows; the trainer weighs them by W * rows / n so that DDP's
gradient average is the gradient of the global batch's mean, and clipping and Adam then
see exactly what one process sees.

What stays equal to one process, and what does not:
- EM's a* memory is held whole on every rank: after each E-step the ranks exchange the
  new a* of their rows (B x T x K int16 per step), so rank 0's checkpoint holds the
  whole memory keyed by global example index and a run resumes under any world size.
  The E-step's draws are keyed by example (``routing.sample_keyed``), so they do not
  depend on the split; the balancing bias moves on the whole batch's a*.
- REINFORCE's draws are keyed by example too; its baseline moves on the global mean reward.
- The logged figures (loss, entropies, module use, E-step changes, accuracy) are the
  global batch's.
- Not equal: dropout masks (drawn per process), noisy top-k's noise and its balance
  losses (per rank's rows), and batch norm's batch statistics in the image network
  (per rank, as plain DDP; SyncBatchNorm would tie the ranks at every layer).

Rank 0 writes checkpoints, metrics and the progress bar, and evaluates; a process that
dies stops the others at their next exchange, with one line, and the last checkpoint on
disk stays whole (it is written atomically, after every exchange it needs succeeded).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from modrt._exceptions import ModrtError, TrainingError

# How long a rank waits at an exchange for the others (rank 0 evaluates alone at epoch
# ends while the others wait at the next step's exchange).
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """The processes of one run. ``World()`` is one process: no process group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    def split(self, n: int) -> slice:
        """This rank's share [rn/W, (r+1)n/W) of n rows."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend can exchange it: NCCL only moves CUDA tensors."""
        return t.cuda() if self.backend == "nccl" and not t.is_cuda else t.contiguous()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns it."""
        if self.size > 1:
            wire = self._wire(t)
            dist.all_reduce(wire, op=dist.ReduceOp.SUM)
            if wire is not t:
                t.copy_(wire)
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (the same shape on all), concatenated along dim 0 in rank order,
        on ``t``'s device."""
        if self.size == 1:
            return t
        small = t.dtype in (torch.int16, torch.int8, torch.uint8, torch.bool)  # gloo has no int16
        wire = self._wire(t.int() if small else t)
        parts = [torch.empty_like(wire) for _ in range(self.size)]
        dist.all_gather(parts, wire)
        return torch.cat(parts).to(t.device, t.dtype)

    def cat_rows(self, ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (ids (n_r,), values (n_r, ...)), concatenated in rank order; the
        ranks may hold different n_r (the last image batch of an epoch)."""
        if self.size == 1:
            return ids, values
        counts = self.cat(torch.tensor([ids.numel()])).tolist()
        top = max(counts)
        pad_ids = ids.new_full((top,), -1)
        pad_ids[: ids.numel()] = ids
        pad_values = values.new_zeros((top, *values.shape[1:]))
        pad_values[: values.shape[0]] = values
        all_ids = self.cat(pad_ids).view(self.size, top)
        all_values = self.cat(pad_values).view(self.size, top, *values.shape[1:])
        keep = [slice(0, c) for c in counts]
        return (torch.cat([all_ids[r, keep[r]] for r in range(self.size)]),
                torch.cat([all_values[r, keep[r]] for r in range(self.size)]))


SINGLE = World()


class PeerStopped(TrainingError):
    """Another process of the run went away; every survivor says so (one line each)."""


def allowed_sizes(streams: int) -> list[int]:
    """The world sizes that split B streams evenly: B's divisors."""
    return [w for w in range(1, streams + 1) if streams % w == 0]


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when torch sees a GPU), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModrtError("--device cuda: no CUDA device is available to torch (use --device cpu or auto)")
    return torch.device(name)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher of its env)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[World, torch.device]:
    """Join the launcher's process group (torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); NCCL when this run trains on CUDA, else gloo. One process
    (no WORLD_SIZE, or 1): ``SINGLE`` and no group. -> (world, this rank's device)."""
    dev = resolve_device(device)
    if not launched():
        return SINGLE, dev
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise ModrtError(f"WORLD_SIZE is set but the launcher's {exc} is not: start with torchrun") from exc
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ModrtError(f"rank {rank} (local rank {local}) has no GPU: torch sees {torch.cuda.device_count()}; "
                             "run at most that many processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank, size, local, backend), dev


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class _Scored(torch.nn.Module):
    """What DDP wraps: the model's forward with gradient and the log-likelihood of the
    targets, so every parameter a loss uses (the LM's head too) is inside DDP's forward."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, h, policy, y):
        out = self.net.run_examples(x, h, policy)
        return out, self.net.example_log_likelihood(out, y)


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module | None:
    """Send the model's ``run_scored`` (the one forward of a training step that carries
    gradient; every method calls it) through DistributedDataParallel. Everything else (the
    E-step under no_grad, evaluation) calls the model itself. ``find_unused_parameters``:
    only the selected modules get gradient, and they change every step (DDP's default
    fails at step 2, ``static_graph`` too). Returns the DDP module (None for one process)."""
    if world.size == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if next(model.parameters()).is_cuda else None
    ddp = DistributedDataParallel(_Scored(model), device_ids=ids, find_unused_parameters=True)
    # An instance attribute over the class's method (a bound method, not a Module, so the
    # model's state_dict and parameters stay its own).
    object.__setattr__(model, "run_scored", ddp.__call__)
    return ddp


def reason(exc: BaseException) -> str:
    """The first sentence of a collective's error, without its source location:
    '[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1968. ...'
    -> 'Connection closed by peer [127.0.0.1]:1968'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return text.split(". ")[0].rstrip(".")[:160]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process went away."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out"))


__all__ = ["SINGLE", "TIMEOUT", "PeerStopped", "World", "allowed_sizes", "close", "init", "is_peer_failure",
           "launched", "wrap"]
