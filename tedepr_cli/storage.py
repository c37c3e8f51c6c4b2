"""Compact, pickle-free tensor storage for artifacts (safetensors has no sparse dtype).

A masked (pruned) tensor is stored as its kept values plus the index structure of its
mask, so bytes on disk follow the kept-entry count. For each masked tensor the smallest
of four documented layouts is chosen:

``csr``      ``<name>::csr.values`` (kept values, row-major), ``<name>::csr.indices``
             (column of each value, narrowest unsigned dtype), ``<name>::csr.indptr``
             (row starts, ``rows + 1`` entries); rows = first dim, cols = the rest.
``coo``      ``<name>::coo.values`` and ``<name>::coo.index`` (flat positions, ascending).
``bitmask``  ``<name>::bitmask.values`` and ``<name>::bitmask.bits`` (``numpy.packbits``
             of the flattened mask, big-endian bit order).
``delta``    ``<name>::delta.values`` and ``<name>::delta.gaps``: the gaps between
             consecutive kept flat positions (first: the position itself; then
             ``pos[i] - pos[i-1] - 1``) as unsigned LEB128 varints in a ``uint8`` array
             -- about one byte per kept entry when gaps are < 128, close to the entropy
             of the mask at extreme sparsity.

An unmasked tensor is stored as itself under its own name. The per-tensor choice, shape and
dtype live in the ``tedepr.encoding`` metadata entry (JSON). Decoding restores the dense
tensor (zeros where masked) and its boolean mask, bit for bit.

**Packed files** (:func:`pack`, what artifacts write since issue 17): a safetensors header
spends ~80 bytes per tensor, more than a small pruned core's whole payload, so every part
above is concatenated, per dtype, into one 1-D tensor ``tedepr.pack.<CODE>`` (``F32``,
``U8``, ``U16``, ... as safetensors names them), and ``tedepr.encoding`` becomes::

    {"format": 2, "tensors": [[name, shape], ...                           # unmasked float32
                              [name, shape, CODE], ...                     # unmasked, other dtype
                              [name, shape, layout, [[CODE, n], ...]]]}    # masked

listed in storage order: each entry's parts (an unmasked tensor is one part; a masked
tensor's parts are the layout's above, in that order, values first, ``n`` elements each,
and the values' CODE is the tensor's dtype) follow the previous entries' parts of the same
dtype. :func:`unpack` restores the per-part tensors; files written before (a dict of
``{name: {"layout", "shape", "dtype"}}``) decode as they are.
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import torch

from .errors import BadInput

SEP = "::"
_UNSIGNED = [(np.uint8, 2**8), (np.uint16, 2**16), (np.uint32, 2**32)]
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def narrowest_unsigned(max_value: int) -> type:
    """Smallest unsigned numpy dtype that holds ``max_value``."""
    for dt, limit in _UNSIGNED:
        if max_value < limit:
            return dt
    return np.uint64


def leb128_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 (7 bits per byte, high bit = more bytes follow), vectorized."""
    v = values.astype(np.uint64)
    lens = np.ones(len(v), dtype=np.int64)
    t = v >> np.uint64(7)
    while t.any():
        lens += t > 0
        t >>= np.uint64(7)
    out = np.empty(int(lens.sum()), dtype=np.uint8)
    starts = np.cumsum(lens) - lens
    for j in range(int(lens.max()) if len(lens) else 0):
        sel = lens > j
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lens[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out


def leb128_decode(data: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`leb128_encode`; malformed input raises :class:`BadInput`."""
    ends = np.flatnonzero(data < 0x80)
    if len(ends) != count or (len(data) and (not len(ends) or ends[-1] != len(data) - 1)):
        raise BadInput("varint-coded indices are malformed")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if count else np.zeros(0, np.int64)
    lens = ends - starts + 1
    if count and lens.max() > 9:
        raise BadInput("varint-coded indices are too long")
    out = np.zeros(count, dtype=np.int64)
    for j in range(int(lens.max()) if count else 0):
        sel = lens > j
        out[sel] |= (data[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    return out


def _to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _candidates(values_flat: torch.Tensor, mask: torch.Tensor) -> dict[str, dict[str, Any]]:
    """All layouts for one masked tensor, as {layout: {suffix: tensor}}."""
    flat_mask = mask.reshape(-1).numpy()
    pos = np.flatnonzero(flat_mask)
    vals = values_flat[torch.from_numpy(pos)] if len(pos) else values_flat[:0]
    numel = flat_mask.size
    out: dict[str, dict[str, Any]] = {
        "coo": {"values": vals, "index": _to_torch(pos.astype(narrowest_unsigned(max(numel - 1, 0))))},
        "bitmask": {"values": vals, "bits": _to_torch(np.packbits(flat_mask.astype(np.uint8)))},
        "delta": {"values": vals, "gaps": _to_torch(leb128_encode(np.diff(pos, prepend=-1) - 1))},
    }
    if mask.dim() >= 2:
        rows = mask.shape[0]
        cols = numel // rows
        r, c = np.divmod(pos, cols)
        indptr = np.zeros(rows + 1, dtype=np.int64)
        np.add.at(indptr, r + 1, 1)
        indptr = np.cumsum(indptr)
        out["csr"] = {
            "values": vals,
            "indices": _to_torch(c.astype(narrowest_unsigned(max(cols - 1, 0)))),
            "indptr": _to_torch(indptr.astype(narrowest_unsigned(len(pos)))),
        }
    return out


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
           layout: str = "auto", ties: dict[str, str] | None = None
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Turn a state dict plus masks into flat safetensors entries and their encoding map.

    ``layout`` forces one of ``csr``/``coo``/``bitmask``/``delta`` for every masked tensor (tests,
    experiments); ``auto`` picks the smallest per tensor. ``ties`` (alias -> name, tied
    weights: :func:`~tedepr_cli.masks.tied_parameters`) are stored once: an alias is the
    entry ``{"layout": "tied", "to": name}`` and no tensor (safetensors refuses tensors
    that share memory); :func:`decode` gives it the same tensor and mask back.
    """
    masks = {k: v for k, v in (masks or {}).items() if k not in (ties or {})}
    for alias, canonical in (ties or {}).items():
        if canonical not in state:
            raise BadInput(f"{alias} is tied to {canonical}, which is not in the model")
    state = dict(state)
    unknown = set(masks) - set(state)
    if unknown:
        raise BadInput(f"masks for tensors that are not in the model: {sorted(unknown)}")
    tensors: dict[str, torch.Tensor] = {}
    encoding: dict[str, Any] = {}
    for name, t in state.items():
        if name in (ties or {}):
            encoding[name] = {"layout": "tied", "to": ties[name]}
            continue
        if SEP in name:
            raise BadInput(f"tensor name {name!r} contains the reserved separator {SEP!r}")
        t = t.detach().cpu().contiguous()
        if name not in masks:
            tensors[name] = t
            encoding[name] = {"layout": "dense"}
            continue
        m = masks[name].detach().cpu().bool()
        if m.shape != t.shape:
            raise BadInput(f"mask of {name} has shape {tuple(m.shape)}, tensor {tuple(t.shape)}")
        cands = _candidates(t.reshape(-1), m)
        if layout == "auto":
            choice = min(cands, key=lambda k: (_nbytes(cands[k]), k))
        elif layout in cands:
            choice = layout
        else:
            raise BadInput(f"layout {layout!r} is not available for {name} (shape {tuple(t.shape)})")
        for suffix, part in cands[choice].items():
            tensors[f"{name}{SEP}{choice}.{suffix}"] = part.contiguous()
        encoding[name] = {"layout": choice, "shape": list(t.shape),
                          "dtype": str(t.dtype).removeprefix("torch.")}
    return tensors, encoding


PACKED_FORMAT = 2
PACK_PREFIX = "tedepr.pack."
PARTS = {"coo": ("values", "index"), "bitmask": ("values", "bits"), "delta": ("values", "gaps"),
         "csr": ("values", "indices", "indptr")}  # the parts of each layout, in packed order
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
          torch.bool: "BOOL"}
_BY_CODE = {c: d for d, c in _CODES.items()}


def _code(t: torch.Tensor) -> str:
    if t.dtype not in _CODES:
        raise BadInput(f"cannot store a {t.dtype} tensor")
    return _CODES[t.dtype]


def pack(tensors: dict[str, torch.Tensor], encoding: dict[str, Any]
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`encode`'s output as one tensor per dtype plus the format-2 encoding (see the
    module doc): the header then holds a handful of entries instead of one per part."""
    entries: list[list[Any]] = []
    blobs: dict[str, list[torch.Tensor]] = {}

    def put(t: torch.Tensor) -> list[Any]:
        code = _code(t)
        blobs.setdefault(code, []).append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        return [code, t.numel()]

    for name, enc in encoding.items():
        lay = enc["layout"]
        if lay == "tied":  # stored once under the name it is tied to: no data of its own
            entries.append([name, [], "tied", enc["to"]])
            continue
        if lay == "dense":
            t = tensors[name]
            put(t)
            entries.append([name, list(t.shape)] + ([] if t.dtype is torch.float32 else [_code(t)]))
        else:
            parts = [put(tensors[f"{name}{SEP}{lay}.{suffix}"]) for suffix in PARTS[lay]]
            if parts[0][0] != _CODES[_DTYPES[enc["dtype"]]]:
                raise BadInput(f"values of {name} are not stored in the tensor's dtype")
            entries.append([name, list(enc["shape"]), lay, parts])
    packed = {f"{PACK_PREFIX}{code}": torch.cat(ts).view(_BY_CODE[code])
              for code, ts in sorted(blobs.items())}
    return packed, {"format": PACKED_FORMAT, "tensors": entries}


def is_packed(encoding: Any) -> bool:
    """Whether ``encoding`` is the format-2 (packed) encoding rather than a per-tensor map."""
    return isinstance(encoding, dict) and isinstance(encoding.get("format"), int) \
        and not isinstance(encoding.get("format"), bool)


def unpack(tensors: dict[str, torch.Tensor], encoding: dict[str, Any]
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`pack`: the per-part tensors (views into the packed ones) and the
    per-tensor encoding map. Malformed entries, parts past the end of their packed tensor
    and packed data no entry claims raise :class:`BadInput`."""
    if encoding.get("format") != PACKED_FORMAT:
        raise BadInput(f"artifact encoding format {encoding.get('format')!r} is not supported by this "
                       f"tedepr (supports {PACKED_FORMAT}); upgrade tedepr")
    entries = encoding.get("tensors")
    if not isinstance(entries, list):
        raise BadInput("artifact encoding has no tensor list")
    offsets = {k.removeprefix(PACK_PREFIX): 0 for k in tensors if k.startswith(PACK_PREFIX)}
    out: dict[str, torch.Tensor] = {}
    enc: dict[str, Any] = {}

    def take(code: Any, n: Any, what: str) -> torch.Tensor:
        if code not in offsets or not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadInput(f"artifact encoding of {what!r} names a packed part ({code!r}, {n!r}) "
                           "the file does not have")
        blob, start = tensors[f"{PACK_PREFIX}{code}"], offsets[code]
        if blob.dim() != 1 or start + n > blob.numel():
            raise BadInput(f"packed {code} data ends before the part of {what!r}")
        offsets[code] = start + n
        return blob[start:start + n]

    for e in entries:
        if not isinstance(e, list) or len(e) not in (2, 3, 4) or not isinstance(e[0], str) \
                or not isinstance(e[1], list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                         and d >= 0 for d in e[1]):
            raise BadInput(f"artifact encoding entry {str(e)[:80]} is malformed")
        name, shape = e[0], e[1]
        if name in enc:
            raise BadInput(f"artifact encoding lists {name!r} twice")
        if len(e) < 4:  # unmasked: one part of the tensor's own dtype
            numel = 1
            for d in shape:
                numel *= d
            out[name] = take(e[2] if len(e) == 3 else "F32", numel, name).reshape(shape)
            enc[name] = {"layout": "dense"}
            continue
        lay, parts = e[2], e[3]
        if lay == "tied":
            if not isinstance(parts, str):
                raise BadInput(f"artifact encoding of {name!r} is malformed")
            enc[name] = {"layout": "tied", "to": parts}
            continue
        if lay not in PARTS or not isinstance(parts, list) or len(parts) != len(PARTS[lay]) \
                or not all(isinstance(p, list) and len(p) == 2 for p in parts) or parts[0][0] not in _BY_CODE:
            raise BadInput(f"artifact encoding of {name!r} is malformed")
        for suffix, part in zip(PARTS[lay], parts, strict=True):
            out[f"{name}{SEP}{lay}.{suffix}"] = take(part[0], part[1], name)
        enc[name] = {"layout": lay, "shape": shape,
                     "dtype": str(_BY_CODE[parts[0][0]]).removeprefix("torch.")}
    left = [c for c, off in offsets.items() if off != tensors[f"{PACK_PREFIX}{c}"].numel()]
    if left:
        raise BadInput(f"packed {', '.join(left)} data is longer than its encoding describes")
    return out, enc


def masked_part_bytes(tensors: dict[str, torch.Tensor], encoding: dict[str, Any]
                      ) -> dict[str, tuple[str, int]]:
    """``{name: (layout, bytes)}`` of every masked tensor of a stored file (packed or not):
    what its kept values and index structure take."""
    if is_packed(encoding):
        tensors, encoding = unpack(tensors, encoding)
    return {name: (enc["layout"], sum(t.numel() * t.element_size() for k, t in tensors.items()
                                      if k.startswith(f"{name}{SEP}")))
            for name, enc in encoding.items() if enc.get("layout") not in ("dense", "tied")}


def _part(tensors: dict[str, torch.Tensor], name: str, layout: str, suffix: str) -> torch.Tensor:
    key = f"{name}{SEP}{layout}.{suffix}"
    if key not in tensors:
        raise BadInput(f"artifact is missing tensor {key!r}")
    return tensors[key]


def decode(tensors: dict[str, torch.Tensor], encoding: dict[str, Any]
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode` (or of :func:`pack`): dense state dict and boolean masks."""
    if not isinstance(encoding, dict):
        raise BadInput("artifact encoding map must be a JSON object")
    if is_packed(encoding):
        tensors, encoding = unpack(tensors, encoding)
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, enc in encoding.items():
        if not isinstance(enc, dict) or "layout" not in enc:
            raise BadInput(f"artifact encoding of {name!r} is malformed")
        lay = enc["layout"]
        if lay == "tied":
            continue  # filled in below, once every tensor is decoded
        if lay == "dense":
            if name not in tensors:
                raise BadInput(f"artifact is missing tensor {name!r}")
            state[name] = tensors[name]
            continue
        try:
            shape = [int(s) for s in enc["shape"]]
            dtype = _DTYPES[enc["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"artifact encoding of {name!r} lacks a valid shape/dtype") from None
        if any(s < 0 for s in shape):
            raise BadInput(f"artifact encoding of {name!r} has a negative dimension")
        numel = int(np.prod(shape, dtype=np.int64))
        values = _part(tensors, name, lay, "values").to(dtype).reshape(-1)
        if lay == "coo":
            pos = _part(tensors, name, lay, "index").to(torch.int64)
        elif lay == "delta":
            gaps = leb128_decode(_part(tensors, name, lay, "gaps").numpy(), values.numel())
            pos = torch.from_numpy(np.cumsum(gaps + 1) - 1)
        elif lay == "bitmask":
            bits = _part(tensors, name, lay, "bits").numpy()
            flat = np.unpackbits(bits)[:numel]
            if flat.size != numel:
                raise BadInput(f"bitmask of {name!r} is too short for shape {shape}")
            pos = torch.from_numpy(np.flatnonzero(flat))
        elif lay == "csr":
            indptr = _part(tensors, name, lay, "indptr").to(torch.int64)
            cols = _part(tensors, name, lay, "indices").to(torch.int64)
            if not shape or indptr.numel() != shape[0] + 1 or int(indptr[-1]) != cols.numel():
                raise BadInput(f"CSR structure of {name!r} does not match its shape {shape}")
            width = numel // shape[0] if shape[0] else 0
            counts = indptr.diff()
            if (counts < 0).any():
                raise BadInput(f"CSR row pointers of {name!r} are not ascending")
            rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
            pos = rows * width + cols
        else:
            raise BadInput(f"unknown storage layout {lay!r} for {name!r}")
        if pos.numel() != values.numel():
            raise BadInput(f"{name!r}: {values.numel()} values for {pos.numel()} positions")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= numel):
            raise BadInput(f"{name!r}: stored index out of range for shape {shape}")
        dense = torch.zeros(numel, dtype=dtype)
        mask = torch.zeros(numel, dtype=torch.bool)
        dense[pos] = values
        mask[pos] = True
        state[name] = dense.reshape(shape)
        masks[name] = mask.reshape(shape)
    for name, enc in encoding.items():
        if enc["layout"] == "tied":
            to = enc.get("to")
            if to not in state:
                raise BadInput(f"artifact ties {name!r} to {to!r}, which it does not store")
            state[name] = state[to]
            if to in masks:
                masks[name] = masks[to]
    return state, masks


def ties_of(encoding: dict[str, Any]) -> dict[str, str]:
    """The ties an encoding records (alias -> name), see :func:`encode`; packed (format 2)
    or per-tensor."""
    if is_packed(encoding):
        return {e[0]: e[3] for e in encoding.get("tensors") or []
                if isinstance(e, list) and len(e) == 4 and e[2] == "tied"}
    return {n: e["to"] for n, e in encoding.items() if isinstance(e, dict) and e.get("layout") == "tied"}


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes (without the safetensors header)."""
    return _nbytes(tensors)


def byte_sizes(data: bytes) -> dict[str, int]:
    """``{"bytes", "gzip_bytes"}`` of a serialized file: what the disk and the wire (gzip -9,
    no timestamp) would hold. The one place size figures are computed (export, bench)."""
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}
