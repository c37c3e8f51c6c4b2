"""Whole-model runtimes: the ways a compressed model can run end to end, and the dense
original the planner measures them against.

``layers``       the per-layer plan (compiled kernels / dense rebuilds / torch chains, fused
                 runs) in torch: :func:`.planner.build_layers` (built from a plan, not here)
``chain-ort``    the compressed model's ``onnx-fast`` graph (:func:`tedepr_cli.export.fast_onnx`:
                 each compressed layer on the faster of its chain ops and its dense rebuild) in
                 stock onnxruntime: the graph ``tedepr export --to onnx-fast`` writes and
                 ``tedepr bench``'s engine of the same name times (the plain ``export.to_onnx``
                 graph where the fast one cannot be built). Called ``onnx`` before: that name
                 is still accepted, with a deprecation warning (:func:`runtime_name`)
``dense-torch``  the compressed model's function in the *original* dense layer types
                 (:func:`dense_model`: each chain rebuilt into ``nn.Linear``/``nn.Conv2d``,
                 a tensorized LSTM into ``nn.LSTM``, attention into ``nn.MultiheadAttention``)
                 in torch
``dense-ort``    the same dense model exported to ONNX, in onnxruntime

The baseline (what "faster than dense" means) is the *original* dense model on its best
runtime, dense torch or dense onnxruntime: built from the artifact's architecture (random
weights with a seed: same shapes, same speed), or, where no architecture is known (the
Python API on a model you hold), :func:`dense_model` itself, which has the original's layer
types. onnxruntime sessions run with ``intra_op_num_threads=threads`` (one thread: on the
calling thread, so per-call CPU time measures them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..artifact import Artifact
from ..logs import log

RUNTIMES = ("layers", "chain-ort", "dense-torch", "dense-ort")
COMPRESSED = ("layers", "chain-ort")
RENAMED = {"onnx": "chain-ort"}  # old runtime name -> current (plan --runtime, stored plans)
DENSE = ("dense-torch", "dense-ort")
ONNX_OPSET = 18
ONNX_RTOL = 1e-4  # an onnxruntime or dense runtime must equal the torch model within this (relative)


def runtime_name(name: str, deprecated_ok: bool = True) -> str:
    """The current name of the runtime ``name``: one of :data:`RUNTIMES`, or an old name in
    :data:`RENAMED` (``onnx`` -> ``chain-ort``; a deprecation warning is logged). Raises
    :class:`~tedepr_cli.errors.UsageError` for anything else."""
    from ..errors import UsageError

    if name in RENAMED and deprecated_ok:
        log.warning(f"runtime {name!r} is deprecated: it is now called {RENAMED[name]!r}, the name "
                    f"tedepr bench uses for the same engine")
        return RENAMED[name]
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    return name


def renamed_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A stored plan with the runtimes of :data:`RENAMED` under their current names (plans
    stored before the rename say ``onnx``); other plans are returned as they are."""
    def fix(x: Any) -> Any:
        if isinstance(x, str):
            return RENAMED.get(x, x)
        if isinstance(x, dict):
            return {RENAMED.get(k, k): fix(v) for k, v in x.items()}
        return x

    if plan.get("runtime") not in RENAMED and not any(
            k in RENAMED for k in (plan.get("runtimes") or {}).get("measured_us") or {}):
        return plan
    return {**plan, "runtime": fix(plan.get("runtime")), "runtimes": fix(plan.get("runtimes") or {})}


#: onnxruntime graph optimization levels the planner tries for each onnxruntime runtime:
#: ``all`` (onnxruntime's default: also the layout transforms, e.g. blocked NCHWc convolutions
#: with reorders between them), ``basic`` (constant folding and redundant-node removal
#: only) and ``extended`` (``basic`` plus the node fusions, e.g. Conv+Relu into one
#: FusedConv, MatMul+Add into Gemm, without the layout transforms). None wins everywhere:
#: the dense ResNet-20 is 1.7x faster on ``all``, its compressed graph 1.1x faster on
#: ``basic`` or ``extended`` (a reorder around every small chain convolution), the dense
#: LeNet-5 1.1x faster on ``extended`` or ``basic``. Ties go to the earlier level.
ORT_LEVELS = ("all", "basic", "extended")


def ort_session(source: Path | bytes, threads: int, device: torch.device | None = None,
                level: str = "all") -> Any:
    """An onnxruntime session over an ONNX file or its bytes on ``device``'s execution
    provider (CPU by default), ``threads`` intra-op threads, one inter-op thread, graph
    optimization ``level`` (one of :data:`ORT_LEVELS`; ``ValueError`` otherwise)."""
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise ValueError(f"onnxruntime level must be one of {ORT_LEVELS}, got {level!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[level]
    so.log_severity_level = 3
    cuda = device is not None and device.type == "cuda"
    provider: Any = ("CUDAExecutionProvider", {"device_id": device.index or 0}) if cuda \
        else "CPUExecutionProvider"
    src = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(src, so, providers=[provider])


_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))  # what OrtModule passes on without a copy


