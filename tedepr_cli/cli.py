"""The ``tedepr`` command line: thin Typer commands over the library.

Each command parses options, calls one library function and renders its result (a rich
table on stdout, or ``--json``). Errors become one line on stderr and the exit code of
:mod:`tedepr_cli.errors`; ``-v`` adds the traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .console import print_json, setup_logging, stderr, stdout, table
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TedeprError

HELP = """\
tedepr - dual-grained model compression (TEDEPR, IEEE TPAMI 2024).

Pipeline: decompose (weights -> low-rank tensor-train/ring cores, coarse grain) ->
prune (score every core entry at initialization, keep the most trainable, fine grain) ->
finetune (masked training) -> export (compact safetensors, ONNX) -> bench (latency and
size against the dense original). Every stage reads and writes a self-describing
artifact directory; `tedepr prune model.pt --arch lenet300 --sparsity 0.995` runs the
one-shot path.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)

F = TypeVar("F", bound=Callable[..., Any])

# ---------------------------------------------------------------------------- options
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                      help="More detail on stderr; tracebacks on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Arch = Annotated[str | None, typer.Option(
    "--arch", help="Architecture of a state_dict: a zoo name (see `tedepr zoo`) or "
    "pkg.module:callable (imported: only name modules you trust).")]
ArchKwargs = Annotated[str | None, typer.Option(
    "--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")]
InputShape = Annotated[str | None, typer.Option(
    "--input-shape", help="Per-sample input shape for an --arch import path, e.g. 3,32,32.")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading pickled modules/objects. Unpickling runs code "
    "from the file: only for files you made or trust.")]
ModelPath = Annotated[Path, typer.Argument(
    help="Checkpoint (.pt/.pth/.safetensors state_dict, .pt2 program) or tedepr artifact.",
    show_default=False)]


def _version_cb(value: bool) -> None:
    if value:
        print(f"tedepr {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version_cb, is_eager=True, help="Show the version and exit.")]
        = False) -> None:
    """tedepr - dual-grained model compression."""


def command(fn: F) -> F:
    """Register ``fn`` as a command with tedepr's logging and error conventions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", 0) or 0
        setup_logging(verbose, kwargs.get("quiet", False))
        try:
            return fn(*args, **kwargs)
        except TedeprError as e:
            if verbose:
                traceback.print_exc(file=sys.stderr)
            print(f"tedepr: {e.label}: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("tedepr: interrupted; nothing partial was written", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as e:  # a bug: say so, show the traceback with -v
            if verbose:
                traceback.print_exc(file=sys.stderr)
            print(f"tedepr: internal error: {type(e).__name__}: {e} "
                  "(run with -v for the traceback and report it)", file=sys.stderr)
            raise typer.Exit(EXIT_INTERNAL) from None

    return app.command(name=fn.__name__.rstrip("_").replace("_", "-"))(wrapper)  # type: ignore[return-value]


def _arch(arch: str | None, arch_kwargs: str | None, input_shape: str | None):
    from .arch import parse_arch

    if arch is None:
        if arch_kwargs or input_shape:
            from .errors import UsageError

            raise UsageError("--arch-kwargs/--input-shape need --arch")
        return None
    return parse_arch(arch, arch_kwargs, input_shape)


def _load(path: Path, arch: str | None, arch_kwargs: str | None, input_shape: str | None,
          trust_pickle: bool):
    from .loading import load_model

    return load_model(path, _arch(arch, arch_kwargs, input_shape), trust_pickle=trust_pickle)


# ---------------------------------------------------------------------------- commands
@command
def info(path: Annotated[Path | None, typer.Argument(
            help="Checkpoint (.pt/.pth/.safetensors state_dict, .pt2 program) or tedepr artifact "
            "(optional with --data).", show_default=False)] = None,
         data: Annotated[str | None, typer.Option(
             "--data", help="Describe a data set instead (or as well): [reader:]PATH, see README "
             "'Datasets'. With a model, also checks that the data fits it.")] = None,
         arch: Arch = None, arch_kwargs: ArchKwargs = None,
         input_shape: InputShape = None, trust_pickle: TrustPickle = False,
         json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Describe a checkpoint or artifact (architecture, layers, parameters, size, history)
    and/or a data set (--data: reader, splits, classes, counts, sample shape)."""
    from .console import human_bytes
    from .errors import UsageError
    from .info import describe

    if path is None and data is None:
        raise UsageError("give a model PATH, --data DATA, or both")
    dd = _describe_data(data) if data is not None else None
    if path is None:
        if arch or arch_kwargs or input_shape:
            raise UsageError("--arch/--arch-kwargs/--input-shape describe a model PATH; none was given")
        if json_out:
            print_json(dd[0])
        else:
            _print_data(dd[0])
        return
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    d = describe(art)
    if dd is not None:
        d["data"] = {**dd[0], "fits_model": _fits(dd[1], art)}
    if json_out:
        print_json(d)
        return
    name = d["arch"]["name"] if d["arch"] else d["model_class"]
    stdout.print(f"[bold]{path}[/bold]: {name}  input {tuple(d['input_shape'])} "
                 f"({d['input_kind']})")
    rows = [[r["name"], r["type"], r["shapes"], r["params"], r["kept"]] for r in d["layers"]]
    stdout.print(table(None, ["layer", "type", "shapes", "params", "kept"], rows,
                       right={3, 4}))
    stdout.print(f"total params {d['params']:,}  kept {d['kept_params']:,}  "
                 f"on disk {human_bytes(d['bytes_on_disk'])}")
    for key in ("tensorization", "pruning", "training"):
        if key in d:
            stdout.print(f"{key}: {_brief(d[key])}")
    if art.meta.get("data"):
        pre = art.meta["data"].get("preprocess") or {}
        stdout.print(f"trained on: {art.meta['data'].get('reader')} data {art.meta['data'].get('path')}; "
                     f"{_brief(pre)}")
    if d["history"]:
        stdout.print(table("history", ["#", "command", "time", "seed", "version"],
                           [[i + 1, h.get("command"), h.get("time"), h.get("seed"),
                             h.get("tool_version")] for i, h in enumerate(d["history"])],
                           right={0}))
    if dd is not None:
        stdout.print("")
        _print_data(d["data"])


