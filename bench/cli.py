"""The `melt-bench` command line: the commands of bench/commands/, one line per user error.
Commands import their heavy modules lazily, so `--help` and a refused flag are fast."""

from __future__ import annotations

import atexit
import os
import signal
import sys

INTERRUPTED = 130  # a shell's code for a process ended by Ctrl-C (128 + SIGINT)


def _interrupted_while_starting(signum: int, frame: object) -> None:
    # Ctrl-C during the imports below (typer, rich: a fraction of a second) happens outside
    # main(): without this it ends in a traceback. Nothing is running or written yet: end here.
    os.write(2, b"melt-bench: interrupted\n")
    os._exit(INTERRUPTED)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores it
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def _ignore_ctrl_c_once_finished() -> None:
    # The interpreter's shutdown resets a Python SIGINT handler to the default after the exit
    # handlers, and a Ctrl-C there ended a complete run as -SIGINT (seen 1 in 40): once every
    # exit handler has run (this one is registered first, so it runs last) nothing is left to stop.
    if _finished:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


_finished = False
atexit.register(_ignore_ctrl_c_once_finished)

# NVML and torch must agree on device indices; set before anything initialises CUDA.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import importlib  # noqa: E402

import typer  # noqa: E402

from melt_bench.commands.app import UserError, app  # noqa: E402
from melt_bench.commands.number_flags import guard_number_flags  # noqa: E402
from melt_bench.commands.support import NothingMeasured  # noqa: E402
from melt_bench.running import interrupts  # noqa: E402
from melt_bench.running.ranks import leave_process_group  # noqa: E402

# registered in the order `--help` lists them
for _group in ("info", "sweeps", "serve", "accuracy", "report", "convert"):
    importlib.import_module(f"melt_bench.commands.{_group}")
guard_number_flags(app)

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors (bad options included) become one line on stderr and exit code 2,
    Ctrl-C at any moment one line and 130. A rank of a data-parallel run leaves its process group
    before it exits; the process that is `melt-bench` (argv None) ends its fork server with it."""
    from melt_bench.running.launcher import stop_fork_server

    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.forget()
    interrupts.install()
    args = sys.argv[1:] if argv is None else argv
    code = INTERRUPTED
    try:
        code = _run_app(args)
    except KeyboardInterrupt:  # while a command's error was being printed, or just after it ended
        print("melt-bench: interrupted", file=sys.stderr)
    except Exception:
        if not interrupts.interrupted():
            raise
        # what a library's half-finished import left behind after a Ctrl-C it swallowed
        # ("cannot load module more than once"): the Ctrl-C is the cause
        print("melt-bench: interrupted", file=sys.stderr)
    if interrupts.interrupted() and code == 0:  # a Ctrl-C dropped after the last check: say so
        print(_LATE_INTERRUPT, file=sys.stderr)
        code = INTERRUPTED
    late: list[int] = []  # the clean-up below runs whole: a Ctrl-C during it is noted, not raised half-way
    previous = signal.signal(signal.SIGINT, lambda signum, frame: late.append(signum))
    try:
        if argv is None or code == INTERRUPTED:  # in-process callers (tests) keep the server for the next run
            stop_fork_server()
        leave_process_group()
    finally:
        signal.signal(signal.SIGINT, previous)
    if late and code != INTERRUPTED:
        print(_LATE_INTERRUPT, file=sys.stderr)
        code = INTERRUPTED
    if argv is None:  # the process exits next; a Ctrl-C during the interpreter's shutdown still says so
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, _interrupted_while_exiting if code != INTERRUPTED else signal.SIG_IGN)
        global _finished
        _finished = True
        if code == INTERRUPTED:  # interrupted: the exit status is 130, whatever the interpreter's
            os._exit(code)  # shutdown would make of a KeyboardInterrupt left behind (seen: -SIGINT)
    return code


_LATE_INTERRUPT = "melt-bench: interrupted as it finished (what it printed and wrote is complete)"


def _interrupted_while_exiting(signum: int, frame: object) -> None:
    # everything was flushed before this handler was installed: end now, without the shutdown's tracebacks
    os.write(2, f"{_LATE_INTERRUPT}\n".encode())
    os._exit(INTERRUPTED)


def _run_app(args: list[str]) -> int:
    """The command's exit code; errors the user can fix as one line."""
    from melt_bench.running.results import ResultsWriteError
    from melt_bench.running.sweep import SweepInterrupted

    try:
        # typer turns a KeyboardInterrupt it sees into a returned 130 (a typer.Exit into its code)
        code = app(args=args or ["--help"], prog_name="melt-bench", standalone_mode=False)
    except UserError as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"melt-bench: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("melt-bench: interrupted", file=sys.stderr)
        return INTERRUPTED
    except SweepInterrupted as exc:
        print(f"melt-bench: {exc}", file=sys.stderr)
        return INTERRUPTED
    except (ResultsWriteError, NothingMeasured) as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    if code == INTERRUPTED:
        print("melt-bench: interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
