"""How each tensorized layer runs while training: its chain, or its dense weight rebuilt.

A linear chain computes ``x -> x W^T`` without forming ``W``. At inference the execution
planner picks per layer between the chain, the compiled kernel and the dense rebuild
(:mod:`tedepr_cli.execution`); training has the same choice. The chain's FLOPs are a small
fraction of the dense layer's, but on a CPU its steps are small, memory-bound
contractions over every row (every pixel of every image for a conv), and its backward
repeats them; rebuilding ``W`` from the cores (a few thousand multiply-adds,
differentiable) and running one dense GEMM/convolution is often faster, and the gradient
reaches the cores through the rebuild. Both paths compute the same function (to float
rounding), and the masks ride on the cores either way (:mod:`tedepr_cli.masks`), so pruned
entries stay exactly zero.

Measured (one thread, batch 128, forward + backward, 99.5 %): the chain is faster on
LeNet-300-100's first layer (2.3 vs 4.8 ms) and ResNet-20's 16x16 and 8x8 stages (7.6 vs
17 ms), the rebuild on ResNet-20's 32x32 stage (21-42 vs 49-58 ms) and most of ViT-tiny's
projections (1.1 vs 2.2 ms). No FLOP rule predicts this, so ``"auto"`` measures each
layer on the run's batch shape, like the execution planner and ``cudnn.benchmark``.

The pruning criteria use the same switch for memory (:func:`lighter`): scoring through
data differentiates the model (twice, for the ``tedepr`` criterion), and autograd keeps a
chain's rank intermediates for every row, which on a wide Transformer layer are several
times the dense layer's input and output; each layer scores on the path that keeps fewer
bytes (a size, not a timing: deterministic).

A pruned TT-matrix rebuilds only the block of ``W`` its masks can reach
(:meth:`~.tt.TTLinear._rebuilt_forward`): at 99.5 % that block is often a small fraction of
``W``, so the rebuild's GEMMs shrink with the pruning.

The same byte count decides training's default (:func:`leaner`): on a CPU these small
contractions are bound by memory traffic, not arithmetic, and the bytes a path keeps for
its backward are the intermediates it writes and reads again. Measured (one thread, batch
128, 99.5 %, whole training steps): for Linear layers it picks what the timings pick where
the difference matters -- the chain for LeNet-300-100's 784x300 first layer, the rebuild
for ViT-tiny's projections (many token rows, rank-1 cores; ``auto`` rebuilt 17 of 18:
ViT-tiny's step went from about 1.5x to about 1.0x dense). It does not hold for
convolutions, whose rebuild is a full dense convolution (compute-bound: LeNet-5 went from
0.64x to 1.02x dense), so they keep their chain.

The compiled training chain (``"kernel"``, :mod:`tedepr_cli.kernels.chain_train`) is a
third way for a TT/TR Linear: the inference kernel's packed layout (each core a CSR over its
kept entries) with a compiled backward, one C call per layer and direction, no GEMM over
pruned entries, no permute copies, one autograd node. Measured (one thread, batch 128,
99.5 %, whole training steps against dense): LeNet-300-100 1.24x on ``lighter``'s chain /
rebuild mix, 0.55-0.60x on the kernel; LeNet-5's Linear layers and ViT-tiny's projections
about as fast as the best of chain and rebuild (see ``benchmarks/results/train_speed.md``).

Paths: ``"lighter"`` (the default: per Linear layer the compiled kernel where it runs
-- float32, CPU, the library built -- else the path whose backward keeps fewer bytes;
convolutions on their chain; no timings, so deterministic), ``"chain"`` (the method's own
computation everywhere), ``"dense"`` (rebuild every linear chain), ``"kernel"`` (every
TT/TR Linear on the compiled training chain; convolutions, and wherever it cannot run, the
chain), ``"auto"`` (per layer the fastest of chain, kernel and rebuild by measurement; the
choice depends on timing, so two runs may differ in float rounding: record it and pass it
back for a bit-identical rerun). Nonlinear chains and TT-embeddings always run their chain
(no single dense weight; an embedding's rebuild would be the whole table).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .base import TensorizedLayer

PATHS = ("lighter", "chain", "dense", "kernel", "auto")
LAYER_PATHS = ("chain", "dense", "kernel")  # what one layer trains on
MARGIN = 0.9  # "auto" takes the rebuild only when it is at least 10 % faster: the chain wins ties


def rebuildable(model: nn.Module) -> dict[str, TensorizedLayer]:
    """The layers of ``model`` that can train on their rebuilt dense weight (linear-chain
    tensorized Linear and Conv2d layers), by module name; not a layer whose owner only ever
    reads its rebuilt weight (``rebuilt_by_owner``: a chain ``W_hh`` of a
    :class:`~.wrappers.TensorizedLSTM`), which has no path to choose."""
    from .embedding import TTEmbedding

    return {n: m for n, m in model.named_modules()
            if isinstance(m, TensorizedLayer) and not isinstance(m, TTEmbedding) and m.chain == "linear"
            and not getattr(m, "rebuilt_by_owner", False)}


@contextmanager
def train_paths(model: nn.Module, choice: dict[str, str]) -> Iterator[None]:
    """Inside the block, the layers named in ``choice`` with ``"dense"`` run on their rebuilt
    weight whenever autograd records (``torch.is_grad_enabled()``); inference under
    ``torch.no_grad()`` keeps the chain. Restores every layer's previous path on exit.
    Raises KeyError for a name that is not a rebuildable layer of ``model``."""
    layers = rebuildable(model)
    before = {n: layers[n].train_path for n in choice}
    try:
        set_train_paths(model, choice)
        yield
    finally:
        for n, path in before.items():
            layers[n].train_path = path


def set_train_paths(model: nn.Module, choice: dict[str, str]) -> None:
    """Set each named layer's path for good (a model the caller owns, e.g. the training
    copy); :func:`train_paths` sets them for a block. Raises KeyError for an unknown name,
    ValueError for a path other than ``"chain"``/``"dense"``/``"kernel"``, or ``"kernel"``
    for a layer without a compiled training chain (a convolution)."""
    layers = rebuildable(model)
    for n, path in choice.items():
        if path not in LAYER_PATHS:
            raise ValueError(f"layer {n}: train path must be one of {', '.join(LAYER_PATHS)}, got {path!r}")
        if path == "kernel" and not layers[n].kernel_trainable():
            raise ValueError(f"layer {n}: {type(layers[n]).__name__} has no compiled training chain")
        layers[n].train_path = path


def uniform(model: nn.Module, path: str) -> dict[str, str]:
    """``path`` (``"chain"``, ``"dense"`` or ``"kernel"``) for every rebuildable layer of
    ``model``; ``"kernel"`` only for the layers that have a compiled training chain (TT/TR
    Linear) that can run here (the library built, float32 CPU parameters:
    :func:`tedepr_cli.kernels.chain_train.usable`), the others on their chain."""
    from ..kernels import chain_train

    def runs(m: TensorizedLayer) -> bool:
        return m.kernel_trainable() and chain_train.usable(*m.parameters()) is None

    layers = rebuildable(model)
    return {n: "chain" if path == "kernel" and not runs(m) else path for n, m in layers.items()}


def kernel_runs(layer: TensorizedLayer, x: Tensor) -> bool:
    """Whether ``layer`` would train on the compiled training chain for input ``x``: it has
    one and the kernel can run here (float32 CPU, the library built;
    :func:`tedepr_cli.kernels.chain_train.usable`)."""
    from ..kernels import chain_train

    return layer.kernel_trainable() and chain_train.usable(x, *layer.parameters()) is None


def layer_inputs(model: nn.Module, run: Callable[[], Any]) -> dict[str, Tensor]:
    """The input each rebuildable layer of ``model`` sees when ``run()`` calls it (eval mode,
    no autograd; the model's train/eval mode is restored)."""
    from ..surgery import eval_mode

    inputs: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:  # None: output kept
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in rebuildable(model).items()]
    try:
        with torch.no_grad(), eval_mode(model):
            run()
    finally:
        for h in hooks:
            h.remove()
    return inputs


