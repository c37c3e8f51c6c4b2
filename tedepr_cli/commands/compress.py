"""`tedepr decompose` (coarse grain) and `tedepr prune` (fine grain)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import print_json, stdout, table
from .common import (
    Arch,
    ArchKwargs,
    DataOpt,
    InputShape,
    JsonOut,
    NonStrict,
    Output,
    Overwrite,
    Quiet,
    Seed,
    Threads,
    TrustPickle,
    Verbose,
    _load,
    command,
    torch_seed,
    use_threads,
)

# decompose's and prune's PATH: a file, or with --init random an architecture (_from_scratch)
ScratchPath = Annotated[Path, typer.Argument(
    help="Checkpoint (.pt/.pth/.safetensors state_dict, .pt2 program) or tedepr artifact; or, with "
    "--init random, an architecture to start from scratch: a zoo name (`tedepr zoo`) or "
    "pkg.module:callable (imported: only name modules you trust).", metavar="PATH", show_default=False)]


def _parse_ranks(values: list[str]) -> tuple[int | None, dict[str, int]]:
    from ..errors import UsageError

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


def _parse_formats(values: list[str]) -> tuple[str, dict[str, str]]:
    """``--format F`` (every layer; default tt) and/or ``name=F`` per-layer globs; the values
    are checked by the planner (:class:`~tedepr_cli.tensorized.plan.PlanOptions`)."""
    from ..errors import UsageError

    fmt, overrides = None, {}
    for v in values:
        for item in v.split(","):
            name, eq, f = item.strip().rpartition("=")
            if eq:
                overrides[name] = f
            elif fmt is not None:
                raise UsageError("--format F given twice")
            else:
                fmt = f
    return "tt" if fmt is None else fmt, overrides


def _parse_modes(values: list[str]) -> tuple[str | int, dict[str, tuple[list[int], list[int]]]]:
    from ..errors import UsageError

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


LstmHH = Annotated[str, typer.Option(
    "--lstm-hh", help="An LSTM's hidden-to-hidden matrices W_hh: dense (the TT-LSTM protocol, pruned "
    "entry by entry) or tensorized (TT/TR chains H -> 4H like W_ih, in the layer's format; trains on "
    "torch's fused LSTM, not the compiled training recurrence).")]


def _split_globs(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _accuracy(art, data, split: str = "test") -> float | None:
    """Test accuracy on ``data``; None for data without labels."""
    from ..evaluate import evaluate
    from ..model_data import tensors_for

    x, y = tensors_for(art, data, split)
    if not bool((y >= 0).any()):
        return None
    return evaluate(art.model, x, y)["accuracy"]


@command
def decompose(
    path: ScratchPath,
    output: Output,
    fmt: Annotated[list[str] | None, typer.Option("--format", help="Tensor format: tt (tensor-train) "
                                               "or tr (tensor-ring) for every layer, and/or per-layer "
                                               "overrides name=F (globs, repeatable). Default tt.")] = None,
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
    lstm_hh: LstmHH = "dense",
    init: Annotated[str, typer.Option(
        "--init", help="pretrained (TT/TR-SVD of the checkpoint's weights) or random "
        "(variance-preserving; then PATH may name an architecture: a fresh model, seeded by "
        "--seed, is built and decomposed).")] = "pretrained",
    init_variance: Annotated[str, typer.Option(
        "--init-variance", help="Target of --init random: he (2/fan_in) or lecun (1/fan_in).")] = "he",
    data: DataOpt = None,
    threads: Threads = 1,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Coarse grain: turn each weight matrix / conv kernel into tensor-train or tensor-ring
    cores whose forward is a chain of small contractions. Prints the per-layer plan."""
    from ..artifact import save_artifact, single_file
    from ..console import log
    from ..decompose import DecomposeOptions, totals
    from ..decompose import decompose as run_decompose
    from ..errors import UsageError
    from ..fsutil import check_output

    r, overrides = _parse_ranks(rank or [])
    if compression is not None and r is not None:
        raise UsageError("give either --rank R or --compression X (name=R overrides combine with both)")
    m, mode_overrides = _parse_modes(modes or ["auto"])
    f, format_overrides = _parse_formats(fmt or [])
    opts = DecomposeOptions(format=f, format_overrides=format_overrides, rank=8 if r is None else r,
                            mode_overrides=mode_overrides,
                            rank_overrides=overrides, compression=compression, modes=m,
                            include=_split_globs(include or []), exclude=_split_globs(exclude or []),
                            chain=chain, init=init, init_variance=init_variance, seed=seed, lstm_hh=lstm_hh)
    if compression is not None:
        opts.rank = None
    opts.validate()
    scratch = _from_scratch(path, init, arch, "decompose")
    check_output(output, overwrite, directory=not single_file(output))
    use_threads(threads)
    torch_seed(seed)
    if scratch:
        from ..arch import parse_arch
        from ..loading import build_fresh

        art = build_fresh(parse_arch(str(path), arch_kwargs, input_shape), seed)
    else:
        art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
    before = sum(p.numel() for p in art.model.parameters())
    ds = None
    if data:
        from ..datasets import open_dataset

        ds = open_dataset(data)  # once: both models are measured on it (its line is logged once)
    acc_before = _accuracy(art, ds) if ds else None
    out, report = run_decompose(art, opts)
    summary = totals(report, before, sum(p.numel() for p in out.model.parameters()))
    if data and acc_before is None:  # no labels: how close the decomposed outputs stay to the original's
        from ..evaluate import cosine_split
        from ..model_data import split_for

        cos = cosine_split(out.model, art.model, split_for(out, ds, "test"))["cosine_mean"]
        summary["cosine_to_original"] = cos
        out.meta.setdefault("metrics", {})["decompose"] = {"data": str(data), "split": "test",
                                                           "cosine_to_original": cos}
    elif data:
        summary["accuracy_before"] = acc_before
        summary["accuracy_after"] = _accuracy(out, ds)
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
        hh = x.get("hh")  # an LSTM's chain W_hh: the row's params and compression cover W_ih and W_hh
        shape = "x".join(map(str, x["shape"])) + (
            f" + {math.prod(hh['out_modes'])}x{math.prod(hh['in_modes'])}" if hh else "")
        rows.append([x["name"], x["type"], shape, modes,
                     ",".join(map(str, x["ranks"])) if x["ranks"] else "-", x["params"],
                     x["compression"], x["work_ratio"], x.get("rel_error"), x["note"]])
        if hh:  # its own line: modes and ranks; its cores are counted in the row above (W_ih + W_hh)
            hh_shape = f"{math.prod(hh['out_modes'])}x{math.prod(hh['in_modes'])}"
            rows.append([f"{x['name']} W_hh", "lstm", hh_shape,
                         f"{'x'.join(map(str, hh['in_modes']))}->{'x'.join(map(str, hh['out_modes']))}",
                         ",".join(map(str, hh["ranks"])), "", "", "", "", "counted in the row above"])
    stdout.print(table("tensorization plan", ["layer", "type", "shape", "modes", "ranks", "params",
                                              "compr.", "work/dense", "rel.err", "note"],
                       rows, right={5, 6, 7, 8}))
    line = (f"params {summary['params_before']:,} -> {summary['params_after']:,} "
            f"({summary['compression']:.1f}x); {summary['layers_tensorized']} layers tensorized")
    if "cosine_to_original" in summary:
        line += f"; mean cosine of the outputs to the original {summary['cosine_to_original']:.4f} (test)"
    if "accuracy_after" in summary:
        line += (f"; test accuracy {100 * summary['accuracy_before']:.2f} % -> "
                 f"{100 * summary['accuracy_after']:.2f} % (before fine-tuning)")
    stdout.print(line)


