"""What the one training loop (``trainer.Trainer``) needs to know about a data set.

A task builds the model, cuts an epoch into batches of examples (``methods.Window`` for PTB,
``methods.Images`` for CIFAR-10), carries state between batches (the recurrent state across
PTB windows; nothing for images), and evaluates. Everything a task draws at random is a
function of (seed, epoch, batch index), so a resumed run sees exactly the batches the
uninterrupted run would have.

    PTB        one example = one BPTT window of one stream; epoch = W windows in order;
               valid / test perplexity under greedy routing.
    CIFAR-10   one example = one training image (keyed by its index); epoch = a fresh
               permutation cut into batches of B (the last one smaller); optional random
               crops (4-pixel zero padding) and flips; train / test accuracy under greedy
               routing, the train accuracy after each epoch on a fixed 10,000-image subset
               (the full 50,000 at the end).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modrt._exceptions import CheckpointError, ModrtError
from modrt.train import data, distributed, methods
from modrt.train import model as lm
from modrt.train.config import ImageModelConfig, ModelConfig, TrainConfig

# Images scored at once when evaluating (no gradient).
EVAL_CHUNK = 500
# Training images whose accuracy is measured after every epoch (a fixed random subset).
TRAIN_EVAL_IMAGES = 10_000


def usage_summary(usage: torch.Tensor) -> dict[str, Any]:
    """Module use under greedy routing on test data: how many modules, and exp of the
    entropy of the use distribution (M = every module equally). ``usage`` (M,) counts, or
    (L, M) one row per modular layer: then the layers' mean (each layer has its own modules)."""
    if usage.dim() == 2:
        rows = [usage_summary(u) for u in usage]
        return {"test_module_usage": usage.tolist(),
                "modules_in_use": round(sum(r["modules_in_use"] for r in rows) / len(rows), 3),
                "usage_exp_entropy": round(sum(r["usage_exp_entropy"] for r in rows) / len(rows), 3),
                "usage_exp_entropy_per_layer": [r["usage_exp_entropy"] for r in rows]}
    p = usage.double() / usage.sum()
    return {"test_module_usage": usage.tolist(), "modules_in_use": int((usage > 0).sum()),
            "usage_exp_entropy": round(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())), 3)}


