"""`tedepr kernels`: what compiled kernels this machine has."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import print_json, stdout, table
from .common import (
    JsonOut,
    Quiet,
    Verbose,
    command,
)


@command
def kernels(
    check: Annotated[bool, typer.Option(
        "--check", help="Build the compiled kernel and run a quick correctness self-test; "
        "exit 10 if it cannot be built (or fails the test).")] = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Report the kernels this machine can run: the C compiler, flags and cache of the
    compiled CPU chain kernel (inference and training chain, built on first use), Triton
    and CUDA."""
    from ..errors import EngineUnavailable
    from ..kernels.report import report

    rep = report(check)
    cpu, tri = rep["cpu"], rep["triton"]
    if json_out:
        print_json(rep)
    else:
        rows = [["compiled CPU kernel", "yes" if cpu["available"] else "no",
                 cpu["library"] if cpu["available"] else cpu["reason"]],
                ["compiler", cpu["compiler"] or "-", cpu["compiler_version"] or "-"],
                ["flags", " ".join(cpu["flags"]), f"{cpu['vector_floats'] or '-'} floats per vector"],
                ["cache", cpu["cache_dir"], "compiled now" if cpu["compiled"] else "-"],
                ["triton", "yes" if tri["available"] else "no",
                 tri["triton"] if tri["available"] else tri["reason"]],
                ["cuda", "yes" if rep["cuda"]["available"] else "no", rep["cuda"]["device"] or "-"]]
        if "check" in rep:
            chk = rep["check"]
            rows.append(["self-test", "ok" if chk["ok"] else "FAILED",
                         f"max rel. error {chk['max_rel_error']:.2e} (tolerance {chk['tolerance']:g}, "
                         f"{len(chk['cases'])} cases, "
                         f"{sum(c['case'].endswith(' training') for c in chk['cases'])} of them the "
                         "training chain's output and gradients)"])
        stdout.print(table("kernels", ["engine", "available", "detail"], rows, right=set()))
    if check and not cpu["available"]:
        raise EngineUnavailable(f"compiled kernel cannot be built here: {cpu['reason']}")
    if check and not rep["check"]["ok"]:
        raise EngineUnavailable(f"compiled kernel failed its self-test (max rel. error "
                                f"{rep['check']['max_rel_error']:.2e}); use the torch path")
