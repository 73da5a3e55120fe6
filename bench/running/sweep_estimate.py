"""--dry-run's plan: how long the pending points of a sweep take on the chosen workers, timed from
the rows of the same kind already in --out (each model's median wall time per point). Without
such rows there is no estimate: the cost model predicts bytes and FLOPs, not seconds on a device
nobody has measured, and melt-bench prints no figure it did not measure."""

from __future__ import annotations

import statistics
from pathlib import Path

from melt_bench.running.results import ResultsFileError, ResultsStore
from melt_bench.units import format_seconds


def planned_workers(placement: dict) -> int | None:
    """Points at a time: the --gpus list's length (all: NVML's count), 1 for a serial sweep,
    None where only the cluster knows (--executor ray)."""
    if placement.get("executor") == "ray":
        return None
    gpus = placement.get("gpus")
    if gpus is None:
        return placement.get("cpu_workers") or 1
    if gpus.strip() == "all":
        from melt_bench.trackers.nvml import NvmlUnavailable, load_pynvml

        try:
            return load_pynvml().nvmlDeviceGetCount() or None
        except NvmlUnavailable:
            return None
    return len([entry for entry in gpus.split(",") if entry.strip()])


def estimate_wall_time(points: list, out: Path | None, workers: int | None) -> str:
    """One line: pending points and their estimated wall time, or why there is no estimate."""
    rows = []
    if out is not None and Path(out).is_file():
        try:
            rows = ResultsStore(Path(out)).read()
        except ResultsFileError as exc:
            return f"no estimate: {exc}"
    done = {row.point_id for row in rows}
    pending = [point for point in points if point.point_id not in done]
    kind = points[0].command if points else None
    timed = [row for row in rows if row.kind == kind and row.wall_s > 0]
    if not pending:
        return "nothing pending: every point is recorded in --out"
    if not timed:
        return (f"{len(pending)} pending; no estimate: no finished {kind} points in --out to time from "
                "(run a few points first, then --dry-run with the same --out)")
    by_model: dict[str, list[float]] = {}
    for row in timed:
        by_model.setdefault(row.point.get("model"), []).append(row.wall_s)
    overall = statistics.median(row.wall_s for row in timed)
    serial = sum(statistics.median(by_model[p.model]) if p.model in by_model else overall for p in pending)
    if workers is None:
        return (f"{len(pending)} pending; estimated {format_seconds(serial)} on one worker (divide by the "
                f"cluster's workers), from the median wall time of {len(timed)} recorded points per model")
    return (f"{len(pending)} pending; estimated {format_seconds(serial / workers)} on {workers} worker"
            f"{'s' if workers != 1 else ''}, from the median wall time of {len(timed)} recorded points per model")
