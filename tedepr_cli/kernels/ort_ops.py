"""The compressed ONNX's sparse path: tensorized layers as one custom op each, run by the
compiled chain kernel inside onnxruntime, with a standard-op body for any other runtime.

Each compressed layer (a TT/TR Linear or conv chain with the linear chain, or an
``nn.Linear`` whose weight is at least half zeros) becomes ONE node
``ai.onnx.contrib::TedeprChain`` whose attributes carry the layer packed for the kernel
(:func:`pack_layer`: the CSR steps of :mod:`.layout`, base64; ``key``: a hash of it).
The model also holds, for every such node, a *model-local function* of the same domain and
name, overload = the layer's module path, whose body is the standard-op subgraph
``torch.onnx.export`` wrote for that layer (MatMul/Reshape/Transpose/Conv over the
cores, folded into ``Constant`` nodes), or that of its dense rebuild, or (linear layers)
the nonzero block of its dense weight (:func:`support_function`), or (TT Linear) its
cores as one MatMul each with no Transpose (:func:`cores_function`), whichever
:func:`choose_bodies` measured fastest. What onnxruntime does with the file:

* with :func:`register` called and onnxruntime-extensions' library registered on the
  session (:func:`session`), the custom-op kernel wins over the function: each node runs
  :func:`_compute`, one call of the compiled kernel (``kernels/chain.c``) per layer (conv
  chains: kernel, ``torch.conv2d`` in rank space, kernel);
* without it (stock onnxruntime, any other runtime), the node has no kernel, so the
  runtime inlines the function: the same standard ops as the plain ``onnx`` export.

Why onnxruntime-extensions' Python custom ops rather than a C custom-op library: the
onnxruntime wheel ships no C headers, and no package reachable here does (Debian bookworm
has no ``libonnxruntime-dev``; the onnxruntime, -extensions, -genai, -training and
-ggml wheels and the onnxruntime npm packages carry none); declaring ``OrtApi`` ourselves
would be copying it. onnxruntime's own ``com.microsoft.SparseToDenseMatMul`` exists in the
CPU build but takes its sparse operand only as a runtime input: a sparse initializer (or a
``Constant`` with ``sparse_value``) is densified at load and the node then fails type
checking, so a self-contained file cannot use it.

Calling :func:`register` defines the op in onnxruntime-extensions' process-wide op table
(once); nothing else global changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import EngineUnavailable
from ..logs import log
from .layout import ChainLayout, StepLayout, ring_in_layout, ring_out_layout, sparse_matrix_layout

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for custom ops defined in Python
OP_TYPE = "TedeprChain"
ATTRS = ("key", "kind", "chain")
FORMAT = 1  # version of the packed payload
MAGIC = b"TDPRCHN1"
MIN_ZEROS = 0.5  # an nn.Linear gets the sparse path when at least this share of its weight is zero
SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's per-node module path (metadata)

_lock = threading.Lock()
_cache: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
_registered: str | None = None
errors: list[str] = []  # what failed inside the custom op (it cannot raise), oldest first


# ---------------------------------------------------------------------------- payload
def _encode(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """``header`` (JSON) and named arrays as one base64 string: MAGIC, the header length
    (uint32 LE), the header with every array's dtype, shape and offset, then the raw
    little-endian array bytes. Deterministic (sorted keys, no timestamps)."""
    index, blobs, off = {}, [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        index[name] = [a.dtype.str, list(a.shape), off]
        blobs.append(a.tobytes())
        off += a.nbytes
    head = json.dumps({"header": header, "arrays": index}, sort_keys=True, separators=(",", ":")).encode()
    raw = MAGIC + len(head).to_bytes(4, "little") + head + b"".join(blobs)
    return base64.b64encode(raw).decode("ascii")


def _decode(text: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`_encode`. Raises ValueError on anything malformed (never
    executes or unpickles anything: JSON and raw numbers only)."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if raw[:len(MAGIC)] != MAGIC:
        raise ValueError("not a tedepr chain payload")
    n = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    meta = json.loads(raw[start:start + n])
    body = memoryview(raw)[start + n:]
    arrays = {}
    for name, (dtype, shape, off) in meta["arrays"].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if dt.hasobject or off < 0 or off + count * dt.itemsize > len(body):
            raise ValueError(f"array {name} is out of bounds")
        arrays[name] = np.frombuffer(body, dt, count, off).reshape(shape).copy()
    return meta["header"], arrays


def _layout_parts(layout: ChainLayout, p: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    steps = []
    for k, s in enumerate(layout.steps):
        steps.append([s.n_rows, s.n_in_rows, s.g_in, s.out_units, s.g_lo, s.g_hi])
        for f in ("row_ptr", "col", "val", "roff", "goff"):
            arrays[f"{p}.{k}.{f}"] = getattr(s, f)
    if layout.bias is not None:
        arrays[f"{p}.bias"] = np.asarray(layout.bias, np.float32)
    return {"n_in": layout.n_in, "n_out": layout.n_out, "kind": layout.kind, "steps": steps}


def _layout_from(h: dict[str, Any], p: str, arrays: dict[str, np.ndarray]) -> ChainLayout:
    steps = tuple(StepLayout(n_rows, n_in_rows, g_in, out_units,
                             *[arrays[f"{p}.{k}.{f}"] for f in ("row_ptr", "col", "val", "roff", "goff")],
                             g_lo=g_lo, g_hi=g_hi)
                  for k, (n_rows, n_in_rows, g_in, out_units, g_lo, g_hi) in enumerate(h["steps"]))
    return ChainLayout(int(h["n_in"]), int(h["n_out"]), steps, arrays.get(f"{p}.bias"), h["kind"])


def pack_layer(layer: nn.Module, in_rank: int | None = None) -> dict[str, str] | None:
    """The custom op's attributes for ``layer`` (``key``, ``kind``, ``chain``), or None
    when it has no sparse path. Takes the model with its masks folded in
    (:func:`tedepr_cli.masks.folded_copy`): the exact zeros are the pruned entries.

    ``kind`` ``linear``: ``(..., N) -> (..., M)`` (a TT/TR Linear, or an ``nn.Linear``
    with at least :data:`MIN_ZEROS` of its weight zero, as a 1-core chain); ``conv``:
    ``(B, C, H, W) -> (B, M, H', W')`` (a conv chain: input chain, rank-space conv
    weight and its geometry, output chain). ``in_rank``: the number of axes the layer's
    input has; a linear op given more flattens the extra trailing ones first (the exporter
    may fold the caller's flatten into the layer's first reshape)."""
    from ..tensorized.conv import ChainConv2d
    from ..tensorized.tr import TRLinear
    from ..tensorized.tt import TTLinear
    from .cpu import supports
    from .layout import tr_linear_layout, tt_linear_layout

    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if isinstance(layer, TTLinear | TRLinear) and supports(layer):
            fn = tt_linear_layout if isinstance(layer, TTLinear) else tr_linear_layout
            spec = layer._spec
            lay = fn(list(layer.cores), spec["in_modes"], spec["out_modes"], None, layer.bias)
            kind, header = "linear", {"chain": _layout_parts(lay, "c", arrays)}
        elif isinstance(layer, ChainConv2d) and supports(layer):
            cores, d = list(layer.cores), layer.n_in
            kernel = layer.kernel_core.detach().float()
            r_in, _, r_out = kernel.shape
            arrays["weight"] = kernel.permute(2, 0, 1).reshape(r_out, r_in, *layer.kernel_size).numpy()
            kind, header = "conv", {
                "in": _layout_parts(ring_in_layout(cores[:d]), "in", arrays),
                "out": _layout_parts(ring_out_layout(cores[d + 1:], None, layer.bias), "out", arrays),
                "r0": int(cores[0].shape[0]), "kernel_size": list(layer.kernel_size),
                "stride": list(layer.stride), "padding": list(layer.padding),
                "dilation": list(layer.dilation)}
        elif type(layer) is nn.Linear and float((layer.weight == 0).float().mean()) >= MIN_ZEROS:
            lay = sparse_matrix_layout(layer.weight.detach(), None, layer.bias)
            kind, header = "linear", {"chain": _layout_parts(lay, "c", arrays)}
        else:
            return None
    header["format"] = FORMAT
    if in_rank is not None and kind == "linear":
        header["in_rank"] = int(in_rank)
    chain = _encode(header, arrays)
    return {"key": hashlib.sha256(chain.encode("ascii")).hexdigest()[:32], "kind": kind, "chain": chain}


def _matches(declared: tuple | None, actual: tuple[int, ...]) -> bool:
    """Whether a declared ONNX shape (ints, or symbols for dynamic axes) fits ``actual``."""
    return declared is not None and len(declared) == len(actual) and all(
        isinstance(d, str) or d == a for d, a in zip(declared, actual, strict=True))


def region_fits(kind: str, x_decl: tuple | None, y_decl: tuple | None, x_shape: tuple[int, ...],
                y_shape: tuple[int, ...]) -> bool:
    """Whether a layer's exported region takes and gives what the layer itself does
    (``x_shape``/``y_shape``, seen at the trace), so the kernel can stand in for it: the
    output exactly; the input exactly, or (a linear layer) with its last axis unflattened
    (the exporter may fold the caller's flatten into the layer's first reshape)."""
    if not _matches(y_decl, y_shape):
        return False
    if _matches(x_decl, x_shape):
        return True
    k = len(x_shape) - 1  # the layer's own leading axes; the rest must multiply to its features
    if kind != "linear" or x_decl is None or len(x_decl) <= len(x_shape):
        return False
    tail = x_decl[k:]
    return all(isinstance(d, int) for d in tail) and math.prod(tail) == x_shape[-1] \
        and _matches(x_decl[:k], x_shape[:k])


def build_kernel(kind: str, chain: str) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy -> numpy function one ``TedeprChain`` node computes (the compiled kernel
    when it can be built, else the kernels' torch path: same packed data). Raises
    ValueError for an unknown kind or a malformed payload."""
    from .cpu import ConvChainKernel, SparseChainKernel

    header, arrays = _decode(chain)
    if header.get("format") != FORMAT:
        raise ValueError(f"payload format {header.get('format')} is not {FORMAT}")
    if kind == "linear":
        k = SparseChainKernel(_layout_from(header["chain"], "c", arrays))
        in_rank = header.get("in_rank")

        def linear(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
            if in_rank is not None and t.dim() > in_rank:  # the caller's flatten, folded in
                t = t.flatten(in_rank - 1)
            with torch.no_grad():
                return k(t).numpy()

        return linear
    if kind == "conv":
        conv = ConvChainKernel.from_parts(
            _layout_from(header["in"], "in", arrays), _layout_from(header["out"], "out", arrays),
            torch.from_numpy(arrays["weight"]), header["r0"], tuple(header["kernel_size"]),
            tuple(header["stride"]), tuple(header["padding"]), tuple(header["dilation"]))

        def convf(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return conv(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

        return convf
    raise ValueError(f"unknown TedeprChain kind {kind!r}")


def run_node(x: np.ndarray, **attrs: str) -> np.ndarray:
    """What one ``TedeprChain`` node computes: the packed layer is decoded once per ``key``
    (then cached for the process) and run on ``x``. Raises ValueError for a payload whose
    hash is not its ``key``, a malformed one, or an input of the wrong shape."""
    key = attrs["key"]
    fn = _cache.get(key)
    if fn is None:
        chain = attrs["chain"]
        if hashlib.sha256(chain.encode("ascii")).hexdigest()[:32] != key:
            raise ValueError("TedeprChain payload does not match its key")
        with _lock:
            fn = _cache.get(key) or build_kernel(attrs["kind"], chain)
            _cache[key] = fn
    return fn(x)


def _compute(x: np.ndarray, **attrs: str) -> np.ndarray:
    """The custom op's kernel (:func:`run_node`), which must never raise: an exception in a
    Python custom op terminates the process inside onnxruntime-extensions. A failure is
    logged once per message, kept in :data:`errors`, and answered with a NaN output, which
    no validation passes (:func:`tedepr_cli.export.compare` requires finite outputs)."""
    try:
        return run_node(x, **attrs)
    except Exception as e:  # noqa: BLE001 - anything, or the process dies
        msg = f"TedeprChain {attrs.get('kind', '?')}: {type(e).__name__}: {e}"
        if msg not in errors:
            errors.append(msg)
            log.warning(msg)
        return np.full((*x.shape[:1], 1), np.nan, np.float32)


# ---------------------------------------------------------------------------- runtime
def extensions_library() -> str:
    """Path of onnxruntime-extensions' custom-op library. Raises
    :class:`EngineUnavailable` when the package is missing."""
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError as e:
        raise EngineUnavailable(f"the sparse ONNX path needs onnxruntime-extensions "
                                f"(pip install 'tedepr[ort]'): {e}") from None
    return get_library_path()


def register() -> str:
    """Define ``TedeprChain`` for onnxruntime-extensions (once per process) and return the
    library path to pass to ``SessionOptions.register_custom_ops_library``. Raises
    :class:`EngineUnavailable` without onnxruntime-extensions."""
    global _registered
    path = extensions_library()
    with _lock:
        if _registered is None:
            from onnxruntime_extensions import PyCustomOpDef, onnx_op

            onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
                    attrs={a: PyCustomOpDef.dt_string for a in ATTRS})(_compute)
            _registered = path
    return path


def available() -> tuple[bool, str | None]:
    """Whether sessions can run the sparse path here, and why not."""
    try:
        register()
    except EngineUnavailable as e:
        return False, str(e)
    return True, None


def session_options(threads: int = 1, sparse: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with ``threads`` intra-op threads, quiet logging and,
    when ``sparse``, the custom-op library registered (:func:`register`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if sparse:
        so.register_custom_ops_library(register())
    return so


def session(path: Path | str | bytes, threads: int = 1, sparse: bool = True,
            providers: list[Any] | None = None) -> Any:
    """An onnxruntime session on ``path`` (a file, or a serialized model) that runs its
    ``TedeprChain`` nodes on the compiled kernel (``sparse=False``: on their standard-op
    bodies, as a runtime without the library would). Raises :class:`EngineUnavailable`
    when ``sparse`` and onnxruntime-extensions is missing."""
    import onnxruntime as ort

    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, session_options(threads, sparse),
                                providers=providers or ["CPUExecutionProvider"])


def uses_sparse_path(proto: Any) -> bool:
    """Whether an ``onnx.ModelProto`` has ``TedeprChain`` nodes."""
    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in proto.graph.node)


# ---------------------------------------------------------------------------- graph
def _scopes(node: Any) -> list[str]:
    for m in node.metadata_props:
        if m.key == SCOPES:
            try:
                v = json.loads(m.value)
            except ValueError:
                import ast

                v = ast.literal_eval(m.value)  # a Python list literal of strings
            return [str(s) for s in v[1:-1]]  # drop the root "" and the node's own name
    return []


def _region(graph: Any, name: str, inits: set[str]) -> tuple[list[int], str, str] | str:
    """The nodes of module ``name`` in ``graph`` (indices), its one activation input and its
    one output; or why it is not such a region."""
    idx = [i for i, n in enumerate(graph.node) if name in _scopes(n)]
    if not idx:
        return "no exported node carries this module's scope"
    inside = set(idx)
    made = {o for i in idx for o in graph.node[i].output}
    used_outside = {v for i, n in enumerate(graph.node) if i not in inside for v in n.input}
    used_outside |= {o.name for o in graph.output}
    ext: list[str] = []
    for i in idx:
        for v in graph.node[i].input:
            if v and v not in made and v not in inits and v not in ext:
                ext.append(v)
    outs = sorted(o for o in made if o in used_outside)
    if len(ext) != 1 or len(outs) != 1:
        return f"{len(ext)} activation inputs and {len(outs)} outputs (need 1 and 1)"
    return idx, ext[0], outs[0]


def _value_shape(graph: Any, name: str) -> tuple | None:
    """The declared shape of value ``name`` (dims as ints or symbol names), if any."""
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
    return None


def _same_signature(a: Any, ra: tuple[list[int], str, str], b: Any, rb: tuple[list[int], str, str]) -> bool:
    """Whether two regions take and give values of the same declared shapes (the batch
    symbol aside): e.g. not when one trace folded the caller's flatten into the layer."""
    for va, vb in ((ra[1], rb[1]), (ra[2], rb[2])):
        sa, sb = _value_shape(a.graph, va), _value_shape(b.graph, vb)
        if sa is None or sb is None or len(sa) != len(sb) or sa[1:] != sb[1:]:
            return False
    return True


def _function(proto: Any, idx: list[int], x: str, y: str, name: str) -> Any:
    """A ``TedeprChain`` function (overload ``name``) whose body is ``proto``'s nodes
    ``idx``, the initializers they read as ``Constant`` nodes."""
    import onnx
    from onnx import helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    sub = [graph.node[i] for i in idx]
    consts = sorted({v for n in sub for v in n.input if v in inits})
    body = [helper.make_node("Constant", [], [c], value=inits[c]) for c in consts]
    for n in sub:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        del c.metadata_props[:]
        body.append(c)
    fn = helper.make_function(DOMAIN, OP_TYPE, [x], [y], body,
                              [o for o in proto.opset_import if o.domain in ("", "ai.onnx")],
                              attributes=list(ATTRS))
    fn.overload = name
    return fn


def linear_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The dense weight ``(M, N)`` and bias ``(M,)`` (or None) of a linear layer with a sparse
    path (:func:`pack_layer` kind ``linear``: a linear-chain TT/TR Linear rebuilt from its
    cores, or a pruned ``nn.Linear``), fp32, no grad; None for anything else."""
    from ..tensorized.base import TensorizedLayer

    with torch.no_grad():
        if isinstance(layer, TensorizedLayer) and layer.kind == "linear" and layer.chain == "linear":
            w = layer.dense_weight()
        elif type(layer) is nn.Linear:
            w = layer.weight
        else:
            return None
        b = layer.bias
        return w.detach().float(), None if b is None else b.detach().float()


def support_function(layer: nn.Module, name: str, x_rank: int, in_rank: int, opset: int) -> Any | None:
    """A ``TedeprChain`` function (overload ``name``) computing a linear layer
    ``(..., N) -> (..., M)`` from the block of its dense weight ``W`` that is not zero: the
    kept input features gathered (``Gather`` on the last axis), one ``MatMul`` with ``W``'s
    nonzero columns, ``(K, M)``; or, when fewer output features are nonzero than that costs,
    ``MatMul`` with the nonzero block ``(K, R)`` then a 0/1 ``(R, M)`` placement, plus the
    bias. A pruned tensor network's ``W`` is zero on every feature whose mode index its
    masks prune out of a core (:func:`tedepr_cli.tensorized.chain.tt_matrix_support`), so at
    99 % and beyond the block is often a few percent of ``W``. The same function as the
    dense body up to float summation order (the skipped products are exact zeros).

    ``x_rank``: the axes of the region's input; ``in_rank``: the axes of the layer's own
    input (a region given more axes, where the exporter folded the caller's reshape into
    the layer, merges its trailing ones into the features first); ``opset``: the model's
    default-domain opset.
    Returns None when the layer is not linear, when
    the block would multiply more than half of ``W``, or when ``W`` is all zeros."""
    from onnx import helper, numpy_helper

    wb = linear_weight(layer)
    if wb is None or x_rank < in_rank:
        return None
    w, bias = wb[0].numpy(), wb[1]
    m, n = w.shape
    cols, rows = np.flatnonzero(np.any(w != 0, axis=0)), np.flatnonzero(np.any(w != 0, axis=1))
    if not cols.size:
        return None
    gather = cols.size * m  # multiply-adds per row of input
    place = cols.size * rows.size + rows.size * m
    if 2 * min(gather, place) > n * m:
        return None
    p = f"{name}/support"

    def const(key: str, arr: np.ndarray) -> Any:
        name = f"{p}/{key}"
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name))

    nodes, v = [], "x"
    if x_rank != in_rank:  # the trailing axes of the region's input are the layer's features
        nodes += [const("shape", np.array([0] * (in_rank - 1) + [-1], np.int64)),
                  helper.make_node("Reshape", [v, f"{p}/shape"], [f"{p}/flat"])]
        v = f"{p}/flat"
    nodes += [const("cols", cols.astype(np.int64)),
              helper.make_node("Gather", [v, f"{p}/cols"], [f"{p}/xk"], axis=-1)]
    if place < gather:
        nodes += [const("block", np.ascontiguousarray(w[np.ix_(rows, cols)].T)),
                  helper.make_node("MatMul", [f"{p}/xk", f"{p}/block"], [f"{p}/zr"])]
        eye = np.zeros((rows.size, m), np.float32)
        eye[np.arange(rows.size), rows] = 1.0
        nodes += [const("place", eye), helper.make_node("MatMul", [f"{p}/zr", f"{p}/place"], [f"{p}/z"])]
    else:
        nodes += [const("block", np.ascontiguousarray(w[:, cols].T)),
                  helper.make_node("MatMul", [f"{p}/xk", f"{p}/block"], [f"{p}/z"])]
    if bias is not None:
        nodes += [const("bias", bias.numpy()), helper.make_node("Add", [f"{p}/z", f"{p}/bias"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", [f"{p}/z"], ["y"]))
    fn = helper.make_function(DOMAIN, OP_TYPE, ["x"], ["y"], nodes, [helper.make_opsetid("", opset)],
                              attributes=list(ATTRS))
    fn.overload = name
    return fn


def cores_function(layer: nn.Module, name: str, x_rank: int, in_rank: int, opset: int) -> Any | None:
    """A ``TedeprChain`` function (overload ``name``) computing a linear-chain
    :class:`~tedepr_cli.tensorized.tt.TTLinear` ``(..., N) -> (..., M)`` from its cores
    ``G_k (r_{k-1}, n_k, m_k, r_k)`` with ``d`` MatMuls, ``d + 1`` Reshapes and the bias
    Add, and no Transpose (the exporter's trace of the chain moves the contracted mode
    last with a Transpose before each MatMul). The last input mode is contracted first,
    ``(L, P, n_d) @ (n_d, r_{d-1} m_d)``; every later core multiplies from the left,
    ``(r_{k-1} m_k, n_k r_k) @ (L, P_k, n_k r_k, m_{k+1}..m_d)``, so the state stays in
    the order ``(lead, n_1..n_{k-1}, r_{k-1}, m_k..m_d)`` that a Reshape regroups without
    moving data. The same function as the chain up to float summation order.

    ``x_rank``/``in_rank``/``opset``: as in :func:`support_function` (the layer's leading
    axes are the first ``in_rank - 1`` axes of the region's input; the rest are its
    features). Returns None for any other layer (a TR or nonlinear chain, a conv) or when
    ``x_rank < in_rank``."""
    from onnx import helper, numpy_helper

    from ..tensorized.tt import TTLinear

    if not isinstance(layer, TTLinear) or layer.chain != "linear" or x_rank < in_rank:
        return None
    with torch.no_grad():
        cores = [c.detach().float().numpy() for c in layer.cores]
        bias = None if layer.bias is None else layer.bias.detach().float().numpy()
    ins, outs = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    lead, d, p = [0] * (in_rank - 1), len(cores), f"{name}/cores"
    nodes: list[Any] = []

    def const(key: str, arr: np.ndarray) -> str:
        v = f"{p}/{key}"
        nodes.append(helper.make_node("Constant", [], [v], value=numpy_helper.from_array(arr, v)))
        return v

    def reshape(v: str, dims: list[int], out: str) -> str:
        nodes.append(helper.make_node("Reshape", [v, const(f"{out}_shape", np.array(lead + dims, np.int64))],
                                      [f"{p}/{out}"]))
        return f"{p}/{out}"

    last = cores[-1]  # (r_{d-1}, n_d, m_d, 1)
    v = reshape("x", [math.prod(ins[:-1]), ins[-1]], "x2")
    w = np.ascontiguousarray(last[..., 0].transpose(1, 0, 2).reshape(ins[-1], -1))
    nodes.append(helper.make_node("MatMul", [v, const(f"g{d - 1}", w)], [f"{p}/t{d - 1}"]))
    v = f"{p}/t{d - 1}"
    for k in range(d - 2, -1, -1):
        r0, n, m, r1 = cores[k].shape
        v = reshape(v, [math.prod(ins[:k]), n * r1, math.prod(outs[k + 1:])], f"s{k}")
        w = np.ascontiguousarray(cores[k].transpose(0, 2, 1, 3).reshape(r0 * m, n * r1))
        nodes.append(helper.make_node("MatMul", [const(f"g{k}", w), v], [f"{p}/t{k}"]))
        v = f"{p}/t{k}"
    if bias is None:
        shape = const("y_shape", np.array(lead + [-1], np.int64))
        nodes.append(helper.make_node("Reshape", [v, shape], ["y"]))
    else:
        v = reshape(v, [math.prod(outs)], "z")
        nodes.append(helper.make_node("Add", [v, const("bias", bias)], ["y"]))
    fn = helper.make_function(DOMAIN, OP_TYPE, ["x"], ["y"], nodes, [helper.make_opsetid("", opset)],
                              attributes=list(ATTRS))
    fn.overload = name
    return fn


def add_sparse_path(proto: Any, model: nn.Module, dense: Any = None, choice: dict[str, str] | None = None,
                    layers: list[str] | None = None,
                    io_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None
                    ) -> list[dict[str, Any]]:
    """Rewrite ``proto`` (an ``onnx.ModelProto`` straight from ``torch.onnx.export``, with
    its ``pkg.torch.onnx.name_scopes`` metadata still on the nodes) in place: every layer of
    ``model`` (masks folded in) that :func:`pack_layer` takes - or only those named in
    ``layers`` - becomes one ``TedeprChain`` node plus a model-local function (overload =
    the module path) holding the layer's standard ops, its initializers as ``Constant``
    nodes. The body is the layer's own exported nodes (``choice[name] == "chain"``, the
    default) or, with ``choice[name] == "dense"``, the nodes of the same module in
    ``dense`` (the trace of the model with that layer rebuilt dense,
    :func:`tedepr_cli.tensorized.layers.to_dense_layer`). A layer whose nodes do not form a
    one-input one-output region (e.g. a module called functionally, whose ops carry no
    scope) keeps its standard ops; so does one whose region does not take and give the
    layer's own input and output shapes (``io_shapes[name]``, seen at the trace: see
    :func:`region_fits`), when given.

    Returns one row per candidate layer: ``layer``, ``kind``, ``body``, ``nodes``
    replaced, ``ok`` and, when not replaced, ``why``."""
    from onnx import helper

    graph = proto.graph
    choice = choice or {}
    rows: list[dict[str, Any]] = []
    for name, layer in model.named_modules():
        if not name or (layers is not None and name not in layers):
            continue
        seen = (io_shapes or {}).get(name)
        attrs = pack_layer(layer, len(seen[0]) if seen else None)
        if attrs is None:
            continue
        body = choice.get(name, "chain")
        row: dict[str, Any] = {"layer": name, "kind": attrs["kind"], "body": body, "ok": False}
        rows.append(row)
        inits = {t.name for t in graph.initializer}
        reg = _region(graph, name, inits)
        if isinstance(reg, str):
            row["why"] = reg
            continue
        idx, x, y = reg
        if io_shapes is not None and not (name in io_shapes and region_fits(
                attrs["kind"], _value_shape(graph, x), _value_shape(graph, y), *io_shapes[name])):
            row["why"] = "the exporter merged a reshape across the layer's boundary"
            continue
        if body in BODIES:
            decl = _value_shape(graph, x)
            fn = BODIES[body](layer, name, len(decl) if decl else -1,
                              len(seen[0]) if seen else len(decl or ()), _opset(proto))
            if fn is None:
                raise ValueError(f"{name}: no {body} body for this layer")
        elif body == "dense":
            if dense is None:
                raise ValueError(f"{name}: a dense body needs the dense trace")
            dreg = _region(dense.graph, name, {t.name for t in dense.graph.initializer})
            if isinstance(dreg, str) or not _same_signature(proto, reg, dense, dreg):
                raise ValueError(f"{name}: the dense trace has no matching region")
            fn = _function(dense, *dreg, name)
        else:
            fn = _function(proto, idx, x, y, name)
        node = helper.make_node(OP_TYPE, [x], [y], name=f"{name}/{OP_TYPE}", domain=DOMAIN, **attrs)
        node.overload = name
        gone = set(idx)
        made = {o for i in idx for o in graph.node[i].output}
        kept = []
        for i, n in enumerate(graph.node):
            if i == idx[-1]:
                kept.append(node)
            elif i not in gone:
                kept.append(n)
        del graph.node[:]
        graph.node.extend(kept)
        proto.functions.append(fn)
        still = {v for n in graph.node for v in n.input} | {o.name for o in graph.output}
        live = [t for t in graph.initializer if t.name in still]
        del graph.initializer[:]
        graph.initializer.extend(live)
        vi = [v for v in graph.value_info if v.name not in made or v.name == y]
        del graph.value_info[:]
        graph.value_info.extend(vi)
        row.update(ok=True, nodes=len(idx), why=None)
    if any(r["ok"] for r in rows):
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        proto.ir_version = max(proto.ir_version, 10)  # function overloads: IR 10
    return rows


#: the bodies built from the layer's weights rather than from a trace, by name (a body
#: ``choice`` of :func:`add_sparse_path`, a candidate of :func:`choose_bodies`)
BODIES: dict[str, Callable[..., Any]] = {"support": support_function, "cores": cores_function}


def _opset(proto: Any) -> int:
    """The default-domain opset version of ``proto``."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def layer_model(proto: Any, fn: Any, attrs: dict[str, str]) -> bytes:
    """A one-node model running one ``TedeprChain`` node with function ``fn`` (any input
    shape): what :func:`choose_bodies` times."""
    from onnx import TensorProto, helper

    node = helper.make_node(OP_TYPE, ["x"], ["y"], domain=DOMAIN, **attrs)
    node.overload = fn.overload
    g = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    m = helper.make_model(g, opset_imports=[*opsets, helper.make_opsetid(DOMAIN, 1)], functions=[fn])
    m.ir_version = max(proto.ir_version, 10)
    return m.SerializeToString()


