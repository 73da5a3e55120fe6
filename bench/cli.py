"""The `melt-bench` command line: the commands of bench/commands/, one line per user error.
Commands import their heavy modules lazily, so `--help` and a refused flag are fast."""

from __future__ import annotations

import os
import sys

# NVML and torch must agree on device indices; set before anything initialises CUDA.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import importlib  # noqa: E402

import typer  # noqa: E402

from melt_bench.commands.app import UserError, app  # noqa: E402
from melt_bench.commands.support import NothingMeasured  # noqa: E402
from melt_bench.running.ranks import leave_process_group  # noqa: E402

for _group in ("info", "sweeps", "accuracy", "report", "convert"):  # registered in the order `--help` lists them
    importlib.import_module(f"melt_bench.commands.{_group}")

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors (bad options included) become one line on stderr and exit code 2.
    A rank of a data-parallel run leaves its process group before it exits."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return _run_app(args)
    finally:
        leave_process_group()


def _run_app(args: list[str]) -> int:
    """The command's exit code; errors the user can fix as one line."""
    from melt_bench.running.results import ResultsWriteError
    from melt_bench.running.sweep import SweepInterrupted

    try:
        app(args=args or ["--help"], prog_name="melt-bench", standalone_mode=False)
    except UserError as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"melt-bench: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("melt-bench: interrupted", file=sys.stderr)
        return 130
    except SweepInterrupted as exc:
        print(f"melt-bench: {exc}", file=sys.stderr)
        return 130
    except (ResultsWriteError, NothingMeasured) as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
