"""The artifact format: what every stage reads and writes (DESIGN §3).

An artifact is a directory ``OUT/`` holding ``model.safetensors`` (tensors in the compact
layouts of :mod:`tedepr_cli.storage`, with the manifest embedded in the metadata) and
``manifest.json`` (the same manifest, for humans and tools), or a single ``.safetensors``
file carrying the manifest in its metadata. Loading needs no pickle: the manifest names
the architecture, the tensorization plan rebuilds factorized layers, and the tensors fill
them.

Size (issue 17): on small compressed models the metadata used to be most of the file. The
tensors are packed, one per dtype (:func:`tedepr_cli.storage.pack`), the embedded manifest
is compact JSON, and in a *directory* artifact the large derived reports (:data:`EXTERNAL`:
the per-layer tensorization and pruning tables, stored execution plans) live only in
``manifest.json``; the embedded copy records their SHA-256 under ``external``, so an edited
report is still detected and the model loads from ``model.safetensors`` alone (without
those reports). A single-file artifact embeds the whole manifest.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .arch import ArchSpec, build
from .errors import BadInput, InputNotFound, UnsafeInput, opt
from .fsutil import atomic_output
from .masks import attach_masks, get_masks, plain_state_dict, tied_parameters, with_tied_names
from .safeload import read_safetensors, safetensors_header
from .storage import decode, encode, pack, ties_of
from .tensorized.layers import tensorized_specs
from .version import __version__

SCHEMA = "tedepr-artifact"
SCHEMA_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
META_MANIFEST = "tedepr.manifest"
META_ENCODING = "tedepr.encoding"
# manifest entries a directory artifact keeps only in manifest.json: derived per-layer
# reports and stored execution plans (section, key)
EXTERNAL = (("tensorization", "report"), ("pruning", "layers"), ("execution", "plans"))
EXTERNAL_KEY = "external"  # the embedded manifest's record of what it left out
_COMPACT = {"sort_keys": True, "separators": (",", ":")}


@dataclass
class Artifact:
    """A model with everything needed to save, reload and continue it.

    ``meta`` holds the manifest sections later stages fill (``tensorization``,
    ``pruning``, ``training``, ``metrics``, ``history``, ...); unknown sections written by a
    newer tedepr of the same schema version are kept as they are.
    """

    model: nn.Module
    arch: ArchSpec | None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The pruning masks riding on :attr:`model` (:mod:`tedepr_cli.masks`), by plain
        parameter name; empty for an unpruned model."""
        return get_masks(self.model)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model.input_shape)

    @property
    def input_kind(self) -> str:
        return self.model.input_kind

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.meta.setdefault("history", [])

    def record(self, command: str, options: dict[str, Any], seed: int | None = None) -> None:
        """Append a stage to the history (what ran, with which options and seed, by which
        tedepr), so an artifact explains how it was made.

        The same inputs and seed give the same bytes, so nothing that depends on the run
        (clock, host, duration) is recorded; a ``time`` is added only when the environment
        sets ``SOURCE_DATE_EPOCH`` (https://reproducible-builds.org/specs/source-date-epoch/),
        and it is that date. Raises :class:`BadInput` for a malformed value.
        """
        entry: dict[str, Any] = {"command": command, "options": _jsonable(options), "seed": seed,
                                 "tool_version": __version__}
        stamp = source_date()
        if stamp is not None:
            entry["time"] = stamp
        self.history.append(entry)

    def manifest(self) -> dict[str, Any]:
        if self.arch is None:
            raise BadInput(
                "this model has no architecture reference (loaded from a .pt2 program or a "
                f"pickled module); pass {opt('arch')} NAME so its weights can be stored in an artifact"
            )
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "tool_version": __version__,
            "arch": self.arch.to_json(),
            "input_shape": list(self.input_shape),
            "input_kind": self.input_kind,
        }
        for k, v in self.meta.items():
            if k not in out:
                out[k] = _jsonable(v)
        # the model is the source of truth for its tensorized layers (a model tensorized
        # through the Python API has no recorded plan of its own)
        specs = tensorized_specs(self.model)
        if specs or out.get("tensorization"):
            out["tensorization"] = {**(out.get("tensorization") or {}), "layers": _jsonable(specs)}
        out.setdefault("history", [])
        return out