def saved_bytes(layer: TensorizedLayer, x: Tensor, path: str) -> int:
    """Bytes autograd keeps for the backward of one forward of ``layer`` on ``x`` along
    ``path`` (every tensor saved for backward, counted through
    ``torch.autograd.graph.saved_tensors_hooks``): what a gradient through this layer
    holds in memory until its backward runs."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    before = layer.train_path
    layer.train_path = path
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x.detach().requires_grad_(x.is_floating_point()))
    finally:
        layer.train_path = before
    return total


def lighter(model: nn.Module, run: Callable[[], Any]) -> dict[str, dict[str, int | str]]:
    """Per rebuildable layer on ``run()``'s path, the path whose autograd keeps fewer bytes
    (:func:`saved_bytes` on the layer's real input), with both counts:
    ``{name: {"path", "chain_bytes", "dense_bytes"}}``. Deterministic (sizes, not timings):
    the pruning criteria score on it, since a chain's intermediates (every row times the
    rank) can be many times the dense layer's input and output."""
    out: dict[str, dict[str, int | str]] = {}
    layers = rebuildable(model)
    for name, x in layer_inputs(model, run).items():
        chain, dense = (saved_bytes(layers[name], x, p) for p in ("chain", "dense"))
        out[name] = {"path": "dense" if dense < chain else "chain", "chain_bytes": chain,
                     "dense_bytes": dense}
    return out


