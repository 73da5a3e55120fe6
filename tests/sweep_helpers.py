"""Measure functions that run in the sweep's child processes (importable by module name)."""

import os
import signal
import time

import torch

from melt_bench.scenarios.measure_memory import measure_memory_point


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
    from melt_bench.running.results import ResultRow, ResultsStore

    store = ResultsStore(path)
    for loops in range(1, count + 1):
        point = {"model": "ouro-tiny", "loops": loops, "seq_len": 32, "batch_size": 1, "phase": "decode"}
        store.append(ResultRow(kind, f"{kind}-{loops}", point, "ok", None, {"peak_bytes": 1000 * loops}, {}, 0.1))


def where_am_i(point, hold_s=0.0):
    """A fake point that reports the GPU its child was pinned to, the NVML index melt-bench's
    samplers would read for cuda:0, and when it ran (to see points overlap)."""
    from melt_bench.trackers.memory_trackers import nvml_index_for

    started = time.time()
    time.sleep(hold_s)
    metrics = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "nvml_index": nvml_index_for(0),
               "started": started, "ended": time.time(), "pid": os.getpid()}
    return {"status": "ok", "error": None, "metrics": metrics}


def kill_the_worker_at_loops_2(point, gpu=None):
    """A point runner (as executors call it) that kills its own process, a Ray worker, at the
    point with 2 loops: the node or worker dying mid-point."""
    from melt_bench.running.launcher import ChildOutcome

    if point.loops == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return ChildOutcome("ok", value={"status": "ok", "error": None, "metrics": {"pid": os.getpid()}}, wall_s=0.01)