def source_date() -> str | None:
    """``SOURCE_DATE_EPOCH`` (seconds since 1970-01-01 UTC, a decimal integer) as an ISO 8601
    UTC time, or None where it is unset or empty. Raises :class:`BadInput` for any other
    value (the specification asks tools to fail rather than guess)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise BadInput(f"SOURCE_DATE_EPOCH must be a non-negative integer number of seconds, got {raw!r}")
    try:
        when = _dt.datetime.fromtimestamp(int(raw), _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise BadInput(f"SOURCE_DATE_EPOCH {raw} is out of range") from None
    return when.isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """Options and metrics as plain JSON (paths -> str, tuples -> lists, tensors -> lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


# ---------------------------------------------------------------------------- save
def single_file(path: str | Path) -> bool:
    """Whether an artifact written to ``path`` is one ``.safetensors`` file (else a directory)."""
    return Path(path).suffix == ".safetensors"


def save_artifact(art: Artifact, path: str | Path, overwrite: bool = False,
                  layout: str = "auto") -> Path:
    """Write ``art`` atomically to ``path`` (a directory, or a file ending in
    ``.safetensors``). Returns the path written."""
    path = Path(path)
    manifest = art.manifest()
    tensors, encoding = pack(*encode(plain_state_dict(art.model), art.masks, layout=layout,
                                     ties=tied_parameters(art.model)))
    single = single_file(path)
    metadata = {
        META_MANIFEST: json.dumps(manifest if single else embedded_manifest(manifest), **_COMPACT),
        META_ENCODING: json.dumps(encoding, **_COMPACT),
    }
    with atomic_output(path, overwrite=overwrite, directory=not single) as tmp:
        st_path = tmp if single else tmp / MODEL_FILE
        save_file(tensors, str(st_path), metadata=metadata)
        _sort_metadata(st_path)
        if not single:
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def embedded_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest a directory artifact embeds in ``model.safetensors``: ``manifest``
    without the :data:`EXTERNAL` reports, plus ``external`` naming them and the SHA-256 of
    their canonical JSON (unchanged when there is nothing to leave out)."""
    out = dict(manifest)
    removed: dict[str, Any] = {}
    for section, key in EXTERNAL:
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec:
            sec = dict(sec)
            removed[f"{section}.{key}"] = sec.pop(key)
            out[section] = sec
    if removed:
        digest = hashlib.sha256(json.dumps(removed, **_COMPACT).encode()).hexdigest()
        out[EXTERNAL_KEY] = {"file": MANIFEST_FILE, "keys": sorted(removed), "sha256": digest}
    return out


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    safetensors (0.8 and earlier; upstream issue safetensors#584) writes the metadata in the
    iteration order of a Rust ``HashMap``, seeded per process, so two saves of the same
    artifact differ in bytes. Sorting changes no length, offset or tensor. If the header is
    not the compact JSON this expects (a future safetensors), it is left as written.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        body = f.read(n).rstrip(b" ")
        header = json.loads(body)
        compact = {"separators": (",", ":"), "ensure_ascii": False}
        if not isinstance(header.get("__metadata__"), dict) or \
                json.dumps(header, **compact).encode() != body:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, **compact).encode()
        if len(canonical) == len(body):
            f.seek(8)
            f.write(canonical)


# ---------------------------------------------------------------------------- load
RUN_BEST = "best"


def resolve(path: str | Path) -> Path:
    """A finetune run directory stands for its best checkpoint (``RUN/best``)."""
    p = Path(path)
    if p.is_dir() and not (p / MODEL_FILE).exists() and (p / RUN_BEST / MODEL_FILE).exists():
        return p / RUN_BEST
    return p


def is_artifact(path: str | Path) -> bool:
    """True for an artifact directory (or a finetune run directory), or a .safetensors
    whose metadata has a manifest."""
    p = resolve(path)
    if p.is_dir():
        return (p / MODEL_FILE).exists() or (p / MANIFEST_FILE).exists()
    if p.suffix == ".safetensors" and p.is_file():
        try:
            return META_MANIFEST in (safetensors_header(p).get("__metadata__") or {})
        except BadInput:
            return False
    return False


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Parse and validate a manifest's envelope (schema, version, arch)."""
    try:
        m = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise BadInput(f"{where}: manifest is not valid JSON") from None
    if not isinstance(m, dict):
        raise BadInput(f"{where}: manifest must be a JSON object")
    if m.get("schema") != SCHEMA:
        raise BadInput(f"{where}: not a tedepr artifact (schema {m.get('schema')!r})")
    ver = m.get("schema_version")
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise BadInput(f"{where}: manifest schema_version must be an integer")
    if ver > SCHEMA_VERSION or ver < 1:
        raise BadInput(f"{where}: artifact schema version {ver} is not supported by this "
                       f"tedepr (supports 1..{SCHEMA_VERSION}); upgrade tedepr")
    ArchSpec.from_json(m.get("arch"))
    for key in ("history",):
        if key in m and not isinstance(m[key], list):
            raise BadInput(f"{where}: manifest '{key}' must be a list")
    for key in ("tensorization", "pruning", "metrics", "training"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise BadInput(f"{where}: manifest '{key}' must be an object")
    return m


def load_artifact(path: str | Path, allow_import: str | None = None) -> Artifact:
    """Rebuild an artifact's model without pickles.

    ``allow_import`` is the import path the user typed with ``--arch``; a manifest that
    names any other import path is refused (it would run code the user did not name).
    """
    p = resolve(path)
    if not p.exists():
        raise InputNotFound(f"{p} does not exist")
    if p.is_dir():
        st_path = p / MODEL_FILE
        if not st_path.is_file():
            raise BadInput(f"{p} is not a tedepr artifact: {MODEL_FILE} is missing")
        root = p.resolve()
        for member in (st_path, p / MANIFEST_FILE):
            if member.exists() and root not in member.resolve().parents:
                raise UnsafeInput(f"{member} points outside its artifact directory (symlink to "
                                  f"{member.resolve()}); refusing to follow it")
    else:
        st_path = p
    tensors, meta = read_safetensors(st_path)
    if META_MANIFEST not in meta:
        raise BadInput(f"{st_path} has no tedepr manifest in its metadata")
    manifest = parse_manifest(meta[META_MANIFEST], str(st_path))
    if p.is_dir() and (p / MANIFEST_FILE).exists():
        side = parse_manifest((p / MANIFEST_FILE).read_text(errors="replace"),
                              str(p / MANIFEST_FILE))
        # the embedded copy is the whole manifest (older artifacts) or leaves the reports
        # to manifest.json, whose digest it records
        if side != manifest and embedded_manifest(side) != manifest:
            raise BadInput(f"{p / MANIFEST_FILE} differs from the manifest embedded in "
                           f"{MODEL_FILE}; the artifact was edited or is corrupt")
        manifest = side
    try:
        encoding = json.loads(meta.get(META_ENCODING, "{}"))
    except json.JSONDecodeError:
        raise BadInput(f"{st_path}: encoding metadata is not valid JSON") from None
    state, masks = decode(tensors, encoding)
    spec = ArchSpec.from_json(manifest["arch"])
    model = build(spec, allow_import=spec.is_import and spec.name == allow_import)
    if manifest.get("tensorization"):
        from .tensorized.plan import rebuild  # the coarse-grain stage owns this

        rebuild(model, manifest["tensorization"])
    retie(model, ties_of(encoding))
    load_state(model, state, where=str(p))
    model_params = dict(model.named_parameters(remove_duplicate=False))
    for name in masks:
        if name not in model_params:
            raise BadInput(f"{p}: mask for {name!r}, which is not a parameter of the model")
    attach_masks(model, masks)
    meta_out = {k: copy.deepcopy(v) for k, v in manifest.items()
                if k not in ("schema", "schema_version", "tool_version", "arch",
                             "input_shape", "input_kind", EXTERNAL_KEY)}
    model.eval()
    return Artifact(model=model, arch=spec, meta=meta_out, source=str(p))


def retie(model: nn.Module, ties: dict[str, str]) -> None:
    """Make every ``alias`` parameter of ``ties`` (alias -> name) the very tensor ``name``
    is, as when the artifact was saved (an architecture that ties them already is left as
    it is). Raises :class:`BadInput` for a name that is not a plain parameter or shapes
    that differ."""
    for alias, canonical in ties.items():
        try:
            owner_a, attr_a = _param_owner(model, alias)
            owner_c, attr_c = _param_owner(model, canonical)
        except (AttributeError, KeyError):
            raise BadInput(f"the artifact ties {alias} to {canonical}, which the model does not "
                           "have") from None
        a, c = getattr(owner_a, attr_a), getattr(owner_c, attr_c)
        if a is c:
            continue
        if a.shape != c.shape:
            raise BadInput(f"the artifact ties {alias} {tuple(a.shape)} to {canonical} {tuple(c.shape)}")
        setattr(owner_a, attr_a, c)


def _param_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod, _, attr = name.rpartition(".")
    owner = model.get_submodule(mod) if mod else model
    if not isinstance(owner._parameters.get(attr), nn.Parameter):
        raise KeyError(name)
    return owner, attr


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True
               ) -> dict[str, list[str]]:
    """``load_state_dict`` with every missing, unexpected and mis-shaped key named.

    A tied weight (:func:`~tedepr_cli.masks.tied_parameters` of ``model``) may be given
    under any one of its names (checkpoints often store it once). With ``strict=False``
    unexpected keys are ignored and missing ones keep the model's current values; mis-shaped
    keys are refused either way. Returns ``{"missing": [...], "unexpected": [...]}``."""
    state = with_tied_names(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing and strict:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected and strict:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shaped:
        problems.append("mis-shaped keys: " + ", ".join(shaped))
    if problems:
        hint = "" if shaped or not strict else f" ({opt('non-strict')} loads it anyway and lists them)"
        raise BadInput(f"{where} does not fit the architecture; " + "; ".join(problems) + hint)
    state = {k: v for k, v in state.items() if k in expected}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"{where} has NaN/Inf values in: {', '.join(bad)}")
    converted = {k: v.to(expected[k].dtype) if v.dtype != expected[k].dtype
                 and v.is_floating_point() and expected[k].is_floating_point() else v
                 for k, v in state.items()}
    model.load_state_dict(converted, strict=strict)
    return {"missing": missing, "unexpected": unexpected}
