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


def _part(tensors: dict[str, torch.Tensor], name: str, layout: str, suffix: str) -> torch.Tensor:
    key = f"{name}{SEP}{layout}.{suffix}"
    if key not in tensors:
        raise BadInput(f"artifact is missing tensor {key!r}")
    return tensors[key]


def decode(tensors: dict[str, torch.Tensor], encoding: dict[str, Any]
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`: dense state dict and boolean masks."""
    if not isinstance(encoding, dict):
        raise BadInput("artifact encoding map must be a JSON object")
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
    """The ties an encoding map records (alias -> name), see :func:`encode`."""
    return {n: e["to"] for n, e in encoding.items() if isinstance(e, dict) and e.get("layout") == "tied"}


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes (without the safetensors header)."""
    return _nbytes(tensors)


def byte_sizes(data: bytes) -> dict[str, int]:
    """``{"bytes", "gzip_bytes"}`` of a serialized file: what the disk and the wire (gzip -9,
    no timestamp) would hold. The one place size figures are computed (export, bench)."""
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}
