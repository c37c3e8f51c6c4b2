"""The engines ``tedepr bench`` times, each built into a zero-argument call that runs one
batch (the timing loop and the memory probe of :mod:`.memory` share these builders).

``dense-torch``  the dense baseline in PyTorch (the reference every speed-up divides)
``dense-ort``    the dense baseline exported to ONNX, in onnxruntime
``chain-torch``  the compressed model, reference torch chain
``tedepr``       the compressed model on the runtime its execution plan chose (the per-layer
                 plan on the compiled CPU kernels, the compressed ONNX in onnxruntime, or,
                 where nothing beats the dense original, the dense model on its best runtime)
``chain-ort``    the compressed model's ONNX in onnxruntime: the ``onnx-fast`` graph (each
                 compressed layer on its faster standard-op body), in stock onnxruntime; with
                 ``Engines(ort_kernel=True)`` its ``TedeprChain`` nodes run the compiled kernel
                 through the custom-op library instead (measured slower: see the README)
``triton``       the compressed model with its sparse chains in the Triton kernel (CUDA; on
                 the CPU only under ``TRITON_INTERPRET=1``, Triton's interpreter: correct,
                 and far slower than anything else)
``dense-torch-graph``, ``chain-torch-graph``, ``triton-graph``
                 the same three torch engines captured once in a CUDA graph
                 (``torch.cuda.CUDAGraph``) and replayed: one launch per call instead of one
                 per kernel, which is what small models at small batches pay for on a GPU
                 (CUDA only; the dense graph is one of the dense original's runtimes)

On ``--device cuda`` the torch and Triton engines run on the GPU and the onnxruntime ones
on its CUDA execution provider (inputs and outputs bound on the device); ``tedepr`` is a
CPU engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifact import Artifact
from ..errors import BadInput, opt

ENGINES = ("dense-torch", "dense-ort", "chain-torch", "tedepr", "chain-ort", "triton",
           "dense-torch-graph", "chain-torch-graph", "triton-graph")
ORT_ENGINES = ("dense-ort", "chain-ort")
GRAPH_ENGINES = {"dense-torch-graph": "dense-torch", "chain-torch-graph": "chain-torch",
                 "triton-graph": "triton"}  # CUDA-graph engine -> the engine it replays
BASELINE = "dense-torch"
# the dense original's runtimes: the best is the bar
DENSE_ENGINES = ("dense-torch", "dense-ort", "dense-torch-graph")


def input_batch(art: Artifact, batch: int, seed: int) -> torch.Tensor:
    """The benchmark input: ``batch`` uniform [0, 1) samples of the model's shape (CPU), or
    uniform token ids for a model that starts with an embedding."""
    from ..surgery import example_input

    return example_input(art.model, art.input_shape, batch, "rand", torch.Generator().manual_seed(seed))


def ort_provider(device: torch.device) -> str:
    return "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"


def ort_session(path: Path, threads: int, device: torch.device, kernel: bool = False,
                level: str = "all") -> Any:
    """An onnxruntime session on ``device``'s execution provider, ``threads`` intra-op threads,
    graph optimization ``level`` (:func:`tedepr_cli.execution.runtimes.ort_session`);
    ``kernel``: on the CPU with tedepr's custom-op library registered (``TedeprChain`` nodes
    run the compiled kernel, :func:`tedepr_cli.kernels.ort_ops.session`; default level)."""
    if kernel:
        from ..kernels.ort_ops import session as kernel_session

        return kernel_session(path, threads, sparse=True)
    from ..execution.runtimes import ort_session as session

    return session(path, threads, device, level)


def ort_level(plan: dict[str, Any] | None, engine: str) -> str:
    """The onnxruntime graph optimization level the execution plan measured fastest for
    ``engine`` (``dense-ort``: the dense original's; ``chain-ort``: the compressed graph's),
    ``all`` (onnxruntime's default) without a plan or a measurement."""
    return (((plan or {}).get("runtimes") or {}).get("ort_levels") or {}).get(engine, "all")


def _ort_call(sess: Any, x: torch.Tensor, device: torch.device) -> Callable[[], Any]:
    """One timed call of ``sess`` on ``x``, every graph input fed by name (:func:`ort_feed`:
    a token graph's ``attention_mask`` all ones for the ids alone)."""
    from ..export import ort_feed

    feed = ort_feed([i.name for i in sess.get_inputs()], x.numpy())
    if device.type != "cuda":
        return lambda: sess.run(None, feed)
    bound = {k: torch.from_numpy(v).to(device).contiguous() for k, v in feed.items()}  # once: no host copy
    io = sess.io_binding()
    for name, xd in bound.items():
        io.bind_input(name, "cuda", device.index or 0, feed[name].dtype, list(xd.shape), xd.data_ptr())
    for o in sess.get_outputs():
        io.bind_output(o.name, "cuda", device.index or 0)

    def call() -> None:
        sess.run_with_iobinding(io)
        _ = bound  # keep the bound inputs alive as long as the call

    return call


class Engines:
    """Builds each engine's model (once) and its one-batch call.

    ``art``: the compressed artifact; ``base``: the dense baseline (None: ``dense-torch``
    unavailable); ``onnx``: the ONNX file of each onnxruntime engine to build;
    ``ort_kernel``: ``chain-ort`` registers the custom-op library (CPU only)."""

    def __init__(self, art: Artifact, base: nn.Module | None, device: torch.device, threads: int,
                 onnx: dict[str, Path] | None = None, ort_kernel: bool = False) -> None:
        self.art, self.base, self.device, self.threads = art, base, device, threads
        self.ort_kernel = ort_kernel
        self.onnx = dict(onnx or {})
        self._models: dict[str, Any] = {}
        self.triton_layers: list[str] = []
        self._runtimes: Any = None

    @property
    def runtimes(self) -> Any:
        """The execution runtimes of the compressed model (built once, shared by the planner
        and the tedepr engine)."""
        if self._runtimes is None:
            from ..execution import Runtimes

            self._runtimes = Runtimes(self.art, self.threads)
        return self._runtimes

    def _on_device(self, m: nn.Module) -> nn.Module:
        """``m`` itself on the CPU; a copy on another device (the artifact stays on the CPU)."""
        return m.eval() if self.device.type == "cpu" else copy.deepcopy(m).to(self.device).eval()

    def model(self, name: str, level: str = "all") -> Any:
        """The torch module (or onnxruntime session, at graph optimization ``level``) behind an
        engine, on the device."""
        key = name if level == "all" or name not in ORT_ENGINES else f"{name}@{level}"
        if key in self._models:
            return self._models[key]
        if name == "dense-torch":
            if self.base is None:
                raise ValueError("no dense baseline was given")
            m: Any = self._on_device(self.base)
        elif name == "chain-torch":
            m = self._on_device(self.art.model)
        elif name == "triton":
            from ..kernels.triton import triton_model

            m, self.triton_layers = triton_model(self.art.model, self.art.masks, self.device)
        elif name in ORT_ENGINES:
            kernel = name == "chain-ort" and self.ort_kernel and self.device.type == "cpu"
            m = ort_session(self.onnx[name], self.threads, self.device, kernel, level)
        else:
            raise ValueError(f"engine {name} has no single model (the tedepr engine is built per plan)")
        self._models[key] = m
        return m

    def runner(self, name: str, x: torch.Tensor, plan: dict[str, Any] | None = None) -> Callable[[], Any]:
        """A call running engine ``name`` on the batch ``x`` (a CPU tensor, moved to the
        device here, outside the call); ``plan``: the execution plan at this batch (the
        tedepr engine's runtime; the onnxruntime engines' graph optimization levels,
        :func:`ort_level`, on the CPU)."""
        if name in ORT_ENGINES:
            level = ort_level(plan, name) if self.device.type == "cpu" else "all"
            return _ort_call(self.model(name, level), x, self.device)
        if name in GRAPH_ENGINES:
            return cuda_graph_call(self.runner(GRAPH_ENGINES[name], x), self.device)
        if name == "tedepr":
            from ..execution import build_model

            if plan is None:
                raise ValueError("the tedepr engine needs an execution plan")
            m: Any = build_model(self.art, plan, self.threads, runtimes=self.runtimes)
        else:
            m = self.model(name)
        xd = x.to(self.device)
        return lambda: m(xd)


def cuda_graph_call(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], Any]:
    """``fn`` (a zero-argument call on ``device``'s tensors, run under ``torch.no_grad()``)
    captured once in a CUDA graph; returns the replay (same output buffers every call).

    Warm-up runs on a side stream first (lazy initialisation, Triton's compilation, cuBLAS
    workspaces), as capture requires. Raises RuntimeError when ``device`` is not CUDA or
    ``fn`` cannot be captured (it synchronises with the host, or allocates pinned memory).
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    # the graph reads and writes fixed addresses: whatever ``fn`` holds (its input on the
    # device, the model) must live as long as the replay, or the allocator hands it out again
    replay.keep_alive = fn  # type: ignore[attr-defined]
    return replay


def load_baseline(art: Artifact, baseline: Path | None, seed: int = 0) -> tuple[nn.Module, bool]:
    """The dense original: from ``--baseline`` (weights into the target's architecture), or
    the architecture freshly built with ``seed`` (same shapes: same speed; no accuracy).
    Returns (model, has_real_weights)."""
    from ..arch import build
    from ..loading import load_model

    if art.arch is None:
        raise BadInput("the target has no architecture reference to build its dense baseline from")
    if baseline is not None:
        base = load_model(baseline, art.arch)
        if base.meta.get("tensorization") or base.masks:
            raise BadInput(f"{opt('baseline')} {baseline} is itself compressed; give the dense checkpoint")
        return base.model.eval(), True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(art.arch, allow_import=art.arch.is_import).eval(), False
