"""What every command does around its work: flags checked before torch loads, the plan resolved, the
results file opened, the runner started, the end-of-run tables and report, the exit status."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from melt_bench.commands.app import UserError, console

if TYPE_CHECKING:
    from melt_bench.running.sweep_options import SweepFlags


def write_report(results: list[Path], output: Path | None, compare: list[Path] | None = None) -> Path:
    """The HTML report of `results` (beside `compare`), every input and the output checked first,
    in one line each, before the report's own imports (pandas, matplotlib: seconds)."""
    from melt_bench.running.results import ResultsFileError, ResultsStore

    inputs = list(results) + list(compare or [])
    torn_notes = []
    for path in inputs:
        if not path.is_file():
            raise UserError(f"no results file {path}")
        store = ResultsStore(path)
        try:
            rows = store.read()
        except ResultsFileError as exc:
            raise UserError(str(exc)) from exc
        torn = f"its last line is torn, a write that never finished ({len(store.torn_tail)} bytes)"
        if not rows:
            raise UserError(f"{path} holds no results rows: nothing to report" + (f" ({torn})" if store.torn_tail
                                                                                   else ""))
        if store.torn_tail:
            torn_notes.append(f"melt-bench: warning: {path}: {torn}: reporting the {len(rows)} complete rows")
    output = output or Path("reports") / f"{results[0].stem}.html"
    check_writable(output, "-o")
    if output.exists() and (any(output.resolve() == path.resolve() for path in inputs) or is_results_file(output)):
        raise UserError(f"-o {output} is a results file: a report never replaces results; choose another name")
    for note in torn_notes:
        print(note, file=sys.stderr)
    from melt_bench.reporting.report import write_report

    try:
        return write_report(list(results), output, compare)
    except OSError as exc:
        raise UserError(f"-o {output}: cannot write the report ({exc.strerror or exc})") from exc


def is_results_file(path: Path) -> bool:
    """Whether `path` holds melt-bench results (its first line carries our schema)."""
    from melt_bench.running.results import SCHEMA

    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return SCHEMA in handle.readline()
    except OSError:
        return False


def check_syntax(flags: SweepFlags) -> None:
    """What can be refused without torch, before it is imported (several seconds): the list
    grammar of --loops, --seq-lens and --batch-sizes, counts that must be positive, and every
    name given (models, dtype, device, KV policies, ...: sweep_options.check_names)."""
    from melt_bench.running.ranges import RangeError, parse_int_list
    from melt_bench.running.sweep_options import OptionError, check_names, check_weights

    given = flags.given()

    for key in ("loops", "seq_lens", "batch_sizes"):
        if isinstance(given.get(key), str):
            try:
                parse_int_list(given[key], f"--{key.replace('_', '-')}")
            except RangeError as exc:
                raise UserError(str(exc)) from exc
    for key, least in (("new_tokens", 0), ("repeats", 1), ("point_timeout", 1e-9)):
        if given.get(key) is not None and given[key] < least:
            bound = "positive" if least else "at least 0"
            raise UserError(f"--{key.replace('_', '-')}: {given[key]:g} must be {bound}")
    try:
        check_names(given)
        check_weights(given.get("weights"))
    except OptionError as exc:
        raise UserError(str(exc)) from exc


def resolve(command: str, flags: SweepFlags, suite: str | None, run: RunOptions):
    """The sweep of `flags` over `suite`. What needs no torch is refused first, in under a second:
    the flags, the suite's settings, --weights and --out; then the fork server starts (its imports
    overlap this process's own) and the machine's defaults are resolved."""
    check_syntax(flags)
    check_suite(suite)
    if not run.dry_run:
        check_out(command, run.out, run.resume)
        from melt_bench.running.launcher import start_fork_server

        start_fork_server()
    from melt_bench.running.sweep_options import OptionError, resolve_sweep

    try:
        resolved = resolve_sweep(command, flags, suite)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    return resolved  # its notices are printed once a run starts (_run_sweep_command), not before a refusal


def check_suite(suite: str | None) -> None:
    """The suite's file and settings, by the flags' own rules, before torch loads."""
    from melt_bench.running.suite_loader import SuiteError, load_suite
    from melt_bench.running.sweep_options import OptionError, check_names, check_weights

    if suite is None:
        return
    try:
        settings = load_suite(suite)
        check_names(settings)
        check_weights(settings.get("weights"))
    except (SuiteError, OptionError) as exc:
        raise UserError(f"--suite {suite}: {exc}" if not str(exc).startswith("--suite") else str(exc)) from exc