def _loop(sess: Any, x: np.ndarray | dict[str, np.ndarray], calls: int) -> Callable[[], None]:
    feed = x if isinstance(x, dict) else {sess.get_inputs()[0].name: x}

    def run() -> None:
        for _ in range(calls):
            sess.run(None, feed)

    return run


def time_sessions(sessions: dict[str, Any], inputs: dict[int, np.ndarray | dict[str, np.ndarray]],
                  reps: int = 15, calls: int = 10) -> dict[str, dict[int, float]]:
    """Median µs per ``session.run`` of each onnxruntime session at each batch of ``inputs``
    (batch -> the one input array, or the feed by input name): per-call CPU time
    (``time.thread_time``, robust to a loaded machine) of ``calls`` calls, ``reps``
    interleaved rounds (:func:`tedepr_cli.timing.medians`)."""
    import time

    from ..timing import medians

    out: dict[str, dict[int, float]] = {k: {} for k in sessions}
    for b, x in sorted(inputs.items()):
        med = medians({k: _loop(s, x, calls) for k, s in sessions.items()}, reps, clock=time.thread_time)
        for k, v in med.items():
            out[k][b] = round(v / calls * 1e6, 2)
    return out


def pick(us: dict[str, dict[int, float]], prefer: str) -> str:
    """The candidate with the lowest sum over batches of its time relative to the fastest
    at that batch; ``prefer`` (the smaller file) unless another beats it by more than 3 %
    of that score."""
    batches = next(iter(us.values())).keys()
    score = {k: sum(v[b] / max(min(u[b] for u in us.values()), 1e-9) for b in batches) for k, v in us.items()}
    best = min(score, key=lambda k: (score[k], k != prefer))
    return prefer if prefer in score and score[prefer] <= score[best] * 1.03 else best


