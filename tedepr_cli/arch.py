"""Architecture references: how an artifact names the network its tensors belong to.

An architecture is either a zoo name (``lenet300``) or an import path
(``pkg.module:callable``) plus JSON keyword arguments. Import paths run user code, so they
are only imported when the user named them on the command line (``allow_import``); a
manifest alone can never make tedepr import a module.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import BadInput, EngineUnavailable, UnsafeInput, UsageError, opt
from .surgery import input_kind
from .zoo import MODELS

_IMPORT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ArchSpec:
    """A buildable architecture reference, stored verbatim in every manifest."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # only needed for import paths

    @property
    def is_import(self) -> bool:
        return ":" in self.name

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs)}
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> ArchSpec:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise BadInput("manifest 'arch' must be an object with a string 'name'")
        kwargs = obj.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise BadInput("manifest 'arch.kwargs' must be an object")
        shape = obj.get("input_shape")
        if shape is not None:
            shape = _parse_shape(shape)
        return cls(obj["name"], kwargs, shape)


def _parse_shape(shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, list | tuple) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                       for s in shape)):
        raise BadInput(f"input shape must be a non-empty list of positive ints, got {shape!r}")
    return tuple(shape)


def parse_arch(name: str, kwargs_json: str | None = None,
               input_shape: str | None = None) -> ArchSpec:
    """Build an :class:`ArchSpec` from the ``--arch``/``--arch-kwargs``/``--input-shape``
    strings of the command line (or a recipe's ``[model]``).

    Raises :class:`UsageError` (exit 2) for an unknown zoo name, a malformed import path,
    kwargs that are not a JSON object or a malformed shape: these are option values.
    Whether the kwargs fit the architecture is only known when :func:`build` calls it.
    """
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise UsageError(f"{opt('arch-kwargs')} is not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"{opt('arch-kwargs')} must be a JSON object, e.g. '{{\"num_classes\": 10}}'")
    shape = None
    if input_shape:
        try:
            shape = _parse_shape([int(s) for s in input_shape.replace("x", ",").split(",")])
        except ValueError:
            raise UsageError(f"{opt('input-shape')} must look like 1,28,28, got {input_shape!r}") from None
    if ":" in name:
        if not _IMPORT_RE.match(name):
            raise UsageError(f"{opt('arch')} {name!r} is not of the form pkg.module:callable")
    elif name not in MODELS:
        raise UsageError(f"unknown architecture {name!r}; choose one of: {', '.join(MODELS.names())} "
                         "(or pkg.module:callable)")
    return ArchSpec(name, kwargs, shape)


def is_arch_name(text: str) -> bool:
    """Whether ``text`` names an architecture (a zoo name or ``pkg.module:callable``)
    rather than a file: ``tedepr prune lenet300 --init random`` starts from scratch."""
    return text in MODELS or bool(_IMPORT_RE.match(text))


def build(spec: ArchSpec, allow_import: bool = False) -> nn.Module:
    """Instantiate ``spec``. Import paths need ``allow_import`` (the user typed them).

    Raises :class:`UnsafeInput` for an import path without ``allow_import``,
    :class:`UsageError` when the path does not import, :class:`BadInput` when the kwargs do
    not fit or the callable fails, :class:`EngineUnavailable` when the callable needs a
    package that is not installed (it raised ImportError)."""
    if spec.is_import:
        if not allow_import:
            raise UnsafeInput(
                f"the architecture {spec.name!r} is an import path: importing it runs code. "
                f"Pass {opt('arch')} {spec.name} to confirm you trust that module"
            )
        factory = _import(spec.name)
        declared = _module_input_shape(spec.name)
    else:
        factory = MODELS.get(spec.name)
        declared = None
    try:
        model = factory(**spec.kwargs)
    except TypeError as e:
        raise BadInput(f"{opt('arch-kwargs')} do not fit {spec.name}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise BadInput(f"cannot build {spec.name} with {spec.kwargs}: {e}") from None
    except ImportError as e:  # the callable imports an optional package (transformers, ...)
        raise EngineUnavailable(f"{spec.name} needs a package that is not installed here: {e}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"{spec.name} returned {type(model).__name__}, not a torch nn.Module")
    if spec.input_shape is not None:
        model.input_shape = spec.input_shape
    elif getattr(model, "input_shape", None) is None and declared is not None:
        model.input_shape = declared
    if getattr(model, "input_shape", None) is None:
        raise BadInput(f"{spec.name} declares no input shape (neither the model nor its module has "
                       f"an input_shape attribute): pass {opt('input-shape')} (e.g. 3,32,32)")
    model.input_shape = tuple(int(s) for s in model.input_shape)
    model.input_kind = input_kind(model, model.input_shape)
    return model


def _module_input_shape(path: str) -> tuple[int, ...] | None:
    """The module-level ``input_shape`` next to the callable ``path`` names (README
    "Inputs"): the per-sample shape for models that do not set ``model.input_shape``
    themselves. None where the module has none; :class:`BadInput` for a malformed one."""
    mod_name = path.partition(":")[0]
    shape = getattr(sys.modules[mod_name], "input_shape", None)  # imported by _import
    if shape is None:
        return None
    try:
        return _parse_shape(list(shape))
    except (BadInput, TypeError) as e:
        raise BadInput(f"{mod_name}.input_shape: {e}") from None


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """Modules in the current directory importable for the ``with`` block (as under
    ``python -m``; a console script's ``sys.path`` lacks it): for an ``--arch`` path and a
    trusted pickle's classes, both named by the user. ``sys.path`` is restored afterwards."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        sys.path.remove(cwd)


def _import_module(name: str) -> Any:
    """``importlib.import_module(name)``, also finding a module in the current directory
    (:func:`cwd_importable`)."""
    with cwd_importable():
        return importlib.import_module(name)


def _import(path: str):
    """The callable an ``--arch pkg.module:callable`` names; only reached for a path the user
    typed, so failures are usage errors."""
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = _import_module(mod_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if mod_name == missing or mod_name.startswith(missing + "."):  # the path itself is wrong
            raise UsageError(f"cannot import {mod_name!r} for {opt('arch')}: {e}") from None
        # the module imports a package that is not installed (as a callable that raises
        # ImportError: EngineUnavailable)
        raise EngineUnavailable(f"{mod_name} (for {opt('arch')}) needs a package that is not installed "
                                f"here: {e}") from None
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} for {opt('arch')}: {e}") from None
    except Exception as e:  # the user's module fails while it is imported (a SyntaxError, ...)
        raise BadInput(f"importing {mod_name!r} for {opt('arch')} failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{opt('arch')}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{opt('arch')} {path!r} is not callable")
    return obj
