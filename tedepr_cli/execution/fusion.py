"""Fusion: find runs ``[flatten(1)] -> linear -> relu -> linear ...`` of Linear-like layers in
the model's ``torch.fx`` graph, decide which are faster as one compiled call, and rewrite the
graph so each chosen run is one :class:`~tedepr_cli.kernels.cpu.FusedSequence`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree
from torch import Tensor, nn

from .. import timing as timer
from ..logs import log
from ..tensorized.base import TensorizedLayer
from .cost import CALL_OVERHEAD_S, KERNEL_GFLOPS, fused_flops, row_estimate_s
from .modules import core_masks

FUSION_RTOL = 1e-5  # a fused run must equal the unfused model within this relative error
FUSION_CHUNKS = (0, 16, 32, 64)  # batch chunks a fused run is timed with (0: the kernel's auto choice)


def fusable(layer: nn.Module) -> bool:
    """Linear-like layers a fused run may hold: ``nn.Linear`` and TT/TR Linear with a
    linear chain (what the compiled kernel packs as a chain or a matrix)."""
    from ..kernels.cpu import supports
    from ..tensorized.tr import TRLinear
    from ..tensorized.tt import TTLinear

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


def variant(name: str, layer: nn.Module, masks: dict[str, Tensor]) -> str:
    """How a fused layer is packed: ``matrix`` (an ``nn.Linear``'s kept weights), ``chain``
    (the pruned cores) or ``dense`` (the rebuilt weight as a 1-core chain), whichever does
    fewer multiply-adds (a small layer's rebuilt matrix can be cheaper than its chain)."""
    if isinstance(layer, nn.Linear):
        return "matrix"
    ms = core_masks(name, layer, masks)
    kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
    return "chain" if layer.chain_flops(1, kept) <= layer.dense_flops(1) else "dense"


def fused_module(model: nn.Module, fusion: dict[str, Any], masks: dict[str, Tensor], threads: int = 1
                 ) -> nn.Module:
    """The :class:`FusedSequence` of one recorded fusion, over ``model``'s layers."""
    from ..kernels.cpu import FusedSequence, SparseChainKernel

    kernels, layers = [], []
    for name, variant in zip(fusion["layers"], fusion["variants"], strict=True):
        layer = model.get_submodule(name)
        layers.append(layer)
        with torch.no_grad():
            if variant == "matrix":
                kernels.append(SparseChainKernel.from_linear(layer, masks.get(f"{name}.weight"), threads))
            elif variant == "chain":
                kernels.append(SparseChainKernel.from_layer(layer, core_masks(name, layer, masks), threads))
            else:
                kernels.append(SparseChainKernel.from_dense(layer.dense_weight().detach(), layer.bias,
                                                            threads=threads))
    return FusedSequence(kernels, fusion["acts"], layers, fusion["flatten"], threads,
                         fusion.get("chunk", 0)).eval()


def apply_fusions(src: nn.Module, masks: dict[str, Tensor], model: nn.Module, plan: dict[str, Any],
                  threads: int) -> nn.Module:
    """Rewrite ``model`` (a planned copy of ``src``, the model with its masks folded in) so
    each recorded fusion is one call. The graph comes from tracing ``src``; a recorded
    run that no longer matches the traced graph is skipped (with a warning) and its layers
    keep their plain forwards."""
    from ..kernels import build

    if not build.available():
        log.warning("fused execution needs the compiled kernels (unavailable here): running unfused")
        return model
    graph = _trace(src)
    if graph is None:
        log.warning("the model cannot be traced any more: running its recorded fusions unfused")
        return model
    by_target = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    valid = []
    for f in plan["fusions"]:  # each recorded run must still be a run of the (unrewritten) graph
        want = {k: f[k] for k in ("layers", "acts", "flatten")}
        runs = find_runs(src, lambda n, m, names=set(f["layers"]): n in names, graph=graph)
        if want in runs:
            valid.append(f)
        else:
            log.warning(f"fusion {'+'.join(f['layers'])} does not match the model's graph: running unfused")
    for i, f in enumerate(valid):
        name = f"tedepr_fused{i}"
        model.add_module(name, fused_module(src, f, masks, threads))
        nodes = [by_target[n] for n in f["layers"]]
        first, last = nodes[0], nodes[-1]
        if f["acts"][-1] is not None:
            last = next(iter(last.users))
        inp = first.args[0]  # the run's input node (not ``src``: the model is needed again)
        doomed = []
        if f["flatten"]:
            doomed.append(inp)
            inp = inp.args[0]
        for n in nodes[:-1]:  # each layer, and the ReLU after it
            user = next(iter(n.users))
            doomed += [n] if user in nodes else [n, user]
        doomed += [nodes[-1]] if last is nodes[-1] else [nodes[-1], last]
        with graph.inserting_before(doomed[0]):
            new = graph.call_module(name, (inp,))
        last.replace_all_uses_with(new)
        for n in reversed(doomed):
            graph.erase_node(n)
    graph.lint()
    nodes = list(graph.nodes)
    if len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"] \
            and not nodes[0].args and nodes[1].args == (nodes[0],) and nodes[2].args == (nodes[1],):
        return model.get_submodule(str(nodes[1].target))  # the whole model is one run: no wrapper
    return torch.fx.GraphModule(model, graph).eval()


def plan_fusions(src: nn.Module, masks: dict[str, Tensor], build: Callable[[dict[str, Any]], nn.Module],
                 plan: dict[str, Any], x: Tensor, threads: int, timed: bool, reps: int) -> None:
    """Record in ``plan["fusions"]`` each run of ``src`` (the model, masks folded in) that is
    faster fused (measured when ``timed``, else by the cost model) and equal to the unfused
    model within ``FUSION_RTOL``. ``build(plan)`` makes the runnable model of a plan."""
    from ..kernels import build as kbuild

    if not kbuild.available() or x.device.type != "cpu":
        return
    rows = plan["layers"]

    def allowed(name: str, layer: nn.Module) -> bool:  # an overridden layer keeps its choice
        return rows.get(name, {}).get("reason") != "override"

    batch = plan["batch"]
    for run in find_runs(src, allowed):
        variants = [variant(n, src.get_submodule(n), masks) for n in run["layers"]]
        fusion = {**run, "variants": variants, "chunk": 0}
        trial = {**plan, "fusions": [*plan["fusions"], fusion]}
        if not timed:
            fused_s = sum(fused_flops(src.get_submodule(n), n, masks, v, batch)
                          for n, v in zip(run["layers"], variants, strict=True)) / KERNEL_GFLOPS / 1e9
            fused_s += CALL_OVERHEAD_S["kernel"]
            unfused_s = sum(row_estimate_s(rows.get(n)) for n in run["layers"])
            if fused_s < unfused_s:
                fusion.update(reason="cost model", estimate_us={"fused": round(1e6 * fused_s, 2),
                                                                "unfused": round(1e6 * unfused_s, 2)})
                _record(plan, fusion)
            continue
        base = build(plan)
        fused = build(trial)
        err = _rel_err(fused, base, x)
        if err > FUSION_RTOL:
            log.info(f"fusion {'+'.join(run['layers'])} rejected: output differs by {err:.1e} relative")
            continue
        fns: dict[str, Callable[[], Any]] = {"unfused": lambda m=base: m(x)}
        mods = {0: fused}
        for ch in FUSION_CHUNKS[1:]:
            if ch <= batch:  # a larger chunk is the same call as chunk == batch
                mods[ch] = build({**plan, "fusions": [*plan["fusions"], {**fusion, "chunk": ch}]})
        fns.update({f"chunk{c}": (lambda m=m: m(x)) for c, m in mods.items()})
        with torch.no_grad():
            t = timer.medians(fns, reps, clock=timer.call_clock(threads))
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


def _rel_err(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest relative difference between the two models' outputs (every output tensor)."""
    with torch.no_grad():
        return outputs_rel_err(a(x), b(x))


def outputs_rel_err(ya: Any, yb: Any) -> float:
    """Largest relative L2 difference ``|p - q| / |q|`` over the output tensors of two
    models (any nesting of tuples/lists/dicts; inf if they differ in structure or shape)."""
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