def choose_bodies(proto: Any, dense: Any, model: nn.Module, shapes: dict[str, dict[int, tuple[int, ...]]],
                  reps: int = 15, calls: int = 20) -> dict[str, dict[str, Any]]:
    """Per layer, the fastest standard-op body in stock onnxruntime (one thread, no custom-op
    library): the layer's chain ops, its dense rebuild, and the bodies of :data:`BODIES`
    that the layer has ((linear layers whose nonzero block is at most half the weight) that
    block, :func:`support_function`; (TT Linear) the transpose-free cores,
    :func:`cores_function`). Each candidate
    is the layer alone (:func:`layer_model`) at every batch of ``shapes[layer]`` (batch ->
    the layer's input shape), timed by :func:`time_sessions` and chosen by :func:`pick`
    (ties: the chain). Returns ``layer -> {"body", "us": {"chain": {batch: µs}, "dense":
    ..., "support": ..., "cores": ...}}``, and a ``"note"`` saying why when the dense body
    was not a candidate; a layer with no alternative to its chain body at all gets
    ``"us": {}`` and a ``"note"`` saying why."""
    out: dict[str, dict[str, Any]] = {}
    for name, layer in model.named_modules():
        if name not in shapes:
            continue
        attrs = pack_layer(layer)
        if attrs is None:
            continue
        reg = _region(proto.graph, name, {t.name for t in proto.graph.initializer})
        if isinstance(reg, str):
            continue
        sess = {"chain": session(layer_model(proto, _function(proto, *reg, name), attrs), sparse=False)}
        dreg = _region(dense.graph, name, {t.name for t in dense.graph.initializer})
        if isinstance(dreg, str):
            no_dense = f"no dense body: in the dense export, {dreg}"
        elif not _same_signature(proto, reg, dense, dreg):
            no_dense = ("no dense body: the dense export's region takes or gives other shapes "
                        "(a reshape folded into the layer)")
        else:
            no_dense = None
            sess["dense"] = session(layer_model(dense, _function(dense, *dreg, name), attrs), sparse=False)
        in_rank = len(next(iter(shapes[name].values())))
        for body, make in BODIES.items():
            fn = make(layer, name, in_rank, in_rank, _opset(proto))
            if fn is not None:
                sess[body] = session(layer_model(proto, fn, attrs), sparse=False)
        if len(sess) == 1:  # no alternative: the layer keeps its chain body, and the report says why
            out[name] = {"body": "chain", "us": {}, "note": f"{no_dense}; no support body (the layer is "
                         "not linear, or its nonzero block would multiply more than half of W) and no "
                         "cores body (not a TT-matrix Linear)"}
            continue
        rng = np.random.default_rng(0)
        inputs = {b: rng.random(shape, dtype=np.float32) for b, shape in shapes[name].items()}
        us = time_sessions(sess, inputs, reps, calls)
        out[name] = {"body": pick(us, "chain"), "us": us, **({"note": no_dense} if no_dense else {})}
    return out
