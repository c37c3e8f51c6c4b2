"""``tedepr export``: a compact safetensors file and validated ONNX models.

Everything is built in a temporary sibling of the output directory and renamed into place
only after every format passed validation, so a failed export leaves nothing behind.

* ``safetensors`` -- a single-file artifact (manifest in the metadata): masked tensors in
  the smallest of the layouts of :mod:`tedepr_cli.storage`. Reloaded and compared with the
  in-memory model bit for bit.
* ``onnx`` -- the model traced by ``torch.onnx.export`` (dynamo), the tensor chain as plain
  MatMul/Reshape/Transpose/Conv ops, one file, dynamic batch axis.
* ``onnx-sparse`` -- the same graph with every mostly-zero initializer (cores, pruned
  weights, and the exporter's folded views of them) stored as a ``sparse_initializer``
  with INT64 indices (what ``onnx.checker`` requires). onnxruntime densifies them when it
  loads the model: this saves disk, not memory or time.
* ``onnx-fast`` -- every compressed layer as one ``ai.onnx.contrib::TedeprChain`` node
  (:mod:`tedepr_cli.kernels.ort_ops`) with a model-local function of standard ops behind
  it: the layer's chain ops, its dense rebuild, the nonzero block of that
  (:func:`tedepr_cli.kernels.ort_ops.support_function`) or (TT Linear) its cores as one
  MatMul each without Transpose (:func:`tedepr_cli.kernels.ort_ops.cores_function`), as
  the fastest of three whole-model candidates in onnxruntime at batches 1 and 32 (all
  chain ops, the per-layer choice, all dense; :func:`fast_onnx`; measured at export, the
  choice and the timings are in ``export.json``, so two exports may differ where
  candidates were a near tie). Any runtime
  runs the function; onnxruntime with the custom-op library registered
  (:func:`tedepr_cli.kernels.ort_ops.session`) runs the compiled chain kernel instead.
  Validated both ways.

Every ONNX export is traced at an example batch of at least 2 that is *not* one of the
validated batch sizes (:func:`trace_batch`; torch.export specialises a batch of 1 into a
fixed axis), its batch axis must come out symbolic, and each ONNX file is then run with
onnxruntime on sample inputs (the first test samples of ``--data``, read by the same
loader and preprocessing as ``eval``, or random of the declared shape) at the validated
batch sizes and compared with PyTorch. Tolerance rule (:func:`compare`): with the output
scale ``s = max |ref|`` over the compared batch, every entry must satisfy
``|onnx - ref| <= atol·s + rtol·|ref|``: the absolute term scales with the output, so
outputs of 1e-6 are held to differences of about 1e-11 rather than to a fixed ``atol``. A
miss fails the export (exit code 8). ``sample_inputs.npy`` and ``sample_outputs.npy`` are
saved beside the models so :func:`validate_dir` can re-check them later without the
original code.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from .artifact import Artifact, load_artifact, save_artifact
from .device import exact_fp32
from .device import resolve as resolve_device
from .errors import BadInput, EngineUnavailable, UsageError, ValidationError, opt
from .fsutil import atomic_output
from .pruning.targets import kept_counts
from .safeload import load_npy
from .storage import byte_sizes
from .surgery import TOKEN_ARRAYS, call_args, eval_mode, example_input, feed, is_token_model, token_ids

FORMATS = ("safetensors", "onnx", "onnx-sparse", "onnx-fast")
FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "onnx-sparse": "model.sparse.onnx",
         "onnx-fast": "model.fast.onnx"}
FAST_BATCHES = (1, 32)  # the batches onnx-fast's per-layer choice is timed at
MIN_OPSET, MAX_OPSET = 17, 23
SPARSE_MIN_ZEROS = 0.5  # initializers at least this sparse become sparse_initializers


@dataclass
class ExportOptions:
    formats: list[str] = field(default_factory=lambda: ["safetensors", "onnx"])
    opset: int = 18
    atol: float = 1e-5
    rtol: float = 1e-4
    batch_sizes: list[int] = field(default_factory=lambda: [1, 7])
    seed: int = 0
    device: str = "cpu"  # where the PyTorch reference (and onnxruntime, where it can) runs

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise UsageError(f"{opt('to')} takes a comma list of {', '.join(FORMATS)}; got "
                             f"{','.join(self.formats)}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise UsageError(f"{opt('opset')} {self.opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
        if self.atol < 0 or self.rtol < 0:
            raise UsageError(f"{opt('atol')}/{opt('rtol')} must be >= 0")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(f"{opt('batch-sizes')} must be positive integers")


# ---------------------------------------------------------------------------- sizes
def entropy_bytes(numel: int, kept: int) -> float:
    """Information-theoretic minimum to say *which* ``kept`` of ``numel`` entries are kept:
    ``log2 C(numel, kept)`` bits."""
    if kept in (0, numel):
        return 0.0
    bits = (math.lgamma(numel + 1) - math.lgamma(kept + 1) - math.lgamma(numel - kept + 1)) / math.log(2)
    return bits / 8


def compact_report(art: Artifact, path: Path) -> dict[str, Any]:
    """Bytes of the prunable (masked) part of a compact safetensors file against the
    target ``4 bytes per kept value + the minimal index bytes``."""
    from .artifact import META_ENCODING, read_safetensors
    from .storage import masked_part_bytes

    tensors, meta = read_safetensors(path)
    parts = masked_part_bytes(tensors, json.loads(meta[META_ENCODING]))
    stored = kept = 0
    minimal_index = 0.0
    for name, m in art.masks.items():
        stored += parts[name][1]
        k = int(m.sum())
        kept += k
        minimal_index += entropy_bytes(m.numel(), k)
    target = 4 * kept + minimal_index
    layouts: dict[str, int] = {}
    for name in art.masks:
        lay = parts[name][0]
        layouts[lay] = layouts.get(lay, 0) + 1
    return {"masked_tensors": len(art.masks), "kept_values": kept, "stored_bytes": stored,
            "minimal_bytes": round(target), "ratio": stored / target if target else None,
            "layouts": layouts}


# ---------------------------------------------------------------------------- onnx
EXPORTER_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")  # top-level names the exporter logs under
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter for the duration of the block: every existing logger under
    :data:`EXPORTER_LOGGERS` is raised above CRITICAL (torch attaches its own stderr
    handlers to some, bound to the stream at import time, so redirecting ``sys.stderr``
    alone does not mute them), ``sys.stdout``/``sys.stderr`` are redirected and warnings
    ignored. Every level, stream and the warning filters are restored on exit."""
    names = {n for n in logging.root.manager.loggerDict if n.split(".")[0] in EXPORTER_LOGGERS}
    loggers = [logging.getLogger(n) for n in sorted(names | set(EXPORTER_LOGGERS))]
    saved = [(lg, lg.level) for lg in loggers]
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.CRITICAL + 1)
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost exception behind ``e`` (the exporter wraps the
    real reason in several layers), without terminal colour codes."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def trace_batch(batch_sizes: list[int]) -> int:
    """The example batch an export is traced at: the smallest batch >= 2 that is not
    validated, so every validated batch runs a shape the trace never saw. A batch of 1 is
    never used: torch.export specialises size-1 dimensions (its 0/1 specialisation), which
    either fixes the batch axis at 1 or fails on the dynamic-shape constraint."""
    b = 2
    while b in batch_sizes:
        b += 1
    return b


