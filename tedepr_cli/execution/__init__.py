"""The execution planner: how each compressed layer should run on *this* machine.

For every tensorized (or pruned dense) layer and a batch size, three ways exist:

* ``kernel`` -- the compiled sparse chain (:mod:`tedepr_cli.kernels`): work proportional to
  the kept core entries, one call per layer;
* ``dense`` -- rebuild the dense weight once and use BLAS: no speed win from the
  factorization, but unbeatable for small layers and large batches;
* ``torch`` -- the chain in torch ops (dense cores): the reference path.

The cost model of DESIGN §4 (chain FLOPs vs dense FLOPs at measured throughputs, plus
per-call overheads) ranks them; an interleaved timing of each candidate on the layer's
real input decides (medians of per-call CPU time).

**Runtimes** (:mod:`.runtimes`). The whole model then runs on one of: that per-layer plan
(``layers``), the compressed ONNX in onnxruntime (``chain-ort``, as bench calls it; ``onnx``
before, still accepted), or the model rebuilt in its
original dense layer types on torch or onnxruntime (``dense-torch``, ``dense-ort``). The
planner times them side by side with the *original* dense model on torch and onnxruntime
and picks a compressed runtime only if it beats the dense original's best runtime (median
and majority of paired rounds); otherwise it says so and runs dense there (DESIGN:
"inference through tedepr is never slower than the dense model it came from"). Plans are
stored in the artifact with a machine fingerprint, re-made when the machine or planner
version differs, and re-checked cheaply at load (:func:`~.planner.recheck`); any layer or
the runtime can be overridden.

**Fusion.** At small batches a sparse layer computes for about as long as one Python -> C
call and an output tensor cost, so the planner also looks for *chains of layers*: it
traces the model with ``torch.fx`` (tensorized layers as leaves) and finds each maximal run
``[flatten(1)] -> linear -> relu -> linear -> ... [-> relu]`` of Linear-like layers (TT/TR
Linear with a linear chain, ``nn.Linear``) whose intermediate values have no other user.
Such a run becomes one :class:`~tedepr_cli.kernels.cpu.FusedSequence` (one C call for the
whole run) when it is measured faster than the per-layer plan and its outputs equal the
unfused model's within 1e-5 relative; anything else keeps the per-layer plan. The plan
records each fusion under ``"fusions"`` (and ``"fused"`` on its layers' rows).

Layout: :mod:`.modules` (what a layer can run as), :mod:`.cost` (the cost model),
:mod:`.fusion` (fx pattern matching and graph rewriting), :mod:`.runtimes` (whole-model
runtimes, the dense model, onnxruntime as a module), :mod:`.planner` (decisions, the
runtime choice, :func:`build_model`, :func:`recheck`), :mod:`.store` (plans kept in artifacts);
the machine fingerprint is :func:`tedepr_cli.machine.fingerprint`, the timer
:func:`tedepr_cli.timing.medians`.
"""

from .cost import flop_share
from .fusion import find_runs, fusable, fused_module
from .modules import CHOICES, candidates, options
from .planner import build_layers, build_model, plan_execution, plan_for, recheck
from .runtimes import RUNTIMES, OrtModule, Runtimes, dense_model, runtime_name
from .store import store_plan

__all__ = ["CHOICES", "RUNTIMES", "OrtModule", "Runtimes", "build_layers", "build_model", "candidates",
           "runtime_name", "dense_model", "find_runs", "flop_share", "fusable", "fused_module", "options",
           "plan_execution", "plan_for", "recheck", "store_plan"]
