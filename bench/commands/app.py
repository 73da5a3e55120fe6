"""The Typer app every command registers with, the console they print to, and the error a user can fix."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="melt-bench",
    help="Memory, latency and accuracy of looped LMs: Ouro (per-loop KV cache) vs MELT (shared gated KV cache).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Piped output (logs, CI) gets a wide fixed width instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)


class UserError(Exception):
    """A problem the user can fix: reported as one line, exit code 2."""
