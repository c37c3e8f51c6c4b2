"""Stored plans: an artifact keeps one plan per batch size with the machine fingerprint it
was made on; :func:`~.planner.plan_for` reuses it on the same machine and re-plans elsewhere."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..artifact import Artifact
from ..logs import log
from ..machine import cpu_features, cpu_model
from .runtimes import renamed_plan

PLANNER_VERSION = 6  # stored plans of another version are re-made (2: fusions; 3: LSTMs planned whole;
#                      4: whole-model runtime; 5: chain-ort runs the onnx-fast graph, onnxruntime
#                      runtimes at their fastest graph optimization level; 6: the 'extended' level
#                      and the onnx-fast 'cores' body join the candidates)


def fingerprint() -> dict[str, Any]:
    """What makes an execution plan valid: CPU, its flags, torch version, compiled kernel
    availability and flags."""
    from ..kernels import build

    st = build.status()
    return {"cpu": cpu_model(), "cpu_flags_sha": hashlib.sha256(cpu_features().encode()).hexdigest()[:16],
            "torch": torch.__version__, "kernel": bool(st.get("available")),
            "kernel_flags": st.get("flags")}


def stored_plan(art: Artifact, batch: int, threads: int) -> dict[str, Any] | None:
    """``art``'s stored plan for ``batch`` if it was made on this machine with ``threads``
    threads by this planner version, else None (a plan from elsewhere is logged)."""
    stored = (art.meta.get("execution") or {}).get("plans", {}).get(str(batch))
    if not stored:
        return None
    if stored.get("fingerprint") == fingerprint() and stored.get("threads") == threads \
            and stored.get("planner") == PLANNER_VERSION:
        return renamed_plan(stored)
    log.info(f"stored execution plan for batch {batch} was made on another machine: re-planning")
    return None


def store_plan(art: Artifact, plan: dict[str, Any]) -> None:
    """Keep ``plan`` in ``art.meta["execution"]["plans"][str(batch)]`` (saved with the
    artifact), where :func:`plan_for` finds it on the next run on this machine."""
    plans = art.meta.setdefault("execution", {}).setdefault("plans", {})
    plans[str(plan["batch"])] = {k: v for k, v in plan.items() if k not in ("fresh", "flops", "recheck")}
