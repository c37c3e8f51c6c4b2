"""Masked training (``tedepr finetune``): pruned entries stay exactly zero, runs resume
exactly, and the same loop scales out under ``torchrun`` with DistributedDataParallel.

A run directory ``OUT/`` holds ``best/`` and ``last/`` (artifacts, each replaced
atomically), ``metrics.jsonl`` (one JSON line per epoch) and ``state.pt`` (the resumable
state: weights, optimizer, schedule, epoch, best score; plain tensors, loaded with
``weights_only=True``). Loading ``OUT`` as a model gives ``best/``.

Exactness: each epoch's shuffle comes from ``seed + epoch`` alone and state is saved at
epoch boundaries, so stopping after epoch k and resuming reproduces the uninterrupted run
bit for bit. Under DDP every rank draws the same permutation and takes a strided share of
each global batch (:func:`~tedepr_cli.datasets.epoch_batches`); the loss is scaled so the
all-reduced gradient equals the gradient of the mean loss over the global batch (same
result as one process, up to float summation order). The reported figures (training loss
and accuracy in ``metrics.jsonl``, the progress value) are sums over every rank's share,
so they too equal one process's.

Data comes through :class:`~tedepr_cli.datasets.Split` objects (``len``, ``labels``,
``batch(indices, epoch)``): small in-memory arrays are presented once, larger or
memory-mapped data and image files are read per batch (``--workers`` DataLoader
processes). Augmentation draws from ``seed + epoch + sample`` only, so it too resumes
exactly and is the same on any number of ranks or workers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifact import Artifact, save_artifact
from .data import stratified_split
from .datasets import (
    NORMALIZE_CHOICES,
    Dataset,
    Preprocess,
    Split,
    epoch_batches,
    iterate,
    make_split,
)
from .device import resolve as resolve_device
from .distill import DISTILL_LOSSES, distill_loss, feature_loss, load_teacher, resolve_distill_loss
from .errors import BadInput, OutputError, TrainingDiverged, UsageError, opt
from .evaluate import cosine_split, evaluate_split, output
from .fsutil import atomic_output, check_output
from .logs import log
from .masks import load_plain_state, plain_state_dict
from .model_data import open_for_model
from .safeload import load_torch
from .tensorized.train_path import PATHS as TRAIN_PATHS

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainOptions:
    """The training recipe; stored in the artifact's manifest."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float | None = None  # None: 1e-2 for tensorized models, 1e-3 for dense (see resolve_lr)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    early_stopping: int = 0  # patience in epochs; 0 = off
    limit_train: int = 0  # use only the first N (shuffled) training samples; 0 = all
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    augment: bool | None = None  # None: the data family's default (on for CIFAR / image folders)
    normalize: str = "auto"  # auto | standard | computed | none (see datasets.resolve_preprocess)
    workers: int = 0  # DataLoader worker processes reading batches; 0 = in this process
    strict_data: bool = False  # unreadable sample files are an error instead of skipped
    teacher: str | None = None  # distill from this model (see distill.py)
    distill_alpha: float = 0.5  # weight of the soft (teacher) term
    distill_temperature: float = 4.0
    train_path: str = "lighter"  # lighter | chain | dense | kernel | auto: how tensorized layers train
    distill_loss: str = "auto"  # kl (logits) | cosine | mse (outputs); auto: kl with labels, else cosine

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"{opt('epochs')} must be >= 1"),
            (self.batch_size >= 1, f"{opt('batch-size')} must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"{opt('optimizer')} must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"{opt('lr')} must be > 0"),
            (self.schedule in SCHEDULES, f"{opt('schedule')} must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_epochs >= 0, f"{opt('warmup-epochs')} must be >= 0"),
            (0 <= self.label_smoothing < 1, f"{opt('label-smoothing')} must be in [0, 1)"),
            (0 <= self.val_fraction < 1, f"{opt('val-fraction')} must be in [0, 1)"),
            (self.weight_decay >= 0, f"{opt('weight-decay')} must be >= 0"),
            (self.early_stopping >= 0, f"{opt('early-stopping')} must be >= 0"),
            (self.limit_train >= 0, f"{opt('limit-train')} must be >= 0"),
            (self.threads >= 1, f"{opt('threads')} must be >= 1"),
            (self.device in ("cpu", "cuda"), f"{opt('device')} must be cpu or cuda"),
            (self.step_epochs >= 1 and 0 < self.gamma <= 1, f"{opt('step-epochs')} >= 1 and 0 < "
                                                            f"{opt('gamma')} <= 1"),
            (0 <= self.distill_alpha <= 1, f"{opt('distill-alpha')} must be in [0, 1]"),
            (self.distill_temperature > 0 and math.isfinite(self.distill_temperature),
             f"{opt('distill-temperature')} must be > 0"),
            (self.workers >= 0, f"{opt('workers')} must be >= 0"),
            (self.train_path in TRAIN_PATHS, f"{opt('train-path')} must be one of {', '.join(TRAIN_PATHS)}"),
            (self.distill_loss in DISTILL_LOSSES,
             f"{opt('distill-loss')} must be one of {', '.join(DISTILL_LOSSES)}"),
            (self.normalize in NORMALIZE_CHOICES,
             f"{opt('normalize')} must be one of {', '.join(NORMALIZE_CHOICES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def _train_paths(model: nn.Module, art: Artifact, opts: TrainOptions, saved: dict[str, Any] | None,
                 dist: Any, device: torch.device) -> tuple[dict[str, str], dict[str, Any]]:
    """Set how each tensorized layer of the training copy ``model`` trains (chain or
    rebuilt dense weight, :mod:`tedepr_cli.tensorized.train_path`); returns the choice and,
    for ``auto``, its timings. A resumed run keeps the choice it started with; under DDP
    every rank computes the same ``lighter`` choice (sizes of a seeded batch), and for
    ``auto`` rank 0 measures and every rank takes its choice, so the replicas compute alike."""
    from .surgery import example_input
    from .tensorized.train_path import leaner, measure, rebuildable, set_train_paths, uniform

    timings: dict[str, Any] = {}
    per_rank = max(1, opts.batch_size // dist.world)
    if saved is not None and "train_paths" in saved:
        paths = dict(saved["train_paths"])
    elif opts.train_path == "lighter":  # sizes, not timings: every rank computes the same choice
        gen = torch.Generator().manual_seed(opts.seed)
        paths = leaner(model, example_input(model, art.input_shape, per_rank, "rand", gen).to(device))
    elif opts.train_path != "auto":
        paths = uniform(model, opts.train_path)
    else:
        if dist.main:
            gen = torch.Generator().manual_seed(opts.seed)
            x = example_input(model, art.input_shape, per_rank, "rand", gen)
            timings = measure(model, x.to(device))
        if dist.world > 1:
            import torch.distributed as tdist

            box = [timings]
            tdist.broadcast_object_list(box, src=0)
            timings = box[0]
        paths = {n: str(t["path"]) for n, t in timings.items()}

    set_train_paths(model, paths)
    # every rebuildable layer as it will train (a layer the choice did not reach keeps its
    # default, e.g. an LSTM's input projections: their rebuild), recorded for a resume
    paths = {n: m.train_path for n, m in rebuildable(model).items()}
    if dist.main and not paths and opts.train_path != "lighter" and saved is None:
        log.warning(f"{opt('train-path')} {opts.train_path}: the model has no tensorized layer to train "
                    "on a chain, kernel or rebuilt weight, so it changes nothing")
    if dist.main and paths:
        how = "kept from the run" if saved is not None and "train_paths" in saved else opts.train_path
        if how == "kernel" and not any(p == "kernel" for p in paths.values()):
            log.warning(f"{opt('train-path')} kernel: no layer can train on the compiled kernel here "
                        "(it takes TT/TR Linear layers, float32 on the CPU, with the library built: "
                        "`tedepr kernels`); every layer trains on its chain")
        where = {"kernel": "on the compiled kernel", "dense": "on their rebuilt dense weight",
                 "chain": "on their chain"}
        groups = [f"{len(ns)} {where[p]} ({', '.join(ns)})"
                  for p in where if (ns := [n for n, q in paths.items() if q == p])]
        log.info(f"{opt('train-path')} {how}: of {len(paths)} tensorized layers, {'; '.join(groups)}")
    return paths, timings


def resolve_lr(art: Artifact) -> float:
    """The default peak learning rate (AdamW/Adam; x10 for SGD is left to the user):
    1e-2 for a tensorized model, 1e-3 for a dense one. In benchmarks/pai_compare.py's
    sweep 1e-2 won the validation for every tensorized run (1e-3 underfits the cores in
    30 epochs by 3-8 points); dense models picked either."""
    lr = 1e-2 if art.meta.get("tensorization") else 1e-3
    log.info(f"learning rate {lr:g} ({'tensorized' if lr == 1e-2 else 'dense'} model; {opt('lr')} sets "
             "another)")
    return lr


# ---------------------------------------------------------------------------- data
@dataclass
class Splits:
    train: Split
    val: Split | None
    test: Split
    data: dict[str, Any]  # the manifest's ``data`` section: reader, classes, preprocessing
    labeled: bool = True  # False: token data without labels (distillation only)


def data_section(ds: Dataset, pre: Preprocess) -> dict[str, Any]:
    """What the manifest records about the data a model was trained on."""
    names = ds.class_names or ds.classes
    return {"reader": ds.reader, "path": ds.path, "family": ds.family, "classes": ds.num_classes,
            "class_names": names if names is not None and len(names) <= 1000 else None,
            "preprocess": pre.to_json()}


def load_splits(data: Path, art: Artifact, opts: TrainOptions) -> Splits:
    """Train (minus a stratified, seeded validation share), validation and test splits."""
    ds, pre = open_for_model(data, art, normalize=opts.normalize, augment=opts.augment, seed=opts.seed,
                             strict=opts.strict_data)
    shape, kind = art.input_shape, art.input_kind
    log.info(f"preprocessing: normalize {pre.normalize}"
             + (f" (mean {pre.mean}, std {pre.std})" if pre.mean else "")
             + f", augment {pre.augment or 'off'}")
    train = make_split(ds, "train", shape, kind, pre, train=True, strict=opts.strict_data)
    val = None
    if opts.val_fraction > 0:
        flags = stratified_split(train.labels_np, opts.val_fraction, seed=opts.seed).astype(bool)
        if flags.all() or not flags.any():
            raise BadInput(f"{data}: too few training samples for {opt('val-fraction')} {opts.val_fraction} "
                           f"({int(flags.sum())} of {len(flags)} held out, stratified per class); "
                           f"change it, or pass {opt('val-fraction')} 0 to pick the best epoch by training "
                           "loss")
        val = train.subset(np.flatnonzero(flags), train=False)
        train = train.subset(np.flatnonzero(~flags))
    if opts.limit_train:
        keep = np.random.default_rng(opts.seed).permutation(len(train))[: opts.limit_train]
        train = train.subset(np.sort(keep))
    test = make_split(ds, "test", shape, kind, pre, train=False, strict=opts.strict_data)
    return Splits(train, val, test, data_section(ds, pre), ds.labeled)


# ---------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """The torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK), or a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def _global_sums(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """The sums over every rank of this rank's partial sums (one ``all_reduce``, float64);
    ``values`` themselves in a single process. Every rank must call it at the same step."""
    if d.world <= 1:
        return [float(v) for v in values]
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def _init_dist(d: Dist, device: str) -> None:
    import torch.distributed as tdist

    if d.world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device == "cuda" else "gloo")


# ---------------------------------------------------------------------------- schedule
def lr_factor(step: int, steps_per_epoch: int, opts: TrainOptions) -> float:
    """Linear warm-up, then cosine / step / constant decay, as a factor of ``opts.lr``."""
    warm = opts.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    total = opts.epochs * steps_per_epoch
    if opts.schedule == "cosine":
        t = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if opts.schedule == "step":
        return opts.gamma ** ((step // steps_per_epoch) // opts.step_epochs)
    return 1.0


def _optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


# ---------------------------------------------------------------------------- loop
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
# per-epoch durations: shown on stderr and in --json, never written to a file (the same
# inputs and seed must give the same bytes)
TIMING = ("seconds", "examples_per_s")


def _stored(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    with atomic_output(out / STATE_FILE, overwrite=True) as tmp:
        torch.save(state, tmp)


def saved_recipe(out: Path) -> dict[str, Any] | None:
    """The training options a resumable run in ``out`` was started with (what ``--resume``
    trains with), or None when ``out`` holds no readable state."""
    try:
        return dict(_load_state(out)["options"])
    except (BadInput, KeyError, TypeError):
        return None


# what a resumed run may change: how long it runs and where/how it executes, never what
# each of its steps computes (the recipe that shaped its optimizer state and data)
RESUME_MAY_CHANGE = ("epochs", "early_stopping", "threads", "workers", "device", "strict_data")


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "default" if name == "teacher" else "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(name: str, recorded: Any, given: Any) -> bool:
    if name == "teacher" and recorded is not None and given is not None:
        return str(recorded) == str(given) or Path(recorded).resolve() == Path(given).resolve()
    return recorded == given


def data_identity(data: str | Path | Dataset) -> str:
    """The data a run trains on, as recorded for ``--resume``: the resolved path of
    ``[reader:]PATH`` (the same file named relatively or absolutely is the same data), or
    of a dataset the caller opened (:func:`~tedepr_cli.datasets.open_dataset`)."""
    from .datasets import parse_spec

    if isinstance(data, Dataset):
        return str(Path(data.path).resolve())
    return str(parse_spec(data)[1].resolve())


def resumed_options(saved: dict[str, Any], opts: TrainOptions, given: Iterable[str] | None,
                    data: str | Path | Dataset | None = None, where: Path | str = "the run") -> TrainOptions:
    """The options a resumed run trains with: its recorded recipe, with the options of
    :data:`RESUME_MAY_CHANGE` taken from ``opts`` where the caller set them.

    ``saved``: the run's state (``state.pt``: ``options``, ``epoch`` completed, ``data``).
    ``given``: the names of the :class:`TrainOptions` fields the caller set on purpose
    (the CLI: the options on the command line); None: every field of ``opts`` that
    differs from the :class:`TrainOptions` default. ``data``: the data now given, checked
    against the recorded one. Any other given option that differs from the recording, a
    different ``data``, or ``epochs`` below the epochs already completed raises
    :class:`UsageError` naming each option with its recorded and given value (exit 2):
    they would silently change what the remaining epochs compute.
    """
    recorded = TrainOptions(**{f.name: saved["options"][f.name] for f in fields(TrainOptions)
                               if f.name in saved["options"]})
    defaults = TrainOptions()
    names = ([f.name for f in fields(TrainOptions) if getattr(opts, f.name) != getattr(defaults, f.name)]
             if given is None else [n for n in given if n in {f.name for f in fields(TrainOptions)}])
    conflicts, changes = [], {}
    for n in names:
        was, now = getattr(recorded, n), getattr(opts, n)
        if _same(n, was, now):
            continue
        if n in RESUME_MAY_CHANGE:
            changes[n] = now
        else:
            conflicts.append(f"{opt(n.replace('_', '-'))} recorded {_shown(n, was)}, given {_shown(n, now)}")
    if data is not None and saved.get("data") is not None and data_identity(data) != saved["data"]:
        conflicts.append(f"{opt('data')} recorded {saved['data']}, given {data_identity(data)}")
    if conflicts:
        raise UsageError(f"resuming {where}: these options differ from the run's recorded recipe and would "
                         f"change what its remaining epochs compute: {'; '.join(conflicts)}. Drop them to "
                         f"resume, or start a new run with another {opt('output')}")
    done = int(saved.get("epoch", 0))
    if changes.get("epochs", recorded.epochs) < done:
        raise UsageError(f"resuming {where}: {opt('epochs')} {changes['epochs']} is fewer than the "
                         f"{done} epochs the run already completed")
    if changes:
        log.info(f"resuming {where}: " + ", ".join(
            f"{opt(n.replace('_', '-'))} {_shown(n, getattr(recorded, n))} -> {_shown(n, v)}"
            for n, v in changes.items())
            + (f" (the cosine schedule now spans {changes['epochs']} epochs)"
               if "epochs" in changes and recorded.schedule == "cosine" else ""))
    return replace(recorded, **changes)


def _load_state(out: Path) -> dict[str, Any]:
    p = out / STATE_FILE
    if not p.is_file():
        raise BadInput(f"{out} has no {STATE_FILE} to resume from")
    return load_torch(p, "resume state")


def finetune(art: Artifact, data: Path, out: Path, opts: TrainOptions, resume: bool = False,
             overwrite: bool = False, on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
             on_batch: Callable[[int, int, int, float], None] | None = None,
             given: Iterable[str] | None = None) -> tuple[Artifact, dict[str, Any]]:
    """Train ``art``'s model with its masks fixed; returns the best artifact and a summary.

    ``on_epoch(epoch, metrics)`` runs after every epoch and ``on_batch(epoch, batch, steps,
    loss)`` after every step, on the main process (progress UI; tests use them to
    interrupt a run). With ``resume`` the run in ``out`` continues with its recorded
    recipe; ``given`` names the options of ``opts`` the caller set on purpose, which must
    agree with it except those a resumed run may change (:func:`resumed_options`).
    PyTorch's thread count is ``opts.threads`` while it trains and restored after.
    """
    prev_threads = torch.get_num_threads()
    try:
        return _finetune(art, data, out, opts, resume, overwrite, on_epoch, on_batch, given)
    finally:
        torch.set_num_threads(prev_threads)


def _finetune(art: Artifact, data: Path, out: Path, opts: TrainOptions, resume: bool, overwrite: bool,
              on_epoch: Callable[[int, dict[str, Any]], None] | None,
              on_batch: Callable[[int, int, int, float], None] | None,
              given: Iterable[str] | None) -> tuple[Artifact, dict[str, Any]]:
    dist = dist_from_env()
    if resume and not (out / STATE_FILE).exists():
        ours = {"best", "last", METRICS_FILE}
        if out.exists() and not all(c.name in ours or c.name.startswith(".") for c in out.iterdir()):
            raise BadInput(f"{out} is not a tedepr finetune run (no {STATE_FILE}); nothing to resume")
        if out.exists():
            log.info(f"{out} holds no completed epoch: starting from the beginning")
        else:  # a typo in the run's path would otherwise train from scratch unnoticed
            log.warning(f"{out} does not exist: there is no run to resume; starting a new one there")
        resume, overwrite = False, True
    saved = _load_state(out) if resume else None
    if saved is not None:
        opts = resumed_options(saved, opts, given, data, out)
        log.info(f"resuming {out} after epoch {saved['epoch']} of {opts.epochs} with its saved recipe")
    opts.validate()
    resolve_device(opts.device)  # --device cuda without a GPU: EngineUnavailable, before any output
    if opts.lr is None:
        opts = replace(opts, lr=resolve_lr(art))
    if not resume and dist.main:
        check_output(out, overwrite, directory=True)
    torch.set_num_threads(opts.threads)
    device = torch.device(f"cuda:{dist.local_rank}" if opts.device == "cuda" else "cpu")
    _init_dist(dist, opts.device)
    splits = load_splits(data, art, opts)
    labeled = splits.labeled  # False: token data without labels, the teacher's outputs are the targets
    kind = resolve_distill_loss(opts.distill_loss, labeled)
    if not labeled and not opts.teacher:
        raise BadInput(f"{data} has no labels: pass {opt('teacher')} (e.g. the dense original) to train the "
                       "model to match its outputs")
    if kind == "kl" and not labeled:
        raise UsageError(f"{opt('distill-loss')} kl matches class probabilities next to labels; {data} has "
                         "none: use cosine or mse")
    # the masks ride on the model (tedepr_cli.masks): pruned entries stay exactly zero
    # through any optimizer step, with no bookkeeping here
    model = copy.deepcopy(art.model).to(device)
    teacher = load_teacher(opts.teacher, art, classes=kind == "kl").to(device) if opts.teacher else None
    optimizer = _optimizer(model, opts)
    n_train = len(splits.train)
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    # best: the val accuracy, or minus the training loss without --val-fraction
    start_epoch, best, stale, history = 0, -math.inf, 0, []
    if saved is not None:
        load_plain_state(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch, best, stale = saved["epoch"], saved["best"], saved["stale"]
        history = [json.loads(x) for x in saved["history"]]
        last_good: dict[str, Any] | None = saved
    elif dist.main:
        if out.exists() and overwrite:
            import shutil

            shutil.rmtree(out) if out.is_dir() else out.unlink()
        try:
            out.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise OutputError(f"cannot create {out}: {e.strerror}") from None
    paths, path_times = _train_paths(model, art, opts, saved, dist, device)
    train_model: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if opts.device == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        # cores with a size-1 rank get grads whose (irrelevant) stride differs from DDP's
        # bucket view: harmless, and not the user's concern
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    recipe = asdict(opts)
    if saved is None:
        last_good = None
    for epoch in range(start_epoch, opts.epochs):
        t0 = time.perf_counter()
        batches = epoch_batches(n_train, opts.batch_size, opts.seed, epoch, dist.rank, dist.world)
        model.train()
        loss_sum, correct, seen, skipped, skip_note = 0.0, 0, 0, 0, None
        loaded = iterate(splits.train, [mine for mine, _ in batches], epoch, opts.workers)
        for b, ((_, global_len), batch) in enumerate(zip(batches, loaded, strict=True)):
            x, y = batch.x.to(device), batch.y.to(device)
            if batch.skipped:
                skipped += batch.skipped
                skip_note = skip_note or batch.error
            for g in optimizer.param_groups:
                g["lr"] = opts.lr * lr_factor(epoch * steps_per_epoch + b, steps_per_epoch, opts)
            optimizer.zero_grad(set_to_none=True)
            out_ = output(train_model, x)
            # sum over my share / global batch, times world: DDP's average is the global mean
            total = (F.cross_entropy(out_, y, reduction="sum", label_smoothing=opts.label_smoothing)
                     if labeled else out_.new_zeros(()))
            if teacher is not None:
                with torch.no_grad():
                    soft = output(teacher, x)
                if kind == "kl":
                    soft_sum = distill_loss(out_, soft, opts.distill_temperature).sum()
                else:
                    soft_sum = feature_loss(out_, soft, kind).sum()
                a = opts.distill_alpha if labeled else 1.0
                total = (1 - a) * total + a * soft_sum
            loss = total * dist.world / global_len
            # this global batch's loss sum, correct predictions and samples over every rank: the
            # metrics are the global batch's, and a NaN on any rank stops every rank at once
            hits = int((out_.argmax(1) == y).sum()) if labeled else 0
            step_loss, step_correct, step_seen = _global_sums([total.item(), hits, len(y)], dist, device)
            if not math.isfinite(step_loss):
                _diverged(out, last_good, epoch, b, dist)
            loss.backward()
            optimizer.step()
            loss_sum += step_loss
            correct += int(step_correct)
            seen += int(step_seen)
            if on_batch and dist.main:
                on_batch(epoch + 1, b + 1, steps_per_epoch, step_loss / max(step_seen, 1))
        if skipped:
            log.warning(f"epoch {epoch + 1}: skipped {skipped} unreadable sample(s), e.g. {skip_note} "
                        f"({opt('strict-data')} makes this an error)")
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                   **({"train_accuracy": correct / max(seen, 1)} if labeled else {}),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3),
                   "examples_per_s": round(n_train / max(time.perf_counter() - t0, 1e-9), 1)}
        if not math.isfinite(metrics["train_loss"]):
            _diverged(out, last_good, epoch, steps_per_epoch, dist)
        model.eval()
        if splits.val is not None and labeled:
            v = evaluate_split(model, splits.val, device=device, workers=opts.workers)
            metrics.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        elif splits.val is not None and teacher is not None:
            v = cosine_split(model, teacher, splits.val, device=device, workers=opts.workers)
            metrics.update(val_cosine=v["cosine_mean"])
        score = metrics.get("val_accuracy", metrics.get("val_cosine", -metrics["train_loss"]))
        improved = score > best
        if improved:
            best, stale = score, 0
        else:
            stale += 1
        history.append(metrics)
        if dist.main:
            snapshot = _artifact(art, model, recipe, history, "last", splits.data)
            save_artifact(snapshot, out / "last", overwrite=True)
            if improved:
                best_snapshot = _artifact(art, model, recipe, history, "best", splits.data)
                save_artifact(best_snapshot, out / "best", overwrite=True)
            _write_metrics(out, history)
            state = {"model": {k: v.detach().cpu() for k, v in plain_state_dict(model).items()},
                     "optimizer": _cpu(optimizer.state_dict()), "epoch": epoch + 1, "best": best,
                     "stale": stale, "train_paths": paths,
                     "history": [json.dumps(_stored(h)) for h in history], "options": recipe,
                     "data": data_identity(data)}
            _save_state(out, state)
            last_good = state
            if on_epoch:
                on_epoch(epoch + 1, metrics)
        if opts.early_stopping and stale >= opts.early_stopping:
            log.info(f"early stopping after epoch {epoch + 1}: no improvement for {stale} epochs")
            break
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    best_art = _final(out, art) if dist.main else art
    # one shape whatever --train-path: {layer: {"path", and for auto its "chain_ms"/"dense_ms"}}
    summary = {"epochs_run": len(history), "best_score": best, "history": history,
               "train_paths": {n: {**path_times.get(n, {}), "path": p} for n, p in paths.items()}}
    if dist.main:
        best_model = best_art.model.to(device)
        if labeled:
            t = evaluate_split(best_model, splits.test, device=device, workers=opts.workers)
            summary["test_accuracy"] = t["accuracy"]
            summary["test_loss"] = t["loss"]
            found = {"test_accuracy": t["accuracy"], "test_loss": t["loss"],
                     "best_val_accuracy": best if splits.val is not None else None}
        else:  # the teacher is the reference: how close the student came on held-out inputs
            assert teacher is not None
            t = cosine_split(best_model, teacher, splits.test, device=device, workers=opts.workers)
            summary["test_cosine"] = t["cosine_mean"]
            found = {"test_cosine": t["cosine_mean"], "test_cosine_min": t["cosine_min"],
                     "best_val_cosine": best if splits.val is not None else None, "distill_loss": kind}
        best_model.cpu()
        best_art.meta.setdefault("metrics", {})["finetune"] = {**found, "epochs_run": len(history),
                                                               "data": str(data)}
        save_artifact(best_art, out / "best", overwrite=True)
    return best_art, summary


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _artifact(src: Artifact, model: nn.Module, recipe: dict[str, Any],
              history: list[dict[str, Any]], which: str, data: dict[str, Any]) -> Artifact:
    cpu_model = copy.deepcopy(model).cpu().eval()
    a = Artifact(model=cpu_model, arch=src.arch, meta=copy.deepcopy(src.meta), source="")
    a.meta["training"] = {"recipe": recipe, "checkpoint": which, "epoch": history[-1]["epoch"],
                          "last_metrics": _stored(history[-1])}
    a.meta["data"] = data
    a.record("finetune", recipe, seed=recipe["seed"])
    return a


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    with atomic_output(out / METRICS_FILE, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(_stored(h)) + "\n" for h in history))


def _final(out: Path, src: Artifact) -> Artifact:
    from .artifact import load_artifact

    allow = src.arch.name if src.arch and src.arch.is_import else None
    return load_artifact(out / "best", allow_import=allow)


def _diverged(out: Path, last_good: dict[str, Any] | None, epoch: int, batch: int, dist: Dist) -> None:
    where = f"epoch {epoch + 1}, batch {batch + 1}"
    kept = f"the last good checkpoint is {out / 'last'}" if last_good else "no checkpoint was completed"
    raise TrainingDiverged(f"loss became NaN/Inf at {where}; {kept}. Lower {opt('lr')} or add "
                           f"{opt('warmup-epochs')}")


def epoch_line(epoch: int, total: int, m: dict[str, Any]) -> str:
    val = f" val_acc {100 * m['val_accuracy']:.2f} %" if "val_accuracy" in m else ""
    if "val_cosine" in m:
        val = f" val_cosine {m['val_cosine']:.4f}"
    acc = f" train_acc {100 * m['train_accuracy']:.2f} %" if "train_accuracy" in m else ""
    return (f"epoch {epoch}/{total}: loss {m['train_loss']:.4f}{acc}{val} lr {m['lr']:.2e} "
            f"({m['seconds']:.1f} s)")
