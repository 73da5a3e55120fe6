"""--executor ray on a local Ray instance of 2 CPUs: every point once, each in a fresh child on
its node, the driver the only writer; a worker killed mid-point is an error row and the rest
finish; --resume skips recorded points."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import sweep_helpers

from melt_bench.cli import main
from melt_bench.running.executors import RayExecutor
from melt_bench.running.results import ResultsStore, load_results
from melt_bench.running.sweep import in_child, run_sweep
from melt_bench.scenarios.memory import MemoryPoint

ray = pytest.importorskip("ray")

POINT = MemoryPoint("memory", "ouro-tiny", 1, 16, 1, "decode", 2, "float32", "cpu")
HERE = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def local_cluster():
    # the workers import this directory's helpers, as a cluster's nodes import melt-bench
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


def points(count):
    return [replace(POINT, loops=loops) for loops in range(1, count + 1)]


def test_every_point_once_in_its_own_child(local_cluster, tmp_path):
    store = ResultsStore(tmp_path / "m.jsonl")
    executor = RayExecutor(None, gpu=False)
    assert executor.workers == 2
    status = run_sweep("memory", points(4), store, in_child(sweep_helpers.where_am_i, (), 60), {}, show_progress=False,
                       executor=executor)
    rows = store.read()
    assert status.ran == 4 and sorted(row.point["loops"] for row in rows) == [1, 2, 3, 4]
    assert all(row.status == "ok" and row.metrics["executor"] == "ray" and row.metrics["ray_node_ip"] for row in rows)
    assert "gpu" not in rows[0].metrics and len({row.metrics["pid"] for row in rows}) == 4  # a fresh child each
    assert ray.is_initialized()  # the executor leaves a Ray it did not start running


def test_a_killed_worker_is_an_error_row_and_resume_skips_the_rest(local_cluster, tmp_path):
    store = ResultsStore(tmp_path / "m.jsonl")
    run_sweep("memory", points(4), store, sweep_helpers.kill_the_worker_at_loops_2, {}, show_progress=False,
              executor=RayExecutor(None, gpu=False))
    by_loops = {row.point["loops"]: row for row in store.read()}
    assert sorted(by_loops) == [1, 2, 3, 4]
    assert by_loops[2].status == "error" and by_loops[2].error.startswith("Ray ")
    assert all(by_loops[n].status == "ok" for n in (1, 3, 4))
    status = run_sweep("memory", points(5), store, in_child(sweep_helpers.where_am_i, (), 60), {},
                       retry_failed=True, show_progress=False, executor=RayExecutor(None, gpu=False))
    assert status.ran == 2 and {row.point["loops"] for row in store.read()[-2:]} == {2, 5}


def test_accuracy_over_ray_gives_the_rows_of_the_local_runner(local_cluster, tmp_path):
    """Accuracy runs through the sweeps' runner, so each point can be a Ray task: same points,
    same scores, same answers (their hash) as one after another here."""
    data = Path(HERE) / "data"
    run = ["accuracy", "--loops", "1", "--models", "ouro-tiny,melt-tiny", "--limit", "2", "--num-fewshot", "1",
           "--max-gen-toks", "4", "--data-dir", str(data), "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "local.jsonl")]) == 0
    assert main([*run, "--executor", "ray", "--out", str(tmp_path / "ray.jsonl")]) == 0
    local, on_ray = (load_results(tmp_path / name).set_index(["point_id", "metric", "filter"]).sort_index()
                     for name in ("local.jsonl", "ray.jsonl"))
    assert len(local) == 4 and list(local.index) == list(on_ray.index)
    for column in ("value", "n_samples", "responses_sha256", "kv_bytes_per_token"):
        assert list(local[column]) == list(on_ray[column]), column
    assert set(on_ray.executor) == {"ray"} and on_ray.ray_node_ip.notna().all()
