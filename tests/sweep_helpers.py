"""Measure functions that run in the sweep's child processes (importable by module name)."""

import os
import signal
import time

import torch

from melt_bench.measure_memory import measure_memory_point


def oom_at_loops_3(point, *args):
    """The real measurement, except that the point with 3 loops hits a (fake) CUDA OOM."""
    if point.loops == 3:
        raise_and_classify = measure_memory_point.__globals__["classify_failure"]
        exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"status": raise_and_classify(exc), "error": str(exc), "metrics": {}}
    return measure_memory_point(point, *args)


def sleep_forever(point, *args):
    time.sleep(3600)


def die_by_sigkill(point, *args):
    os.kill(os.getpid(), signal.SIGKILL)


def raise_error(point, *args):
    raise RuntimeError("something broke")


def write_rows(path, kind: str, count: int) -> None:
    """A small results file of `kind` rows, as a finished sweep leaves it."""
    from melt_bench.results import ResultRow, ResultsStore

    store = ResultsStore(path)
    for loops in range(1, count + 1):
        point = {"model": "ouro-tiny", "loops": loops, "seq_len": 32, "batch_size": 1, "phase": "decode"}
        store.append(ResultRow(kind, f"{kind}-{loops}", point, "ok", None, {"peak_bytes": 1000 * loops}, {}, 0.1))
