"""The execution planner: how each compressed layer should run on *this* machine.

For every tensorized (or pruned dense) layer and a batch size, three ways exist:

* ``kernel`` -- the compiled sparse chain (:mod:`tedepr_cli.kernels`): work proportional to
  the kept core entries, one call per layer;
* ``dense`` -- rebuild the dense weight once and use BLAS: no speed win from the
  factorization, but unbeatable for small layers and large batches;
* ``torch`` -- the chain in torch ops (dense cores): the reference path.

The cost model of DESIGN §4 (chain FLOPs vs dense FLOPs at measured throughputs, plus
per-call overheads) ranks them; a quick interleaved timing of each candidate on the
layer's real input decides. A final whole-model check keeps the plan only if the model is
not slower than its dense rebuild beyond noise (DESIGN: "inference through tedepr is never
slower than the dense model it came from"). Plans are stored in the artifact with a
machine fingerprint and re-made when the machine differs; any layer can be overridden.

**Fusion.** At small batches a sparse layer computes for about as long as one Python -> C
call and an output tensor cost, so the planner also looks for *chains of layers*: it
traces the model with ``torch.fx`` (tensorized layers as leaves) and finds each maximal run
``[flatten(1)] -> linear -> relu -> linear -> ... [-> relu]`` of Linear-like layers (TT/TR
Linear with a linear chain, ``nn.Linear``) whose intermediate values have no other user.
Such a run becomes one :class:`~tedepr_cli.kernels.cpu.FusedSequence` (one C call for the
whole run) when it is measured faster than the per-layer plan and its outputs equal the
unfused model's within 1e-5 relative; anything else keeps the per-layer plan. The plan
records each fusion under ``"fusions"`` (and ``"fused"`` on its layers' rows).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree
from torch import Tensor, nn

from .artifact import Artifact
from .console import log
from .errors import UsageError
from .tensorized.base import TensorizedLayer
from .tensorized.conv import ChainConv2d

CHOICES = ("kernel", "dense", "torch")
PLANNER_VERSION = 2  # stored plans of another version are re-made (2: fusions)
# Throughputs of DESIGN §4 (one core, fp32): what the estimate assumes before timing.
DENSE_GFLOPS = {1: 25.0, 32: 52.0}
KERNEL_GFLOPS = 30.0
TORCH_CHAIN_GFLOPS = 20.0
CALL_OVERHEAD_S = {"kernel": 3e-6, "dense": 4e-6, "torch_step": 16e-6}
GUARD_SLACK = 1.05  # the whole model may be at most 5 % slower than its dense rebuild (noise)
FUSION_RTOL = 1e-5  # a fused run must equal the unfused model within this relative error
FUSION_CHUNKS = (0, 16, 32, 64)  # batch chunks a fused run is timed with (0: the kernel's auto choice)


def fingerprint() -> dict[str, Any]:
    """What makes a plan valid: CPU, torch version, compiled kernel availability/flags."""
    from .kernels import build

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    st = build.status()
    return {"cpu": cpu, "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "torch": torch.__version__, "kernel": bool(st.get("available")),
            "kernel_flags": st.get("flags")}


# ---------------------------------------------------------------------------- modules
class KernelConv2d(nn.Module):
    """A conv chain whose 1×1 core steps run in the compiled kernel (inference only)."""

    def __init__(self, layer: ChainConv2d, masks: list[Tensor | None], threads: int) -> None:
        from .kernels.cpu import ConvChainKernel

        super().__init__()
        self.layer = layer
        self.kernel = ConvChainKernel(layer, masks, threads)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.layer(x)
        return self.kernel(x)


def _core_masks(name: str, layer: nn.Module, masks: dict[str, Tensor]) -> list[Tensor | None]:
    return [masks.get(f"{name}.cores.{i}") for i in range(len(layer.cores))]


def _dense_module(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        w = layer.dense_weight().detach()
        if isinstance(layer, ChainConv2d):
            m = nn.Conv2d(layer.in_features, layer.out_features, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=layer.bias is not None)
        else:
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        m.weight.copy_(w)
        if layer.bias is not None:
            m.bias.copy_(layer.bias.detach())
    return m.eval()


def _kernel_module(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int) -> nn.Module:
    from .kernels.cpu import KernelLinear

    if isinstance(layer, ChainConv2d):
        return KernelConv2d(layer, _core_masks(name, layer, masks), threads).eval()
    if isinstance(layer, nn.Linear):
        return KernelLinear(layer, masks.get(f"{name}.weight"), threads).eval()
    return KernelLinear(layer, _core_masks(name, layer, masks), threads).eval()


def candidates(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, nn.Module]:
    """Layers the planner decides for: tensorized layers and pruned ``nn.Linear``s."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorizedLayer) or (isinstance(mod, nn.Linear) and f"{name}.weight" in masks):
            out[name] = mod
    return out


