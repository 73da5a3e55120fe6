"""`melt-bench report`: a self-contained HTML report from results files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from melt_bench.commands.app import app, console
from melt_bench.commands.support import write_report


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results files (JSONL) to draw"),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="HTML file (default: reports/<first file's name>.html)"),
    compare: Optional[list[Path]] = typer.Option(None, "--compare",
                                                 help="a second run's results, shown side by side with ratios"),
) -> None:
    """A self-contained HTML report (plots, tables, key ratios, provenance) from results files."""
    path = write_report(results, output, compare or None)
    console.print(f"report written to {path}")