def leaner(model: nn.Module, x: Tensor | tuple[Tensor, ...]) -> dict[str, str]:
    """The ``"lighter"`` training path of every rebuildable layer of ``model`` on the input
    ``x`` (a training batch: the byte counts grow with its rows): for a tensorized Linear
    the compiled training chain where it runs (:func:`kernel_runs`), else the path whose
    backward keeps fewer bytes (:func:`lighter`); for a convolution its chain (see the
    module doc). Deterministic: the machine (a C compiler), shapes and masks decide, not
    timings."""
    from .conv import ChainConv2d

    layers = rebuildable(model)
    inputs = layer_inputs(model, lambda: model(*x) if isinstance(x, tuple) else model(x))
    sizes = lighter(model, lambda: model(*x) if isinstance(x, tuple) else model(x))
    out = {}
    for n, t in sizes.items():
        if isinstance(layers[n], ChainConv2d):
            out[n] = "chain"
        elif kernel_runs(layers[n], inputs[n]):
            out[n] = "kernel"
        else:
            out[n] = str(t["path"])
    return out


def measure(model: nn.Module, x: Tensor | tuple[Tensor, ...], reps: int = 5, margin: float = MARGIN
            ) -> dict[str, dict[str, float | str]]:
    """Time one forward + backward of each rebuildable layer on its chain, its rebuild and
    (where it runs, :func:`kernel_runs`) the compiled training chain, on the inputs that
    layer sees when ``model`` runs on ``x`` (a training batch: its batch size is the one
    that matters), interleaved, ``reps`` rounds after one warm-up; per layer the path to
    train with and the medians in ms: ``{name: {"path", "chain_ms", "dense_ms"[,
    "kernel_ms"]}}``. The kernel is taken when it is faster than the chain; the rebuild
    when it is ``margin`` times faster than the better of those two.

    CPU: per-call thread CPU time; CUDA: wall clock with the device synchronised. The
    model's parameters, their gradients, its train/eval mode and every layer's path are
    left as they were (the layer inputs are captured in eval mode under ``no_grad``)."""
    layers = rebuildable(model)
    if not layers:
        return {}
    inputs = layer_inputs(model, lambda: model(*x) if isinstance(x, tuple) else model(x))
    out: dict[str, dict[str, float | str]] = {}
    for name, layer in layers.items():
        if name not in inputs:  # not on this input's path
            continue
        params = list(layer.parameters())
        grads = [p.grad for p in params]
        for p in params:  # the measurement's gradients must not add to the caller's
            p.grad = None
        paths = ("chain", "dense", "kernel") if kernel_runs(layer, inputs[name]) else ("chain", "dense")
        times: dict[str, list[float]] = {p: [] for p in paths}
        try:
            for r in range(reps + 1):
                for path in paths[r % len(paths):] + paths[: r % len(paths)]:
                    t = _step(layer, inputs[name], path)
                    if r:  # round 0 warms up
                        times[path].append(t)
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best = "kernel" if "kernel" in ms and ms["kernel"] < ms["chain"] else "chain"
        path = "dense" if ms["dense"] < margin * ms[best] else best
        out[name] = {"path": path, **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}
    return out


def _step(layer: TensorizedLayer, x: Tensor, path: str) -> float:
    """Seconds of one forward + backward of ``layer`` on ``x`` along ``path``."""
    xr = x.clone().requires_grad_(x.is_floating_point())
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter() if cuda else time.thread_time()
    before = layer.train_path
    layer.train_path = path
    try:
        with torch.enable_grad():
            y = layer(xr)
            y.backward(torch.ones_like(y))
    finally:
        layer.train_path = before
    if cuda:
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() if cuda else time.thread_time()) - t0
