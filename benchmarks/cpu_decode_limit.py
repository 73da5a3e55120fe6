"""Issue #33's table: how close melt-bench's CPU decode runs to the machine's limit.

For each engine (eager, compiled, forward), dtype (float32, bfloat16) and thread count (1, 2),
runs `melt-bench latency` on ouro-mid and melt-mid (4 loops, a 512-token prompt, 64 greedy
tokens; random weights, nothing downloaded). Each point runs in a fresh child, as every latency
point does. Prints, per row: decode ms/token (median of the timed runs) with its spread and
stability, bytes per token, the copy bandwidth the child measured, MBU (bytes per token over
that bandwidth, as a percentage), the load average, the ratio to issue #33's goal and MELT's
time over Ouro's.

The goals are issue #33's: 1.15x (fp32) and 1.25x (bf16) of llama.cpp's Ouro for compiled,
1.4x for eager, on the same weights. The llama.cpp figures (24.8 / 16.5 ms/token) are the ones
the issue measured on its 2-core VM on 2026-12-02; they are not measured by this script, so a
ratio to them means something only on that machine.

    python benchmarks/cpu_decode_limit.py                       # the whole table (~30 min, 2 cores)
    python benchmarks/cpu_decode_limit.py --engines compiled --dtypes float32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_CPP_MS = {"float32": 24.8, "bfloat16": 16.5}  # issue #33, 2026-12-02 VM, one thread
GOAL_FACTOR = {("compiled", "float32"): 1.15, ("compiled", "bfloat16"): 1.25,
               ("eager", "float32"): 1.4, ("eager", "bfloat16"): 1.4}
MELT_OVER_OURO_GOAL = 1.1


def run_latency(out: Path, models: str, engine: str, dtype: str, threads: int, args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "melt_bench", "latency", "--models", models, "--loops", str(args.loops),
               "--seq-lens", str(args.seq_len), "--new-tokens", str(args.new_tokens), "--engine", engine,
               "--dtype", dtype, "--threads", str(threads), "--device", "cpu", "--repeats", str(args.repeats),
               "--warmup", "1", "--out", str(out), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True)


def goal_ms(engine: str, dtype: str) -> float | None:
    factor = GOAL_FACTOR.get((engine, dtype))
    return None if factor is None else factor * LLAMA_CPP_MS[dtype]


def table_rows(rows: list[dict], engine: str, dtype: str, threads: int, at_goal_shape: bool = True) -> list[str]:
    """Markdown rows for one (engine, dtype, threads) run: one per model, then MELT over Ouro
    (stated only when both points are stable). The goal applies only at the issue's shape."""
    lines, by_model = [], {}
    for row in rows:
        model, m = row["point"]["model"], row["metrics"]
        if row["status"] != "ok":
            lines.append(f"| {engine} | {dtype} | {threads} | {model} | {row['status']}: {row['error']} |" + " |" * 7)
            continue
        by_model[model] = m
        ms = m["decode_ms_per_token_mean"]
        spread = f"{m['decode_ms_per_token_mean_min']:.1f}-{m['decode_ms_per_token_mean_max']:.1f}"
        goal = goal_ms(engine, dtype) if at_goal_shape else None
        versus_goal = "-" if goal is None else f"{ms / goal:.2f}x of {goal:.1f}"
        load = f"{m['loadavg_1m_before']:.1f} / {m['loadavg_1m_after']:.1f}"
        lines.append(f"| {engine} | {dtype} | {threads} | {model} | {ms:.1f} | {spread} | {m['timing_stability']} | "
                     f"{m['decode_bytes_per_token'] / 1e6:.1f} | {m['device_bandwidth_bytes_per_s'] / 1e9:.1f} | "
                     f"{100 * m['decode_mbu']:.0f}% | {load} | {versus_goal} |")
    ouro = next((m for name, m in by_model.items() if name.startswith("ouro")), None)
    melt = next((m for name, m in by_model.items() if name.startswith("melt")), None)
    if ouro and melt:
        stable = ouro["timing_stability"] == melt["timing_stability"] == "stable"
        ratio = melt["decode_ms_per_token_mean"] / ouro["decode_ms_per_token_mean"]
        verdict = (f"{ratio:.2f}x (goal <= {MELT_OVER_OURO_GOAL}x)" if stable
                   else "not stated: a point is unstable (see its spread)")
        lines.append(f"| {engine} | {dtype} | {threads} | MELT / Ouro | {verdict} |" + " |" * 7)
    return lines


def at_goal_shape(args) -> bool:
    return (args.models, args.loops, args.seq_len, args.new_tokens) == ("ouro-mid,melt-mid", 4, 512, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="eager,compiled,forward")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--models", default="ouro-mid,melt-mid")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the results files here")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="cpu-decode-limit-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"shape: {args.models}, {args.loops} loops, {args.seq_len}-token prompt, {args.new_tokens} new tokens; "
          f"llama.cpp reference: {LLAMA_CPP_MS} ms/token (issue #33, not measured here)")
    print("| engine | dtype | threads | model | decode ms/token | min-max | stability | MB/token | copy GB/s "
          "| MBU | load before / after | vs goal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for engine in args.engines.split(","):
        for dtype in args.dtypes.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                out = out_dir / f"{engine}-{dtype}-{threads}t.jsonl"
                done = run_latency(out, args.models, engine, dtype, threads, args)
                if done.returncode != 0:
                    failed = True
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    note = f"melt-bench exited {done.returncode}: {last}"
                    print(f"| {engine} | {dtype} | {threads} | {note} |" + " |" * 8)
                    continue
                rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
                for line in table_rows(rows, engine, dtype, threads, at_goal_shape(args)):
                    print(line, flush=True)
    print(f"results: {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
