"""Sweeps over several GPUs (a local pool, GPUs and NVML faked) and a Ray cluster (local, CPU):
points run at once, each child pinned to its own GPU, one writer, failures as rows, resume."""

import sys
import types
from dataclasses import replace

import pytest
import sweep_helpers
import torch
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.running.executors import ExecutorError, GpuPoolExecutor, busy_gpus, make_executor, parse_gpus
from melt_bench.running.results import ResultsStore
from melt_bench.running.sweep import in_child, run_sweep
from melt_bench.running.sweep_plan import SweepPoint
from melt_bench.scenarios.memory import MemoryPoint

POINT = MemoryPoint("memory", "ouro-tiny", 1, 16, 1, "decode", 2, "float32", "cuda:0")


def points(count: int) -> list[SweepPoint]:
    return [replace(POINT, loops=loops) for loops in range(1, count + 1)]


def fake_nvml(count=4, busy=None):
    """nvidia-ml-py's calls the GPU pool makes: `count` GPUs, `busy` maps an index to the pids on it."""
    busy = busy or {}
    mod = types.SimpleNamespace()
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda index: index
    mod.nvmlDeviceGetHandleByUUID = lambda uuid: {"GPU-aaaa": 0}[uuid]
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=pid) for pid in busy.get(h, [])]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    return mod


def test_the_gpu_pool_runs_points_at_once_each_child_on_its_own_gpu(tmp_path):
    store = ResultsStore(tmp_path / "m.jsonl")
    status = run_sweep("memory", points(6), store, in_child(sweep_helpers.where_am_i, (1.0,), 60), {},
                       show_progress=False, executor=GpuPoolExecutor(["1", "3"]))
    rows = store.read()
    assert status.ran == 6 and len(rows) == 6 and len({row.point_id for row in rows}) == 6
    for row in rows:  # the child saw only its GPU, and NVML figures for cuda:0 come from that GPU
        assert row.metrics["gpu"] == row.metrics["visible"] and row.metrics["nvml_index"] == int(row.metrics["gpu"])
        assert row.metrics["executor"] == "gpus"
    assert {row.metrics["gpu"] for row in rows} == {"1", "3"}
    spans = sorted((row.metrics["started"], row.metrics["ended"]) for row in rows)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # some points overlapped in time
    # never two points on one GPU at once
    for gpu in ("1", "3"):
        mine = sorted((r.metrics["started"], r.metrics["ended"]) for r in rows if r.metrics["gpu"] == gpu)
        assert all(b[0] >= a[1] for a, b in zip(mine, mine[1:]))


def test_failures_are_rows_and_resume_skips_what_the_pool_recorded(tmp_path):
    store = ResultsStore(tmp_path / "m.jsonl")
    run_sweep("memory", points(3), store, in_child(sweep_helpers.die_by_sigkill, (), 60), {}, show_progress=False,
              executor=GpuPoolExecutor(["0", "1"]))
    rows = store.read()
    assert [row.status for row in rows] == ["oom"] * 3, [row.error for row in rows]  # SIGKILL reads as the OOM killer's
    status = run_sweep("memory", points(4), store, in_child(sweep_helpers.where_am_i, (), 60), {}, show_progress=False,
                       executor=GpuPoolExecutor(["0", "1"]))
    assert status.ran == 1 and status.skipped == 3


def test_gpu_lists_are_checked_against_the_machine():
    nvml = fake_nvml(count=4)
    assert parse_gpus("all", nvml) == ["0", "1", "2", "3"] and parse_gpus("2, 0", nvml) == ["2", "0"]
    assert parse_gpus("GPU-aaaa", nvml) == ["GPU-aaaa"]
    for text, needle in (("0,4", "GPU 4 does not exist"), ("1,1", "names a GPU twice"), ("x", "not a GPU index"),
                         ("", "not a GPU index")):
        with pytest.raises(ExecutorError, match=needle):
            parse_gpus(text, nvml)


