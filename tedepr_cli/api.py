"""The Python API: compress any ``nn.Module`` you hold, train it your way, store it.

The module is what flows between the stages; an artifact is only how it is stored::

    import tedepr_cli as tedepr
    model = tedepr.tensorize(net, format="tt", rank="auto", sparsity=0.995, example_input=x[:1])
    report = tedepr.prune(model, sparsity=0.995, batches=loader)   # masks ride on the model
    my_own_training_loop(model, loader)        # pruned entries stay exactly 0, any optimizer
    tedepr.save(model, "out/", arch="mypkg.models:Net")
    tedepr.export_onnx(model, "out/model.onnx", example_input=x[:2])

Pruning masks are ``torch.nn.utils.parametrize`` parametrizations of the pruned parameters
(as ``torch.ao.pruning`` does), so every read of a pruned weight is ``original * mask``: any
optimizer, weight decay, momentum, AMP or third-party trainer keeps pruned entries exactly
zero (:mod:`tedepr_cli.masks`). :func:`save` folds the masks into compact storage and
:func:`load` re-attaches them.

Every function raises :class:`~tedepr_cli.errors.TedeprError` subclasses for bad input
(``UsageError`` for bad options, ``BadInput`` for models or data that do not fit,
``CollapseError`` when pruning would cut a layer, ``ValidationError`` when an export
disagrees with PyTorch) and never changes the caller's thread count, tensorly backend or the
train/eval mode of a model it does not return.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arch import ArchSpec, parse_arch
from .artifact import Artifact, load_artifact, save_artifact
from .decompose import DecomposeOptions, tensorize_model
from .errors import BadInput, UsageError
from .masks import get_masks, remove_masks
from .pruning.criteria import CriterionOptions
from .pruning.prune import PruneOptions, auto_rank, prune_model
from .surgery import eval_mode, feed, input_kind

__all__ = ["tensorize", "from_linear", "from_conv2d", "prune", "get_masks", "remove_masks", "save", "load",
           "accelerate", "export_onnx"]


def _input_shape(model: nn.Module, example_input: Tensor | None) -> tuple[int, ...]:
    """One sample's shape: from ``example_input`` (batch first), else ``model.input_shape``."""
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() < 2:
            raise UsageError("example_input must be a tensor with a batch dimension, e.g. x[:1]")
        return tuple(int(s) for s in example_input.shape[1:])
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise UsageError("pass example_input (a batch, e.g. x[:1]): the model declares no input_shape")
    return tuple(int(s) for s in shape)