class OrtModule(nn.Module):
    """An ONNX model in an onnxruntime CPU session as an ``nn.Module`` (inference only):
    takes a CPU tensor ``(B, *sample)`` (floats as float32, token ids as they are) and
    returns the first output as a tensor (several outputs: a tuple). ``onnx``: the
    serialized ``ModelProto``; ``level``: the graph optimization level (:func:`ort_session`)."""

    def __init__(self, onnx: bytes, threads: int = 1, level: str = "all") -> None:
        super().__init__()
        self.onnx = onnx
        self.threads = threads
        self.level = level
        self.session = ort_session(onnx, threads, level=level)
        self.input_name = self.session.get_inputs()[0].name
        self._outputs = [o.name for o in self.session.get_outputs()]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        # the common case (a CPU float32 or int64 batch, no grad) is one torch call, ``numpy()``,
        # checked on the numpy side (onnxruntime copies a non-contiguous array itself): each
        # torch call costs tens of µs when its code is out of cache (the cold regime of
        # ``benchmarks/speed_table.py``)
        try:
            a = x.numpy()
        except (RuntimeError, TypeError):  # requires grad, or not on the CPU
            a = None
        if a is None or a.dtype not in _FAST_DTYPES:
            x = x.detach().to("cpu")
            x = (x.to(torch.float32) if x.is_floating_point() else x).contiguous()  # ids stay as they are
            a = x.numpy()
        out = self.session.run(self._outputs, {self.input_name: a})
        if len(out) == 1:
            return torch.from_numpy(out[0])
        return tuple(torch.from_numpy(o) for o in out)

    def __deepcopy__(self, memo: dict[int, Any]) -> OrtModule:
        return OrtModule(self.onnx, self.threads, self.level).train(self.training)

    def extra_repr(self) -> str:
        return f"onnxruntime, {len(self.onnx):,} bytes of ONNX, {self.threads} thread(s), level {self.level}"


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], fast: bool = False) -> bytes:
    """``model`` (masks folded in) as ONNX with a dynamic batch axis, traced at batch 2,
    serialized: :func:`tedepr_cli.export.to_onnx`, or with ``fast`` the ``onnx-fast`` graph
    (:func:`tedepr_cli.export.fast_onnx`, which times its candidates in onnxruntime: a few
    seconds more); where that fails, the plain graph (logged)."""
    from ..export import fast_onnx, to_onnx
    from ..surgery import example_input

    # token ids (int64) for a model that starts with an embedding, floats otherwise
    example = example_input(model, input_shape, 2, "zeros")
    if fast:
        try:
            return fast_onnx(model, example, ONNX_OPSET)[0].SerializeToString()
        except Exception as e:  # noqa: BLE001 - the plain graph is the same function
            log.info(f"the onnx-fast graph cannot be built ({type(e).__name__}: {e}): "
                     "chain-ort runs the plain compressed graph")
    return to_onnx(model, example, ONNX_OPSET).SerializeToString()


def _dense_lstm(layer: nn.Module) -> nn.LSTM:
    lstm = nn.LSTM(layer.ih[0].in_features, layer.hidden_size, num_layers=layer.num_layers,
                   bias=bool(layer._spec.get("bias", True)), batch_first=layer.batch_first,
                   bidirectional=layer.bidirectional)
    with torch.no_grad():
        for idx, name in enumerate(layer._suffixes()):
            ih = layer.ih[idx]
            getattr(lstm, f"weight_ih_{name}").copy_(ih.dense_weight().detach())
            getattr(lstm, f"weight_hh_{name}").copy_(getattr(layer, f"weight_hh_{name}").detach())
            if lstm.bias:
                getattr(lstm, f"bias_ih_{name}").copy_(ih.bias.detach() if ih.bias is not None else 0.0)
                getattr(lstm, f"bias_hh_{name}").copy_(getattr(layer, f"bias_hh_{name}").detach())
    return lstm


def _dense_mha(layer: nn.Module) -> nn.MultiheadAttention:
    e = layer.embed_dim
    mha = nn.MultiheadAttention(e, layer.num_heads, bias=layer.in_proj.bias is not None,
                                batch_first=layer.batch_first)
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.in_proj.dense_weight().detach())
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(layer.in_proj.bias.detach())
        out = layer.out_proj
        w = out.dense_weight() if hasattr(out, "cores") else out.weight
        mha.out_proj.weight.copy_(w.detach())
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(out.bias.detach() if out.bias is not None else 0.0)
    return mha


