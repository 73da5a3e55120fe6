"""What the executors cost: fake points that sleep a fixed time, each in a fresh child as real
points run, through the serial executor, the local GPU pool (its pinning is harmless to a
sleeping child, so it runs on a CPU-only machine too) and Ray (a local instance with N CPUs),
with 1, 2, 4 and 8 workers. Prints the wall time, the speed-up over one worker and the overhead
per point (wall x workers / points - the sleep). Target (issue 15): under 0.5 s per point, and
the speed-up linear while workers <= cores (sleeping points do not compete for cores, so past
that it shows the executor, not the machine).

    python benchmarks/executor_overhead.py --points 16 --sleep 1.0
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from melt_bench.running.executors import GpuPoolExecutor, PointRunner, RayExecutor, SerialExecutor
from melt_bench.scenarios.memory import MemoryPoint

POINT = MemoryPoint("memory", "ouro-tiny", 1, 16, 1, "decode", 2, "float32", "cpu")


def sleep_point(point, seconds):
    time.sleep(seconds)
    return {"status": "ok", "error": None, "metrics": {}}


def timed(executor, points, runner) -> float:
    started = time.perf_counter()
    done = list(executor.run(points, runner))
    assert len(done) == len(points) and all(d.outcome.status == "ok" for d in done), [d.outcome for d in done]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each fake point takes")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    points = [replace(POINT, loops=i + 1) for i in range(args.points)]
    # by module name, so children and Ray workers import it (this directory on their path)
    from executor_overhead import sleep_point as importable

    runner = PointRunner(importable, (args.sleep,), timeout_s=600)
    runner(points[0])  # start the fork server once, as a sweep's first point does
    counts = [int(n) for n in args.workers.split(",")]
    print(f"{args.points} points of {args.sleep:g} s each; {os.cpu_count()} cores")
    print(f"{'executor':<10} {'workers':>7} {'wall s':>8} {'speed-up':>9} {'overhead s/point':>17}")
    rows = [("serial", 1, timed(SerialExecutor(), points, runner))]
    rows += [("gpu pool", n, timed(GpuPoolExecutor([str(i) for i in range(n)]), points, runner)) for n in counts]
    if not args.no_ray:
        import ray

        for n in counts:
            here = os.path.dirname(os.path.abspath(__file__))
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": here}})
            executor = RayExecutor(None, gpu=False)
            timed(executor, points[:n], runner)  # start the workers (and their fork servers) first
            rows.append(("ray", n, timed(executor, points, runner)))
            ray.shutdown()
    base = rows[0][2]
    for name, workers, wall in rows:
        overhead = wall * workers / args.points - args.sleep
        print(f"{name:<10} {workers:>7} {wall:>8.2f} {base / wall:>8.2f}x {overhead:>17.3f}")


if __name__ == "__main__":
    main()
