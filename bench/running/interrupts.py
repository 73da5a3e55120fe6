"""Ctrl-C that no library can swallow. Python turns SIGINT into a KeyboardInterrupt wherever the
main thread is; during a heavy import (torch, numpy) that can be inside a bare `except:` of the
library's, which drops it, and the run then goes on to exit 0 as if nobody had asked it to stop
(seen at ~1 s into a sweep). The handler below also notes the Ctrl-C, and the places where a
run would start its work ask `stop_if_interrupted()` first. Torch-free: the CLI installs it
before any import."""

from __future__ import annotations

import signal
import threading

_asked = threading.Event()


def interrupt(signum: int, frame: object) -> None:
    """The SIGINT handler: note it, then what Python's default handler does; but not inside an
    import, where the exception can cross a C++ frame (torch's import runs Python from pybind11,
    and an exception there aborts the process: exit -6, not 130). There it is only noted, and
    `stop_if_interrupted()` raises it once the import is done."""
    _asked.set()
    if not _inside_import(frame):
        raise KeyboardInterrupt


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def install() -> None:
    """Use `interrupt` for Ctrl-C, unless the caller ignores it (or set its own)."""
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, interrupt):
        signal.signal(signal.SIGINT, interrupt)


def interrupted() -> bool:
    """Whether Ctrl-C came since `install` (or the last `forget`), even if a library dropped it."""
    return _asked.is_set()


def stop_if_interrupted() -> None:
    """Raise the KeyboardInterrupt a library swallowed, before work starts that it would spoil."""
    if _asked.is_set():
        raise KeyboardInterrupt


def forget() -> None:
    """A new run in the same process (tests call main() again) starts with no Ctrl-C noted."""
    _asked.clear()
