"""What the progress bar and the closing line count (#32 item 7): points and repeats apart, and
an ETA that a narrow terminal does not cut."""

import io
import re
import time

import pytest
from rich.console import Console
from rich.progress import Progress

from melt_bench.running.sweep import progress_columns, runs_phrase
from melt_bench.scenarios.accuracy import AccuracyPoint
from melt_bench.scenarios.memory import MemoryPoint


def points(count: int, repeats: int) -> list[MemoryPoint]:
    return [MemoryPoint("memory", "ouro-tiny", loops, 32, 1, "decode", 4, "float32", "cpu", repeat=repeat)
            for loops in range(1, count + 1) for repeat in range(repeats)]


def test_points_and_repeats_are_counted_apart():
    assert runs_phrase(points(32, 2)) == "32 points x 2 repeats (64 runs)"
    assert runs_phrase(points(3, 1)) == "3 points" and runs_phrase(points(1, 1)) == "1 point"
    assert runs_phrase(points(2, 2)[1:]) == "3 runs of 2 points"  # a resumed sweep, one repeat recorded
    accuracy = [AccuracyPoint("ouro-tiny", loops, "gsm8k") for loops in (1, 2)]  # no repeats to count
    assert runs_phrase(accuracy) == "2 points"


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_eta_stays_whole_and_the_point_label_is_what_is_cut(width):
    screen = io.StringIO()
    console = Console(file=screen, width=width, color_system=None)
    bar = Progress(*progress_columns(width, "memory", 64), console=console, auto_refresh=False)
    task = bar.add_task("memory", total=64, last="")
    bar.update(task, advance=3, last="done: melt-tiny reads=chunk loops=16 seq=1024 batch=4 " + "x" * 80)
    time.sleep(1.05)  # one run a second: the ETA is a whole minute
    bar.update(task, advance=1)
    console.print(bar.get_renderable())
    [line] = screen.getvalue().splitlines()
    assert len(line) <= width and "4/64 runs" in line
    assert re.search(r"ETA 0:0\d:\d\d", line), line
    assert line.rstrip().endswith("…")  # the label gave way
