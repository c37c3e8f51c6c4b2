"""`tedepr run`: a whole pipeline from a TOML recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import print_json, stdout, table
from .common import JsonOut, Output, Overwrite, Quiet, Verbose, command


@command
def run(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe: [model], [data] and one table per stage "
                                           "(decompose, prune, finetune, export, bench).",
                                           show_default=False)],
    output: Output,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe option: stage.option=value (repeatable), e.g. "
        "prune.sparsity=0.999.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed of every stage (decompose, prune, finetune, export, bench), over the "
        "recipe's; --set stage.seed=N still wins.")] = None,
    overwrite: Overwrite = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Run a whole pipeline from a recipe file into one directory (flags override the recipe;
    the merged recipe is stored in every artifact)."""
    from ..recipe import apply_overrides, apply_seed, load_recipe, run_recipe

    loaded = load_recipe(recipe)
    merged = apply_overrides(loaded if seed is None else apply_seed(loaded, seed), set_ or [])
    summary = run_recipe(merged, output, overwrite=overwrite)
    if json_out:
        print_json(summary)
        return
    stdout.print(table(f"pipeline {output}", ["result", "value"], _rows(summary), right=set()))


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per stage output and figure of :func:`tedepr_cli.recipe.run_recipe`'s summary."""
    rows = []
    for k, v in summary.items():
        if k == "sparsity_vs_dense" or k == "test_accuracy":
            v = f"{100 * v:.2f} %"
        elif k == "speedup":
            k, v = "speed-up vs dense (median)", ", ".join(f"{x:.2f}x at batch {b}" for b, x in v.items())
        rows.append([k.replace("_", " "), str(v)])
    return rows