def _from_scratch(path: Path, init: str, arch: str | None, verb: str = "prune") -> bool:
    """Whether PATH names an architecture to build fresh (``tedepr prune lenet300 --init
    random``, ``tedepr decompose lenet300 --init random``) rather than a file. A file of
    that name always wins."""
    from ..arch import is_arch_name
    from ..errors import UsageError

    if path.exists() or not is_arch_name(str(path)):
        return False
    if init != "random":
        why = "pruning at initialization from scratch" if verb == "prune" else "no checkpoint"
        raise UsageError(f"{path} is not a file but names an architecture: add --init random to {verb} "
                         f"a freshly initialized {path} ({why}), or pass a checkpoint of it with "
                         f"--arch {path}")
    if arch is not None:
        raise UsageError(f"PATH {path} already names the architecture: drop --arch {arch}")
    return True


def _criteria_help() -> str:
    from ..pruning.criteria import CRITERIA

    return ", ".join(CRITERIA.names())


@command
def prune(
    path: ScratchPath,
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
    scope: Annotated[str, typer.Option(
        "--scope", help="global (one top-K over all layers), normalized (one top-K over scores divided "
        "by their layer's mean: layers compete on relative importance) or layer (each layer keeps its "
        "share).")] = "global",
    decompose_first: Annotated[bool, typer.Option(
        "--decompose/--no-decompose", help="Decompose a dense checkpoint first (one-shot TEDEPR); "
        "--no-decompose prunes the dense weights (the PaI baseline).")] = True,
    fmt: Annotated[list[str] | None, typer.Option(
        "--format", help="Tensor format when decomposing first: tt or tr, and/or per-layer name=F "
        "(globs, repeatable). Default tt.")] = None,
    lstm_hh: LstmHH = "dense",
    rank: Annotated[str, typer.Option("--rank", help="Rank when decomposing first: an integer, or auto "
                                      "(the largest rank whose cores hold about --coarse-ratio x the "
                                      "budget).")] = "auto",
    init: Annotated[str, typer.Option(
        "--init", help="Cores of the one-shot decomposition: pretrained (TT/TR-SVD of the checkpoint's "
        "weights) or random (variance-preserving, see --init-variance). With random, PATH may name an "
        "architecture: a fresh model (seeded by --seed) is built, decomposed and pruned.")] = "pretrained",
    init_variance: Annotated[str, typer.Option(
        "--init-variance", help="Target of --init random: he (2/fan_in) or lecun (1/fan_in).")] = "he",
    coarse_ratio: Annotated[float, typer.Option(
        "--coarse-ratio", help="With --rank auto: core entries per kept entry before pruning.")] = 4.0,
    rank_allocation: Annotated[str, typer.Option(
        "--rank-allocation", help="With --rank auto: uniform (one rank for every layer) or criterion "
        "(each layer's rank sized to about --coarse-ratio x the entries the criterion keeps in it "
        "when scored on a 4x larger probe decomposition).")] = "uniform",
    min_density: Annotated[float, typer.Option(
        "--min-density", help="Collapse guard: each prunable tensor keeps at least this fraction "
        "of its entries (always at least 1).")] = 0.0,
    path_guard: Annotated[bool, typer.Option(
        "--path-guard/--no-path-guard", help="Keep one unbroken path through every tensorized "
        "layer's cores.")] = True,
    connectivity: Annotated[bool, typer.Option(
        "--connectivity/--no-connectivity", help="Spend the budget only on core entries that lie "
        "on complete paths through their layer's chain (effective sparsity).")] = True,
    min_paths: Annotated[int, typer.Option(
        "--min-paths", help="Path floor: every tensorized layer keeps at least this many rank paths "
        "through its cores (as many as its ranks hold); with --rank auto, conv and tensor-ring layers "
        "whose ranks hold fewer get the smallest rank that holds them. 0: off.")] = 0,
    grain: Annotated[str, typer.Option(
        "--grain", help="entry (single core entries) or path (whole rank paths through the cores, "
        "scored by their entries' saliency per kept entry).")] = "entry",
    path_pool: Annotated[float, typer.Option(
        "--path-pool", help="With --grain path: 1 keeps whole paths only (at most the budget); F > 1 "
        "pools whole paths up to F x the budget, then keeps exactly the budget's best entries within "
        "them.")] = 1.0,
    repair_paths: Annotated[bool, typer.Option(
        "--repair-paths/--no-repair-paths", help="If no input unit would reach the output any more "
        "(whole-network collapse, otherwise refused with exit 7) or only some outputs would (instead "
        "of --reconnect's swap), add the fewest best-scored entries that reconnect every output, "
        "beyond the budget (the report says how many).")] = False,
    reconnect: Annotated[bool | None, typer.Option(
        "--reconnect/--no-reconnect", help="If only some outputs would depend on no input (constant "
        "logits), swap the fewest best-scored entries that reconnect them for as many of the "
        "lowest-scored kept entries: the kept count stays the budget (the default, unless "
        "--repair-paths). --no-reconnect keeps the selection and warns.", show_default=False)] = None,
    score_mode: Annotated[str, typer.Option(
        "--score-mode", help="Normalization layers while scoring: eval (running statistics) or "
        "train (batch statistics; running statistics are restored).")] = "eval",
    steps: Annotated[int, typer.Option("--steps", help="tedepr: differentiable SGD steps.")] = 3,
    inner_lr: Annotated[float, typer.Option("--inner-lr", help="tedepr: their learning rate.")] = 0.1,
    rounds: Annotated[int, typer.Option("--rounds", help="synflow: pruning rounds.")] = 100,
    iterations: Annotated[int, typer.Option("--iterations", help="force: pruning iterations.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per scoring batch.")] = 128,
    micro_batch: Annotated[int, typer.Option(
        "--micro-batch", help="Data-driven criteria differentiate at most N samples at a time and add "
        "the results up (same scores up to rounding; memory grows with N). A BatchNorm using batch "
        "statistics (--score-mode train) keeps the whole batch.")] = 32,
    threads: Threads = 1,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Fine grain: score every prunable entry at initialization and keep the most useful,
    so that (1 - sparsity) x the dense model's prunable weights remain."""

    from ..artifact import save_artifact, single_file
    from ..console import log
    from ..decompose import DecomposeOptions
    from ..errors import UsageError
    from ..fsutil import check_output
    from ..pruning.criteria import CriterionOptions
    from ..pruning.prune import PruneOptions
    from ..pruning.prune import prune as run_prune

    if (sparsity is None) == (density is None):
        raise UsageError("give exactly one of --sparsity or --density")
    s = sparsity if sparsity is not None else 1.0 - density
    if reconnect and repair_paths:
        raise UsageError("give --reconnect (within the budget) or --repair-paths (beyond it), not both")
    reconnect = not repair_paths if reconnect is None else reconnect
    use_threads(threads)  # checks --threads (>= 1) before anything else is done
    opts = PruneOptions(sparsity=s, criterion=criterion, scope=scope, min_density=min_density,
                        path_guard=path_guard, connectivity=connectivity, batch_size=batch_size, seed=seed,
                        decompose=decompose_first, coarse_ratio=coarse_ratio, score_mode=score_mode,
                        rank_allocation=rank_allocation,
                        repair_paths=repair_paths, reconnect=reconnect, min_paths=min_paths, grain=grain,
                        path_pool=path_pool,
                        criterion_options=CriterionOptions(steps=steps, inner_lr=inner_lr, rounds=rounds,
                                                           iterations=iterations, micro_batch=micro_batch))
    opts.validate()
    if rank == "auto":
        rank_value = None
    else:
        try:
            rank_value = int(rank)
        except ValueError:
            raise UsageError(f"--rank must be an integer or auto, got {rank!r}") from None
    f, format_overrides = _parse_formats(fmt or [])
    dopts = DecomposeOptions(format=f, format_overrides=format_overrides,
                             rank=rank_value if rank_value is not None else 8, seed=seed,
                             init=init, init_variance=init_variance, lstm_hh=lstm_hh)
    dopts.validate()
    dopts.rank = rank_value
    scratch = _from_scratch(path, init, arch)
    name = re.sub(r"[^\w.-]", "-", str(path)) if scratch else path.stem
    out_path = output if output is not None else Path(f"{name}-pruned")
    check_output(out_path, overwrite, directory=not single_file(out_path))
    torch_seed(seed)
    if scratch:
        from ..arch import parse_arch
        from ..loading import build_fresh

        art = build_fresh(parse_arch(str(path), arch_kwargs, input_shape), seed)
    else:
        art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
        if init != "pretrained" and (art.meta.get("tensorization") or not decompose_first):
            raise UsageError(f"--init {init} initializes the cores of the one-shot decomposition, and "
                             f"{path} is {'already decomposed' if decompose_first else 'kept dense'}; to "
                             "prune a fresh model name its architecture, e.g. `tedepr prune lenet300 "
                             "--init random`")
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
    stdout.print(f"kept {report['kept']:,} stored entries of {report['dense_prunable']:,} dense prunable "
                 f"weights: sparsity {100 * sp['vs_dense']:.2f} % vs dense, "
                 f"{100 * sp['over_prunable']:.2f} % over prunable entries, "
                 f"{100 * sp['over_all_params']:.2f} % over all parameters" + (
                     f"; they compute with {report['effective_nonzero']:,} effective non-zero weights "
                     "(each tensorized layer's kept cores multiplied out to its dense weight)"
                     if report["effective_nonzero"] != report["kept"] else ""))
    cov = report["coverage"]
    left = cov["not_pruned"]
    stdout.print(f"the prunable tensors hold {100 * cov['prunable_share']:.2f} % of the model's "
                 f"{report['all_params']:,} parameters" + (
                     f"; weights not pruned: {', '.join(f'{n} ({k:,})' for n, k in left.items())}"
                     if left else ""))
    rep = report["repair"]
    beyond = rep["added"] - rep.get("dropped", 0)
    reach = report["reachability"]
    if rep.get("dropped"):
        stdout.print(f"reconnect: {rep['cut_outputs']} output(s) were cut off the input; "
                     f"{rep['dropped']:,} of the lowest-scored kept entries swapped for {rep['added']:,} "
                     f"that reach them ({reach['outputs_reached']} of {reach['outputs']} outputs now reached)"
                     + (f", {beyond:,} beyond the budget of {report['budget']:,}" if beyond else
                        ", within the budget"))
    elif rep["added"]:
        stdout.print(f"path repair: {rep['added']:,} entries added beyond the budget of "
                     f"{report['budget']:,} to reconnect the input to every output")
    elif rep.get("mode") == "off" and reach.get("checked") and reach["outputs_reached"] < reach["outputs"]:
        stdout.print(f"{reach['outputs'] - reach['outputs_reached']} of {reach['outputs']} outputs depend on "
                     "no input (constant logits): kept as selected (--no-reconnect)")