def options(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int
            ) -> dict[str, Callable[[], nn.Module]]:
    """The ways ``layer`` can run here, as module factories."""
    from .kernels import build
    from .kernels.cpu import supports

    opts: dict[str, Callable[[], nn.Module]] = {}
    if isinstance(layer, nn.Linear):  # a pruned dense layer: BLAS or the 1-core sparse chain
        opts["dense"] = lambda: layer
        if build.available():
            opts["kernel"] = lambda: _kernel_module(name, layer, masks, threads)
        return opts
    opts["torch"] = lambda: layer
    if layer.chain == "linear":
        opts["dense"] = lambda: _dense_module(layer)
        if build.available() and supports(layer):
            opts["kernel"] = lambda: _kernel_module(name, layer, masks, threads)
    return opts


def estimate(layer: nn.Module, name: str, masks: dict[str, Tensor], batch: int, choice: str) -> float:
    """Seconds the cost model expects for one forward of ``batch`` samples."""
    rate = DENSE_GFLOPS[1] if batch < 8 else DENSE_GFLOPS[32]
    if isinstance(layer, nn.Linear):
        dense = 2 * batch * layer.in_features * layer.out_features
        kept = int(masks[f"{name}.weight"].sum())
        return (dense / rate / 1e9 + CALL_OVERHEAD_S["dense"] if choice == "dense"
                else 2 * batch * kept / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"])
    if choice == "dense":
        return layer.dense_flops(batch) / rate / 1e9 + CALL_OVERHEAD_S["dense"]
    if choice == "kernel":
        ms = _core_masks(name, layer, masks)
        kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
        return layer.chain_flops(batch, kept) / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"]
    return (layer.chain_flops(batch) / TORCH_CHAIN_GFLOPS / 1e9
            + CALL_OVERHEAD_S["torch_step"] * len(layer.cores))


def _time(fns: dict[str, Callable[[], Any]], reps: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call, interleaved so drift hits every candidate alike."""
    for f in fns.values():
        f()
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            ts[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _capture_inputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def plan_execution(art: Artifact, batch: int, threads: int = 1, timing: bool = True,
                   overrides: dict[str, str] | None = None, reps: int = 15, fuse: bool = True,
                   seed: int = 0) -> dict[str, Any]:
    """Choose kernel / dense / torch for every candidate layer of ``art`` at ``batch``, then
    fuse chains of Linear-like layers where that is faster (``fuse=False``: never). The
    timings run on ``batch`` uniform random inputs drawn with ``seed``."""
    overrides = overrides or {}
    for pat, c in overrides.items():
        if c not in CHOICES:
            raise UsageError(f"override {pat}={c}: choose one of {', '.join(CHOICES)}")
    torch.set_num_threads(threads)
    model = art.model.eval()
    cands = candidates(model, art.masks)
    x = torch.rand(batch, *art.input_shape, generator=torch.Generator().manual_seed(seed))
    inputs = _capture_inputs(model, list(cands), x) if timing else {}
    layers: dict[str, Any] = {}
    for name, layer in cands.items():
        opts = options(name, layer, art.masks, threads)
        est = {c: estimate(layer, name, art.masks, batch, c) for c in opts}
        forced = next((c for p, c in overrides.items() if fnmatch.fnmatchcase(name, p)), None)
        row: dict[str, Any] = {"type": type(layer).__name__,
                               "estimate_us": {c: round(1e6 * s, 2) for c, s in est.items()}}
        if forced is not None:
            if forced not in opts:
                raise UsageError(f"{name} cannot run as {forced!r} here (available: {', '.join(opts)})")
            row.update(choice=forced, reason="override")
        elif timing and name in inputs:
            mods = {c: f() for c, f in opts.items()}
            xin = inputs[name]
            with torch.no_grad():
                t = _time({c: (lambda m=m, xin=xin: m(xin)) for c, m in mods.items()}, reps)
            row["measured_us"] = {c: round(1e6 * s, 2) for c, s in t.items()}
            best = min(t, key=t.get)
            row.update(choice=best, reason="fastest measured")
        else:
            best = min(est, key=est.get)
            row.update(choice=best, reason="cost model" if timing is False else "layer not reached")
        layers[name] = row
    plan = {"planner": PLANNER_VERSION, "batch": batch, "threads": threads, "fingerprint": fingerprint(),
            "layers": layers, "fusions": [], "guard": None}
    if fuse:
        _plan_fusions(art, plan, x, threads, timing, overrides, reps)
    if timing and (cands or plan["fusions"]):
        plan["guard"] = _guard(art, plan, x, threads, reps)
    return plan


def _guard(art: Artifact, plan: dict[str, Any], x: Tensor, threads: int, reps: int) -> dict[str, Any]:
    """Whole model: planned vs every layer rebuilt dense. Fall back if the plan is slower."""
    planned = build_model(art, plan, threads)
    dense_plan = {**plan, "fusions": [], "layers": {n: {**r, "choice": "dense" if "dense" in options(
        n, art.model.get_submodule(n), art.masks, threads) else r["choice"]}
        for n, r in plan["layers"].items()}}
    dense = build_model(art, dense_plan, threads)
    with torch.no_grad():
        t = _time({"planned": lambda: planned(x), "dense": lambda: dense(x)}, reps)
    out = {"planned_us": round(1e6 * t["planned"], 2), "dense_rebuild_us": round(1e6 * t["dense"], 2),
           "fallback": False}
    if t["planned"] > GUARD_SLACK * t["dense"]:
        log.info(f"execution plan at batch {plan['batch']} was slower than the dense rebuild: using dense")
        for n, r in plan["layers"].items():
            if r["reason"] != "override":
                r["choice"] = dense_plan["layers"][n]["choice"]
                r["reason"] = "whole-model guard: dense rebuild was faster"
            r.pop("fused", None)
        plan["fusions"] = []
        out["fallback"] = True
    return out


# ---------------------------------------------------------------------------- fusion
def fusable(layer: nn.Module) -> bool:
    """Linear-like layers a fused run may hold: ``nn.Linear`` and TT/TR Linear with a
    linear chain (what the compiled kernel packs as a chain or a matrix)."""
    from .kernels.cpu import supports
    from .tensorized.tr import TRLinear
    from .tensorized.tt import TTLinear

    return isinstance(layer, nn.Linear) or (isinstance(layer, TTLinear | TRLinear) and supports(layer))


class _LeafTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps tensorized layers whole (as ``torch.nn`` modules are)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, TensorizedLayer) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's graph, or None where it cannot be traced (data-dependent control flow,
    unusual inputs): such a model simply keeps its per-layer plan."""
    try:
        return _LeafTracer().trace(model)
    except Exception as e:  # tracing is an optimisation: any failure means "no fusion"
        log.debug(f"fusion: the model cannot be traced with torch.fx ({type(e).__name__}: {e})")
        return None


def _is_relu(n: torch.fx.Node, model: nn.Module) -> bool:
    """``F.relu(x)``, ``torch.relu(x)``, ``x.relu()`` or an ``nn.ReLU`` module (in place or not)."""
    if not n.args or not isinstance(n.args[0], torch.fx.Node) or set(n.kwargs) - {"inplace"}:
        return False
    if n.op == "call_function" and n.target in (torch.nn.functional.relu, torch.relu):
        return len(n.args) == 1 or (len(n.args) == 2 and isinstance(n.args[1], bool))
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return len(n.args) == 1 and not n.kwargs
    if n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
        return isinstance(model.get_submodule(str(n.target)), nn.ReLU)
    return False


def _is_flatten1(n: torch.fx.Node, model: nn.Module) -> bool:
    """``x.flatten(1)``, ``torch.flatten(x, 1)`` or ``nn.Flatten()`` (dims 1 .. -1)."""
    if n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
        m = model.get_submodule(str(n.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if not ((n.op == "call_method" and n.target == "flatten")
            or (n.op == "call_function" and n.target is torch.flatten)):
        return False
    if not n.args or not isinstance(n.args[0], torch.fx.Node):
        return False
    start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
    end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
    return start == 1 and end == -1 and set(n.kwargs) <= {"start_dim", "end_dim"}


def find_runs(model: nn.Module, allowed: Callable[[str, nn.Module], bool] | None = None,
              graph: torch.fx.Graph | None = None) -> list[dict[str, Any]]:
    """Maximal runs ``[flatten(1)] -> L -> [relu] -> L -> ... [-> relu]`` of fusable layers
    ``L`` (and ``allowed(name, layer)``) in ``model``'s traced graph, where every value
    inside a run has exactly one user (the next op of the run). A run holds >= 2 layers, or
    one layer and its ReLU. Returns ``[{"layers", "acts", "flatten"}]`` (module names)."""
    graph = graph if graph is not None else _trace(model)
    if graph is None:
        return []

    def linear(n: object) -> bool:
        if not isinstance(n, torch.fx.Node) or n.op != "call_module" or n.kwargs or len(n.args) != 1 \
                or not isinstance(n.args[0], torch.fx.Node):
            return False
        m = model.get_submodule(str(n.target))
        return fusable(m) and (allowed is None or allowed(str(n.target), m))

    runs, taken = [], set()
    for node in graph.nodes:
        if node in taken or not linear(node):
            continue
        layers, acts, cur = [node], [], node
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if linear(u) and u.args[0] is cur and u not in taken:
                acts.append(None)
                layers.append(u)
                cur = u
            elif _is_relu(u, model) and u.args[0] is cur:
                nxt = next(iter(u.users)) if len(u.users) == 1 else None
                acts.append("relu")
                if nxt is not None and linear(nxt) and nxt.args[0] is u and nxt not in taken:
                    layers.append(nxt)
                    cur = nxt
                    continue
                break  # a trailing ReLU: its output leaves the run
            else:
                break
        acts += [None] * (len(layers) - len(acts))
        if len(layers) < 2 and acts[-1] is None:
            continue
        src = node.args[0]
        flat = isinstance(src, torch.fx.Node) and _is_flatten1(src, model) and len(src.users) == 1
        taken.update(layers)
        runs.append({"layers": [str(n.target) for n in layers], "acts": acts, "flatten": bool(flat)})
    return runs


def _variant(name: str, layer: nn.Module, masks: dict[str, Tensor]) -> str:
    """How a fused layer is packed: ``matrix`` (an ``nn.Linear``'s kept weights), ``chain``
    (the pruned cores) or ``dense`` (the rebuilt weight as a 1-core chain), whichever does
    fewer multiply-adds (a small layer's rebuilt matrix can be cheaper than its chain)."""
    if isinstance(layer, nn.Linear):
        return "matrix"
    ms = _core_masks(name, layer, masks)
    kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
    return "chain" if layer.chain_flops(1, kept) <= layer.dense_flops(1) else "dense"


def fused_module(model: nn.Module, fusion: dict[str, Any], masks: dict[str, Tensor], threads: int = 1
                 ) -> nn.Module:
    """The :class:`FusedSequence` of one recorded fusion, over ``model``'s layers."""
    from .kernels.cpu import FusedSequence, SparseChainKernel

    kernels, layers = [], []
    for name, variant in zip(fusion["layers"], fusion["variants"], strict=True):
        layer = model.get_submodule(name)
        layers.append(layer)
        with torch.no_grad():
            if variant == "matrix":
                kernels.append(SparseChainKernel.from_linear(layer, masks.get(f"{name}.weight"), threads))
            elif variant == "chain":
                kernels.append(SparseChainKernel.from_layer(layer, _core_masks(name, layer, masks), threads))
            else:
                kernels.append(SparseChainKernel.from_dense(layer.dense_weight().detach(), layer.bias,
                                                            threads=threads))
    return FusedSequence(kernels, fusion["acts"], layers, fusion["flatten"], threads,
                         fusion.get("chunk", 0)).eval()


def _apply_fusions(art: Artifact, model: nn.Module, plan: dict[str, Any], threads: int) -> nn.Module:
    """Rewrite ``model`` (a planned copy of ``art.model``) so each recorded fusion is one
    call. The graph comes from tracing ``art.model``; a recorded run that no longer matches
    the traced graph is skipped (with a warning) and its layers keep their plain forwards."""
    from .kernels import build

    if not build.available():
        log.warning("fused execution needs the compiled kernels (unavailable here): running unfused")
        return model
    graph = _trace(art.model)
    if graph is None:
        log.warning("the model cannot be traced any more: running its recorded fusions unfused")
        return model
    by_target = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    valid = []
    for f in plan["fusions"]:  # each recorded run must still be a run of the (unrewritten) graph
        want = {k: f[k] for k in ("layers", "acts", "flatten")}
        runs = find_runs(art.model, lambda n, m, names=set(f["layers"]): n in names, graph=graph)
        if want in runs:
            valid.append(f)
        else:
            log.warning(f"fusion {'+'.join(f['layers'])} does not match the model's graph: running unfused")
    for i, f in enumerate(valid):
        name = f"tedepr_fused{i}"
        model.add_module(name, fused_module(art.model, f, art.masks, threads))
        nodes = [by_target[n] for n in f["layers"]]
        first, last = nodes[0], nodes[-1]
        if f["acts"][-1] is not None:
            last = next(iter(last.users))
        src = first.args[0]
        doomed = []
        if f["flatten"]:
            doomed.append(src)
            src = src.args[0]
        for n in nodes[:-1]:  # each layer, and the ReLU after it
            user = next(iter(n.users))
            doomed += [n] if user in nodes else [n, user]
        doomed += [nodes[-1]] if last is nodes[-1] else [nodes[-1], last]
        with graph.inserting_before(doomed[0]):
            new = graph.call_module(name, (src,))
        last.replace_all_uses_with(new)
        for n in reversed(doomed):
            graph.erase_node(n)
    graph.lint()
    nodes = list(graph.nodes)
    if len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"] \
            and not nodes[0].args and nodes[1].args == (nodes[0],) and nodes[2].args == (nodes[1],):
        return model.get_submodule(str(nodes[1].target))  # the whole model is one run: no wrapper
    return torch.fx.GraphModule(model, graph).eval()


def _plan_fusions(art: Artifact, plan: dict[str, Any], x: Tensor, threads: int, timing: bool,
                  overrides: dict[str, str], reps: int) -> None:
    """Record in ``plan["fusions"]`` each run that is faster fused (measured, or by the cost
    model without timing) and equal to the unfused model within ``FUSION_RTOL``."""
    from .kernels import build

    if not build.available() or x.device.type != "cpu":
        return
    rows = plan["layers"]

    def allowed(name: str, layer: nn.Module) -> bool:  # an overridden layer keeps its choice
        return rows.get(name, {}).get("reason") != "override"

    batch = plan["batch"]
    for run in find_runs(art.model, allowed):
        variants = [_variant(n, art.model.get_submodule(n), art.masks) for n in run["layers"]]
        fusion = {**run, "variants": variants, "chunk": 0}
        trial = {**plan, "fusions": [*plan["fusions"], fusion]}
        if not timing:
            fused_s = sum(_fused_flops(art, n, v, batch) for n, v in zip(run["layers"], variants,
                                                                        strict=True)) / KERNEL_GFLOPS / 1e9
            fused_s += CALL_OVERHEAD_S["kernel"]
            unfused_s = sum(_row_estimate_s(rows.get(n)) for n in run["layers"])
            if fused_s < unfused_s:
                fusion.update(reason="cost model", estimate_us={"fused": round(1e6 * fused_s, 2),
                                                                "unfused": round(1e6 * unfused_s, 2)})
                _record(plan, fusion)
            continue
        base = build_model(art, plan, threads)
        fused = build_model(art, trial, threads)
        err = _rel_err(fused, base, x)
        if err > FUSION_RTOL:
            log.info(f"fusion {'+'.join(run['layers'])} rejected: output differs by {err:.1e} relative")
            continue
        fns: dict[str, Callable[[], Any]] = {"unfused": lambda m=base: m(x)}
        mods = {0: fused}
        for ch in FUSION_CHUNKS[1:]:
            if ch <= batch:  # a larger chunk is the same call as chunk == batch
                mods[ch] = build_model(art, {**plan, "fusions": [*plan["fusions"], {**fusion, "chunk": ch}]},
                                       threads)
        fns.update({f"chunk{c}": (lambda m=m: m(x)) for c, m in mods.items()})
        with torch.no_grad():
            t = _time(fns, reps)
        best = min((k for k in t if k != "unfused"), key=t.get)
        fusion["chunk"] = int(best[len("chunk"):])
        fusion["measured_us"] = {"fused": round(1e6 * t[best], 2), "unfused": round(1e6 * t["unfused"], 2)}
        fusion["max_rel_err"] = float(f"{err:.3g}")
        if t[best] < t["unfused"]:
            fusion["reason"] = "fastest measured"
            _record(plan, fusion)
        else:
            log.debug(f"fusion {'+'.join(run['layers'])} not faster: {fusion['measured_us']}")


def _record(plan: dict[str, Any], fusion: dict[str, Any]) -> None:
    name = f"fused{len(plan['fusions'])}"
    plan["fusions"].append({"name": name, **fusion})
    for n in fusion["layers"]:
        if n in plan["layers"]:
            plan["layers"][n]["fused"] = name


def _fused_flops(art: Artifact, name: str, variant: str, batch: int) -> int:
    layer = art.model.get_submodule(name)
    if variant == "matrix":
        m = art.masks.get(f"{name}.weight")
        kept = int(m.sum()) if m is not None else int((layer.weight != 0).sum())
        return 2 * batch * kept
    if variant == "dense":
        return layer.dense_flops(batch)
    ms = _core_masks(name, layer, art.masks)
    kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
    return layer.chain_flops(batch, kept)


def _row_estimate_s(row: dict[str, Any] | None) -> float:
    """The cost model's seconds for a planned layer (a plain, unplanned Linear: one dense call)."""
    if row is None:
        return CALL_OVERHEAD_S["dense"]
    return row["estimate_us"][row["choice"]] / 1e6


def _rel_err(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest relative difference between the two models' outputs (every output tensor)."""
    with torch.no_grad():
        ya, yb = a(x), b(x)
    la = [t for t in torch.utils._pytree.tree_leaves(ya) if isinstance(t, Tensor)]
    lb = [t for t in torch.utils._pytree.tree_leaves(yb) if isinstance(t, Tensor)]
    if len(la) != len(lb):
        return float("inf")
    err = 0.0
    for p, q in zip(la, lb, strict=True):
        if p.shape != q.shape:
            return float("inf")
        p, q = p.double(), q.double()
        err = max(err, float((p - q).norm() / max(float(q.norm()), 1e-30)))
    return err


def build_model(art: Artifact, plan: dict[str, Any], threads: int = 1) -> nn.Module:
    """A copy of ``art.model`` whose layers run as ``plan`` says (inference only): per-layer
    choices, and each recorded fusion as one :class:`FusedSequence` (the model then is a
    ``torch.fx.GraphModule``, or the fused module itself when the whole model is one run)."""
    model = copy.deepcopy(art.model).eval()
    fused = {n for f in plan.get("fusions") or [] for n in f["layers"]}
    for name, row in plan["layers"].items():
        if name in fused:
            continue
        layer = model.get_submodule(name)
        choice = row["choice"]
        if choice == "torch" or (choice == "dense" and isinstance(layer, nn.Linear)):
            continue
        opts = options(name, layer, art.masks, threads)
        if choice not in opts:  # e.g. a stored "kernel" plan on a machine without a compiler
            log.warning(f"{name}: {choice!r} is not available here; using its torch forward")
            continue
        _set(model, name, opts[choice]())
    if plan.get("fusions"):
        return _apply_fusions(art, model, plan, threads)
    return model


def plan_for(art: Artifact, batch: int, threads: int = 1, overrides: dict[str, str] | None = None,
             replan: bool = False, seed: int = 0) -> tuple[dict[str, Any], bool]:
    """The stored plan for ``batch`` if it was made on this machine, else a fresh one.
    Returns (plan, fresh)."""
    stored = (art.meta.get("execution") or {}).get("plans", {}).get(str(batch))
    if stored and not replan and not overrides and stored.get("fingerprint") == fingerprint() \
            and stored.get("threads") == threads and stored.get("planner") == PLANNER_VERSION:
        return stored, False
    if stored and not replan and not overrides:
        log.info(f"stored execution plan for batch {batch} was made on another machine: re-planning")
    return plan_execution(art, batch, threads, overrides=overrides, seed=seed), True


def store_plan(art: Artifact, plan: dict[str, Any]) -> None:
    """Keep ``plan`` in ``art.meta["execution"]["plans"][str(batch)]`` (saved with the
    artifact), where :func:`plan_for` finds it on the next run on this machine."""
    plans = art.meta.setdefault("execution", {}).setdefault("plans", {})
    plans[str(plan["batch"])] = {k: v for k, v in plan.items() if k not in ("fresh", "flops")}


def flop_share(art: Artifact, plan: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one forward by where they run: sparse/factorized kernels vs dense."""
    batch = plan["batch"]
    kern = dense = torch_chain = 0
    variant = {n: v for f in plan.get("fusions") or []
               for n, v in zip(f["layers"], f["variants"], strict=True)}
    for name, row in plan["layers"].items():
        layer = art.model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            f_dense = 2 * batch * layer.in_features * layer.out_features
            f_kern = 2 * batch * int(art.masks[f"{name}.weight"].sum())
        else:
            ms = _core_masks(name, layer, art.masks)
            kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
            f_dense, f_kern = layer.dense_flops(batch), layer.chain_flops(batch, kept)
        choice = row["choice"]
        if name in variant:  # fused: the chain runs in the kernel, a rebuilt matrix is dense work
            choice = "dense" if variant[name] == "dense" else "kernel"
        if choice == "kernel":
            kern += f_kern
        elif choice == "dense":
            dense += f_dense
        else:
            torch_chain += layer.chain_flops(batch) if not isinstance(layer, nn.Linear) else f_dense
    total = kern + dense + torch_chain
    return {"kernel_flops": kern, "dense_flops": dense, "torch_chain_flops": torch_chain,
            "share_on_sparse_or_factorized": (kern + torch_chain) / total if total else 0.0}