class PTBTask:
    """Penn Treebank windows (``data.batchify`` / ``data.window``)."""

    kind = "ptb"

    def __init__(self, corpus, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, world=None):
        self.mcfg, self.tcfg, self.device = mcfg, tcfg, device
        self.world = world or distributed.SINGLE
        self.vocab = list(corpus.vocab)
        if mcfg.vocab_size != len(self.vocab):
            raise ModrtError(f"model vocab_size {mcfg.vocab_size} != corpus vocabulary {len(self.vocab)}")
        B, W = tcfg.batch_size, self.world.size
        if B % W:
            raise ValueError(f"{B} streams do not split over {W} processes")
        self.all_train = data.batchify(corpus.train, B)  # (N/B, B)
        # This process's streams (all of them for one process): they stay its own all run.
        self.share = self.world.split(B)
        self.train_data = self.all_train[:, self.share]
        self.valid_data = data.batchify(corpus.valid, tcfg.eval_batch_size)
        self.test_data = data.batchify(corpus.test, tcfg.eval_batch_size)
        self.batches = data.num_windows(self.train_data, tcfg.bptt)
        self.examples, self.positions = self.batches * tcfg.batch_size, tcfg.bptt
        self.unit = "windows"

    def meta(self) -> dict[str, Any]:
        return {"vocab": self.vocab}

    def check_resume(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("vocab") != self.vocab:
            raise CheckpointError("checkpoint vocabulary differs from this data set's: cannot continue")

    def build_model(self) -> lm.ModularLM:
        return lm.ModularLM(self.mcfg)

    def build_method(self, model) -> methods.Method:
        return methods.build(model, self.mcfg, self.tcfg, self.examples, self.positions, self.all_train)

    def initial_carry(self, model) -> torch.Tensor:
        return model.init_hidden(self.share.stop - self.share.start, self.device)

    def carry(self, out) -> torch.Tensor:
        return out.h_last.detach()

    def batch(self, index: int, epoch: int, step: int, carry: torch.Tensor) -> methods.Window:
        x, y = (t.to(self.device) for t in data.window(self.train_data, index, self.tcfg.bptt))
        return methods.Window(x, y, carry, index, epoch, step, self.share.start, self.tcfg.batch_size)

    def weight(self, w) -> float:
        """W * this process's rows / the global batch's rows: every process holds B/W streams."""
        return 1.0

    def batch_stats(self, out, w) -> dict[str, int]:
        return {}

    def validate(self, model) -> dict[str, Any]:
        loss, _ = evaluate(model, self.valid_data, self.tcfg.bptt, self.device)
        return {"loss": round(loss, 5), "ppl": round(math.exp(loss), 3)}

    def describe(self, record: dict[str, Any]) -> str:
        return f"valid ppl {record['ppl']:.2f}"

    def final(self, model) -> dict[str, Any]:
        vloss, _ = evaluate(model, self.valid_data, self.tcfg.bptt, self.device)
        ent: list[float] = []
        tloss, usage = evaluate(model, self.test_data, self.tcfg.bptt, self.device, ent)
        return {"valid_ppl": round(math.exp(vloss), 3), "test_ppl": round(math.exp(tloss), 3),
                **usage_summary(usage), "controller_exp_entropy": round(math.exp(ent[0]), 3)}


@torch.no_grad()
def evaluate(model: lm.ModularLM, tokens: torch.Tensor, bptt: int,
             device: torch.device, entropy: list[float] | None = None) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood per token (nats) with greedy routing, and how often
    each module was selected. tokens: (N, B) -> (nll, usage (M,)). Given a list,
    ``entropy`` gets the controller's mean per-example entropy (nats; how decided it is)."""
    was = model.training
    model.eval()
    h = model.init_hidden(tokens.shape[1], device)
    total, count = 0.0, 0
    usage = torch.zeros(model.cfg.modules, dtype=torch.long)
    ent, ent_n = 0.0, 0
    for w in range(data.num_windows(tokens, bptt)):
        x, y = (t.to(device) for t in data.window(tokens, w, bptt))
        out = model(x, h, lm.greedy_policy())
        total -= model.token_log_likelihood(out.hs, y).sum().item()
        count += y.numel()
        usage += torch.bincount(out.a.flatten().cpu(), minlength=model.cfg.modules)
        if out.log_probs is not None:
            lp = out.log_probs
            ent -= float((lp.exp() * lp).sum(-1).mean(-1).sum())  # slots averaged, positions summed
            ent_n += lp.shape[0] * lp.shape[1]
        h = out.h_last
    model.train(was)
    if entropy is not None:
        entropy.append(ent / ent_n if ent_n else 0.0)
    return total / count, usage


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips, per image.
    (B, C, H, W) -> (B, C, H, W); ``generator`` decides everything (exact resume)."""
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    rows = (dy.view(B, 1) + torch.arange(H).view(1, H)).to(images.device)  # (B, H)
    cols = (dx.view(B, 1) + torch.arange(W).view(1, W)).to(images.device)  # (B, W)
    cols = torch.where(flip.view(B, 1).to(images.device), cols.flip(1), cols)
    b = torch.arange(B, device=images.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=images.device).view(1, C, 1, 1)
    return padded[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


class ImageTask:
    """CIFAR-10 images (``modrt.data.cifar10``), uint8 HWC in memory, normalised per batch."""

    kind = "cifar10"

    def __init__(self, dataset, mcfg: ImageModelConfig, tcfg: TrainConfig, device: torch.device, world=None):
        self.mcfg, self.tcfg, self.device = mcfg, tcfg, device
        self.world = world or distributed.SINGLE
        self.classes = list(dataset.classes)
        if mcfg.classes != len(self.classes):
            raise ModrtError(f"model classes {mcfg.classes} != the data set's {len(self.classes)}")
        self.train_images = torch.from_numpy(np.ascontiguousarray(dataset.train_images))  # (N, H, W, 3) uint8
        self.train_labels = torch.from_numpy(np.asarray(dataset.train_labels, np.int64))
        self.test_images = torch.from_numpy(np.ascontiguousarray(dataset.test_images))
        self.test_labels = torch.from_numpy(np.asarray(dataset.test_labels, np.int64))
        size = tuple(self.train_images.shape[1:])
        if size != (mcfg.image, mcfg.image, mcfg.in_channels):
            raise ModrtError(f"images are {size}, the model takes ({mcfg.image}, {mcfg.image}, {mcfg.in_channels})")
        N, B = len(self.train_labels), tcfg.batch_size
        self.examples, self.positions = N, mcfg.layers
        self.batches = (N + B - 1) // B
        if min(B, N - (self.batches - 1) * B) < self.world.size:
            raise ValueError(f"a batch of {min(B, N - (self.batches - 1) * B)} images does not give each of "
                             f"{self.world.size} processes one")
        self.unit = "batches"
        g = torch.Generator().manual_seed(tcfg.seed)
        self.train_eval = torch.randperm(N, generator=g)[:TRAIN_EVAL_IMAGES].sort().values
        self._perm: tuple[int, torch.Tensor] | None = None

    def meta(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def check_resume(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("classes") != self.classes:
            raise CheckpointError("checkpoint classes differ from this data set's: cannot continue")

    def build_model(self):
        from modrt.train.conv import ModularConvNet

        return ModularConvNet(self.mcfg)

    def build_method(self, model) -> methods.Method:
        return methods.build(model, self.mcfg, self.tcfg, self.examples, self.positions)

    def initial_carry(self, model) -> None:
        return None

    def carry(self, out) -> None:
        return None

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation of the training images (a function of seed and epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.tcfg.seed * 1_000_003 + epoch + 1)
            self._perm = (epoch, torch.randperm(len(self.train_labels), generator=g))
        return self._perm[1]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the device."""
        mean = torch.tensor(self.mcfg.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.mcfg.std, device=self.device).view(1, -1, 1, 1)
        x = images.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - mean) / std

    def batch(self, index: int, epoch: int, step: int, carry: None) -> methods.Images:
        """Batch ``index`` of epoch ``epoch``; on several processes this one's rows of it
        (the global batch is drawn and augmented whole, then split)."""
        B = self.tcfg.batch_size
        ids = self.order(epoch)[index * B:(index + 1) * B]
        x = self.pixels(self.train_images[ids])
        if self.tcfg.augment:
            g = torch.Generator().manual_seed((self.tcfg.seed * 1_000_003 + epoch) * 100_003 + index)
            x = augment(x, g)
        if self.world.size > 1:
            part = self.world.split(len(ids))
            ids, x = ids[part], x[part]
        y = self.train_labels[ids].to(self.device)
        return methods.Images(x, y, ids, self.mcfg.layers, index, epoch, step)

    def weight(self, w) -> float:
        """W * this process's rows / the global batch's rows (the epoch's last batch is
        smaller and may not split evenly)."""
        B = self.tcfg.batch_size
        n = min(B, len(self.train_labels) - w.index * B)
        return self.world.size * len(w.ids) / n

    def batch_stats(self, out, w) -> dict[str, int]:
        return {"correct": int((out.logits.argmax(1) == w.y).sum()), "count": int(w.y.numel())}

    @torch.no_grad()
    def accuracy(self, model, images: torch.Tensor, labels: torch.Tensor,
                 usage: torch.Tensor | None = None, entropy: list[float] | None = None) -> tuple[float, float]:
        """(accuracy, mean nll) under greedy routing, clean images; ``usage`` (L, M) gets the
        selections' counts per layer, ``entropy`` the controllers' mean per-example
        entropy (nats)."""
        was = model.training
        model.eval()
        correct, nll, ent, ent_n = 0, 0.0, 0.0, 0
        for lo in range(0, len(labels), EVAL_CHUNK):
            x = self.pixels(images[lo:lo + EVAL_CHUNK])
            y = labels[lo:lo + EVAL_CHUNK].to(self.device)
            out = model(x, lm.greedy_policy())
            correct += int((out.logits.argmax(1) == y).sum())
            nll -= float(model.log_likelihood(out.logits, y).sum())
            if usage is not None:
                for li, a in enumerate(out.a.cpu()):
                    usage[li] += torch.bincount(a.flatten(), minlength=self.mcfg.modules)
            if out.log_probs is not None:
                lp = out.log_probs
                ent -= float((lp.exp() * lp).sum(-1).mean(-1).sum())
                ent_n += lp.shape[0] * lp.shape[1]
        model.train(was)
        if entropy is not None:
            entropy.append(ent / ent_n if ent_n else 0.0)
        return correct / len(labels), nll / len(labels)

    def validate(self, model) -> dict[str, Any]:
        test_acc, test_nll = self.accuracy(model, self.test_images, self.test_labels)
        ids = self.train_eval
        train_acc, _ = self.accuracy(model, self.train_images[ids], self.train_labels[ids])
        return {"loss": round(test_nll, 5), "test_acc": round(test_acc, 5), "train_acc_subset": round(train_acc, 5)}

    def describe(self, record: dict[str, Any]) -> str:
        return f"test acc {record['test_acc']:.4f}, train acc {record['train_acc_subset']:.4f} (10k subset)"

    def final(self, model) -> dict[str, Any]:
        usage = torch.zeros(self.mcfg.layers, self.mcfg.modules, dtype=torch.long)
        ent: list[float] = []
        test_acc, test_nll = self.accuracy(model, self.test_images, self.test_labels, usage, ent)
        train_acc, _ = self.accuracy(model, self.train_images, self.train_labels)
        return {"train_acc": round(train_acc, 5), "test_acc": round(test_acc, 5), "test_nll": round(test_nll, 5),
                **usage_summary(usage), "controller_exp_entropy": round(math.exp(ent[0]), 3)}


def build(config, dataset, tcfg: TrainConfig, device: torch.device, world=None):
    """The task of a model config: ``ModelConfig`` -> PTB, ``ImageModelConfig`` -> CIFAR-10;
    ``world``: the processes that share each batch (None: this one alone)."""
    if isinstance(config, ImageModelConfig):
        return ImageTask(dataset, config, tcfg, device, world)
    return PTBTask(dataset, config, tcfg, device, world)


__all__ = ["ImageTask", "PTBTask", "augment", "build", "evaluate", "usage_summary"]
