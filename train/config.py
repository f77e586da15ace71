"""Configuration: one frozen dataclass per concern, validated on construction.

Checkpoints store ``asdict(config)``; models and runs are rebuilt from that alone.
Click options fill these dataclasses and nothing else configures a run. This module
does not import torch, so ``modrt train --help`` works without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METHODS = ("em", "dense", "reinforce", "noisy-topk", "hash")
E_STEPS = ("window", "position", "word")
# EM's word E-step: the default threshold t of its frequent-word subsampling (TrainConfig.word_subsample).
WORD_SUBSAMPLE = 1e-3
# How EM's a* memory starts: uniform at random, or the hash table's modules of each input word.
A_STAR_INITS = ("random", "hash", "controller")
COMBINE_RULES = ("sum", "mean", "gate")
DEVICES = ("auto", "cpu", "cuda")
E_STEP_DTYPES = ("float32", "bfloat16")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """The PTB modular language model: embedding -> modular GRU layer -> linear head."""

    vocab_size: int = 10_000  # V: words in the vocabulary (PTB: 10,000 incl. <unk>, <eos>)
    embedding: int = 128  # E: word embedding width
    hidden: int = 256  # H: recurrent state width, every module's output width
    modules: int = 15  # M: modules in the modular layer
    k: int = 1  # K: controller slots per step (modules picked per step, at most K distinct)
    # How the distinct selected modules' new states combine: "sum" (the official code's
    # rule) or "mean". Identical for K=1. For K>1 a sum of K GRU states can grow up to K-fold
    # per step (a random (2,2) model overflowed within 35 steps), so PTB defaults to mean.
    # "gate" (noisy top-k only): weighted by the softmax of the selected gate logits.
    combine: str = "mean"
    method: str = "em"  # em | dense | reinforce | noisy-topk
    dropout: float = 0.2  # on embeddings and on the recurrent output before the head
    task: str = "ptb"

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "embedding", "hidden", "modules", "k")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; choose one of {', '.join(METHODS)}")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine {self.combine!r} unknown; choose one of {', '.join(COMBINE_RULES)}")
        if self.k > self.modules:
            raise ValueError(f"k ({self.k}) cannot exceed modules ({self.modules})")
        if (self.combine == "gate") != (self.method == "noisy-topk"):
            raise ValueError("combine 'gate' is noisy top-k's rule, and noisy top-k combines only by 'gate'")
        if self.method == "dense" and self.modules != self.k:
            raise ValueError(
                f"dense baseline uses every module: modules ({self.modules}) must equal k ({self.k})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def selection(self) -> str:
        """How the controller's scores become a selection (the manifest's ``selection``):
        "slots" - K independent softmaxes, the argmax of each (EM, REINFORCE, dense);
        "topk"  - one distribution over the M modules, its k largest (noisy top-k)."""
        return "topk" if self.method == "noisy-topk" else "slots"

    @property
    def exportable(self) -> bool:
        """Whether the bundle format can hold this model (hash routing's token-keyed table
        is not a controller graph of [e_t; h])."""
        return self.method != "hash"

    @property
    def routed(self) -> bool:
        """Whether a controller picks modules (False: the dense baseline uses all M = K)."""
        return self.method != "dense"


# CIFAR-10's per-channel mean and std of the 50,000 training images, pixels in [0, 1]: the
# values commonly quoted for the official batches (the shared JPEG copy measures mean
# .4913/.4821/.4465, std .2452/.2428/.2606 with modrt.data.cifar10).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ImageModelConfig:
    """The CIFAR-10 modular convolutional network: modular conv layers, each followed by a
    2x2 max pool, then a linear head over the globally pooled last layer.

    Each of a layer's M modules is a conv block (3x3 conv -> batch norm -> ReLU) of
    ``channels[l]`` filters; the layer's controller maps its globally pooled input to K
    softmaxes over the M modules, so selection is per image and per layer. The default is
    the wide one (M=8 modules of 64-128 filters, K=1: inference pays for 1/8 of each layer);
    ``demo()`` is the official demo's shape (4 layers x 5 modules of 8 filters)."""

    channels: tuple[int, ...] = (64, 64, 128, 128)  # filters of every module, per modular layer
    modules: int = 8  # M per layer
    k: int = 1  # K per layer
    combine: str = "sum"  # how the distinct selected modules' outputs combine: sum | mean
    method: str = "em"
    classes: int = 10
    in_channels: int = 3
    image: int = 32  # height = width
    mean: tuple[float, float, float] = CIFAR10_MEAN  # per-channel normalisation (part of the bundle)
    std: tuple[float, float, float] = CIFAR10_STD
    task: str = "cifar10"
    # The controllers' input: the layer's input average-pooled to a controller_pool x
    # controller_pool grid, flattened (C * pool^2 numbers). 1 is the global average pool (the
    # official code's); a grid lets layer 0's controller see more than the mean colour.
    controller_pool: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _positive(self, "modules", "k", "classes", "in_channels", "image")
        if not self.channels or min(self.channels) <= 0:
            raise ValueError(f"channels must be positive filter counts, got {list(self.channels)}")
        if self.image % 2 ** len(self.channels):
            raise ValueError(f"{len(self.channels)} layers halve a {self.image}-pixel image to a fraction")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; choose one of {', '.join(METHODS)}")
        if self.method == "hash":
            raise ValueError("hash routing keys modules on the current word; an image has none "
                             "(choose em, dense, reinforce or noisy-topk)")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine {self.combine!r} unknown; choose one of {', '.join(COMBINE_RULES)}")
        if (self.combine == "gate") != (self.method == "noisy-topk"):
            raise ValueError("combine 'gate' is noisy top-k's rule, and noisy top-k combines only by 'gate'")
        if self.k > self.modules:
            raise ValueError(f"k ({self.k}) cannot exceed modules ({self.modules})")
        last = self.image // 2 ** (len(self.channels) - 1)  # the last modular layer's input side
        if self.controller_pool < 1 or last % self.controller_pool:
            raise ValueError(f"controller_pool {self.controller_pool} must divide every modular layer's input "
                             f"side (the last one's is {last} pixels)")
        if self.method == "dense" and self.modules != self.k:
            raise ValueError(f"dense baseline uses every module: modules ({self.modules}) must equal k ({self.k})")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels or min(self.std) <= 0:
            raise ValueError("mean and std need one value per input channel, std positive")

    @classmethod
    def demo(cls, **kw) -> ImageModelConfig:
        """The official demo's network (louiskirsch/libmodular ``cifar10.py``): 4 modular
        layers of 5 modules of 8 filters."""
        return cls(**{"channels": (8, 8, 8, 8), "modules": 5, "k": 1, **kw})

    @classmethod
    def mid(cls, **kw) -> ImageModelConfig:
        """The default's M=8, K=1 at 16, 16, 32, 32 filters: routing still pays at inference
        (dense/routed 5.9x at batch 1), and the dense network cannot fit the training set
        as the default's does (results/README.md)."""
        return cls(**{"channels": (16, 16, 32, 32), **kw})

    @property
    def routed(self) -> bool:
        return self.method != "dense"

    @property
    def selection(self) -> str:
        """As ``ModelConfig.selection``: "slots" (K softmaxes) or "topk" (noisy top-k)."""
        return "topk" if self.method == "noisy-topk" else "slots"

    @property
    def exportable(self) -> bool:
        return True

    @property
    def layers(self) -> int:
        return len(self.channels)


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains. Defaults: a ~1 hour run of the default model on a 2-core CPU."""

    samples: int = 10  # S: E-step candidates (the stored a* plus S-1 controller draws)
    # E-step each window on every n-th of its visits (staggered). 1, the paper's algorithm; the
    # official demos run it every 10th step, which on PTB's 6-epoch protocol leaves 40% of
    # the windows at their random a* (docs/design-notes.md, "E-step").
    e_step_every: int = 1
    # E-step score: log p(y|x,a) + prior_weight * log p(a|x). 1 is the paper's joint, which on
    # PTB collapsed onto one module within 50 steps; 0 (ours) scores by the likelihood alone.
    prior_weight: float = 0.0
    # Precision of the E-step's head matmul (its scores only rank candidates). bfloat16: the
    # matmul 3.4x and the scoring 1.7x faster on a CPU with AMX (measured: results/README.md);
    # log-likelihoods moved by <= 0.02 nats per 35-step window, so near-ties may flip.
    e_step_dtype: str = "float32"
    # EM's E-step search (docs/design-notes.md, "E-step variants"). "window": S whole-window
    # candidates (a* and S-1 controller draws), the best by the window's score. "position":
    # walk the window step by step, keep the best of a*_t and S-1 draws at each step by that
    # step's score, accept the new path only if its window score is not below a*'s. "word"
    # (PTB): a* is a word -> modules table (a* at a position: its input word's entry); the
    # E-step moves a word's entry to the one-slot change that scored better over its
    # occurrences (methods/em.py, word_e_step).
    e_step: str = "window"
    # EM: loss-free balancing (Wang et al. 2024): a per-module bias added to the E-step's
    # scores (not to any loss), moved by this many nats per E-step against the module's load.
    balance_rate: float = 0.0
    # EM: a word (word E-step: its table entry) or an example (window E-step: its a* in the
    # memory; images: per modular layer) may move into a module only if that keeps the
    # module's share at most this many times an even share (BASE layers' capacity, Lewis et
    # al. 2021; methods/em.py, word_decide and capped_pick). 0: no cap.
    capacity: float = 0.0
    # EM, word E-step: score an occurrence of word w with probability min(1, sqrt(t / f_w)),
    # f_w its share of the training text (Mikolov et al. 2013's subsampling of frequent
    # words; methods/em.py, word_keep). 0: score every position.
    word_subsample: float = WORD_SUBSAMPLE
    # EM, word E-step: True: the M-step's forward runs first and is the E-step's trajectory
    # (no dropout, float32), a window's moves apply from the next window on. False: the
    # E-step runs its own forward first and the M-step trains the moved table (the original
    # order, an E-step forward and head more per step).
    word_reuse: bool = True
    # EM: train a dense cell (modules 0..K-1 on every row) for this many steps, then copy it
    # into every module with noise of 1% of each tensor's RMS (sparse upcycling, Komatsuzaki
    # et al. 2023).
    warm_start: int = 0
    # EM: the prior weight rises linearly from 0 to prior_weight over this many steps.
    prior_anneal: int = 0
    # EM: the a* memory's start. "random": uniform (the paper). "hash" (PTB): each position's
    # a* is the K modules that hash routing's frequency-balanced table gives its input word
    # (methods/hash.py), so EM starts from a balanced, input-determined decomposition.
    a_star_init: str = "random"
    bptt: int = 35  # T: time steps per training window
    batch_size: int = 64  # B: parallel streams (batchify)
    eval_batch_size: int = 10  # streams for validation / test perplexity
    lr: float = 1e-3  # Adam, modules and controller together (official code)
    clip: float = 0.5  # max global gradient norm
    epochs: int = 10
    steps: int = 0  # stop after this many steps in total (0: run all epochs)
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    ckpt_every: int = 200  # also write ckpt.pt every n steps (0: only at epoch ends)
    log_every: int = 50  # one metrics.jsonl line per n steps
    # REINFORCE: the reward's moving-average baseline, b <- decay * b + (1 - decay) * mean reward.
    baseline_decay: float = 0.9
    # Noisy top-k: Shazeer et al. (2017)'s importance and load losses, weight 0.1 each.
    importance_weight: float = 0.1
    load_weight: float = 0.1
    # Images: random crops (4-pixel zero padding) and horizontal flips of the training images.
    augment: bool = False

    def __post_init__(self) -> None:
        _positive(self, "samples", "e_step_every", "bptt", "batch_size", "eval_batch_size", "lr", "epochs", "log_every")
        if self.clip < 0 or self.steps < 0 or self.ckpt_every < 0:
            raise ValueError("clip, steps and ckpt_every must not be negative")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must not be negative, got {self.prior_weight}")
        if self.importance_weight < 0 or self.load_weight < 0:
            raise ValueError("importance_weight and load_weight must not be negative")
        if self.e_step not in E_STEPS:
            raise ValueError(f"e_step {self.e_step!r} unknown; choose one of {', '.join(E_STEPS)}")
        if self.capacity and (self.e_step == "position" or self.capacity < 1):
            raise ValueError("capacity caps the E-step's modules at a multiple >= 1 of an even share of the "
                             "training examples: it needs --e-step word or window and a value >= 1 (0: off)")
        if self.word_subsample < 0 or (self.word_subsample != WORD_SUBSAMPLE and self.e_step != "word"):
            raise ValueError("word_subsample thins the word E-step's scored positions: it needs --e-step word "
                             "and a value >= 0 (0: score every position)")
        if not self.word_reuse and self.e_step != "word":
            raise ValueError("--no-word-reuse orders the word E-step's passes: it needs --e-step word")
        if self.balance_rate < 0 or self.warm_start < 0 or self.prior_anneal < 0:
            raise ValueError("balance_rate, warm_start and prior_anneal must not be negative")
        if self.a_star_init not in A_STAR_INITS:
            raise ValueError(f"a_star_init {self.a_star_init!r} unknown; choose one of {', '.join(A_STAR_INITS)}")
        if self.a_star_init == "controller" and self.e_step == "word":
            raise ValueError("--a-star-init controller starts the a* memory; the word E-step keeps a table "
                             "instead (start it with random or hash)")
        if self.e_step_dtype not in E_STEP_DTYPES:
            raise ValueError(f"e_step_dtype {self.e_step_dtype!r} unknown; choose one of {', '.join(E_STEP_DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} unknown; choose one of {', '.join(DEVICES)}")


# Fields a resumed run may change; every other field must match the checkpoint, since it
# defines the model, the windows (the a* memory's keys) or the optimisation.
RESUMABLE_CHANGES = frozenset({"epochs", "steps", "device", "ckpt_every", "log_every", "eval_batch_size"})


def from_dict(cls, d: dict):
    """Rebuild a config from ``asdict`` output, ignoring nothing silently."""
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    return cls(**d)


# TrainConfig fields only EM reads, with their defaults: other methods refuse them.
EM_ONLY = {"samples": 10, "e_step_every": 1, "prior_weight": 0.0, "e_step": "window", "balance_rate": 0.0,
           "warm_start": 0, "prior_anneal": 0, "e_step_dtype": "float32", "a_star_init": "random",
           "capacity": 0.0, "word_subsample": WORD_SUBSAMPLE, "word_reuse": True}

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "ImageModelConfig", "ModelConfig", "TrainConfig", "asdict", "from_dict",
           "METHODS", "RESUMABLE_CHANGES"]
