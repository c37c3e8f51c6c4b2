"""`tedepr finetune` and `tedepr eval`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import print_json, stdout, table
from .common import (
    Arch,
    ArchKwargs,
    InputShape,
    JsonOut,
    ModelPath,
    NonStrict,
    Overwrite,
    Quiet,
    Seed,
    Threads,
    TrustPickle,
    Verbose,
    _load,
    command,
    given_options,
    torch_seed,
    use_threads,
)


@command
def finetune(
    ctx: typer.Context,
    path: ModelPath,
    data: Annotated[Path, typer.Option("--data", help="Data, [reader:]PATH: .npz, CIFAR, MNIST IDX, image "
                                       "folders, sequence clips, token ids (README 'Datasets'). The train "
                                       "split trains, a seeded --val-fraction of it validates, the test "
                                       "split reports. Token data without labels needs --teacher.",
                                       show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: best/ and last/ "
                                         "artifacts, metrics.jsonl, state.pt.", show_default=False)],
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 128,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (momentum), adamw or adam.")] = "adamw",
    lr: Annotated[float | None, typer.Option(
        "--lr", help="Peak learning rate (default: 1e-2 for a tensorized model, 1e-3 for a dense one).",
        show_default=False)] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", help="L2 penalty (decoupled for adamw); pruned entries stay zero.")] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length.")] = 0.0,
    step_epochs: Annotated[int, typer.Option("--step-epochs", help="step schedule: epochs per decay.")] = 30,
    gamma: Annotated[float, typer.Option("--gamma", help="step schedule: decay factor.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option(
        "--label-smoothing", help="Share of each label's probability spread over all classes, in "
        "[0, 1).")] = 0.0,
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", help="Share of the train split held out (stratified, seeded) to pick the "
        "best checkpoint and for early stopping; 0 picks by training loss.")] = 0.1,
    early_stopping: Annotated[int, typer.Option(
        "--early-stopping", help="Stop after N epochs without validation improvement (0: off).")] = 0,
    limit_train: Annotated[int, typer.Option(
        "--limit-train", help="Train on only N (seeded) samples: smoke tests.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", help="CPU threads per process.")] = 1,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="Standard training augmentation of the data family (CIFAR: "
        "random crop + flip; image folders: random-resized-crop + flip), seeded by --seed, epoch and "
        "sample. Default: on for CIFAR and image folders, off otherwise.", show_default=False)] = None,
    normalize: Annotated[str, typer.Option(
        "--normalize", help="auto (the statistics recorded in the model's manifest, else the data "
        "family's: CIFAR/ImageNet constants, none for others), standard, computed (on the train "
        "split) or none.")] = "auto",
    workers: Annotated[int, typer.Option(
        "--workers", help="DataLoader worker processes reading and decoding batches (0: in the "
        "training process). Results do not depend on it.")] = 0,
    strict_data: Annotated[bool, typer.Option(
        "--strict-data", help="Fail on an unreadable (corrupt) sample file instead of skipping it "
        "with a count.")] = False,
    teacher: Annotated[Path | None, typer.Option(
        "--teacher", help="Distil from this model while training: usually the dense original "
        "(a state_dict is read into the student's architecture; an artifact or .pt2 may be any "
        "network with the same inputs and classes).", show_default=False)] = None,
    distill_alpha: Annotated[float, typer.Option(
        "--distill-alpha", help="With --teacher: weight of the teacher's soft targets (the labels "
        "get 1 - alpha).")] = 0.5,
    distill_temperature: Annotated[float, typer.Option(
        "--distill-temperature", help="With --teacher: softmax temperature of the soft targets.")] = 4.0,
    train_path: Annotated[str, typer.Option(
        "--train-path", help="How tensorized layers train: lighter (each TT/TR Linear on the "
        "compiled kernel where it runs, else on whichever of chain and dense keeps fewer bytes "
        "for its backward; convolutions on their chain; deterministic), chain (their cores' "
        "contractions), dense (the dense weight rebuilt from the cores each step, only the block "
        "the masks keep, one GEMM/conv; same function, gradients reach the cores), kernel (each "
        "TT/TR Linear forward and backward in one compiled C call over its kept entries, float32 "
        "CPU; elsewhere, and for convolutions, the chain), or auto (per layer the fastest, "
        "measured on the batch shape at the start: timing-dependent, so runs may differ in float "
        "rounding).")] = "lighter",
    distill_loss: Annotated[str, typer.Option(
        "--distill-loss", help="With --teacher: kl (soft class probabilities), cosine or mse (match the "
        "outputs: embeddings, features); auto: kl with labels, cosine without.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output exactly "
                                         "where it stopped (after its last completed epoch).")] = False,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Train a (pruned, tensorized or dense) model with its masks fixed: pruned entries stay
    exactly zero. Runs under torchrun for DistributedDataParallel (only rank 0 writes)."""
    from ..console import log
    from ..errors import UsageError
    from ..train import TrainOptions, dist_from_env, epoch_line, saved_recipe
    from ..train import finetune as run_finetune

    opts = TrainOptions(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                        momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                        warmup_epochs=warmup_epochs, step_epochs=step_epochs, gamma=gamma,
                        label_smoothing=label_smoothing, val_fraction=val_fraction,
                        early_stopping=early_stopping, limit_train=limit_train, seed=seed,
                        device=device, threads=threads, augment=augment, normalize=normalize,
                        workers=workers, strict_data=strict_data,
                        teacher=str(teacher) if teacher is not None else None,
                        distill_alpha=distill_alpha, distill_temperature=distill_temperature,
                        train_path=train_path, distill_loss=distill_loss)
    opts.validate()
    if resume and overwrite:
        raise UsageError("--resume continues a run; --overwrite would discard it: choose one")
    torch_seed(seed)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
    main_rank = dist_from_env().main
    given = given_options(ctx)
    if resume and "epochs" not in given:  # the run goes on with its recorded epochs: the total shown
        epochs = int((saved_recipe(output) or {}).get("epochs", epochs))
    progress = _progress(epochs) if (main_rank and not quiet and not json_out) else None

    def on_epoch(epoch: int, m: dict[str, Any]) -> None:
        if progress is None:
            log.info(epoch_line(epoch, epochs, m))
        else:
            progress.console.print(epoch_line(epoch, epochs, m))

    def on_batch(epoch: int, b: int, steps: int, loss: float) -> None:
        if progress is not None:
            progress.update(progress.task_ids[0], completed=(epoch - 1) * steps + b, total=epochs * steps,
                            description=f"epoch {epoch}/{epochs} loss {loss:.4f}")

    try:
        if progress is not None:
            progress.start()
        best, summary = run_finetune(art, data, output, opts, resume=resume, overwrite=overwrite,
                                     on_epoch=on_epoch, on_batch=on_batch, given=given)
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        print(f"tedepr: interrupted; {output} keeps the last completed epoch: continue with "
              f"--resume", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        if progress is not None:
            progress.stop()
    if not main_rank:
        return
    out = {"output": str(output), "best": str(output / "best"), **{k: v for k, v in summary.items()
                                                                     if k != "history"},
           "epochs": summary["history"]}
    if json_out:
        print_json(out)
        return
    cosine = "test_cosine" in summary  # unlabeled data: agreement with the teacher
    if opts.val_fraction <= 0:
        picked = f"training loss {-summary['best_score']:.4f}"
    else:
        picked = (f"val cosine {summary['best_score']:.4f}" if cosine
                  else f"val accuracy {100 * summary['best_score']:.2f} %")
    result = (f"test cosine to the teacher {summary['test_cosine']:.4f}" if cosine
              else f"test accuracy {100 * summary['test_accuracy']:.2f} %")
    n = summary["epochs_run"]
    stdout.print(f"{output}: {n} epoch{'' if n == 1 else 's'}; best checkpoint {output / 'best'} "
                 f"({picked}), {result}")


def _progress(epochs: int):
    """A rich progress bar on a TTY, else None (plain per-epoch lines on stderr)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..console import is_tty
    from ..console import stderr as err_console

    if not is_tty():
        return None
    p = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                 console=err_console, transient=True)
    p.add_task(f"epoch 1/{epochs}", total=None)
    return p


@command
def eval_(
    path: ModelPath,
    data: Annotated[Path, typer.Option("--data", help="Labelled data, [reader:]PATH (README "
                                       "'Datasets'); token data without labels needs --reference.",
                                       show_default=False)],
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Report the mean cosine of the model's outputs to this model's (usually "
        "the dense original: an artifact, .pt2, or a state_dict read into the model's architecture) "
        "instead of accuracy: for encoders and other models that are not classifiers.",
        show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="test, train or all.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per evaluation batch.")] = 256,
    threads: Threads = 1,
    normalize: Annotated[str, typer.Option(
        "--normalize", help="auto (the statistics recorded in the model's manifest, else the data "
        "family's), standard, computed or none.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes reading "
                                         "batches (0: this process).")] = 0,
    strict_data: Annotated[bool, typer.Option(
        "--strict-data", help="Fail on an unreadable sample file instead of skipping it.")] = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Loss, top-1 and per-class accuracy and throughput of a model on labelled data."""

    from ..data import SPLITS
    from ..datasets import make_split
    from ..errors import UsageError
    from ..evaluate import evaluate_split, num_outputs
    from ..model_data import open_for_model

    if batch_size < 1 or threads < 1 or workers < 0:
        raise UsageError("--batch-size and --threads must be >= 1, --workers >= 0")
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    use_threads(threads)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
    ds, pre = open_for_model(data, art, normalize=normalize, strict=strict_data)
    s = make_split(ds, split, art.input_shape, art.input_kind, pre, strict=strict_data)
    if reference is not None or not ds.labeled:
        from ..distill import load_teacher
        from ..evaluate import cosine_split

        if reference is None:
            raise UsageError(f"{data} has no labels: pass --reference (e.g. the dense original) to "
                             "report the cosine of the outputs to it")
        ref = load_teacher(reference, art, classes=False, option="reference")
        m = cosine_split(art.model, ref, s, batch_size=batch_size, workers=workers)
        m.update(path=str(path), data=str(data), split=split, reference=str(reference), reader=ds.reader)
        if json_out:
            print_json(m)
            return
        stdout.print(f"{path} on {data} ({split}, {m['samples']:,} samples): mean cosine to {reference} "
                     f"{m['cosine_mean']:.4f} (min {m['cosine_min']:.4f}), {m['examples_per_s']:,.0f} "
                     f"examples/s of both models ({threads} thread{'s' if threads > 1 else ''})")
        return
    classes = num_outputs(art.model, art.input_shape)
    m = evaluate_split(art.model, s, batch_size=batch_size, num_classes=classes, workers=workers)
    m.update(path=str(path), data=str(data), split=split, reader=ds.reader, normalize=pre.normalize)
    if json_out:
        print_json(m)
        return
    stdout.print(f"{path} on {data} ({split}, {m['samples']:,} samples): accuracy "
                 f"{100 * m['accuracy']:.2f} % ({m['correct']:,} correct), loss {m['loss']:.4f}, "
                 f"{m['examples_per_s']:,.0f} examples/s ({threads} thread{'s' if threads > 1 else ''})")
    names = ds.class_names or ds.classes
    # percent, as the overall accuracy above (--json keeps fractions in [0, 1] for both)
    stdout.print(table("per-class accuracy", ["class", "accuracy"],
                       [[f"{c} ({names[c]})" if names and c < len(names) and names[c] != str(c) else c,
                         f"{100 * a:.2f} %"] for c, a in m["per_class_accuracy"].items()]))
