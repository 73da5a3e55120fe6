"""Where a point runs: a fresh child process per point, so peak statistics never leak between
points and an out-of-memory or a crash kills only that point.

Children come from a fork server that has already imported torch and melt-bench (a child starts
in ~0.1 s instead of seconds); the server never touches CUDA, so each child initialises its own
CUDA context, allocator and peak counters from nothing."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Ctrl-C ignored from a child's start; torch, transformers, the models, the trackers
_PRELOAD = ["melt_bench.running.fork_server_signals", "torch", "melt_bench.scenarios.measure_memory"]
_context = None
_live: set = set()  # children running now (several at once under --gpus)
_live_lock = threading.Lock()
_stopped = threading.Event()  # set by stop_fork_server: no new child (nor a new server) until the next run starts


def child_context():
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        else:  # pragma: no cover - macOS/Windows
            _context = mp.get_context("spawn")
    return _context


def start_fork_server(*modules: str) -> None:
    """Start the fork server now, with `modules` imported beside torch and the models, so its
    imports (seconds) overlap the parent's own preparation instead of delaying the first point.
    A server already running keeps what it has; nothing to do without a fork server."""
    _stopped.clear()
    context = child_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        context.set_forkserver_preload([*_PRELOAD, *modules])
        with sigint_held():
            forkserver.ensure_running()


@contextmanager
def sigint_held():
    """Hold Ctrl-C back while a process is started: a fork server starts with SIGINT blocked
    (the mask survives exec) and unblocks it once it ignores it (fork_server_signals), so a Ctrl-C
    during its interpreter's own start-up cannot print Python's "Fatal Python error:
    init_import_site" beside the parent's one line. The parent takes the Ctrl-C right after."""
    if child_context().get_start_method() == "forkserver":
        # the stdlib starts its resource tracker with SIGINT blocked and then *unblocks* it,
        # which would undo the hold: started first, it is left running
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def stop_fork_server() -> None:
    """End the fork server this process started, at once. A parent that stops while the server
    still imports torch (Ctrl-C, a refusal) would otherwise leave it running for seconds, holding
    the terminal's (or a pipe's) output open after the parent is gone."""
    _stopped.set()  # a worker thread starting its next child would start a new server (seconds of imports)
    if _context is None or _context.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the stdlib's own handle: pid, alive pipe, socket
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    kill_children()
    # A child forked this instant is not in _live yet (its start() waits for its pid, which the
    # server sends after the fork): end the server's children too.
    for process in (pid, *_children_of(pid)):
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        server._stop()  # closes its pipe, reaps it, removes its socket
    except (OSError, AttributeError):  # already reaped, or a Python without _stop
        pass


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc; none elsewhere)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended while we looked
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(stat.parent.name))
    return children


@dataclass
class ChildOutcome:
    """What came back: the target's return value, or why there is none."""

    status: str  # "ok" (the target returned), "timeout", "crashed"
    value: Any = None
    error: str | None = None
    wall_s: float = 0.0
    killed_by: str | None = None  # the signal that ended a crashed child, e.g. "SIGKILL"


def _child_main(conn, target: Callable, args: tuple) -> None:
    # Ctrl-C reaches the whole process group; the parent decides (it kills this child and keeps
    # the rows already written), so the child neither dies half-way nor prints a traceback.
    # (Children of the fork server ignore it from their start: fork_server_signals.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a forked child: held by sigint_held
    try:
        value = target(*args)
    except BaseException as exc:  # report, never hang the parent
        _report(conn, ("raised", f"{type(exc).__name__}: {exc}"))
    else:
        _report(conn, ("ok", value))
    finally:
        conn.close()


def _report(conn, message: tuple) -> None:
    """Send the outcome; a parent that stopped listening (Ctrl-C, a timeout: it closed its end
    and kills this child) gets nothing, and the child ends without a traceback, in any order."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass


def run_in_child(target: Callable, args: tuple, timeout_s: float | None) -> ChildOutcome:
    """Run `target(*args)` in a fresh child; wait at most `timeout_s` (None: as long as it takes;
    no busy-waiting)."""
    if _stopped.is_set():
        return ChildOutcome("crashed", error="the run was stopped before this point started")
    ctx = child_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(sender, target, args), daemon=True)
    started = time.monotonic()
    with sigint_held():  # a fork server started here (the first child, or after a stop) too
        proc.start()
    with _live_lock:
        _live.add(proc)
    sender.close()
    try:
        try:
            ready = receiver.poll(timeout_s)
        except KeyboardInterrupt:
            _kill(proc)
            raise
        if not ready:
            _kill(proc)
            return ChildOutcome("timeout", error=f"point exceeded its {timeout_s:g} s limit",
                                wall_s=time.monotonic() - started)
        try:
            kind, value = receiver.recv()
        except EOFError:  # the child died without a word: a signal, os._exit, the OOM killer
            # its exit status comes from the fork server once it reaps the child: wait for it,
            # or a SIGKILL read too early is labelled an error, not an OOM
            proc.join(timeout=60)
            killed_by = signal.Signals(-proc.exitcode).name if proc.exitcode and proc.exitcode < 0 else None
            return ChildOutcome("crashed", error=_death_note(proc.exitcode), wall_s=time.monotonic() - started,
                                killed_by=killed_by)
    finally:
        receiver.close()
        with _live_lock:
            _live.discard(proc)
    proc.join(timeout=30)
    if proc.is_alive():
        _kill(proc)
    wall = time.monotonic() - started
    if kind == "raised":
        return ChildOutcome("crashed", error=value, wall_s=wall)
    return ChildOutcome("ok", value=value, wall_s=wall)


def kill_children() -> None:
    """End every child still running (an interrupted multi-GPU sweep); their points report crashed."""
    with _live_lock:
        running = list(_live)
    for proc in running:
        if proc.is_alive():
            proc.kill()


def _kill(proc) -> None:
    proc.kill()
    proc.join(timeout=10)


def _death_note(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the OS out-of-memory killer, most likely)" if name == "SIGKILL" else ""
        return f"child process killed by {name}{hint}"
    return f"child process exited with code {exitcode} before reporting"