def checked_points(resolved, options) -> list:
    """The sweep's points as its command's (`options`: scenarios/memory.MemoryOptions, ...), once
    what a packed cache cannot run, and what a model family does not have, are refused (sweep_options)."""
    from melt_bench.running.sweep_options import OptionError, check_family_support, check_packed_caches

    points = resolved.spec.points(options)
    try:
        check_family_support(points)
        check_packed_caches(points, resolved.spec.command)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    return points


def check_prefill_chunk(tokens: int | None) -> int | None:
    if tokens is not None and tokens < 1:
        raise UserError(f"--prefill-chunk: {tokens} must be at least 1")
    return tokens


def parse_early_exit(text: str) -> float | None:
    if text == "off":
        return None
    prefix, _, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if prefix != "threshold" or not 0 < threshold <= 1:
        raise UserError(f"--early-exit: {text!r} is not off or threshold:P with 0 < P <= 1")
    return threshold


def parse_budget(text: str) -> int | None:
    """--budget in bytes, refused in one line before torch loads; None for auto (the device's
    total memory: device_total_bytes, once the device is resolved)."""
    from melt_bench.scenarios.capacity import parse_bytes  # torch-free

    if text == "auto":
        return None
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise UserError(f"--budget: {exc}") from exc


def device_total_bytes(device: str) -> int:
    """--budget auto: the CUDA device's total memory (NVML, else torch)."""
    if not device.startswith("cuda"):
        raise UserError("--budget auto needs a CUDA device; on a CPU give the budget, e.g. --budget 2GiB")
    from melt_bench.trackers.nvml import NvmlUnavailable, read_nvml

    index = int(device.partition(":")[2] or 0)
    try:
        return read_nvml().devices[index].memory_total_bytes
    except (NvmlUnavailable, IndexError):
        import torch

        return torch.cuda.get_device_properties(index).total_memory


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def show_plan(points, dry_run: bool, out: Path | None = None, placement: dict | None = None,
              as_json: bool = False) -> bool:
    """--dry-run: the plan (what every point shares, then a row per point with what varies; with
    --json a JSON line per point, for machines), how many points there are and, timed from the
    rows already in --out, about how long the pending ones take on the chosen workers."""
    if dry_run:
        from melt_bench.reporting.plan_table import print_plan
        from melt_bench.running.sweep_estimate import estimate_wall_time, planned_workers

        if as_json:
            for point in points:
                print(json.dumps({"point_id": point.point_id, **point.to_dict()}))
        else:
            print_plan([{"point_id": point.point_id, **point.to_dict()} for point in points], console)
        console.print(plural(len(points), "point"))
        console.print(estimate_wall_time(points, out, planned_workers(placement or {})))
    return dry_run


def open_store(kind: str, out: Path | None, resume: bool):
    """The results store for --out (checked as check_out does) and the run metadata."""
    from melt_bench.trackers.envinfo import collect_env

    store = check_out(kind, out, resume)
    torn = len(store.torn_tail)
    aside = store.set_torn_tail_aside()
    if aside is not None:
        print(f"melt-bench: {store.path}: its last line was torn (a write that never finished, {torn} bytes): "
              f"moved to {aside}; resuming from the {len(store.read())} complete rows", file=sys.stderr)
    return store, collect_env(probe_cuda=False).to_dict()


def check_out(kind: str, out: Path | None, resume: bool):
    """The results store --out names (default: results/KIND-TIMESTAMP.jsonl), refusing before torch
    loads a path no file can be written at, an existing file without --resume, and a corrupt or
    foreign one always. Writes nothing but missing parent folders."""
    from melt_bench.running.results import ResultsFileError, ResultsStore

    out = out or Path("results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    check_writable(out, "--out")
    store = ResultsStore(out)
    if store.exists() and not resume:
        raise UserError(f"--out {out} already exists: pass --resume to continue it, or choose another file")
    try:
        kinds = {row.kind for row in store.read()}
    except ResultsFileError as exc:
        raise UserError(str(exc)) from exc
    if kinds - {kind}:
        raise UserError(f"--out {out} holds {', '.join(sorted(kinds))} results, not {kind}: a results file holds "
                        f"one kind; choose another file")
    return store


def check_writable(path: Path, option: str) -> None:
    """Before anything runs: `path` can be created (or appended to) as a file. Creates missing
    parent folders; writes nothing else."""
    import tempfile

    if path.is_dir() or str(path).endswith(os.sep):
        raise UserError(f"{option} {path} is a directory: name a file, e.g. {Path(path) / 'results.jsonl'}")
    parent = path.parent
    for folder in [parent, *parent.parents]:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {path}: {folder} is a file, not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: the file is not writable")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create a file in {parent} ({exc.strerror or exc})") from exc


