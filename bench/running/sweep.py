"""Running a sweep: each pending point in its own child, one results row per point, appended the
moment it is known. Failures (oom, timeout, error) are rows too, and the sweep goes on."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from melt_bench.running.executors import PointRunner, SerialExecutor
from melt_bench.running.interrupts import stop_if_interrupted
from melt_bench.running.launcher import ChildOutcome, stop_fork_server
from melt_bench.running.results import ResultRow, ResultsStore
from melt_bench.running.sweep_plan import SweepPoint


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep: the running point was stopped; every finished row is in the store."""

    def __init__(self, store: ResultsStore, planned: list) -> None:
        recorded = len({row.point_id for row in store.read()} & {point.point_id for point in planned})
        super().__init__(f"interrupted: {recorded} of {len(planned)} points recorded in {store.path}; "
                         "run the same command with --resume to continue")


@dataclass
class SweepStatus:
    planned: int
    skipped: int  # already recorded (--resume)
    ran: int
    ran_phrase: str = ""  # what ran, points and repeats apart (runs_phrase)


def runs_phrase(points: list[SweepPoint]) -> str:
    """How many points and repeats `points` holds, the two apart: '32 points x 2 repeats (64
    runs)', or '3 points' where each is measured once."""
    distinct = len({replace(point, repeat=0).point_id if hasattr(point, "repeat") else point.point_id
                    for point in points})  # accuracy points have no repeats
    if distinct == len(points):
        return f"{distinct} point" + ("" if distinct == 1 else "s")
    repeats = max(point.repeat for point in points) + 1
    if len(points) == distinct * repeats:
        return f"{distinct} point{'' if distinct == 1 else 's'} x {repeats} repeats ({len(points)} runs)"
    return f"{len(points)} runs of {distinct} point" + ("" if distinct == 1 else "s")


def pending_points(points: list[SweepPoint], store: ResultsStore, retry_failed: bool = False) -> list[SweepPoint]:
    """Points without a row yet; with `retry_failed`, also those whose last row is a timeout or an
    error (an OOM is a result, not a failure to retry)."""
    latest = {row.point_id: row.status for row in store.read()}
    def wanted(point: SweepPoint) -> bool:
        status = latest.get(point.point_id)
        return status is None or (retry_failed and status in ("timeout", "error"))
    return [point for point in points if wanted(point)]


def outcome_to_rows(kind: str, point, outcome: ChildOutcome, meta: dict) -> list[ResultRow]:
    """The rows a finished point gives: those its child built (an accuracy point gives one per
    metric and filter, {"rows": [...]}), else one row from its status and metrics."""
    if outcome.status == "ok" and "rows" in outcome.value:
        return list(outcome.value["rows"])
    return [outcome_to_row(kind, point, outcome, meta)]


def outcome_to_row(kind: str, point: SweepPoint, outcome: ChildOutcome, meta: dict) -> ResultRow:
    if outcome.status == "ok":
        value = outcome.value
        return ResultRow(kind, point.point_id, point.to_dict(), value["status"], value["error"],
                         value["metrics"], meta, outcome.wall_s)
    status = "timeout" if outcome.status == "timeout" else "error"
    if outcome.killed_by == "SIGKILL":  # what the OS out-of-memory killer sends
        status = "oom"
    return ResultRow(kind, point.point_id, point.to_dict(), status, outcome.error, {}, meta, outcome.wall_s)


def in_child(measure: Callable[..., dict], args: tuple = (), timeout_s: float = 600.0) -> PointRunner:
    """A point runner: `measure(point, *args)` in a fresh child process, within `timeout_s`
    (pinned to a GPU when an executor passes one)."""
    return PointRunner(measure, args, timeout_s)


def in_this_process(measure: Callable[..., dict], args: tuple = ()) -> Callable:
    """A point runner for a point whose measurement starts children of its own (capacity's
    probes, serve's search and run): `measure(point, *args, gpu)` here, its wall time kept."""
    def run(point, gpu: str | None = None) -> ChildOutcome:
        started = time.monotonic()
        return ChildOutcome("ok", value=measure(point, *args, gpu), wall_s=time.monotonic() - started)

    return run


def run_sweep(
    kind: str,
    points: list[SweepPoint],
    store: ResultsStore,
    run_point: Callable[[SweepPoint], ChildOutcome],
    meta: dict | None = None,
    retry_failed: bool = False,
    show_progress: bool = True,
    executor=None,
) -> SweepStatus:
    """Run every point not yet in `store` through `run_point` (usually `in_child(...)`), on
    `executor` (executors.py; default one at a time here). This thread alone appends rows."""
    executor = executor or SerialExecutor()
    todo = pending_points(points, store, retry_failed)
    progress = Progress(disable=not show_progress, transient=False)
    progress.columns = progress_columns(progress.console.width, kind, len(todo))
    if show_progress and todo:  # the bar counts runs: say once what they are
        progress.console.print(f"{kind}: {runs_phrase(todo)} to run")
    with progress:
        task = progress.add_task(kind, total=len(todo), last="")
        finished = executor.run(todo, run_point)
        shown: set[str] = set()
        try:
            stop_if_interrupted()  # a Ctrl-C that torch's import swallowed: no point starts
            for done in finished:
                for row in outcome_to_rows(kind, done.point, done.outcome, meta or {}):
                    row.metrics.update(done.placement)  # which GPU / node ran it
                    store.append(row)
                for warning in _warnings(done.outcome):  # what a child asks to show (lm-eval's), once each
                    if warning not in shown:
                        shown.add(warning)
                        progress.console.print(warning, style="yellow", markup=False, highlight=False)
                progress.update(task, advance=1, last=f"done: {done.point.label()}")
                stop_if_interrupted()
        except KeyboardInterrupt:
            stop_fork_server()  # a child the serial executor waits for the server to fork (it may still import)
            finished.close()
            progress.stop()
            raise SweepInterrupted(store, points) from None
        finally:  # a failed write (ResultsWriteError) too: the executor's children end here
            finished.close()
    return SweepStatus(planned=len(points), skipped=len(points) - len(todo), ran=len(todo),
                       ran_phrase=runs_phrase(todo) if todo else "0 points")


def progress_columns(width: int, description: str, total: int) -> tuple:
    """The progress bar: the kind, runs done of all, elapsed time and the ETA, each whole; the bar
    and then the last point's label take what is left of `width` (the terminal's) and are the
    ones cut short."""
    counts = f"{total}/{total} runs"
    fixed = len(description) + len(counts) + len("0:00:00 ETA 0:00:00") + 6  # 6 gaps
    bar = max(4, min(BAR_WIDTH, width - fixed - 20))
    whole = Column(no_wrap=True)
    return (TextColumn("[bold]{task.description}", table_column=whole), BarColumn(bar_width=bar),
            TextColumn("{task.completed}/{task.total} runs", table_column=Column(no_wrap=True, min_width=len(counts))),
            TimeElapsedColumn(table_column=whole), TextColumn("ETA", table_column=whole),
            TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("{task.fields[last]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                  max_width=max(1, width - fixed - bar))))


BAR_WIDTH = 24


def _warnings(outcome: ChildOutcome) -> list[str]:
    value = outcome.value if outcome.status == "ok" else None
    return list(value.get("warnings", ())) if isinstance(value, dict) else []