def _describe_data(spec: str):
    from .datasets import describe_dataset, open_dataset

    ds = open_dataset(spec)
    return describe_dataset(ds), ds


def _fits(ds, art) -> dict[str, Any]:
    """Whether ``ds`` can feed ``art``'s model: class count and one presented sample."""
    import numpy as np

    from .datasets import check_classes, make_split, resolve_preprocess
    from .errors import TedeprError
    from .evaluate import num_outputs

    try:
        check_classes(ds, num_outputs(art.model, art.input_shape))
        pre = resolve_preprocess(ds, art.input_shape, art.input_kind, augment=False,
                                 recorded=(art.meta.get("data") or {}).get("preprocess"))
        make_split(ds, "test", art.input_shape, art.input_kind, pre).batch(np.arange(1))
    except TedeprError as e:
        return {"ok": False, "reason": str(e)}
    return {"ok": True, "reason": None}


def _print_data(d: dict[str, Any]) -> None:
    names = d.get("class_names")
    shown = f": {', '.join(map(str, names[:10]))}{', ...' if len(names) > 10 else ''}" if names else ""
    stdout.print(f"[bold]{d['path']}[/bold]: {d['reader']} reader ({d['family']}), {d['classes']} classes"
                 f"{shown}", markup=True, highlight=False)
    rows = []
    for name, s in d["splits"].items():
        counts = [c for c in s["class_counts"] if c] or [0]
        rows.append([name, s["count"], f"{min(counts)}-{max(counts)}", s["from"]])
    stdout.print(table(None, ["split", "samples", "per class", "from"], rows, right={1, 2}))
    shape = tuple(d["sample_shape"]) if d.get("sample_shape") else "?"
    extra = " (sizes vary)" if d.get("sizes_vary") else ""
    extra = " (lengths vary)" if d.get("time_steps_vary") else extra
    stdout.print(f"sample shape {shape}{extra}, {d.get('dtype')}; {d.get('storage')}")
    for n in d.get("notes", []):
        stdout.print(f"note: {n}")
    fit = d.get("fits_model")
    if fit is not None:
        stdout.print("fits the model: yes" if fit["ok"] else f"fits the model: no - {fit['reason']}")


def _brief(section: dict[str, Any]) -> str:
    keys = [k for k, v in section.items() if not isinstance(v, dict | list)]
    return ", ".join(f"{k}={section[k]}" for k in keys[:8])