def _declare_input(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Record the input a tensorized model takes (``input_shape``/``input_kind``, as the zoo
    models declare them), so later stages and artifacts know it."""
    model.input_shape = shape
    model.input_kind = input_kind(model, shape)


def tensorize(model: nn.Module, *, example_input: Tensor | None = None, format: str = "tt",
              rank: int | str = "auto", sparsity: float | None = None, coarse_ratio: float = 4.0,
              compression: float | None = None, modes: int | str = "auto", chain: str = "linear",
              init: str = "pretrained", init_variance: str = "he", include: Iterable[str] = (),
              exclude: Iterable[str] = (), seed: int = 0, inplace: bool = False,
              lstm_hh: str = "dense") -> nn.Module:
    """Coarse grain: replace ``model``'s Linear, Conv2d (groups=1), LSTM,
    MultiheadAttention and Embedding layers by tensor-train (``format="tt"``; TT-matrix,
    Novikov et al. 2015; TT-embedding, Khrulkov et al. 2019) or tensor-ring (``"tr"``;
    TR-Nets, Wang et al. 2018; embeddings stay dense) chains.

    Args:
        model: any ``nn.Module``; a copy is tensorized unless ``inplace``.
        example_input: a batch ``(B, *sample_shape)`` (e.g. ``x[:1]``); needed unless the model
            declares ``input_shape``. The returned model declares ``input_shape``.
        rank: uniform TT/TR rank, or ``"auto"``: with ``sparsity`` the largest rank whose cores
            hold about ``coarse_ratio`` × the pruning budget (the one-shot rule of
            ``tedepr prune``), without it rank 8 clipped to each layer's full rank.
        compression: instead of ``rank``, the per-layer ratio dense/cores to reach.
        modes: modes per side (``"auto"``: 2-4, the least chain work), ``format``, ``chain``
            (``"linear"`` or ``"nonlinear"``), ``include``/``exclude`` (module-name globs):
            as ``tedepr decompose``.
        lstm_hh: an LSTM's hidden-to-hidden matrices ``W_hh``: ``"dense"`` (default, the
            TT-LSTM protocol) or ``"tensorized"`` (chains H -> 4H like ``W_ih``; as
            ``tedepr decompose --lstm-hh``).
        init: ``"pretrained"`` (TT-SVD/TR-SVD of the layer's weights, tensorly) or
            ``"random"`` (variance-preserving, ``init_variance`` ``"he"`` or ``"lecun"``).

    Returns the tensorized model (in eval mode if ``model`` was). Raises ``UsageError``
    for bad options and ``BadInput`` when no layer can be tensorized.
    """
    shape = _input_shape(model, example_input)
    out = model if inplace else copy.deepcopy(model)
    opts = DecomposeOptions(format=format, chain=chain, init=init, init_variance=init_variance,
                            modes=modes, compression=compression, include=list(include),
                            exclude=list(exclude), seed=seed, rank=8, lstm_hh=lstm_hh)
    if rank == "auto":
        if sparsity is not None and compression is None:
            popts = PruneOptions(sparsity=sparsity, coarse_ratio=coarse_ratio, seed=seed)
            popts.validate()
            opts.rank = auto_rank(out, shape, opts, popts)
    elif isinstance(rank, int) and not isinstance(rank, bool):
        opts.rank = rank
    else:
        raise UsageError(f"rank must be a positive int or 'auto', got {rank!r}")
    tensorize_model(out, shape, opts)
    _declare_input(out, shape)
    return out


def _from_layer(layer: nn.Module, input_shape: tuple[int, ...], format: str, rank: int,
                compression: float | None, modes: int | str, chain: str, init: str, seed: int) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(layer))
    opts = DecomposeOptions(format=format, rank=rank, compression=compression, modes=modes, chain=chain,
                            init=init, include=["0"], seed=seed)
    tensorize_model(holder, input_shape, opts)
    return holder[0]


def from_linear(linear: nn.Linear, *, format: str = "tt", rank: int = 8, compression: float | None = None,
                modes: int | str = "auto", chain: str = "linear", init: str = "pretrained",
                seed: int = 0) -> nn.Module:
    """A TT-matrix (``format="tt"``, Novikov et al. 2015) or tensor-ring (``"tr"``) Linear
    initialized from ``linear``'s weight by TT-SVD/TR-SVD (``init="pretrained"``) and taking
    its bias: the drop-in replacement, as tensorly-torch's ``FactorizedLinear.from_linear``.
    ``linear`` is not changed. Raises ``BadInput`` when no factorization of the requested
    ``rank``/``modes`` is smaller than the layer."""
    return _from_layer(linear, (linear.in_features,), format, rank, compression, modes, chain, init, seed)


def from_conv2d(conv: nn.Conv2d, input_hw: tuple[int, int], *, format: str = "tt", rank: int = 8,
                compression: float | None = None, modes: int | str = "auto", chain: str = "linear",
                init: str = "pretrained", seed: int = 0) -> nn.Module:
    """The 3-step TT/TR conv chain (input cores, k×k conv in rank space, output cores;
    TR-Nets, Wang et al. 2018) replacing ``conv`` (groups=1), initialized from its kernel.
    ``input_hw``: the (height, width) of the conv's input in pixels. Raises ``BadInput`` for a
    grouped conv or a factorization that would not be smaller."""
    return _from_layer(conv, (conv.in_channels, *input_hw), format, rank, compression, modes, chain, init,
                       seed)


def _take_batches(batches: Iterable[Any], n: int) -> list[tuple[Tensor, Tensor]]:
    out = []
    for item in itertools.islice(iter(batches), n):
        if not isinstance(item, list | tuple) or len(item) < 2 or not all(
                isinstance(t, Tensor) for t in item[:2]):
            raise UsageError("batches must yield (inputs, labels) pairs of tensors, as a DataLoader does")
        out.append((item[0], item[1]))
    if not out:
        raise BadInput("batches yielded nothing to score with")
    return out


def prune(model: nn.Module, *, sparsity: float, batches: Iterable[Any] | None = None,
          criterion: str | None = None, example_input: Tensor | None = None, scope: str = "global",
          min_density: float = 0.0, connectivity: bool = True, score_mode: str = "eval",
          min_paths: int = 0, grain: str = "entry", path_pool: float = 1.0, reconnect: bool = True,
          seed: int = 0, **criterion_options: Any) -> dict[str, Any]:
    """Fine grain: prune ``model`` in place at initialization and attach the masks to it.

    Prunable are the cores of tensorized layers and the weights of dense Linear/Conv2d/LSTM/
    attention layers; the budget keeps ``round((1 - sparsity) × D)`` entries where ``D`` is
    the dense original's prunable weight count.

    Args:
        sparsity: fraction of the dense model's prunable weights to remove, in (0, 1).
        batches: an iterable of ``(x, y)`` tensor pairs (a ``DataLoader``); the first few
            (``steps + 1`` for the default criterion) are used. ``None``: data-free (the
            default criterion falls back to SynFlow).
        criterion: ``"tedepr"`` (default; trainability, ProsPr-style, Alizadeh et al. 2022),
            ``"snip"``, ``"grasp"``, ``"synflow"``, ``"force"``, ``"magnitude"``, ``"random"``.
        example_input: a batch, needed unless the model declares ``input_shape``.
        scope: ``"global"``, ``"normalized"`` or ``"layer"``; ``min_density``: a floor per tensor.
        min_paths: the path floor, every tensorized layer keeps at least this many rank paths
            through its cores (as many as its ranks hold; 0 or 1: only the collapse guard's one).
        grain: ``"entry"`` (single core entries) or ``"path"`` (whole rank paths, chosen by
            saliency per kept entry; :mod:`tedepr_cli.pruning.paths`). ``path_pool``: 1 keeps
            whole paths only (at most the budget), ``F > 1`` pools paths up to ``F ×`` the
            budget and keeps exactly the budget's best entries within them.
        reconnect: where the selection leaves some outputs depending on no input (constant
            logits), swap the fewest best-scored entries that reconnect them for as many of
            the lowest-scored kept ones (the kept count stays the budget; the report's
            ``repair`` says what moved). ``False``: keep the selection and warn.
        criterion_options: ``steps``, ``inner_lr``, ``rounds``, ``iterations``,
            ``temperature``, ``micro_batch`` (samples differentiated at a time; memory only;
            see ``tedepr prune --help``).

    Returns the pruning report (``kept``, ``budget``, the three ``sparsity`` figures, per-layer
    rows). The model's train/eval mode and buffers are unchanged. Raises ``UsageError``,
    ``BadInput`` and ``CollapseError`` (a layer would lose every path).
    """
    shape = _input_shape(model, example_input)
    try:
        copts = CriterionOptions(**criterion_options)
    except TypeError as e:
        raise UsageError(f"unknown criterion option: {e}") from None
    opts = PruneOptions(sparsity=sparsity, criterion=criterion, scope=scope, min_density=min_density,
                        connectivity=connectivity, score_mode=score_mode, seed=seed, decompose=False,
                        min_paths=min_paths, grain=grain, path_pool=path_pool, reconnect=reconnect,
                        criterion_options=copts)
    opts.validate()
    scored = None
    if batches is not None:
        scored = _take_batches(batches, max(copts.steps + 1, copts.iterations))
    return prune_model(model, opts, scored, shape)


def _arch_spec(arch: str | ArchSpec | None, arch_kwargs: dict[str, Any] | None,
               shape: tuple[int, ...]) -> ArchSpec | None:
    if arch is None or isinstance(arch, ArchSpec):
        return arch
    spec = parse_arch(arch)
    return ArchSpec(spec.name, dict(arch_kwargs or {}), shape if spec.is_import else None)


def save(model: nn.Module, path: str | Path, *, arch: str | ArchSpec | None = None,
         arch_kwargs: dict[str, Any] | None = None, example_input: Tensor | None = None,
         meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Store ``model`` as a tedepr artifact (a directory, or one ``.safetensors`` file):
    pruned tensors compactly (kept values + indices), the tensorized layers' specs and the
    masks in the manifest; written atomically with normal file modes.

    ``arch`` says how to rebuild the network on :func:`load`: a zoo name, or
    ``"pkg.module:callable"`` (with ``arch_kwargs``). ``meta`` adds manifest sections (e.g.
    ``{"pruning": report}``). Raises ``UsageError`` without ``arch`` and ``OutputError`` if
    ``path`` exists and ``overwrite`` is false.
    """
    shape = _input_shape(model, example_input)
    spec = _arch_spec(arch, arch_kwargs, shape)
    if spec is None:
        raise UsageError("save needs arch=: a zoo name or 'pkg.module:callable' that builds the "
                         "dense network (its tensorized layers and masks are stored in the file)")
    art = Artifact(model=model, arch=spec, meta=copy.deepcopy(meta or {}))
    if getattr(model, "input_shape", None) is None:
        _declare_input(art.model, shape)
    art.record("save", {"arch": spec.name})
    return save_artifact(art, path, overwrite=overwrite)


def load(path: str | Path, *, arch: str | None = None) -> nn.Module:
    """Rebuild a saved model (tensorized layers re-created, masks re-attached), in eval mode.

    An artifact whose architecture is an import path runs that module's code on load, so
    ``arch`` must name the same path to confirm it (as ``--arch`` does on the command line).
    Raises ``InputNotFound``, ``BadInput`` (not an artifact, or it does not fit) and
    ``UnsafeInput`` (an import path not confirmed by ``arch``).
    """
    return load_artifact(path, allow_import=arch).model


def accelerate(model: nn.Module, *, batch: int = 1, threads: int = 1,
               example_input: Tensor | None = None) -> nn.Module:
    """``model`` for fast CPU inference at batch size ``batch``, on the runtime that measured
    fastest on this machine (see ``tedepr plan``): the per-layer plan (each compressed layer
    on the compiled sparse chain kernel, a dense rebuild or the torch chain, consecutive
    Linear+ReLU layers fused into one C call), the compressed graph exported to ONNX in
    onnxruntime (an :class:`~tedepr_cli.execution.OrtModule`, ``threads`` intra-op threads),
    or -- when none beats the dense model on its best runtime (torch or onnxruntime) -- the
    model rebuilt in its original dense layer types on that runtime. The dense model it is
    measured against is that rebuild (the API knows no original checkpoint). Every runtime
    takes and returns torch tensors and computes the same function within 1e-4 relative.
    Inference only; ``model`` is not changed. The thread count is restored after planning;
    the plan is the returned module's ``tedepr_plan`` attribute. It always measures afresh
    (tens of seconds on a small CNN, mostly exporting and timing the onnxruntime graphs):
    plans ``tedepr plan`` stores in an artifact are reused by ``tedepr bench``, not here."""
    from .execution import Runtimes, build_model, plan_execution

    shape = _input_shape(model, example_input)
    art = Artifact(model=model, arch=None)
    if getattr(model, "input_shape", None) is None:
        art.model = copy.deepcopy(model)
        _declare_input(art.model, shape)
    prev = torch.get_num_threads()
    try:
        rt = Runtimes(art, threads)
        plan = plan_execution(art, batch, threads, runtimes=rt)
        fast = build_model(art, plan, threads, runtimes=rt)
        fast.tedepr_plan = plan
        return fast
    finally:
        torch.set_num_threads(prev)


def export_onnx(model: nn.Module, path: str | Path, *, example_input: Tensor, opset: int = 18,
                sparse: bool = False, atol: float = 1e-5, rtol: float = 1e-4,
                overwrite: bool = False) -> dict[str, Any]:
    """Export ``model`` (masks folded in) to one ONNX file with a dynamic batch axis, check it
    with ``onnx.checker`` and run it in onnxruntime against PyTorch on ``example_input``.

    ``example_input``: a batch ``(B, ...)`` with ``B >= 2`` (tracing at batch 1 would fix the
    batch axis); token arrays stacked ``(B, k, L)`` (``input_ids``, ``attention_mask``,
    ``token_type_ids``) become graph inputs of those names where the forward takes them.
    ``sparse``: store mostly-zero initializers as ONNX sparse initializers
    (onnxruntime densifies them at load). Returns the validation figures. Raises
    ``UsageError``, ``ValidationError`` (outputs differ beyond ``atol + rtol·|ref|``) and
    ``OutputError``; nothing is written on failure.
    """
    import onnx

    from .errors import ValidationError
    from .export import compare, run_onnx, sparsify_initializers, to_onnx
    from .fsutil import atomic_output

    if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.shape[0] < 2:
        raise UsageError("example_input must be a batch of at least 2 samples (e.g. x[:2])")
    path = Path(path)
    with eval_mode(model), torch.no_grad():
        ref = feed(model, example_input).numpy()
        proto = to_onnx(model, example_input, opset)
    if sparse:
        sparsify_initializers(proto)
    with atomic_output(path, overwrite=overwrite) as tmp:
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as e:
            raise ValidationError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
        check = compare(run_onnx(tmp, example_input.numpy()), ref, atol, rtol)
        if not check["ok"]:
            raise ValidationError(f"{path.name} differs from PyTorch: max abs {check['max_abs']}, "
                                  f"max rel {check['max_rel']}")
    return check
