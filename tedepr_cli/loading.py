"""Load any supported model input into an :class:`~tedepr_cli.artifact.Artifact`.

Accepted inputs (DESIGN §3):

* a tedepr artifact (directory, or ``.safetensors`` with a manifest);
* a ``state_dict`` in ``.safetensors`` or ``.pt``/``.pth`` (``torch.load(weights_only=True)``)
  plus an architecture (``--arch``);
* a ``torch.export`` program ``.pt2`` (its pickled parts are checked first, see
  :func:`_check_pt2`), used as is or, with ``--arch``, poured into that architecture;
* a fully pickled ``nn.Module`` -- only with ``trust_pickle=True``: unpickling runs
  arbitrary code from the file, so tedepr refuses it by default.

:func:`build_fresh` makes the same kind of artifact from an architecture alone (a freshly
initialized model: pruning at initialization from scratch).
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ArchSpec, build, cwd_importable, is_arch_name
from .artifact import Artifact, is_artifact, load_artifact, load_state
from .errors import BadInput, InputNotFound, UnsafeInput, opt
from .safeload import (
    PickledObjects,
    first_line,
    held_torch_logs,
    load_torch,
    pickle_builds_objects,
    read_safetensors,
)
from .surgery import input_kind

log = logging.getLogger("tedepr")

def _pickle_refusal(path: object) -> str:
    return (f"{path} is a pickled Python object, not plain tensors: unpickling it would run code "
            "stored in the file. Save a state_dict instead (torch.save(model.state_dict(), ...)) or, "
            f"only if you trust the file's origin, pass {opt('trust-pickle')}")


def load_model(path: str | Path, arch: ArchSpec | None = None,
               trust_pickle: bool = False, strict: bool = True) -> Artifact:
    """Load ``path`` as an :class:`Artifact` (model, architecture, masks, history).

    ``strict=False`` loads a checkpoint whose keys do not all fit ``arch`` (unexpected keys
    ignored, missing ones left at the architecture's initialization), logs both lists and
    records them in the manifest's ``origin.keys``. A Hugging Face model folder
    (``config.json`` and weights, no tedepr manifest) loads its weights file into ``arch``;
    without ``arch`` it is :class:`BadInput` saying how to write one.
    """
    p = Path(path)
    if not p.exists():
        if is_arch_name(str(p)):  # `tedepr eval lenet300`: a zoo name where a file goes
            raise InputNotFound(f"{p} does not exist: it names an architecture, not a file; pass a "
                                f"checkpoint or artifact of it (a checkpoint with {opt('arch')} {p}), or "
                                f"build a freshly initialized one with decompose or prune and "
                                f"{opt('init')} random")
        raise InputNotFound(f"{p} does not exist")
    hf = _hf_weights(p)
    if hf is not None:
        if arch is None:
            raise BadInput(
                f"{p} is a Hugging Face model folder (config.json + {hf.name}), not a tedepr "
                "artifact: write a function that builds the model, e.g. in mymodels.py `def "
                f"encoder(): m = transformers.AutoModel.from_pretrained('{p}'); m.input_shape = "
                f"(128,); return m`, and pass {opt('arch')} mymodels:encoder (its weights come from "
                f"{hf.name}; add {opt('non-strict')} if the keys differ)")
        p = hf
    if is_artifact(p):
        art = load_artifact(p, allow_import=arch.name if arch and arch.is_import else None)
        if arch is not None and arch.name != art.arch.name:
            raise BadInput(f"{p} is an artifact of {art.arch.name!r}, but {opt('arch')} says {arch.name!r}")
        return art
    if p.is_dir():
        raise InputNotFound(f"{p} is a directory but not a tedepr artifact (no model.safetensors)")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        tensors, _ = read_safetensors(p)
        return _from_state(p, tensors, arch, strict=strict)
    if suffix == ".pt2":
        return _load_pt2(p, arch, trust_pickle, strict)
    if suffix == ".onnx":
        raise BadInput(f"{p}: ONNX models are an output of tedepr, not an input; "
                       "load the PyTorch checkpoint or artifact instead")
    return _load_torch_file(p, arch, trust_pickle, strict)


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _hf_weights(p: Path) -> Path | None:
    """The weights file of a Hugging Face model folder (``config.json`` beside
    ``model.safetensors`` or ``pytorch_model.bin``, no tedepr manifest), else None."""
    if not p.is_dir() or not (p / "config.json").is_file() or (p / "manifest.json").exists():
        return None
    for name in HF_WEIGHTS:
        f = p / name
        if f.is_file() and not (name == "model.safetensors" and is_artifact(f)):
            return f
    return None


def build_fresh(arch: ArchSpec, seed: int = 0) -> Artifact:
    """A freshly initialized model of ``arch`` (a zoo name, or an import path the user typed),
    as an artifact whose manifest records ``origin = {"kind": "fresh", ...}``.

    The weights are the architecture's own initialization drawn from ``torch.manual_seed(seed)``
    (the same seed gives the same weights); the global RNG is restored afterwards. Raises
    what :func:`~tedepr_cli.arch.build` raises (:class:`BadInput` for kwargs the architecture
    rejects, :class:`~tedepr_cli.errors.UsageError` for an import path that does not import).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(arch, allow_import=True).eval()  # the user typed the architecture
    art = Artifact(model=model, arch=arch, source=arch.name)
    art.meta["origin"] = {"kind": "fresh", "arch": arch.name, "seed": seed,
                          "weights": "the architecture's own initialization"}
    return art


def _from_state(p: Path, state: dict[str, torch.Tensor], arch: ArchSpec | None,
                source_kind: str = "state_dict", strict: bool = True) -> Artifact:
    if arch is None:
        raise BadInput(f"{p} holds only weights (a state_dict); pass {opt('arch')} NAME "
                       f"(a zoo model) or {opt('arch')} pkg.module:callable to say which network")
    model = build(arch, allow_import=True)  # the user typed --arch on this command line
    keys = load_state(model, state, where=str(p), strict=strict)
    model.eval()
    art = Artifact(model=model, arch=arch, source=str(p))
    art.meta["origin"] = {"path": str(p), "kind": source_kind}
    if keys["missing"] or keys["unexpected"]:
        art.meta["origin"]["keys"] = keys
        for what, names in (("missing (kept the architecture's initialization)", keys["missing"]),
                            ("unexpected (ignored)", keys["unexpected"])):
            if names:
                log.warning(f"{p}: {len(names)} key(s) {what}: {', '.join(names)}")
    return art


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A state dict, or the one nested under a usual checkpoint key."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if key in obj:
                found = _find_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def _logged_cause(held: list[logging.LogRecord]) -> str | None:
    """The first sentence of the last exception torch logged, without C++ enforce prefixes."""
    for r in reversed(held):
        if r.exc_info and r.exc_info[1] is not None:
            text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first_line(r.exc_info[1]))
            return text.split(". ")[0].rstrip(".") or None
    return None


