"""Ctrl-C at any moment of a run: exit 130 and one line, results intact, nothing left running.
A real SIGINT to the command's process group, as a terminal sends it, at moments that fall in
the interpreter's start, the imports, the fork server's start, the points and the report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import write_rows

from melt_bench.running.results import ResultsStore

SWEEP = ["memory", "--loops", "1..2", "--models", "ouro-tiny,melt-tiny", "--seq-lens", "256", "--batch-sizes", "1",
         "--device", "cpu", "--repeats", "1", "--no-progress"]


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies, already dead, are left to init to reap)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def interrupt_at(seconds: float, argv: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run melt-bench `argv`, Ctrl-C it after `seconds`: its exit code, stderr, and how long
    after its exit the last process of its group still ran."""
    proc = subprocess.Popen([sys.executable, "-m", "melt_bench", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(seconds)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    exited = time.monotonic()
    while live_processes_in_group(proc.pid) and time.monotonic() - exited < 10:
        time.sleep(0.02)
    return proc.returncode, stderr, time.monotonic() - exited


@pytest.mark.parametrize("seconds", [0.2, 1.0, 3.0, 5.0])
def test_ctrl_c_at_any_moment_of_a_sweep_exits_130_with_one_line(seconds, tmp_path):
    out = tmp_path / "sweep.jsonl"
    code, stderr, outlived = interrupt_at(seconds, [*SWEEP, "--out", str(out)], tmp_path)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("melt-bench: no CUDA")]
    if code == 0:  # the run finished first on a fast machine: then it must have finished whole
        assert len(ResultsStore(out).read()) == 4
        return
    assert code == 130, stderr
    assert len(lines) == 1 and lines[0].startswith("melt-bench: interrupted"), stderr
    assert outlived < 1.0, f"a child or the fork server ran {outlived:.1f} s after the parent"
    if out.exists():  # what was written is whole rows
        assert ResultsStore(out).torn_tail == b""
        assert all(row.status == "ok" for row in ResultsStore(out).read())


def test_ctrl_c_inside_report_exits_130_and_writes_no_report(tmp_path):
    results = tmp_path / "memory.jsonl"
    write_rows(results, "memory", 2)
    report = tmp_path / "report.html"
    code, stderr, _ = interrupt_at(1.0, ["report", str(results), "-o", str(report)], tmp_path)
    assert code == 130, stderr
    assert stderr.strip().splitlines() == ["melt-bench: interrupted"]
    assert not report.exists()


def test_a_ctrl_c_that_a_library_swallowed_still_stops_the_sweep_before_any_point(tmp_path):
    """torch's and numpy's imports can drop a KeyboardInterrupt in a bare `except:` (a sweep once
    ran to exit 0 after a Ctrl-C at ~1 s): the Ctrl-C is noted, and the sweep starts no point."""
    from melt_bench.running import interrupts
    from melt_bench.running.sweep import SweepInterrupted, run_sweep
    from melt_bench.scenarios.memory import MemoryPoint

    previous = signal.getsignal(signal.SIGINT)
    interrupts.forget()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    try:
        try:  # what a library's import does with it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except BaseException:
            pass
        assert interrupts.interrupted()
        ran = []
        points = [MemoryPoint("memory", "ouro-tiny", 1, 16, 1, "decode", 2, "float32", "cpu")]
        with pytest.raises(SweepInterrupted):
            run_sweep("memory", points, ResultsStore(tmp_path / "r.jsonl"), ran.append, show_progress=False)
        assert ran == [] and not (tmp_path / "r.jsonl").exists()
    finally:
        interrupts.forget()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("delay", [0.05, 0.2])
def test_ctrl_c_just_after_the_last_row_is_not_death_by_signal(delay, tmp_path):
    """Once the last row is written the process tears down torch; the interpreter resets a Python
    SIGINT handler to the default on its way out, and a Ctrl-C then ended a complete run as
    -SIGINT (19 of 25 trials at 0-0.4 s after the last row): now 0, or 130 with its one line."""
    out = tmp_path / "sweep.jsonl"
    argv = [*SWEEP, "--models", "ouro-tiny", "--loops", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "melt_bench", *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not (out.exists() and out.read_bytes().endswith(b"\n")):
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), (proc.returncode, stderr)
    assert len(ResultsStore(out).read()) == 1
    if proc.returncode == 130:
        assert stderr.strip().splitlines()[-1].startswith("melt-bench: interrupted"), stderr