def dense_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` (masks folded in, eval mode) computing the same function in the
    original dense layer types: linear-chain TT/TR Linear and Conv2d become ``nn.Linear``/
    ``nn.Conv2d`` (:func:`~tedepr_cli.tensorized.layers.to_dense_layer`), a tensorized LSTM
    ``nn.LSTM`` and tensorized attention ``nn.MultiheadAttention``; pruned dense layers keep
    their zeros. Returns (model, names of tensorized layers left as they are: nonlinear
    chains, which have no single dense weight)."""
    from ..masks import folded_copy
    from ..surgery import swap_module
    from ..tensorized.base import TensorizedLayer
    from ..tensorized.layers import to_dense_layer
    from ..tensorized.wrappers import TensorizedLSTM, TensorizedMHA

    out = folded_copy(model).eval()
    left: list[str] = []
    done: list[str] = []
    for name, mod in list(out.named_modules()):
        if any(name.startswith(f"{d}.") for d in done):
            continue
        try:
            if isinstance(mod, TensorizedLSTM):
                new: nn.Module = _dense_lstm(mod)
            elif isinstance(mod, TensorizedMHA):
                new = _dense_mha(mod)
            elif isinstance(mod, TensorizedLayer):
                if mod.chain != "linear":
                    left.append(name)
                    continue
                new = to_dense_layer(mod)
            else:
                continue
        except ValueError:  # a nonlinear projection inside a wrapper
            left.append(name)
            continue
        swap_module(out, name, new.eval())
        done.append(name)
    return out, left


def original_model(art: Artifact, seed: int = 0) -> tuple[nn.Module, str]:
    """The dense original the planner measures against, in eval mode, and what it is: the
    artifact's architecture built with random weights drawn with ``seed`` (timing only:
    same shapes, same speed), else (no architecture, or it cannot be built)
    :func:`dense_model` of the compressed model."""
    if art.arch is not None:
        from ..arch import build

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build(art.arch, allow_import=art.arch.is_import).eval(), \
                    f"the original architecture ({art.arch.name}, random weights)"
        except Exception as e:  # an architecture that does not build here: the rebuild stands in
            log.info(f"the dense original cannot be built ({type(e).__name__}: {e}): measuring the "
                     "compressed model rebuilt in dense layers instead")
    return dense_model(art.model)[0], "the compressed model rebuilt in the original dense layer types"


class Runtimes:
    """Builds (once each) the whole-model runtimes of one artifact and thread count, and the
    dense original's torch and onnxruntime versions. A runtime that cannot be built here
    (an export failure, onnxruntime missing) is recorded in :attr:`unavailable` with the
    reason."""

    def __init__(self, art: Artifact, threads: int = 1, seed: int = 0) -> None:
        self.art, self.threads, self.seed = art, threads, seed
        self._mods: dict[str, nn.Module] = {}
        self._onnx: dict[str, bytes] = {}
        #: graph optimization level of each onnxruntime runtime (``chain-ort``, ``dense-ort``,
        #: ``original:dense-ort``); absent: ``all``. The planner sets the ones it measured.
        self.levels: dict[str, str] = {}
        self._dense: tuple[nn.Module, list[str]] | None = None
        self.unavailable: dict[str, str] = {}
        self.baseline_source: str | None = None

    def dense(self) -> tuple[nn.Module, list[str]]:
        if self._dense is None:
            self._dense = dense_model(self.art.model)
        return self._dense

    def _ort(self, key: str, model: nn.Module, fast: bool = False, level: str | None = None
             ) -> nn.Module | None:
        if key in self.unavailable:
            return None
        level = level or self.levels.get(key, "all")
        if f"{key}@{level}" not in self._mods:
            try:
                if key not in self._onnx:  # exported once, whatever the levels it runs at
                    self._onnx[key] = onnx_bytes(model, self.art.input_shape, fast)
                self._mods[f"{key}@{level}"] = OrtModule(self._onnx[key], self.threads, level).eval()
            except Exception as e:  # export or session failure: this runtime is not available here
                why = (str(e).splitlines() or [type(e).__name__])[0]
                self.unavailable[key] = f"{type(e).__name__}: {why}"
                log.info(f"runtime {key} unavailable: {self.unavailable[key]}")
                return None
        return self._mods[f"{key}@{level}"]

    def baseline(self, runtime: str, level: str | None = None) -> nn.Module | None:
        """The dense original on ``runtime`` (``dense-torch`` or ``dense-ort``; onnxruntime at
        ``level``, by default the one in :attr:`levels`)."""
        if "original" not in self._mods:
            self._mods["original"], self.baseline_source = original_model(self.art, self.seed)
        if runtime == "dense-torch":
            return self._mods["original"]
        return self._ort(f"original:{runtime}", self._mods["original"], level=level)

    def module(self, runtime: str, level: str | None = None) -> nn.Module | None:
        """The compressed model running on ``runtime`` (None where it cannot run here; an
        onnxruntime one at ``level``, by default the one in :attr:`levels`); ``layers``
        depends on a plan: :func:`.planner.build_model` builds it."""
        if runtime == "chain-ort":
            return self._ort("chain-ort", self.art.model, fast=True, level=level)
        dense, left = self.dense()
        if left:
            why = f"no dense equivalent of {', '.join(left)} (nonlinear chain)"
            self.unavailable.setdefault(runtime, why)
            return None
        if runtime == "dense-torch":
            return dense
        if runtime == "dense-ort":
            return self._ort("dense-ort", dense, level=level)
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