def _load_torch_file(p: Path, arch: ArchSpec | None, trust_pickle: bool, strict: bool = True) -> Artifact:
    try:
        obj = load_torch(p, "checkpoint")
    except PickledObjects:  # a pickle that imports/calls things: only behind --trust-pickle
        if not trust_pickle:
            raise UnsafeInput(_pickle_refusal(p)) from None
        obj = _trusted_load(p)
    if isinstance(obj, nn.Module):
        return _from_module(p, obj, arch, "pickled module", strict)
    state = _find_state_dict(obj)
    if state is None:
        raise BadInput(f"{p} holds a {type(obj).__name__}, not a state_dict of tensors or a "
                       "module")
    return _from_state(p, state, arch, strict=strict)


def _trusted_load(p: Path) -> Any:
    try:
        with held_torch_logs(), cwd_importable():
            return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # user code ran: anything can fail
        raise BadInput(f"{p}: unpickling failed: {first_line(e)}") from None


def _recover_arch(p: Path, module: nn.Module) -> tuple[ArchSpec | None, str]:
    """The architecture of a trusted pickled module, where one can be recovered: its class
    as ``pkg.module:Class``, built with no arguments, with the very state-dict keys and
    shapes of the file. Returns ``(spec or None, hint)``: the hint says what to pass instead.
    Only called with ``--trust-pickle`` (unpickling already ran this module's code)."""
    cls = type(module)
    path = f"{cls.__module__}:{cls.__qualname__}"
    hint = (f"{p} holds a pickled {cls.__qualname__}; pass {opt('arch')} pkg.module:callable that builds "
            f"this network (e.g. {opt('arch')} {path} with {opt('arch-kwargs')} for its constructor); the "
            "file's "
            "weights fill it")
    if cls.__module__ in ("__main__", "builtins") or "<" in cls.__qualname__ or not is_arch_name(path):
        return None, hint
    shape = getattr(module, "input_shape", None)
    spec = ArchSpec(path, {}, tuple(int(s) for s in shape) if shape is not None else None)
    try:
        with torch.random.fork_rng(devices=[]):
            built = build(spec, allow_import=True)
    except Exception:  # a constructor that needs arguments, or anything user code raises
        return None, hint
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in built.state_dict().items()} != want:
        return None, hint
    return spec, hint