def fixed_batch_axes(proto) -> list[str]:
    """Names of the graph inputs and outputs of ``proto`` (an ``onnx.ModelProto``) whose
    first (batch) axis is not symbolic; an exported model must have none."""
    fixed = []
    for v in [*proto.graph.input, *proto.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param or dims[0].HasField("dim_value"):
            shape = [d.dim_param or d.dim_value for d in dims]
            fixed.append(f"{v.name} {shape}")
    return fixed


def strip_metadata(proto) -> None:
    """Drop the exporter's per-node metadata (stack traces and FX dumps: a third of the
    file, and local paths)."""
    for node in proto.graph.node:
        del node.metadata_props[:]


def graph_inputs(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """The ONNX graph's input names for ``model`` on the batch ``example``: ``["x"]`` for
    float samples, ``["input_ids"]`` for token ids ``[N, L]`` (as a Hugging Face export
    names them), and for stacked token arrays ``[N, k, L]`` the ids followed by every other
    array the forward takes by name (:func:`~tedepr_cli.surgery.call_args`: ``attention_mask``,
    ``token_type_ids``, in :data:`~tedepr_cli.surgery.TOKEN_ARRAYS` order)."""
    if example.is_floating_point():
        return ["x"]
    _, kwargs = call_args(model, example)
    return ["input_ids", *(k for k in kwargs if k != "input_ids")]


def ort_feed(names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's feed for a graph with inputs ``names`` on the batch ``x``, by name.

    Float samples or token ids ``[N, L]`` go to the first input; stacked token arrays
    ``[N, k, L]`` (:data:`~tedepr_cli.surgery.TOKEN_ARRAYS` order) each to the input of its
    name, the ids to the first input whatever its name. A token input ``x`` does not hold
    gets the value a forward assumes without it: ``attention_mask`` ones (every token
    attends), ``token_type_ids`` zeros (one segment); so a graph exported with a mask also
    runs on ids alone. Raises :class:`BadInput` for any other input it cannot fill."""
    tokens = x.ndim == 3 and np.issubdtype(x.dtype, np.integer)
    ids = x[:, 0] if tokens else x
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        if tokens and name in TOKEN_ARRAYS[1:x.shape[1]]:
            out[name] = np.ascontiguousarray(x[:, TOKEN_ARRAYS.index(name)])
        elif i == 0:
            out[name] = np.ascontiguousarray(ids)
        elif name == "attention_mask" and ids.ndim == 2:
            out[name] = np.ones_like(ids)
        elif name == "token_type_ids" and ids.ndim == 2:
            out[name] = np.zeros_like(ids)
        else:
            raise BadInput(f"the ONNX graph takes an input {name!r} that samples of shape {list(x.shape)} "
                           f"({x.dtype}) do not provide")
    return out


def _export_call(model: torch.nn.Module, example: torch.Tensor, dynamic_length: bool = True
                 ) -> tuple[tuple, dict, list[str], Any]:
    """``(args, kwargs, input_names, dynamic_shapes)`` for ``torch.onnx.export`` of ``model``
    on ``example``. One input: positional, dynamic batch axis. Several token arrays
    (:func:`graph_inputs`): every one by keyword in :func:`graph_inputs` order (the ids
    under the forward's own name for its first parameter), each with the same dynamic batch
    axis. ``dynamic_length``: token inputs get a sequence axis the exporter may keep
    symbolic (``Dim.AUTO``: fixed where the model specialises on it)."""
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim.AUTO if dynamic_length else None
    names = graph_inputs(model, example)
    if example.is_floating_point():
        return (example,), {}, names, ({0: batch},)
    if len(names) == 1:
        return (token_ids(example),), {}, names, ({0: batch, 1: length},)
    args, kwargs = call_args(model, example)
    if args:  # the ids go to the forward's first parameter, whatever its name
        import inspect

        first = next(iter(inspect.signature(model.forward).parameters))
        kwargs = {first: args[0], **kwargs}
    # call_args' order is graph_inputs' order: the ids, then the other arrays
    return (), kwargs, names, {k: {0: batch, 1: length} for k in kwargs}


def to_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int, strip: bool = True):
    """An ``onnx.ModelProto`` of ``model`` traced at ``example`` (batch >= 2, see
    :func:`trace_batch`) with a dynamic batch axis (inputs named by :func:`graph_inputs`:
    ``x``, or ``input_ids`` [+ ``attention_mask``, ``token_type_ids`` when ``example``
    stacks them and the forward takes them by name, with a symbolic sequence axis where the
    exporter can keep one, else the traced length]; output ``logits``). Masks are folded
    into the weights first (a copy), so the graph holds the pruned tensors themselves, not a
    mask multiply.

    Raises :class:`EngineUnavailable` without onnx/onnxscript, and :class:`ValidationError`
    when the exporter fails (one line: the innermost reason) or leaves the batch axis of an
    input or output fixed. ``strip=False`` keeps the exporter's node metadata (the module
    scopes :func:`fast_onnx` needs)."""
    import torch.onnx

    from .masks import folded_copy

    model = folded_copy(model).eval()
    # token inputs: a symbolic sequence axis first; where the exporter cannot translate it
    # (a tensorized layer's reshapes read symbolic strides), the traced length
    for dynamic_length in (True, False) if not example.is_floating_point() else (False,):
        args, kwargs, names, dynamic = _export_call(model, example, dynamic_length)
        try:
            with _quiet_export():
                prog = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, external_data=False,
                                         opset_version=opset, input_names=names, output_names=["logits"],
                                         dynamic_shapes=dynamic)
            break
        except ImportError as e:
            raise EngineUnavailable(f"ONNX export needs onnx/onnxscript: {e}") from None
        except Exception as e:  # the exporter raises many kinds
            if not dynamic_length:
                raise ValidationError(f"ONNX export failed: {_root_cause(e)}") from None
    proto = prog.model_proto
    fixed = fixed_batch_axes(proto)
    if fixed:
        raise ValidationError(f"the exported ONNX has a fixed batch axis ({'; '.join(fixed)}) although it "
                              f"was traced at batch {example.shape[0]} with a dynamic batch: the model "
                              f"specialises on its batch size")
    if strip:
        strip_metadata(proto)
    return proto


def fast_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int,
              batches: tuple[int, ...] = FAST_BATCHES) -> tuple[Any, dict[str, Any]]:
    """The ``onnx-fast`` graph of ``model`` (masks folded in): each layer with a sparse path
    (:func:`tedepr_cli.kernels.ort_ops.pack_layer`) as one ``TedeprChain`` node whose
    function body is the layer's chain ops, its dense rebuild, (linear layers) the nonzero
    block of that or (TT Linear) its transpose-free cores. Per layer the fastest alone
    (:func:`tedepr_cli.kernels.ort_ops.choose_bodies`); then the whole model is timed in
    stock onnxruntime at ``batches`` with every layer on its chain ops, with the per-layer
    choice and with every layer dense, and the fastest end to end is kept (ties: the
    chain ops, the smallest file), so the file is never slower than the plain ``onnx``
    export beyond timing noise. Traced twice (the model, and a copy with those layers
    rebuilt dense) at ``example``. Returns the ``onnx.ModelProto`` and a report (per
    layer: kind, body, timings in µs; ``choice`` and ``model_us``: the whole-model one)."""
    from .kernels import ort_ops
    from .masks import folded_copy
    from .surgery import swap_module
    from .tensorized.layers import is_tensorized, to_dense_layer

    folded = folded_copy(model).eval()
    names = [n for n, m in folded.named_modules() if n and ort_ops.pack_layer(m) is not None]
    proto = to_onnx(folded, example, opset, strip=False)
    dense = copy.deepcopy(folded)
    for n in names:
        m = folded.get_submodule(n)
        if is_tensorized(m):
            swap_module(dense, n, to_dense_layer(m))
    dense_proto = to_onnx(dense, example, opset, strip=False)
    shapes: dict[str, dict[int, tuple[int, ...]]] = {n: {} for n in names}
    io: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    current = [0]

    def grab(name: str):  # each layer's input and output shapes at the batch being run
        def hook(_m, args, out):
            if current[0] in batches:
                shapes[name][current[0]] = tuple(args[0].shape)
            if current[0] == example.shape[0]:
                io[name] = (tuple(args[0].shape), tuple(out.shape))
        return hook

    hooks = [folded.get_submodule(n).register_forward_hook(grab(n)) for n in names]
    try:
        with torch.no_grad():
            for b in (*batches, example.shape[0]):
                current[0] = b
                feed(folded, example[torch.arange(b) % example.shape[0]])  # the example's rows
    finally:
        for h in hooks:
            h.remove()
    # layers whose exported region is not the layer itself keep their standard ops
    fits = [r["layer"] for r in ort_ops.add_sparse_path(onnx_copy(proto), folded, io_shapes=io) if r["ok"]]
    shapes = {n: s for n, s in shapes.items() if s and n in fits}
    timed = ort_ops.choose_bodies(proto, dense_proto, folded, shapes)
    # whole-model candidates: every layer on its chain ops (the plain export's speed), the
    # per-layer choice, every layer dense where it can be; the fastest end to end is kept
    choices = {"chain": {}, "per-layer": {n: t["body"] for n, t in timed.items() if t["us"]},
               "dense": {n: "dense" for n, t in timed.items() if "dense" in t["us"]}}
    built: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
    for label, choice in choices.items():
        if any(choice == c for k, c in choices.items() if k in built):
            continue  # the same graph as a candidate already built
        p = onnx_copy(proto)
        built[label] = (p, ort_ops.add_sparse_path(p, folded, dense_proto, choice, io_shapes=io))
    rng = np.random.default_rng(0)
    names, per_sample = graph_inputs(folded, example), token_ids(example).shape[1:]
    inputs = {b: ort_feed(names, rng.random((b, *per_sample), dtype=np.float32) if example.is_floating_point()
                          else np.zeros((b, *per_sample), np.int64))
              for b in batches}  # token ids: id 0, every token attending
    sessions = {k: ort_ops.session(p.SerializeToString(), sparse=False) for k, (p, _) in built.items()}
    whole = ort_ops.time_sessions(sessions, inputs, reps=9, calls=4)
    best = ort_ops.pick(whole, "chain")
    proto, rows = built[best]
    for r in rows:
        t = timed.get(r["layer"], {})
        if t.get("us"):
            r["us"] = t["us"]
        if "note" in t:
            r["note"] = t["note"]
    strip_metadata(proto)
    return proto, {"layers": rows, "batches": list(batches), "choice": best, "model_us": whole}


def onnx_copy(proto):
    """A deep copy of an ``onnx.ModelProto``."""
    import onnx

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    return p


def sparsify_initializers(proto) -> int:
    """Move every mostly-zero initializer to ``graph.sparse_initializer`` (INT64 flat
    indices, as ``onnx.checker`` requires). Returns how many moved."""
    import onnx
    from onnx import numpy_helper

    keep, moved = [], 0
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.size >= 16 and np.issubdtype(arr.dtype, np.floating) \
                and (arr == 0).mean() >= SPARSE_MIN_ZEROS:
            flat = arr.reshape(-1)
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(flat[idx], name=init.name)
            indices = numpy_helper.from_array(idx, name=f"{init.name}_indices")
            sparse = onnx.helper.make_sparse_tensor(values, indices, list(arr.shape))
            proto.graph.sparse_initializer.append(sparse)
            moved += 1
        else:
            keep.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return moved


def ort_providers(device: str) -> list[str]:
    """onnxruntime's providers for ``device``: CUDA's where this onnxruntime has it (the
    onnxruntime-gpu package), else the CPU's."""
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def run_onnx(path: Path, x: np.ndarray, device: str = "cpu", kernel: bool = False) -> np.ndarray:
    """Run the ONNX file ``path`` on ``x`` in onnxruntime (fed by name, :func:`ort_feed`), one
    thread; ``kernel``: with tedepr's custom-op library registered (its ``TedeprChain``
    nodes run the compiled kernel instead of their standard-op bodies)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineUnavailable(f"onnxruntime is not installed: {e}") from None
    if kernel:
        from .kernels.ort_ops import session_options

        opts = session_options(1, sparse=True)
    else:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=ort_providers(device))
    except Exception as e:  # empty, truncated or not ONNX at all
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"{path} is not a loadable ONNX model: {why}") from None
    try:
        return sess.run(None, ort_feed([i.name for i in sess.get_inputs()], x))[0]
    except Exception as e:
        raise ValidationError(f"onnxruntime cannot run {path.name}: {str(e).splitlines()[0]}") from None


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Whether ``got`` matches ``ref`` (same shape, both any float array) within tolerance.

    Rule: with the output scale ``s = max |ref|`` (over the whole array), every entry must
    satisfy ``|got - ref| <= atol·s + rtol·|ref|`` and ``got`` must be finite. ``atol`` is
    thus a fraction of the output's scale, not a fixed number: a fixed 1e-5 would pass any
    difference on outputs of about 1e-6. An all-zero ``ref`` must be matched exactly.
    Returns ``ok``, ``max_abs`` (max ``|got - ref|``), ``max_rel`` (max entrywise
    ``|got - ref| / |ref|``), ``scale`` (``s``) and ``max_scaled`` (``max_abs / s``)."""
    if got.shape != ref.shape:
        return {"ok": False, "max_abs": None, "max_rel": None, "scale": None, "max_scaled": None,
                "why": f"shape {list(got.shape)} != {list(ref.shape)}"}
    r = ref.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - r)
    scale = float(np.abs(r).max()) if r.size else 0.0
    ok = bool(np.isfinite(got).all() and (diff <= atol * scale + rtol * np.abs(r)).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = diff / np.maximum(np.abs(r), 1e-12)
    return {"ok": ok, "max_abs": max_abs, "max_rel": float(rel.max()) if rel.size else 0.0,
            "scale": scale, "max_scaled": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else None)}


# ---------------------------------------------------------------------------- export
def sample_inputs(art: Artifact, n: int, data: Path | None, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``n`` inputs of the model's shape and where they came from: the first readable
    test samples of ``data`` (any ``--data`` layout, ``[reader:]PATH``), presented and
    normalized as ``tedepr eval`` does (the statistics recorded in the artifact's manifest,
    else the data family's), or uniform random in [0, 1) from ``seed`` (random ids in the
    vocabulary for a token model).
    Token data keeps the arrays the forward takes by name (stacked ``[n, k, L]``, the
    graph's inputs, :func:`graph_inputs`), padded samples included; a forward that takes
    the ids alone gets ``[n, L]`` ids.

    Raises :class:`InputNotFound`/:class:`BadInput` for unreadable data or fewer than
    ``n`` readable test samples."""
    if data is None:
        g = torch.Generator().manual_seed(seed)
        x = example_input(art.model, art.input_shape, n, "rand", generator=g)
        return x.numpy(), {"source": "random token ids" if is_token_model(art.model) else "random",
                           "seed": seed}
    from .datasets import make_split
    from .model_data import open_for_model

    ds, pre = open_for_model(data, art)
    split = make_split(ds, "test", art.input_shape, art.input_kind, pre)
    xs, got, pos = [], 0, 0
    while got < n and pos < len(split):  # unreadable files are skipped: read on until n
        stop = min(pos + n - got, len(split))
        b = split.load(np.arange(pos, stop))
        xs.append(b.x)
        got, pos = got + len(b.x), stop
    if got < n:
        raise BadInput(f"{data} has only {got} readable test samples; the export needs {n}")
    info = {"source": "data", "reader": ds.reader, "split": "test", "normalize": pre.normalize,
            "mean": pre.mean, "std": pre.std}
    x = torch.cat(xs)
    if ds.input_names:  # the graph takes the arrays the forward takes by name (graph_inputs)
        names = graph_inputs(art.model, x)
        info["token_arrays"] = list(ds.input_names)
        info["graph_inputs"] = names
        if len(names) == 1:
            x = token_ids(x)
    return x.numpy(), info


def export(art: Artifact, out: Path, opts: ExportOptions, data: Path | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """Write the requested formats to ``out`` (a directory), each validated (see the module
    docstring for the tracing rule and the tolerance). Raises :class:`ValidationError` on
    a miss, with nothing written. The model's train/eval mode is restored afterwards."""
    opts.validate()
    with eval_mode(art.model):
        return _export(art, out, opts, data, overwrite)


def _export(art: Artifact, out: Path, opts: ExportOptions, data: Path | None, overwrite: bool
            ) -> dict[str, Any]:
    import onnx

    dev = resolve_device(opts.device)
    model = art.model
    traced = trace_batch(opts.batch_sizes)
    n = max(*opts.batch_sizes, traced)
    x_all, source = sample_inputs(art, n, data, opts.seed)

    def on_device(m: torch.nn.Module, b: int) -> np.ndarray:  # the reference, float32 (no TF32)
        with torch.no_grad(), exact_fp32():
            return feed(m, torch.from_numpy(x_all[:b]).to(dev)).cpu().numpy()

    ref_model = model if dev.type == "cpu" else copy.deepcopy(model).to(dev)
    refs = {b: on_device(ref_model, b) for b in sorted({*opts.batch_sizes, n})}
    report: dict[str, Any] = {"options": asdict(opts), "data": str(data) if data else None,
                              "inputs": source, "formats": {}, "validation": {}, "device": str(dev)}
    counts = kept_counts(model)
    report["dense_original"] = _dense_original(art)
    exported = art
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        np.save(tmp / "sample_inputs.npy", x_all)
        np.save(tmp / "sample_outputs.npy", refs[n])
        if "safetensors" in opts.formats:
            exported = Artifact(model=art.model, arch=art.arch, meta=dict(art.meta))
            exported.meta = json.loads(json.dumps(art.meta, default=str))
            exported.record("export", {"formats": opts.formats})
            path = save_artifact(exported, tmp / FILES["safetensors"])
            allow = art.arch.name if art.arch and art.arch.is_import else None
            back = load_artifact(path, allow_import=allow).model.to(dev)
            same = all(np.array_equal(on_device(back, b), refs[b]) for b in opts.batch_sizes)
            report["validation"]["safetensors"] = {"bit_exact": same}
            if not same:
                raise ValidationError("the compact safetensors file does not reload to the same outputs")
            report["formats"]["safetensors"] = _row(path, counts)
            report["compact"] = compact_report(art, path)
        if any(f.startswith("onnx") for f in opts.formats):
            example = torch.from_numpy(x_all[:traced])
            report["traced_batch"] = traced
            plain = {"onnx", "onnx-sparse"} & set(opts.formats)
            proto = to_onnx(model, example, opts.opset) if plain else None
            if proto is not None:  # names and axes (symbolic: dynamic) of the graph's inputs
                report["onnx_inputs"] = {
                    i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in proto.graph.input}
            for fmt in ("onnx", "onnx-sparse", "onnx-fast"):
                if fmt not in opts.formats:
                    continue
                p = proto
                if fmt == "onnx-sparse":
                    p = onnx_copy(proto)
                    report["sparse_initializers"] = sparsify_initializers(p)
                elif fmt == "onnx-fast":
                    p, report["fast"] = fast_onnx(model, example, opts.opset)
                path = tmp / FILES[fmt]
                onnx.save(p, str(path))
                try:
                    onnx.checker.check_model(str(path))
                except onnx.checker.ValidationError as e:
                    why = str(e).splitlines()[0]
                    raise ValidationError(f"{path.name} fails onnx.checker: {why}") from None
                report["onnxruntime_providers"] = ort_providers(opts.device)
                runs = [(fmt, False)]
                if fmt == "onnx-fast":
                    from .kernels.ort_ops import available

                    ok, why = available()
                    report["fast"]["kernel"] = {"available": ok, "why": why}
                    if ok:
                        runs.append(("onnx-fast+kernel", True))
                for label, kernel in runs:
                    checks = {b: compare(run_onnx(path, x_all[:b], opts.device, kernel), refs[b],
                                         opts.atol, opts.rtol) for b in opts.batch_sizes}
                    report["validation"][label] = {str(b): c for b, c in checks.items()}
                    bad = [b for b, c in checks.items() if not c["ok"]]
                    if bad:
                        c = checks[bad[0]]
                        how = " with the custom-op kernel" if kernel else ""
                        raise ValidationError(f"{path.name}{how} differs from PyTorch at batch {bad[0]}: "
                                              f"{_miss(c)} (atol {opts.atol} x scale + rtol {opts.rtol} "
                                              f"x |ref|)")
                report["formats"][fmt] = _row(path, counts)
        (tmp / "export.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _miss(c: dict[str, Any]) -> str:
    if c.get("why"):
        return c["why"]
    scaled = "inf" if c["max_scaled"] is None else f"{c['max_scaled']:.3g}"
    return (f"max abs diff {c['max_abs']:.3g} on outputs of scale {c['scale']:.3g} (max abs / scale "
            f"{scaled}, max rel {c['max_rel']:.3g})")


def _row(path: Path, counts: dict[str, int]) -> dict[str, Any]:
    raw, gz = byte_sizes(path.read_bytes()).values()
    return {"file": path.name, **counts, "bytes": raw, "gzip_bytes": gz}


def _dense_original(art: Artifact) -> dict[str, Any]:
    """Size of the dense model the artifact came from (same architecture, fp32 safetensors)."""
    if art.arch is None:
        return {}
    from .arch import build

    with torch.random.fork_rng(devices=[]):  # a fixed draw: export.json is the same every run
        torch.manual_seed(0)
        dense = build(art.arch, allow_import=art.arch.is_import)
    from .masks import tied_parameters

    tied = tied_parameters(dense)  # a tied tensor is stored once (safetensors refuses shared memory)
    state = {k: v.contiguous() for k, v in dense.state_dict().items() if k not in tied}
    raw, gz = byte_sizes(st_save(state)).values()
    return {"file": "(dense original, fp32 safetensors)", **kept_counts(dense), "bytes": raw,
            "gzip_bytes": gz, "note": "gzip size measured on this architecture's initial weights"}


def validate_dir(path: Path, atol: float = 1e-5, rtol: float = 1e-4,
                 allow_import: str | None = None) -> dict[str, Any]:
    """Re-run every exported model in ``path`` on its saved sample inputs and compare with
    the saved outputs by :func:`compare`'s rule; an ONNX file whose batch axis is fixed
    fails too. ``allow_import``: the import-path architecture the user named (``--arch``;
    the safetensors file of a custom architecture needs it, :func:`load_artifact`).
    Raises :class:`BadInput` when ``path`` is no export directory."""
    import onnx

    xi, xo = path / "sample_inputs.npy", path / "sample_outputs.npy"
    if not xi.is_file() or not xo.is_file():
        raise BadInput(f"{path} has no sample_inputs.npy/sample_outputs.npy (not a tedepr export)")
    x, y = load_npy(xi, "export sample"), load_npy(xo, "export sample")
    results: dict[str, Any] = {}
    for f in sorted(path.glob("*.onnx")):
        results[f.name] = compare(run_onnx(f, x), y, atol, rtol)
        fixed = fixed_batch_axes(onnx.load(str(f), load_external_data=False))
        if fixed:
            results[f.name].update(ok=False, why=f"fixed batch axis: {'; '.join(fixed)}")
    st = path / FILES["safetensors"]
    if st.exists():
        art = load_artifact(st, allow_import=allow_import)
        with torch.no_grad():
            results[st.name] = compare(feed(art.model, torch.from_numpy(x)).numpy(), y, atol, rtol)
    if not results:
        raise BadInput(f"{path} holds no exported model")
    return results
