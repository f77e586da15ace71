"""``modrt train``: click options fill ModelConfig and TrainConfig, nothing else.

Imports torch only when a command runs, so ``--help`` works without it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path

import click

from modrt._exceptions import CheckpointError, ModrtError
from modrt.train.config import (
    A_STAR_INITS,
    E_STEPS,
    EM_ONLY,
    METHODS,
    RESUMABLE_CHANGES,
    ImageModelConfig,
    ModelConfig,
    TrainConfig,
)

_M = ModelConfig()
_I = ImageModelConfig()
_T = TrainConfig()
IMAGE_BATCH = 128  # images per step (the official demo's)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def train() -> None:
    """Train a modular network with EM (or a baseline) on a task.

    \b
    On several processes (DistributedDataParallel; gloo on CPU, NCCL on CUDA), the same
    options, --batch-size being the global batch:
      torchrun --standalone --nproc-per-node 2 -m modrt.train ptb --out runs/ddp
    """


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ModrtError("training needs PyTorch: pip install 'modrt[train]'") from exc


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ModrtError(f"--out {out}: not writable ({exc.strerror or exc})") from exc


def _warn_if_busy() -> None:
    """One line when other work already keeps the cores busy: PyTorch's default (a thread
    per core) then fights it. Measured on a 2-core CPU beside one single-threaded training:
    the README's 200-step EM run made 30 steps in 9.8 min with the default threads (about
    65 min for 200), 25.7 min with --threads 1; alone, 4.1 min with the default."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return
    if load >= 0.75 and cores <= 8:
        click.echo(f"modrt: load average {load:.1f} on {cores} cores: other work is running; --threads 1 (or "
                   f"fewer than {cores}) keeps the trainings from slowing each other down many times over", err=True)