def _from_module(p: Path, module: nn.Module, arch: ArchSpec | None, kind: str, strict: bool = True
                 ) -> Artifact:
    if arch is None and kind == "pickled module":
        arch, hint = _recover_arch(p, module)
        if arch is not None:
            log.info(f"{p}: architecture recovered from the pickled module: {arch.name} (later "
                     f"commands on its artifacts need {opt('arch')} {arch.name})")
    if arch is not None:
        return _from_state(p, module.state_dict(), arch, source_kind=kind, strict=strict)
    if getattr(module, "input_shape", None) is None:
        raise BadInput(f"{p}: the module declares no input_shape; pass {opt('arch')} to rebuild it")
    module.input_kind = input_kind(module, tuple(module.input_shape))
    module.eval()
    art = Artifact(model=module, arch=None, source=str(p))
    art.meta["origin"] = {"path": str(p), "kind": kind, "arch_hint": hint if kind == "pickled module" else (
        f"{p} is a torch.export program: its graph calls operators, not layer modules, so tedepr "
        f"cannot swap its layers for tensorized ones; pass {opt('arch')} pkg.module:callable that builds "
        "the network (the program's weights fill it)")}
    return art


# ---------------------------------------------------------------------------- .pt2
def _check_pt2(p: Path, data: bytes) -> None:
    """Refuse a ``.pt2`` whose pickled members could run code.

    ``torch.export.load`` unpickles sample inputs and some weights/constants and falls
    back to ``weights_only=False`` when the safe loader fails, so every member that is not
    a raw tensor payload or JSON is checked here first with the safe loader.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except zipfile.BadZipFile:
        raise BadInput(f"{p} is not a torch.export archive (not a zip file)") from None
    raw_payloads: set[str] = set()
    for name in names:
        if name.endswith("_config.json") and "/data/" in name:
            try:
                cfg = json.loads(zf.read(name)).get("config", {})
            except (json.JSONDecodeError, AttributeError):
                raise BadInput(f"{p}: {name} is not valid JSON") from None
            base = name.rsplit("/", 1)[0]
            for entry in cfg.values():
                if isinstance(entry, dict) and not entry.get("use_pickle", True):
                    raw_payloads.add(f"{base}/{entry.get('path_name')}")
    for name in names:
        if name.endswith("/") or name in raw_payloads or name.endswith(".json"):
            continue
        blob = zf.read(name)
        if blob[:2] == b"PK":
            try:
                load_torch(f"{p} (member {name})", "archive", data=blob)
            except PickledObjects:
                raise UnsafeInput(_pickle_refusal(f"{p} (member {name})")) from None
        elif blob[:1] == b"\x80" and pickle_builds_objects(blob):
            raise UnsafeInput(_pickle_refusal(f"{p} (member {name})"))


class ExportedProgramModule(nn.Module):
    """Runs a ``torch.export`` program as a module. The program was captured in one mode
    (usually eval) and cannot switch, so ``train()``/``eval()`` leave it as it is."""

    def __init__(self, program: nn.Module, batch: int | None = None, where: str = "") -> None:
        super().__init__()
        self.program = program
        self.batch = batch  # a program exported with a static batch size runs only at it
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is not None and x.shape[0] != self.batch:
            raise BadInput(f"{self.where} was exported with a static batch size of {self.batch} and "
                           f"cannot run batch {x.shape[0]}: export it with a dynamic batch dimension "
                           f"(torch.export.Dim) or pass {opt('arch')} to pour its weights into the network")
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode
        return self


def _load_pt2(p: Path, arch: ArchSpec | None, trust_pickle: bool, strict: bool = True) -> Artifact:
    data = p.read_bytes()
    if not trust_pickle:
        _check_pt2(p, data)
    with held_torch_logs() as held:
        try:
            ep = torch.export.load(io.BytesIO(data))
        except Exception as e:  # torch raises many types for a bad archive
            # torch's own message points at "the warnings above": cite the logged cause instead
            why = _logged_cause(held) or first_line(e)
            raise BadInput(f"{p} is not a loadable torch.export program: {why}") from None
    if arch is not None:
        # Buffers that are not persistent in the program live among its constants.
        expected = set(build(arch, allow_import=True).state_dict())
        state = dict(ep.state_dict)
        state.update({k: v for k, v in ep.constants.items()
                      if k in expected and isinstance(v, torch.Tensor)})
        return _from_state(p, state, arch, source_kind="torch.export", strict=strict)
    shapes = [n.meta["val"].shape for n in ep.graph.nodes
              if n.op == "placeholder" and n.name in set(ep.graph_signature.user_inputs)]
    if len(shapes) != 1:
        raise BadInput(f"{p}: tedepr supports programs with one tensor input, found {len(shapes)}")
    batch = shapes[0][0] if isinstance(shapes[0][0], int) else None
    module = ExportedProgramModule(ep.module(), batch, str(p))
    try:
        module.input_shape = tuple(int(s) for s in shapes[0][1:])
    except TypeError:
        raise BadInput(f"{p}: the program's input shape is not static beyond the batch") from None
    return _from_module(p, module, None, "torch.export", strict)