def test_busy_gpus_are_refused_or_warned(monkeypatch):
    nvml = fake_nvml(count=2, busy={1: [4242]})
    assert busy_gpus(["0", "1"], nvml) == {"1": [4242]}
    monkeypatch.setattr("melt_bench.trackers.nvml.load_pynvml", lambda: nvml)
    with pytest.raises(ExecutorError, match=r"busy with other processes \(GPU 1: pids 4242\)"):
        make_executor("0,1", "local", None, False, "cuda:0", warn=print)
    warnings = []
    pool = make_executor("all", "local", None, True, "cuda:0", warn=warnings.append)
    assert pool.gpus == ["0", "1"] and "busy GPUs (GPU 1: pids 4242)" in warnings[0]
    assert isinstance(make_executor("0", "local", None, False, "cuda:0", warn=print), GpuPoolExecutor)


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "0"], "--gpus runs CUDA points; this sweep runs on cpu"),
    (["--executor", "slurm"], "--executor: 'slurm' is not one of local, ray"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address applies to --executor ray"),
    (["--executor", "ray", "--gpus", "0"], "--gpus applies to --executor local"),
])
def test_bad_placement_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    out = tmp_path / "x.jsonl"
    err = one_line_error(["memory", "--models", "ouro-tiny", "--loops", "1", "--device", "cpu", "--out", str(out),
                          *args], capsys)
    assert needle in err
    assert not out.exists()


def test_ray_missing_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    err = one_line_error(["memory", "--models", "ouro-tiny", "--loops", "1", "--device", "cpu", "--executor", "ray",
                          "--out", str(tmp_path / "x.jsonl")], capsys)
    assert 'pip install "melt-bench[ray]"' in err


def test_dry_run_estimates_from_the_rows_already_recorded(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    args = ["memory", "--models", "ouro-tiny", "--seq-lens", "16", "--batch-sizes", "1", "--new-tokens", "2",
            "--device", "cpu", "--repeats", "1", "--no-progress", "--out", str(out), "--cpu-workers", "1"]
    assert main([*args, "--loops", "1..4", "--dry-run"]) == 0
    assert "4 pending; no estimate: no finished memory points" in capsys.readouterr().out
    assert main([*args, "--loops", "1,2"]) == 0
    walls = [row.wall_s for row in ResultsStore(out).read()]
    capsys.readouterr()
    assert main([*args, "--loops", "1..4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "2 pending; estimated" in text and "on 1 worker," in text
    assert f"{2 * sorted(walls)[0]:.0f} s" in text or f"{walls[0] + walls[1]:.0f} s" in text
    assert main([*args[:-1], "2", "--loops", "1..4", "--dry-run"]) == 0
    assert "on 2 workers," in capsys.readouterr().out  # CPU memory points side by side


def test_a_dead_ray_address_is_one_line_at_once(capsys, tmp_path):
    """Ray retries a dead address for minutes, printing its logs; we ask the port first."""
    import socket
    import time

    from melt_bench.cli import main

    with socket.socket() as free:  # a local port nobody listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance of this process is up: the address would not be used")
    started = time.monotonic()
    out = tmp_path / "never.jsonl"
    assert main(["memory", "--models", "ouro-tiny", "--loops", "1", "--device", "cpu", "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ray-address 127.0.0.1:{port}: nothing answers there" in err[0], err
    assert time.monotonic() - started < 30 and not out.exists() and not ray.is_initialized()


def test_cpu_memory_points_run_side_by_side_each_with_one_thread(tmp_path):
    """The main job's points share the cores: a pool of CPU workers, each point a child of its
    own with one intra-op thread (recorded), so the peaks (per-process RSS) stay each point's own."""
    from melt_bench.running.executors import CpuPoolExecutor

    store = ResultsStore(tmp_path / "m.jsonl")
    cpu_points = [replace(p, device="cpu") for p in points(4)]
    status = run_sweep("memory", cpu_points, store, in_child(sweep_helpers.where_am_i, (1.0,), 60), {},
                       show_progress=False, executor=CpuPoolExecutor(2))
    rows = store.read()
    assert status.ran == 4 and {row.metrics["executor"] for row in rows} == {"cpu-pool"}
    spans = sorted((row.metrics["started"], row.metrics["ended"]) for row in rows)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # some points overlapped in time
    assert make_executor(None, "local", None, False, "cpu", print, cpu_workers=2).name == "cpu-pool"
    assert make_executor(None, "local", None, False, "cuda:0", print, cpu_workers=2).name == "serial"


def test_a_cpu_memory_row_records_its_one_thread():
    from melt_bench.running.executors import ONE_CPU_THREAD, run_pinned
    from melt_bench.running.launcher import run_in_child
    from melt_bench.scenarios.measure_memory import measure_memory_point

    point = replace(POINT, device="cpu")  # in children: not this process's threads
    pooled = run_in_child(run_pinned, (ONE_CPU_THREAD, measure_memory_point, point), 120)
    assert pooled.status == "ok" and pooled.value["metrics"]["torch_num_threads"] == 1
    alone = run_in_child(run_pinned, (None, measure_memory_point, point), 120)
    assert alone.value["metrics"]["torch_num_threads"] == torch.get_num_threads()