def _options(*decorators):
    """Apply click options in the order they are listed (as written above a command)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


# Options of EM and the baselines, the same for every task.
_method_options = _options(
    click.option("--samples", "-S", type=click.IntRange(min=1), default=_T.samples, show_default=True,
                 help="S, E-step candidates per example: the stored a* plus S-1 controller draws (--e-step "
                      "word: S-1 one-slot changes). 1: a* alone, so the E-step never changes it (an "
                      "ablation: the start, e.g. hash's table, kept)."),
    click.option("--e-step-every", type=click.IntRange(min=1), default=_T.e_step_every, show_default=True,
                 help="E-step each window (example) on every n-th of its visits, staggered over windows "
                      "so that every window gets one in any n consecutive epochs (images: every n-th "
                      "batch of an epoch, staggered over epochs)."),
    click.option("--prior-weight", type=click.FloatRange(min=0), default=_T.prior_weight, show_default=True,
                 help="E-step score: log p(y|x,a) + w * log p(a|x). 1 is the paper's joint; 0 scores candidates "
                      "by their likelihood alone (they are still drawn from the controller). --e-step word: a "
                      "move's gain counts w times the controller's log-probability ratio of the new module "
                      "over the old, so the table moves towards what the controller can predict."),
    click.option("--balance-rate", type=click.FloatRange(min=0), default=_T.balance_rate, show_default=True,
                 help="EM: loss-free balancing (Wang et al. 2024). A per-module bias on the E-step's scores, "
                      "moved this many nats per E-step towards under-used modules; no loss term. 0: off."),
    click.option("--capacity", type=click.FloatRange(min=0), default=_T.capacity, show_default=True,
                 help="EM (BASE layers' capacity, Lewis et al. 2021): the E-step may move a word (--e-step "
                      "word: its table entry) or an example (the a* memory; images: per modular layer) into a "
                      "module only while that module holds at most this many times an even share of the "
                      "training tokens or examples; moves go best gain first. 0: no cap."),
    click.option("--word-subsample", type=click.FloatRange(min=0), default=_T.word_subsample, show_default=True,
                 help="EM, --e-step word: score an occurrence of word w with probability min(1, sqrt(t / f_w)), "
                      "f_w its share of the training text (Mikolov et al. 2013's subsampling of frequent "
                      "words): fewer heads to score, rare words keep all their evidence. 0: every position "
                      "(measured better for K > 1, where each change is scored more rarely)."),
    click.option("--word-reuse/--no-word-reuse", default=_T.word_reuse, show_default=True,
                 help="EM, --e-step word: reuse the M-step's forward as the E-step's trajectory (no dropout, "
                      "float32; a window's moves apply from the next window on). --no-word-reuse: the "
                      "E-step runs its own forward first and the M-step trains the moved table (slower)."),
    click.option("--warm-start", type=click.IntRange(min=0), default=_T.warm_start, show_default=True,
                 help="EM: train modules 0..K-1 densely for this many steps, then copy them into every module "
                      "with noise of 1% of each tensor's RMS (sparse upcycling) and start EM. 0: off."),
    click.option("--prior-anneal", type=click.IntRange(min=0), default=_T.prior_anneal, show_default=True,
                 help="EM: raise the prior weight linearly from 0 to --prior-weight over this many steps "
                      "(after any warm start). 0: off."),
    click.option("--baseline-decay", type=click.FloatRange(0, 1, max_open=True), default=_T.baseline_decay,
                 show_default=True, help="REINFORCE: decay of the reward's moving-average baseline."),
    click.option("--importance-weight", type=click.FloatRange(min=0), default=_T.importance_weight,
                 show_default=True, help="noisy-topk: weight of the importance (gate mass balance) loss."),
    click.option("--load-weight", type=click.FloatRange(min=0), default=_T.load_weight, show_default=True,
                 help="noisy-topk: weight of the load (top-k count balance) loss."),
)

# How a run optimises, where it writes, how it resumes: the same for every task.
_run_options = _options(
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_T.lr, show_default=True,
                 help="Adam learning rate (modules and controller together)."),
    click.option("--clip", type=click.FloatRange(min=0), default=_T.clip, show_default=True,
                 help="Max global gradient norm (0: no clipping)."),
    click.option("--epochs", type=click.IntRange(min=1), default=_T.epochs, show_default=True,
                 help="Passes over the training set."),
    click.option("--steps", type=click.IntRange(min=0), default=_T.steps, show_default=True,
                 help="Stop after this many steps in total (0: all epochs). For quick runs."),
    click.option("--seed", type=int, default=_T.seed, show_default=True, help="Random seed."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_T.device, show_default=True,
                 help="auto: CUDA when torch sees a GPU, else CPU."),
    click.option("--ckpt-every", type=click.IntRange(min=0), default=_T.ckpt_every, show_default=True,
                 help="Also write ckpt.pt every n steps (always at epoch ends, Ctrl-C and the end)."),
    click.option("--log-every", type=click.IntRange(min=1), default=_T.log_every, show_default=True,
                 help="One metrics.jsonl line per n steps."),
    click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Continue from this ckpt.pt exactly where it stopped (its config is used)."),
    click.option("--force", is_flag=True, help="Overwrite a run already in --out."),
    click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                 help="CPU threads for PyTorch (0: its default, one per core). On a shared machine use 1: "
                      "two multi-threaded trainings on the same cores slow each other down many times over."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
)


@train.command("ptb")
@click.option("--method", type=click.Choice(METHODS), default=_M.method, show_default=True,
              help="em: the paper's generalised EM. dense: the same network with every module used "
                   "(M = K). reinforce / noisy-topk: the paper's baselines. hash: each word to fixed "
                   "modules, a frequency-balanced table (Roller et al. 2021); not exportable.")
@click.option("--modules", "-M", type=click.IntRange(min=1), default=None,
              help="M, modules in the modular layer.  [default: 15; dense: K]")
@click.option("--k", "-K", type=click.IntRange(min=1), default=None,
              help="K, controller slots: modules picked per time step.  [default: 1; noisy-topk: 4, "
                   "as in the paper (with k=1 its gate weight is always 1 and gets no gradient)]")
@click.option("--combine", type=click.Choice(["sum", "mean"]), default=_M.combine, show_default=True,
              help="How the selected modules' new states combine. Same for K=1; for K>1 the official "
                   "code's sum lets the GRU state grow K-fold per step, mean keeps it bounded. "
                   "noisy-topk always weights by its gates.")
@click.option("--e-step", type=click.Choice(E_STEPS), default=_T.e_step, show_default=True,
              help="EM's search. window: S whole-window candidates (a* and S-1 controller draws), the "
                   "best by the window's score. position: walk the window, at each step keep the best of "
                   "a*_t and S-1 draws (K=1, S>=M: every module) by that step's score, then accept the "
                   "path only if its window score beats a*'s (never worse). word (PTB): a* is a word -> "
                   "modules table; at the positions of a window (all of a rare word's, fewer of a frequent "
                   "one's) one-slot changes of the input word's entry are scored by that step's "
                   "likelihood, and a word moves to the change that gained over its occurrences (the "
                   "controller learns the table; likelihood score, no --prior-weight).")
@click.option("--e-step-dtype", type=click.Choice(["float32", "bfloat16"]), default=_T.e_step_dtype,
              show_default=True,
              help="Precision of the E-step's head matmul (its scores only rank candidates). bfloat16 "
                   "scored 1.7x faster on a CPU with AMX (and suits GPUs); scores move by ~0.02 nats per "
                   "window, so a near-tie between candidates may resolve the other way.")
@click.option("--a-star-init", type=click.Choice(A_STAR_INITS), default=_T.a_star_init, show_default=True,
              help="EM: how the a* memory starts. random: uniform draws (the paper). hash: each "
                   "position's a* is the modules hash routing's frequency-balanced table gives its "
                   "input word (Roller et al. 2021), a balanced start the controller can learn from "
                   "the word alone; the E-step then moves it only where a candidate scores better. "
                   "controller: at an example's first E-step (after any --warm-start) its a* becomes the "
                   "controller's own most probable modules, within --capacity when set: a start the "
                   "controller can represent by construction.")
@_method_options
@click.option("--embedding", type=click.IntRange(min=1), default=_M.embedding, show_default=True,
              help="E, word embedding width.")
@click.option("--hidden", type=click.IntRange(min=1), default=_M.hidden, show_default=True,
              help="H, recurrent state width (each module is a GRU cell E -> H).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=_M.dropout, show_default=True,
              help="Dropout on embeddings and on the recurrent output.")
@click.option("--bptt", type=click.IntRange(min=1), default=_T.bptt, show_default=True,
              help="T, time steps per training window (one window of one stream = one example).")
@click.option("--batch-size", type=click.IntRange(min=1), default=_T.batch_size, show_default=True,
              help="B, parallel streams.")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=_T.eval_batch_size, show_default=True,
              help="Parallel streams for validation and test perplexity.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with ptb.{train,valid,test}.txt (or a ptb/ folder). Default: "
                   "$MODRT_DATA, the user cache, ../shared/data/ptb in a checkout, else download.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory for ckpt.pt and metrics.jsonl.  [default: runs/ptb-<method>-M<M>K<K>]")
@_run_options
@click.pass_context
def ptb(ctx: click.Context, **opts) -> None:
    """Learn a modular recurrent language model on Penn Treebank.

    \b
    Model: embedding -> modular GRU layer (a controller picks K of M GRU cells
    per time step from [e_t; h_{t-1}]) -> linear head over 10,000 words.
    Training (--method em): generalised EM. The E-step scores the stored
    best selection a* of each window and S-1 draws from the controller by
    log p(y|x,a) + w log p(a|x) (w = --prior-weight; the paper's w=1 collapsed
    onto one module on PTB, so the default is 0) and keeps the best; the M-step
    trains the modules on a* and the controller towards a*.
    Baselines: reinforce (sampled selections; the controller by the score-function
    gradient, reward log p(y|x,a), moving-average baseline), noisy-topk (Shazeer
    et al. 2017 gating with importance and load losses; the paper used k=4) and
    dense (M = K, every module always used).

    \b
    The defaults (E=128, H=256, M=15, K=1, B=64, T=35, 10 epochs) take about
    3 hours on one core of a 2-core CPU (an EM step costs ~4.7 dense steps; the
    dense network's 10 epochs take ~20 min). Quick check:  modrt train ptb --steps 300
    """
    from modrt.data import ptb as ptb_data

    _train(ctx, opts, "ptb", _configs, lambda: ptb_data.load(opts["data"]))


# The image network's sizes (``--size``): the default wide one, the official demo's, and one
# between them.
SIZES = ("default", "demo", "mid")


@train.command("cifar10")
@click.option("--method", type=click.Choice([m for m in METHODS if m != "hash"]), default=_I.method,
              show_default=True,
              help="em: the paper's generalised EM (a* kept per training image). dense: every module used "
                   "(M = K). reinforce / noisy-topk: the paper's baselines.")
@click.option("--size", type=click.Choice(SIZES), default="default", show_default=True,
              help="default: 4 modular conv layers of M=8 modules of 64, 64, 128, 128 filters, K=1 (an image "
                   "pays for 1/8 of each layer). demo: the official demo's 4 layers x 5 modules of 8 filters. "
                   "mid: the default's M and K at 16, 16, 32, 32 filters.")
@click.option("--channels", type=str, default=None,
              help="Filters of each module per modular layer, comma-separated (e.g. 32,64,128): one layer "
                   "each, a 2x2 max pool after each.  [default: by --size]")
@click.option("--modules", "-M", type=click.IntRange(min=1), default=None,
              help="M, modules per modular layer.  [default: by --size; dense: K]")
@click.option("--k", "-K", type=click.IntRange(min=1), default=None,
              help="K, controller slots per layer: modules picked per image.  [default: 1; noisy-topk: 2 "
                   "(with k=1 its gate weight is always 1 and gets no gradient)]")
@click.option("--combine", type=click.Choice(["sum", "mean"]), default=_I.combine, show_default=True,
              help="How the distinct selected modules' feature maps combine (the official code sums). "
                   "noisy-topk always weights by its gates.")
@click.option("--controller-pool", type=click.IntRange(min=1), default=_I.controller_pool, show_default=True,
              help="Each controller reads its layer's input average-pooled to an N x N grid (C*N*N numbers): "
                   "1 is the global average pool (the official code; layer 0's controller then sees only the "
                   "mean colour); N must divide every layer's input side (1, 2 or 4 with 4 layers).")
@_method_options
@click.option("--a-star-init", type=click.Choice([i for i in A_STAR_INITS if i != "hash"]), default=_T.a_star_init,
              show_default=True,
              help="EM: how the a* memory starts. random: uniform draws (the paper). controller: at an image's "
                   "first E-step (after any --warm-start) its a* becomes the controller's own most probable "
                   "module per layer, within --capacity when set: a start the controller can represent by "
                   "construction.")
@click.option("--augment/--no-augment", default=_T.augment, show_default=True,
              help="Random crops (4-pixel padding) and horizontal flips of the training images. The E-step "
                   "scores the image the M-step trains on (augmented, when on).")
@click.option("--batch-size", type=click.IntRange(min=1), default=IMAGE_BATCH, show_default=True,
              help="B, images per step (the official demo's 128).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10: the official python batches (cifar-10-batches-py/ or cifar-10-python.tar.gz) or "
                   "JPEG class folders ({train,test}/<class>/*.jpg, a folder or a tarball). Default: $MODRT_DATA, "
                   "the user cache, ../shared/data/cifar10 in a checkout, else download.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory for ckpt.pt and metrics.jsonl.  [default: runs/cifar10-<method>-M<M>K<K>]")
@_run_options
@click.pass_context
def cifar10(ctx: click.Context, **opts) -> None:
    """Learn a modular convolutional network on CIFAR-10.

    \b
    Model: modular conv layers (each module a 3x3 conv -> batch norm -> ReLU; a
    controller per layer picks K of M modules per image from the layer's globally
    pooled input), a 2x2 max pool after each, a linear head over 10 classes.
    Training (--method em): the a* memory holds every training image's selection
    per layer; the E-step scores a* and S-1 controller draws by
    log p(y|x,a) + w log p(a|x) and keeps the best; the M-step trains the modules
    on a* and the controllers towards it. Evaluated by test accuracy after every
    epoch (and the train accuracy of a fixed 10,000-image subset).

    \b
    Quick check:  modrt train cifar10 --steps 200
    """
    from modrt.data import cifar10 as cifar_data

    _train(ctx, opts, "cifar10", _image_configs, lambda: cifar_data.load(opts["data"]))


def _train(ctx: click.Context, opts: dict, task: str, configs, load_data) -> None:
    """What every ``modrt train TASK`` does once its options are read: on one process, or
    on each of the processes torchrun started (``python -m modrt.train``; rank 0 speaks)."""
    _require_torch()
    if opts["threads"]:
        import torch

        torch.set_num_threads(opts["threads"])
    from modrt.train import distributed

    world, device = distributed.init(opts["device"])
    try:
        _run(ctx, opts, task, configs, load_data, world, device)
    except distributed.PeerStopped:
        raise  # every survivor says so
    except (ModrtError, click.ClickException) as exc:
        if world.main:
            raise
        # The same error on every process: rank 0's line is enough.
        ctx.exit(exc.exit_code if isinstance(exc, click.ClickException) else 1)
    finally:
        distributed.close(world)


def _check_world(task: str, tcfg: TrainConfig, world, dataset) -> None:
    """A world size that cannot split the batch is a usage error naming the sizes that can."""
    from modrt.train import distributed

    if world.size == 1:
        return
    B = tcfg.batch_size
    if task == "ptb" and B % world.size:
        *rest, last = distributed.allowed_sizes(B)
        sizes = ", ".join(map(str, rest)) + f" or {last}"
        raise click.UsageError(f"{world.size} processes cannot split --batch-size {B} streams evenly (each "
                               f"process owns whole streams): run {sizes} processes, or change --batch-size")
    if task == "cifar10":
        n = len(dataset.train_labels)
        smallest = min(B, n - (n - 1) // B * B)  # the epoch's last batch
        if smallest < world.size:
            raise click.UsageError(f"{world.size} processes: the smallest batch ({smallest} images) must give "
                                   f"each one image; run at most {smallest} processes, or change --batch-size")


def _run(ctx: click.Context, opts: dict, task: str, configs, load_data, world, device) -> None:
    from modrt.train import checkpoint
    from modrt.train.trainer import Trainer

    explicit = {name for name in opts
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    resume = None
    if opts["resume"] is not None:
        resume = checkpoint.load(opts["resume"])
        if checkpoint.task_of(resume) != task:
            raise CheckpointError(f"{opts['resume']}: a {checkpoint.task_of(resume)} checkpoint; continue it with "
                                  f"modrt train {checkpoint.task_of(resume)} --resume")
        mcfg, tcfg = _resumed_configs(resume, opts, explicit)
        out = opts["out"] or opts["resume"].parent
    else:
        mcfg, tcfg = configs(opts)
        out = opts["out"] or Path("runs") / f"{task}-{mcfg.method}-M{mcfg.modules}K{mcfg.k}"
        if (out / "ckpt.pt").exists() and not opts["force"]:
            raise ModrtError(f"{out} already holds a run: continue it with --resume {out / 'ckpt.pt'}, "
                             "or pass --force to overwrite, or --out elsewhere")
    if task == "ptb":
        _check_world(task, tcfg, world, None)
    _check_writable(out)
    dataset = load_data()
    if task != "ptb":
        _check_world(task, tcfg, world, dataset)
    if resume is None and world.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(mcfg, tcfg, dataset, out, resume=resume, progress=not opts["quiet"], world=world,
                      device=device)
    on = f"{trainer.device}" if world.size == 1 else f"{world.size} processes ({world.backend}, rank 0 on {device})"
    if world.main:
        click.echo(f"modrt: training {mcfg.method} M={mcfg.modules} K={mcfg.k} on {on} "
                   f"({trainer.windows} {trainer.task.unit}/epoch, {trainer.total_steps()} steps) -> {out}", err=True)
        if not opts["threads"] and trainer.device.type == "cpu" and world.size == 1:  # after every check
            _warn_if_busy()
    result = trainer.fit()
    if result.get("stopped"):
        if world.main:
            click.echo(f"modrt: stopped at step {result['step']}; checkpoint {result['checkpoint']} "
                       f"(continue with --resume {result['checkpoint']})", err=True)
        ctx.exit(130)
    if not world.main:
        return
    usage = (f", modules in use {result['modules_in_use']}/{mcfg.modules} "
             f"(exp usage entropy {result['usage_exp_entropy']})") if mcfg.routed else ""
    figures = (f"valid ppl {result['valid_ppl']}, test ppl {result['test_ppl']}" if task == "ptb" else
               f"train acc {result['train_acc']:.4f}, test acc {result['test_acc']:.4f}")
    click.echo(f"done: {result['step']} steps in {result['minutes']} min; {figures}{usage}; "
               f"checkpoint {out / 'ckpt.pt'}")


def _configs(opts: dict) -> tuple[ModelConfig, TrainConfig]:
    if opts["k"] is None:
        opts = {**opts, "k": 4 if opts["method"] == "noisy-topk" else _M.k}
    modules = opts["modules"]
    if modules is None:
        modules = opts["k"] if opts["method"] == "dense" else 15
    m = {f.name: opts[f.name] for f in fields(ModelConfig) if f.name in opts and f.name != "modules"}
    if opts["method"] == "noisy-topk":
        if opts["combine"] != _M.combine:
            raise click.UsageError("--combine does not apply to noisy-topk: its gates weight the modules")
        m["combine"] = "gate"
    t = _train_fields(opts)
    try:
        return ModelConfig(modules=modules, **m), TrainConfig(**t)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _train_fields(opts: dict) -> dict:
    """TrainConfig's fields from the options; EM's options refused for other methods."""
    t = {f.name: opts[f.name] for f in fields(TrainConfig) if f.name in opts}
    if opts["method"] != "em":
        for name, default in EM_ONLY.items():
            if t.get(name, default) != default:
                raise click.UsageError(f"--{name.replace('_', '-')} is an EM option; --method {opts['method']} "
                                       "does not use it")
    return t


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise click.UsageError(f"--channels {text!r}: comma-separated filter counts, e.g. 64,64,128,128") from None
    if not channels or min(channels) < 1:
        raise click.UsageError(f"--channels {text!r}: every filter count must be at least 1")
    return channels


def _image_configs(opts: dict) -> tuple[ImageModelConfig, TrainConfig]:
    size = {"demo": ImageModelConfig.demo, "mid": ImageModelConfig.mid}.get(opts["size"], ImageModelConfig)()
    k = opts["k"] or (2 if opts["method"] == "noisy-topk" else size.k)
    modules = opts["modules"] or (k if opts["method"] == "dense" else size.modules)
    channels = _channels(opts["channels"]) if opts["channels"] else size.channels
    combine = opts["combine"]
    if opts["method"] == "noisy-topk":
        if combine != _I.combine:
            raise click.UsageError("--combine does not apply to noisy-topk: its gates weight the modules")
        combine = "gate"
    t = _train_fields(opts)
    try:
        return (ImageModelConfig(channels=channels, modules=modules, k=k, combine=combine, method=opts["method"],
                                 controller_pool=opts["controller_pool"]),
                TrainConfig(**t))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _resumed_configs(ckpt: dict, opts: dict, explicit: set[str]) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs, with the few fields a resumed run may change."""
    from modrt.train import checkpoint

    try:
        mcfg = checkpoint.model_config(ckpt)
        tsaved = dict(ckpt["train_config"])
        tcfg_saved = TrainConfig(**tsaved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{opts['resume']}: its config is not valid for this modrt ({exc})") from exc
    saved = {**asdict(mcfg), **asdict(tcfg_saved)}
    if opts.get("channels"):  # given as text, saved as a tuple
        opts = {**opts, "channels": _channels(opts["channels"])}
    for name in sorted(explicit - {"resume", "out", "data", "force", "quiet", "threads", "size"}):
        if name in saved and opts[name] != saved[name] and name not in RESUMABLE_CHANGES:
            raise CheckpointError(
                f"cannot continue {opts['resume']} with --{name.replace('_', '-')} {opts[name]}: "
                f"it was trained with {saved[name]} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    for name in RESUMABLE_CHANGES & explicit:
        tsaved[name] = opts[name]
    return mcfg, TrainConfig(**tsaved)
