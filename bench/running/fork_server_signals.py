"""Imported only by the fork server, as a preload (launcher.child_context): there it ignores
Ctrl-C before the server records the signal handlers its children start with, so a child
ignores SIGINT from its first instruction, not only once `_child_main` runs. A Ctrl-C that
reached a child during its start-up would otherwise print "Process ForkServerProcess-N:" (and
half a traceback) beside the parent's one line, before the parent kills it."""

import signal
import sys

# The server runs `python -c "from multiprocessing.forkserver import main; ..."`; a parent that
# imported this module by mistake keeps its Ctrl-C.
if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent started the server with SIGINT blocked (launcher.sigint_held), so that a Ctrl-C
    # in the interpreter's start-up waited; ignored now, a pending one is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
