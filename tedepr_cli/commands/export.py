"""`tedepr export` and `tedepr validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import print_json, stdout, table
from .common import (
    KEPT_NOTE,
    Arch,
    ArchKwargs,
    ConfirmArch,
    DataOpt,
    InputShape,
    JsonOut,
    ModelPath,
    NonStrict,
    Overwrite,
    Quiet,
    Seed,
    Threads,
    TrustPickle,
    Verbose,
    _allow_import,
    _load,
    command,
    use_threads,
)

AtolOpt = Annotated[float, typer.Option(
    "--atol", help="Validation: absolute tolerance as a fraction of the output's scale: an entry "
    "misses when |onnx - torch| > atol x max|torch| + rtol x |torch|.")]
RtolOpt = Annotated[float, typer.Option(
    "--rtol", help="Validation: relative tolerance per entry (the rtol x |torch| term of the --atol rule).")]


@command
def export(
    path: ModelPath,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the exported "
                                         "files into.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Comma list of safetensors, onnx, onnx-sparse "
                                    "(cores/weights as ONNX sparse_initializers), onnx-fast (one "
                                    "custom op per compressed layer over its fastest standard ops; "
                                    "the compiled kernel where the library is registered).")
                  ] = "safetensors,onnx",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (17..23).")] = 18,
    atol: AtolOpt = 1e-5,
    rtol: RtolOpt = 1e-4,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes the ONNX files are run "
                                             "at and compared with PyTorch; the export is traced at the "
                                             "smallest batch >= 2 not listed, and its batch axis must "
                                             "be dynamic.")] = "1,7",
    data: DataOpt = None,
    threads: Threads = 1,
    seed: Seed = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda: where the PyTorch reference "
                                        "runs (and onnxruntime, where it has CUDA).")] = "cpu",
    overwrite: Overwrite = False,
    arch: Arch = None, arch_kwargs: ArchKwargs = None, input_shape: InputShape = None,
    trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Export a compact safetensors file and ONNX models of the chain, each validated
    against PyTorch (exit 8 on a miss); prints a size table."""
    from ..console import human_bytes, log
    from ..device import resolve as resolve_device
    from ..errors import UsageError
    from ..export import ExportOptions
    from ..export import export as run_export
    from ..fsutil import check_output

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes must be integers like 1,7; got {batch_sizes!r}") from None
    opts = ExportOptions(formats=[f.strip() for f in to.split(",") if f.strip()], opset=opset,
                         atol=atol, rtol=rtol, batch_sizes=sizes, seed=seed, device=device)
    opts.validate()
    use_threads(threads)  # checks --threads (>= 1) before anything is written
    resolve_device(device)  # --device cuda without a GPU: exit 10 before anything is written
    check_output(output, overwrite, directory=True)
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
    report = run_export(art, output, opts, data, overwrite=overwrite)
    log.info(f"wrote {output}")
    if json_out:
        print_json({"output": str(output), **report})
        return
    rows = []
    for name, r in [("dense original", report.get("dense_original") or {}),
                    *[(f, report["formats"][f]) for f in report["formats"]]]:
        if r:
            rows.append([name, r["params"], r["kept"], r["effective_nonzero"], r["other"], r["bytes"],
                         human_bytes(r["bytes"]), r["gzip_bytes"], human_bytes(r["gzip_bytes"])])
    stdout.print(table(f"export to {output}", ["format", "params", "kept", "effective non-zero",
                                               "other params", "bytes", "", "gzip bytes", ""], rows,
                       right={1, 2, 3, 4, 5, 6, 7, 8}))
    stdout.print(KEPT_NOTE)
    c = report.get("compact")
    if c and c["ratio"] is not None:
        entropy = c["minimal_bytes"] - 4 * c["kept_values"]
        stdout.print(f"compact safetensors, prunable part: {c['stored_bytes']:,} B for {c['kept_values']:,} "
                     f"kept values = {c['ratio']:.3f} x the minimum (4 B per value + {entropy:,} B "
                     f"index entropy); layouts {c['layouts']}")
    for fmt, v in report["validation"].items():
        if fmt == "safetensors":
            stdout.print(f"validated safetensors: reload bit-exact = {v['bit_exact']}")
        else:
            worst = max(v.values(), key=lambda c: c["max_scaled"])
            stdout.print(f"validated {fmt} with onnxruntime at batch {', '.join(v)} (traced at batch "
                         f"{report['traced_batch']}, batch axis dynamic): max abs diff "
                         f"{worst['max_abs']:.3g} on outputs of scale {worst['scale']:.3g} "
                         f"({worst['max_scaled']:.3g} of it), max rel diff {worst['max_rel']:.3g}")


@command
def validate(
    path: Annotated[Path, typer.Argument(help="A directory written by `tedepr export`.",
                                         show_default=False)],
    atol: AtolOpt = 1e-5,
    rtol: RtolOpt = 1e-4,
    arch: ConfirmArch = None,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Re-check an export directory: run every model on its saved sample inputs and compare
    with the saved outputs (exit 8 on a miss), without the original code or checkpoint."""
    from ..errors import InputNotFound, ValidationError
    from ..export import validate_dir

    if not path.is_dir():
        raise InputNotFound(f"{path} is not a directory written by tedepr export")
    results = validate_dir(path, atol, rtol, allow_import=_allow_import(arch))
    if json_out:
        print_json(results)
    else:
        why = any(r.get("why") for r in results.values())  # shape mismatch, fixed batch axis
        stdout.print(table(f"validation of {path}", ["file", "ok", "max abs", "scale", "max abs / scale",
                                                     "max rel", *(["why"] if why else [])],
                           [[f, r["ok"], r["max_abs"], r["scale"], r["max_scaled"], r["max_rel"],
                             *([r.get("why", "")] if why else [])] for f, r in results.items()]))
    bad = [f for f, r in results.items() if not r["ok"]]
    if bad:
        raise ValidationError(f"{', '.join(bad)} no longer match the saved outputs "
                              f"(atol {atol} x scale + rtol {rtol} x |ref|)")