@dataclass
class Placement:
    """Where points run: --gpus, --executor, --ray-address, --allow-busy-gpus, and for CPU memory
    sweeps how many points run side by side."""

    gpus: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    allow_busy_gpus: bool = False
    cpu_workers: int = 1


@dataclass
class RunOptions:
    """What happens around the points: the results file, --resume, --retry-failed, the progress
    bar, the report at the end, and a dry run (readable, or JSON lines)."""

    out: Path | None = None
    resume: bool = False
    retry_failed: bool = False
    progress: bool = True
    report: bool = False
    dry_run: bool = False
    as_json: bool = False


def executor_for(placement: Placement, device: str):
    """The executor of --gpus / --executor / --ray-address (executors.py); one line on a bad one."""
    from melt_bench.running.executors import ExecutorError, make_executor

    try:
        return make_executor(placement.gpus, placement.executor, placement.ray_address, placement.allow_busy_gpus,
                             device, warn=lambda line: print(f"melt-bench: warning: {line}", file=sys.stderr),
                             cpu_workers=placement.cpu_workers)
    except ExecutorError as exc:
        raise UserError(str(exc)) from exc


def plan_and_run(summary, resolved, points: list, make_runner: Callable[[], Callable], run: RunOptions,
                 placement: Placement) -> None:
    """The sweep commands' common end: the plan on --dry-run, else every pending point through
    the runner on the placement's executor, then the scenario's `summary` tables (a TableSpec),
    the report and the exit status."""
    if not show_plan(points, run.dry_run, run.out, asdict(placement), run.as_json):
        run_sweep_command(summary, points, make_runner(), run, executor_for(placement, resolved.spec.device),
                          resolved.notices)


def run_sweep_command(summary, points: list, runner: Callable, run: RunOptions, executor=None,
                      notices: tuple[str, ...] = ()) -> None:
    from melt_bench.running.sweep import run_sweep

    kind = summary.command
    store, meta = open_store(kind, run.out, run.resume)
    for notice in notices:
        print(f"melt-bench: {notice}", file=sys.stderr)
    before = len(store.read())
    status = run_sweep(kind, points, store, runner, meta, run.retry_failed, show_progress=run.progress,
                       executor=executor)
    finish_run(summary, store, points, before, f"{status.ran_phrase} run, {status.skipped}", run)


def finish_run(summary, store, points: list, before: int, counts: str, run: RunOptions) -> None:
    """Every run's end: the scenario's `summary` tables over its `points`, what ran (`counts`)
    and where the results are, the --report, and exit 1 when none of the rows written after the
    first `before` is ok."""
    from melt_bench.reporting.summary_tables import print_fitted

    rows = store.read()
    planned = {point.point_id for point in points}
    print_fitted(summary, [row for row in rows if row.point_id in planned], console)
    console.print(f"{counts} already recorded; results in {store.path}")
    if run.report:
        console.print(f"report written to {write_report([store.path], None)}")
    check_something_measured(rows[before:], store.path, summary)


class NothingMeasured(Exception):
    """Every point this run wrote failed: exit 1 (the rows are kept)."""


def check_something_measured(new: list, path: Path, summary=None) -> None:
    """The run wrote rows (`new`) and none of them is ok, or none holds a measurement (the
    scenario's `summary.measured`): say so in one line, exit 1."""
    if new and not any(row.status == "ok" for row in new):
        statuses = ", ".join(f"{sum(r.status == s for r in new)} {s}" for s in sorted({r.status for r in new}))
        raise NothingMeasured(f"no point succeeded: {len(new)} rows written, all failed ({statuses}); the rows are "
                              f"kept in {path} (see their error field)")
    measured = getattr(summary, "measured", None)
    if new and measured is not None and not any(row.status == "ok" and measured(row.metrics) for row in new):
        raise NothingMeasured(f"{summary.nothing_measured} ({len(new)} rows kept in {path})")