@command
def zoo(json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """List the built-in architectures with their input shapes and parameter counts."""
    from .zoo import MODELS

    rows = []
    for name in MODELS:
        m = MODELS.get(name)()
        rows.append({"name": name, "input_shape": list(m.input_shape),
                     "input_kind": m.input_kind,
                     "params": sum(p.numel() for p in m.parameters())})
    if json_out:
        print_json(rows)
    else:
        stdout.print(table(None, ["arch", "input", "kind", "params"],
                           [[r["name"], str(tuple(r["input_shape"])), r["input_kind"],
                             r["params"]] for r in rows], right={3}))


Output = Annotated[Path, typer.Option("--output", "-o", help="Artifact to write (a directory, "
                                      "or a file ending in .safetensors).", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (same seed => same result).")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Labelled data (.npz with x, y[, split]) to measure accuracy on.")]


def _parse_ranks(values: list[str]) -> tuple[int | None, dict[str, int]]:
    from .errors import UsageError

    rank, overrides = None, {}
    for v in values:
        for item in v.split(","):
            name, eq, r = item.strip().rpartition("=")
            try:
                val = int(r)
            except ValueError:
                raise UsageError(f"--rank takes R or name=R, got {item!r}") from None
            if eq:
                overrides[name] = val
            elif rank is not None:
                raise UsageError("--rank R given twice")
            else:
                rank = val
    return rank, overrides


def _parse_modes(values: list[str]) -> tuple[str | int, dict[str, tuple[list[int], list[int]]]]:
    from .errors import UsageError

    mode: str | int = "auto"
    overrides: dict[str, tuple[list[int], list[int]]] = {}
    for v in values:
        name, eq, spec = v.partition("=")
        if not eq:
            if v.strip() == "auto":
                mode = "auto"
                continue
            try:
                mode = int(v)
            except ValueError:
                raise UsageError(f"--modes takes auto, N or name=IN:OUT, got {v!r}") from None
            continue
        try:
            ins, outs = spec.split(":")
            overrides[name.strip()] = ([int(x) for x in ins.split("x")],
                                       [int(x) for x in outs.split("x")])
        except ValueError:
            raise UsageError(f"--modes {v!r}: write name=IN:OUT, e.g. fc1=28x28:15x20") from None
    return mode, overrides


def _split_globs(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _accuracy(art, data: Path, split: str = "test") -> float:
    from .data import load_split
    from .evaluate import evaluate, num_outputs

    x, y = load_split(data, split, art.input_shape, art.input_kind,
                      num_outputs(art.model, art.input_shape))
    return evaluate(art.model, x, y)["accuracy"]


@command
def decompose(
    path: ModelPath,
    output: Output,
    fmt: Annotated[str, typer.Option("--format", help="Tensor format: tt (tensor-train) or tr "
                                     "(tensor-ring).")] = "tt",
    rank: Annotated[list[str] | None, typer.Option(
        "--rank", help="Rank R for every layer, and/or per-layer overrides name=R (globs, "
        "repeatable). Default 8.")] = None,
    compression: Annotated[float | None, typer.Option(
        "--compression", help="Instead of --rank: largest ranks whose cores are X times "
        "smaller than each dense layer.")] = None,
    modes: Annotated[list[str] | None, typer.Option(
        "--modes", help="Modes per side: auto (fewest that meet the budget: fastest) or N; "
        "per layer name=IN:OUT, e.g. fc1=28x28:15x20 (repeatable).")] = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Only tensorize layers matching these globs (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Never tensorize layers matching these globs (repeatable).")] = None,
    chain: Annotated[str, typer.Option(
        "--chain", help="linear (exactly a low-rank weight) or nonlinear (BN+ReLU between "
        "chain steps).")] = "linear",
    init: Annotated[str, typer.Option(
        "--init", help="pretrained (TT/TR-SVD of the checkpoint's weights) or random "
        "(variance-preserving).")] = "pretrained",
    init_variance: Annotated[str, typer.Option(
        "--init-variance", help="Target of --init random: he (2/fan_in) or lecun (1/fan_in).")] = "he",
    data: DataOpt = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Coarse grain: turn each weight matrix / conv kernel into tensor-train or tensor-ring
    cores whose forward is a chain of small contractions. Prints the per-layer plan."""
    from .artifact import save_artifact
    from .console import log
    from .decompose import DecomposeOptions, totals
    from .decompose import decompose as run_decompose
    from .errors import UsageError
    from .fsutil import check_output

    r, overrides = _parse_ranks(rank or [])
    if compression is not None and r is not None:
        raise UsageError("give either --rank R or --compression X (name=R overrides combine with both)")
    m, mode_overrides = _parse_modes(modes or ["auto"])
    opts = DecomposeOptions(format=fmt, rank=8 if r is None else r, mode_overrides=mode_overrides,
                            rank_overrides=overrides, compression=compression, modes=m,
                            include=_split_globs(include or []), exclude=_split_globs(exclude or []),
                            chain=chain, init=init, init_variance=init_variance, seed=seed)
    if compression is not None:
        opts.rank = None
    opts.validate()
    check_output(output, overwrite)
    torch_seed(seed)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    before = sum(p.numel() for p in art.model.parameters())
    acc_before = _accuracy(art, data) if data else None
    out, report = run_decompose(art, opts)
    summary = totals(report, before, sum(p.numel() for p in out.model.parameters()))
    if data:
        summary["accuracy_before"] = acc_before
        summary["accuracy_after"] = _accuracy(out, data)
        out.meta.setdefault("metrics", {})["decompose"] = {
            "data": str(data), "split": "test", "accuracy_before": acc_before,
            "accuracy_after": summary["accuracy_after"]}
    out.meta["tensorization"]["summary"] = summary
    save_artifact(out, output, overwrite=overwrite)
    log.info(f"wrote {output}")
    if json_out:
        print_json({"output": str(output), "summary": summary, "layers": report})
        return
    _print_plan(report, summary)


def _print_plan(report: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    rows = []
    for x in report:
        modes = (f"{'x'.join(map(str, x['in_modes']))}->{'x'.join(map(str, x['out_modes']))}"
                 if x["tensorized"] else "-")
        rows.append([x["name"], x["type"], "x".join(map(str, x["shape"])), modes,
                     ",".join(map(str, x["ranks"])) if x["ranks"] else "-", x["params"],
                     x["compression"], x["work_ratio"], x.get("rel_error"), x["note"]])
    stdout.print(table("tensorization plan", ["layer", "type", "shape", "modes", "ranks", "params",
                                              "compr.", "work/dense", "rel.err", "note"],
                       rows, right={5, 6, 7, 8}))
    line = (f"params {summary['params_before']:,} -> {summary['params_after']:,} "
            f"({summary['compression']:.1f}x); {summary['layers_tensorized']} layers tensorized")
    if "accuracy_after" in summary:
        line += (f"; test accuracy {100 * summary['accuracy_before']:.2f} % -> "
                 f"{100 * summary['accuracy_after']:.2f} % (before fine-tuning)")
    stdout.print(line)


def _criteria_help() -> str:
    from .pruning.criteria import CRITERIA

    return ", ".join(CRITERIA.names())


@command
def prune(
    path: ModelPath,
    sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="Fraction of the dense model's prunable weights to remove, in (0, 1).")] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="Alternative to --sparsity: the fraction to keep (1 - sparsity).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Artifact to write (default: ./<input name>-pruned).",
        show_default=False)] = None,
    criterion: Annotated[str | None, typer.Option(
        "--criterion", help="Scoring criterion: tedepr (default; trainability, needs --data), "
        "snip, grasp, force (need --data), synflow, magnitude, random.")] = None,
    data: DataOpt = None,
    scope: Annotated[str, typer.Option("--scope", help="global (one top-K over all layers) or "
                                       "layer (each layer keeps its share).")] = "global",
    decompose_first: Annotated[bool, typer.Option(
        "--decompose/--no-decompose", help="Decompose a dense checkpoint first (one-shot TEDEPR); "
        "--no-decompose prunes the dense weights (the PaI baseline).")] = True,
    fmt: Annotated[str, typer.Option("--format", help="Tensor format when decomposing first.")] = "tt",
    rank: Annotated[int, typer.Option("--rank", help="Rank when decomposing first.")] = 8,
    min_density: Annotated[float, typer.Option(
        "--min-density", help="Collapse guard: each prunable tensor keeps at least this fraction "
        "of its entries (always at least 1).")] = 0.0,
    path_guard: Annotated[bool, typer.Option(
        "--path-guard/--no-path-guard", help="Keep one unbroken path through every tensorized "
        "layer's cores.")] = True,
    steps: Annotated[int, typer.Option("--steps", help="tedepr: differentiable SGD steps.")] = 3,
    inner_lr: Annotated[float, typer.Option("--inner-lr", help="tedepr: their learning rate.")] = 0.1,
    rounds: Annotated[int, typer.Option("--rounds", help="synflow: pruning rounds.")] = 100,
    iterations: Annotated[int, typer.Option("--iterations", help="force: pruning iterations.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per scoring batch.")] = 128,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads (results are "
                                         "reproducible for a fixed thread count).")] = 1,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Fine grain: score every prunable entry at initialization and keep the most useful,
    so that (1 - sparsity) x the dense model's prunable weights remain."""
    import torch

    from .artifact import save_artifact
    from .console import log
    from .decompose import DecomposeOptions
    from .errors import UsageError
    from .fsutil import check_output
    from .prune import PruneOptions
    from .prune import prune as run_prune
    from .pruning.criteria import CriterionOptions

    if (sparsity is None) == (density is None):
        raise UsageError("give exactly one of --sparsity or --density")
    s = sparsity if sparsity is not None else 1.0 - density
    if threads < 1:
        raise UsageError("--threads must be >= 1")
    opts = PruneOptions(sparsity=s, criterion=criterion, scope=scope, min_density=min_density,
                        path_guard=path_guard, batch_size=batch_size, seed=seed,
                        decompose=decompose_first,
                        criterion_options=CriterionOptions(steps=steps, inner_lr=inner_lr,
                                                           rounds=rounds, iterations=iterations))
    opts.validate()
    dopts = DecomposeOptions(format=fmt, rank=rank, seed=seed)
    dopts.validate()
    out_path = output if output is not None else Path(f"{path.stem}-pruned")
    check_output(out_path, overwrite)
    torch.set_num_threads(threads)
    torch_seed(seed)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    out, report = run_prune(art, opts, data, dopts)
    save_artifact(out, out_path, overwrite=overwrite)
    log.info(f"wrote {out_path}")
    if json_out:
        print_json({"output": str(out_path), **report})
        return
    rows = [[r["name"], r["kind"], f"{r['kept']:,}/{r['total']:,}", r["density"], r["dense_count"],
             r["density_vs_dense"]] for r in report["layers"]]
    stdout.print(table(f"pruned with {report['criterion']} ({report['scope']} scope)",
                       ["layer", "kind", "kept/total", "density", "dense weights", "density vs dense"],
                       rows, right={2, 3, 4, 5}))
    sp = report["sparsity"]
    stdout.print(f"kept {report['kept']:,} of {report['dense_prunable']:,} dense prunable weights: "
                 f"sparsity {100 * sp['vs_dense']:.2f} % vs dense, {100 * sp['over_prunable']:.2f} % "
                 f"over prunable entries, {100 * sp['over_all_params']:.2f} % over all parameters")


@command
def finetune(
    path: ModelPath,
    data: Annotated[Path, typer.Option("--data", help="Labelled data, [reader:]PATH: .npz, CIFAR, MNIST "
                                       "IDX, image folders, sequence clips (README 'Datasets'). The train "
                                       "split trains, a seeded --val-fraction of it validates, the test "
                                       "split reports.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory: best/ and last/ "
                                         "artifacts, metrics.jsonl, state.pt.", show_default=False)],
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 128,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (momentum), adamw or adam.")] = "adamw",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length.")] = 0.0,
    step_epochs: Annotated[int, typer.Option("--step-epochs", help="step schedule: epochs per decay.")] = 30,
    gamma: Annotated[float, typer.Option("--gamma", help="step schedule: decay factor.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
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
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output exactly "
                                         "where it stopped (after its last completed epoch).")] = False,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Train a (pruned, tensorized or dense) model with its masks fixed: pruned entries stay
    exactly zero. Runs under torchrun for DistributedDataParallel (only rank 0 writes)."""
    from .console import log
    from .errors import UsageError
    from .train import TrainOptions, dist_from_env, epoch_line
    from .train import finetune as run_finetune

    opts = TrainOptions(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                        momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                        warmup_epochs=warmup_epochs, step_epochs=step_epochs, gamma=gamma,
                        label_smoothing=label_smoothing, val_fraction=val_fraction,
                        early_stopping=early_stopping, limit_train=limit_train, seed=seed,
                        device=device, threads=threads, augment=augment, normalize=normalize,
                        workers=workers, strict_data=strict_data)
    opts.validate()
    if resume and overwrite:
        raise UsageError("--resume continues a run; --overwrite would discard it: choose one")
    torch_seed(seed)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    main_rank = dist_from_env().main
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
                                     on_epoch=on_epoch, on_batch=on_batch)
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
    picked = (f"val accuracy {100 * summary['best_score']:.2f} %" if opts.val_fraction > 0
              else f"training loss {-summary['best_score']:.4f}")
    stdout.print(f"{output}: {summary['epochs_run']} epochs; best checkpoint {output / 'best'} "
                 f"({picked}), test accuracy {100 * summary['test_accuracy']:.2f} %")


def _progress(epochs: int):
    """A rich progress bar on a TTY, else None (plain per-epoch lines on stderr)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .console import is_tty
    from .console import stderr as err_console

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
                                       "'Datasets').", show_default=False)],
    split: Annotated[str, typer.Option("--split", help="test, train or all.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    threads: Annotated[int, typer.Option("--threads")] = 1,
    normalize: Annotated[str, typer.Option(
        "--normalize", help="auto (the statistics recorded in the model's manifest, else the data "
        "family's), standard, computed or none.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes reading "
                                         "batches (0: this process).")] = 0,
    strict_data: Annotated[bool, typer.Option(
        "--strict-data", help="Fail on an unreadable sample file instead of skipping it.")] = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Loss, top-1 and per-class accuracy and throughput of a model on labelled data."""
    import torch

    from .datasets import check_classes, make_split, open_dataset, resolve_preprocess
    from .errors import UsageError
    from .evaluate import evaluate_split, num_outputs

    if batch_size < 1 or threads < 1 or workers < 0:
        raise UsageError("--batch-size and --threads must be >= 1, --workers >= 0")
    torch.set_num_threads(threads)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    classes = num_outputs(art.model, art.input_shape)
    ds = open_dataset(data)
    check_classes(ds, classes)
    pre = resolve_preprocess(ds, art.input_shape, art.input_kind, normalize=normalize, augment=False,
                             recorded=(art.meta.get("data") or {}).get("preprocess"), strict=strict_data)
    s = make_split(ds, split, art.input_shape, art.input_kind, pre, strict=strict_data)
    m = evaluate_split(art.model, s, batch_size=batch_size, num_classes=classes, workers=workers)
    m.update(path=str(path), data=str(data), split=split, reader=ds.reader, normalize=pre.normalize)
    if json_out:
        print_json(m)
        return
    stdout.print(f"{path} on {data} ({split}, {m['samples']:,} samples): accuracy "
                 f"{100 * m['accuracy']:.2f} % ({m['correct']:,} correct), loss {m['loss']:.4f}, "
                 f"{m['examples_per_s']:,.0f} examples/s ({threads} thread{'s' if threads > 1 else ''})")
    names = ds.class_names or ds.classes
    stdout.print(table("per-class accuracy", ["class", "accuracy"],
                       [[f"{c} ({names[c]})" if names and c < len(names) and names[c] != str(c) else c, a]
                        for c, a in m["per_class_accuracy"].items()]))


@command
def export(
    path: ModelPath,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the exported "
                                         "files into.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Comma list of safetensors, onnx, onnx-sparse "
                                    "(cores/weights as ONNX sparse_initializers).")] = "safetensors,onnx",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (17..23).")] = 18,
    atol: Annotated[float, typer.Option("--atol", help="Validation: absolute tolerance.")] = 1e-5,
    rtol: Annotated[float, typer.Option("--rtol", help="Validation: relative tolerance.")] = 1e-4,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes validated "
                                             "(the ONNX batch axis is dynamic).")] = "1,7",
    data: DataOpt = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Export a compact safetensors file and ONNX models of the chain, each validated
    against PyTorch (exit 8 on a miss); prints a size table."""
    from .console import human_bytes, log
    from .errors import UsageError
    from .export import ExportOptions
    from .export import export as run_export
    from .fsutil import check_output

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers like 1,7; got {batch_sizes!r}") from None
    opts = ExportOptions(formats=[f.strip() for f in to.split(",") if f.strip()], opset=opset,
                         atol=atol, rtol=rtol, batch_sizes=sizes, seed=seed)
    opts.validate()
    check_output(output, overwrite)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle)
    report = run_export(art, output, opts, data, overwrite=overwrite)
    log.info(f"wrote {output}")
    if json_out:
        print_json({"output": str(output), **report})
        return
    rows = []
    for name, r in [("dense original", report.get("dense_original") or {}),
                    *[(f, report["formats"][f]) for f in report["formats"]]]:
        if r:
            rows.append([name, r["params"], r["kept"], r["bytes"], human_bytes(r["bytes"]),
                         r["gzip_bytes"], human_bytes(r["gzip_bytes"])])
    stdout.print(table(f"export to {output}", ["format", "params", "kept", "bytes", "", "gzip bytes", ""],
                       rows, right={1, 2, 3, 4, 5, 6}))
    c = report.get("compact")
    if c and c["ratio"] is not None:
        entropy = c["minimal_bytes"] - 4 * c["kept_values"]
        stdout.print(f"compact safetensors, prunable part: {c['stored_bytes']:,} B for {c['kept_values']:,} "
                     f"kept values = {c['ratio']:.3f} x the minimum (4 B per value + {entropy:,} B "
                     f"index entropy); layouts {c['layouts']}")
    for fmt, v in report["validation"].items():
        if fmt == "safetensors":
            stdout.print(f"validated safetensors: reload bit-exact = {v['bit_exact']}")
        else:
            worst = max(v.values(), key=lambda c: c["max_abs"])
            stdout.print(f"validated {fmt} with onnxruntime at batch {', '.join(v)}: max abs diff "
                         f"{worst['max_abs']:.3g}, max rel diff {worst['max_rel']:.3g}")


@command
def validate(
    path: Annotated[Path, typer.Argument(help="A directory written by `tedepr export`.",
                                         show_default=False)],
    atol: Annotated[float, typer.Option("--atol")] = 1e-5,
    rtol: Annotated[float, typer.Option("--rtol")] = 1e-4,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Re-check an export directory: run every model on its saved sample inputs and compare
    with the saved outputs (exit 8 on a miss), without the original code or checkpoint."""
    from .errors import InputNotFound, ValidationError
    from .export import validate_dir

    if not path.is_dir():
        raise InputNotFound(f"{path} is not a directory written by tedepr export")
    results = validate_dir(path, atol, rtol)
    if json_out:
        print_json(results)
    else:
        stdout.print(table(f"validation of {path}", ["file", "ok", "max abs", "max rel"],
                           [[f, r["ok"], r["max_abs"], r["max_rel"]] for f, r in results.items()]))
    bad = [f for f, r in results.items() if not r["ok"]]
    if bad:
        raise ValidationError(f"{', '.join(bad)} no longer match the saved outputs "
                              f"(atol {atol}, rtol {rtol})")


@command
def bench(
    path: Annotated[Path, typer.Argument(help="Compressed artifact, finetune run or export directory.",
                                         show_default=False)],
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="The dense checkpoint it came from (weights into the same architecture); "
        "without it the dense architecture is built with random weights (timing only).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,32.")] = "1,32",
    threads: Annotated[int, typer.Option("--threads", help="Threads for every engine (default 1: "
                                         "two threads on two shared cores are noisy).")] = 1,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed rounds first.")] = 10,
    iters: Annotated[int, typer.Option("--iters", help="Timed rounds (each runs every engine once).")] = 100,
    seconds: Annotated[float | None, typer.Option("--time", help="Time budget in seconds instead of "
                                                  "--iters.")] = None,
    engines: Annotated[str | None, typer.Option(
        "--engines", help="Comma list of dense-torch, dense-ort, chain-torch, tedepr, chain-ort, triton "
        "(default: all that can run here).")] = None,
    strict: Annotated[bool, typer.Option("--strict-engines", help="Fail (exit 10) instead of skipping "
                                         "an unavailable engine named in --engines.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    replan: Annotated[bool, typer.Option("--replan", help="Ignore stored execution plans.")] = False,
    data: DataOpt = None,
    json_file: Annotated[Path | None, typer.Option(
        "--json", help="Write every figure as JSON to this file ('-' for stdout).")] = None,
    fail_if_slower: Annotated[float | None, typer.Option(
        "--fail-if-slower", help="Gate (exit 11): fail if the tedepr engine is slower than RATIO x the "
        "dense baseline (or x the same engine in --compare-to).")] = None,
    compare_to: Annotated[Path | None, typer.Option(
        "--compare-to", help="A saved bench JSON for --fail-if-slower.")] = None,
    max_size: Annotated[int | None, typer.Option(
        "--max-size", help="Gate (exit 12): fail if the compressed artifact exceeds BYTES.")] = None,
    min_speedup: Annotated[float | None, typer.Option(
        "--min-speedup", help="Gate (exit 13): fail if the tedepr engine's speed-up is below X.")] = None,
    verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Honest latency and size: every engine side by side, interleaved, with medians, IQR,
    percentiles, speed-ups with their spread, sizes, planner choices and accuracy."""
    import json as _json

    from .bench.core import BenchOptions, check_gates, load_saved, load_target, run_bench
    from .console import human_bytes, log
    from .errors import UsageError

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch takes integers like 1,32; got {batch!r}") from None
    opts = BenchOptions(batches=batches, threads=threads, warmup=warmup, iters=iters, seconds=seconds,
                        engines=[e.strip() for e in engines.split(",")] if engines else None,
                        device=device, strict=strict, replan=replan)
    opts.validate()
    if compare_to is not None and fail_if_slower is None:
        raise UsageError("--compare-to is used by --fail-if-slower: give both")
    saved = load_saved(compare_to) if compare_to is not None else None
    if baseline is not None and not baseline.exists():
        from .errors import InputNotFound

        raise InputNotFound(f"--baseline {baseline} does not exist")
    target = load_target(path)
    report = run_bench(target, opts, baseline, data)
    failures = check_gates(report, fail_if_slower, max_size, min_speedup, saved, opts.gate_engine)
    report["gates"] = {"fail_if_slower": fail_if_slower, "max_size": max_size, "min_speedup": min_speedup,
                       "failed": [str(f) for f in failures]}
    if json_file is not None:
        text = _json.dumps(report, indent=2, default=str) + "\n"
        if str(json_file) == "-":
            sys.stdout.write(text)
        else:
            from .fsutil import atomic_output

            with atomic_output(json_file, overwrite=True) as tmp:
                tmp.write_text(text)
            log.info(f"wrote {json_file}")
    if str(json_file) != "-":
        _print_bench(report, human_bytes)
    for w in report["warnings"]:
        log.warning(w)
    if failures:
        for f in failures[1:]:
            log.error(str(f))
        raise failures[0]


def _print_bench(report: dict[str, Any], human_bytes) -> None:
    m = report["machine"]
    stdout.print(f"{report['target']} vs dense baseline ({report['baseline_weights']}); {m['cpu']}, "
                 f"{m['threads']} thread(s), torch {m['torch']}, onnxruntime {m['onnxruntime']}, kernels "
                 f"{'on' if m['kernel']['available'] else 'off'}")
    for b, row in report["results"].items():
        rows = []
        for e, s in row.items():
            sp = s["speedup_vs_dense_torch"]
            rows.append([e, 1e6 * s["median_s"], 1e6 * s["iqr_s"], 1e6 * s["p90_s"], 1e6 * s["p99_s"],
                         f"{1e6 * s['mean_s']:.1f} ± {1e6 * s['std_s']:.1f}", s["throughput_per_s"],
                         f"{sp['median']:.2f}x [{sp['q1']:.2f}-{sp['q3']:.2f}]",
                         human_bytes(s["peak_memory_bytes"]) if s["peak_memory_bytes"] is not None else None])
        stdout.print(table(f"batch {b} (µs)", ["engine", "median", "IQR", "p90", "p99", "mean ± σ",
                                               "samples/s", "speed-up vs dense", "peak mem"], rows))
    srows = [[k, v.get("params"), v.get("kept"), v["bytes"], human_bytes(v["bytes"]), v["gzip_bytes"]]
             for k, v in report["sizes"].items()]
    stdout.print(table("size", ["format", "params", "kept", "bytes", "", "gzip bytes"], srows))
    for b, plan in report.get("execution_plans", {}).items():
        f = plan["flops"]
        choices = ", ".join(f"{n}={r['choice']}" for n, r in plan["layers"].items())
        stdout.print(f"plan at batch {b}{' (fresh)' if plan.get('fresh') else ' (stored)'}: {choices}; "
                     f"{100 * f['share_on_sparse_or_factorized']:.1f} % of the compressed layers' FLOPs on "
                     f"sparse/factorized kernels")
    acc = report.get("accuracy")
    if acc:
        base = "unknown (no --baseline)" if acc["baseline"] is None else f"{100 * acc['baseline']:.2f} %"
        stdout.print(f"accuracy on {acc['data']} (test): baseline {base}, compressed "
                     f"{100 * acc['compressed']:.2f} %")
    for name, why in report.get("skipped_engines", {}).items():
        stdout.print(f"skipped {name}: {why}")


def torch_seed(seed: int) -> None:
    """Seed every generator tedepr draws from."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # during option parsing
        stderr.print("tedepr: interrupted")
        sys.exit(EXIT_INTERRUPTED)


@command
def kernels(
    check: Annotated[bool, typer.Option(
        "--check", help="Build the compiled kernel and run a quick correctness self-test; "
        "exit 10 if it cannot be built (or fails the test).")] = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Report the inference kernels this machine can run: the C compiler, flags and cache
    of the compiled CPU chain kernel (built on first use), Triton and CUDA."""
    from .errors import EngineUnavailable
    from .kernels.report import report

    rep = report(check)
    cpu, tri = rep["cpu"], rep["triton"]
    if json_out:
        print_json(rep)
    else:
        rows = [["compiled CPU kernel", "yes" if cpu["available"] else "no",
                 cpu["library"] if cpu["available"] else cpu["reason"]],
                ["compiler", cpu["compiler"] or "-", cpu["compiler_version"] or "-"],
                ["flags", " ".join(cpu["flags"]), f"{cpu['vector_floats'] or '-'} floats per vector"],
                ["cache", cpu["cache_dir"], "compiled now" if cpu["compiled"] else "-"],
                ["triton", "yes" if tri["available"] else "no",
                 tri["triton"] if tri["available"] else tri["reason"]],
                ["cuda", "yes" if rep["cuda"]["available"] else "no", rep["cuda"]["device"] or "-"]]
        if "check" in rep:
            chk = rep["check"]
            rows.append(["self-test", "ok" if chk["ok"] else "FAILED",
                         f"max rel. error {chk['max_rel_error']:.2e} (tolerance {chk['tolerance']:g}, "
                         f"{len(chk['cases'])} cases)"])
        stdout.print(table("kernels", ["engine", "available", "detail"], rows, right=set()))
    if check and not cpu["available"]:
        raise EngineUnavailable(f"compiled kernel cannot be built here: {cpu['reason']}")
    if check and not rep["check"]["ok"]:
        raise EngineUnavailable(f"compiled kernel failed its self-test (max rel. error "
                                f"{rep['check']['max_rel_error']:.2e}); use the torch path")
