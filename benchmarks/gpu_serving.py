"""Issue #34 item 5: the serving table for Ouro-1.4B vs MELT-1.4B on a GPU, measured: bf16,
1,024-token prompts, 128 output tokens, closed loop at concurrency 1, 8, 32, 128 and the largest
that fits the budget (slots from capacity's search within --budget, 80GiB by default), compiled
engine. Runs `melt-bench serve` twice (slots = concurrency; slots searched within the budget at
a concurrency of --max-slots), then prints per model and load: slots, output tokens/s, requests/s,
p50/p90/p99 TTFT and TPOT, p90 ITL, peak memory and K/V in use, with the CV over the timed runs;
and beside them the published figures of a dedicated Ouro serving engine (vllm-rlt, Ouro-1.4B
bf16, 4 loops: 13.3-13.7 tok/s at concurrency 1 and 100-104 at 8 on an H800, synchronous eager;
387 tok/s at batch 16 with CUDA graphs on an RTX 5090, 128 in / 128 out) - other machines, set
beside ours for scale, never divided.

    python benchmarks/gpu_serving.py --out results/gpu-serving
    python benchmarks/gpu_serving.py --models ouro-tiny,melt-tiny --device cpu --dtype float32 \\
        --prompt-len 32 --output-len 8 --concurrency 1,2 --budget 256MiB --max-slots 4 --num-requests 4 \\
        --engine eager     # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from melt_bench.cli import main as melt_bench
from melt_bench.running.results import ResultsStore

PUBLISHED = ("vllm-rlt (published, not measured here): Ouro-1.4B bf16, 4 loops: 13.3-13.7 tok/s at concurrency 1 "
             "and 100-104 tok/s at 8 (H800, synchronous eager); 387 tok/s at batch 16 (RTX 5090, CUDA graphs, "
             "128 in / 128 out)")


def serve(args, out: Path, extra: list[str]) -> list:
    resume = ["--resume"] if out.exists() else []
    code = melt_bench(["serve", "--models", args.models, "--loops", str(args.loops), "--prompt-lens",
                       str(args.prompt_len), "--output-lens", str(args.output_len), "--num-requests",
                       str(args.num_requests), "--engine", args.engine, "--dtype", args.dtype, "--device", args.device,
                       "--timed-runs", "2", "--warmup", "1", "--no-progress", "--out", str(out), *extra, *resume])
    if code != 0:
        sys.exit(f"melt-bench serve failed with exit code {code}")
    return ResultsStore(out).read()


def cell(m: dict, key: str, digits: int = 1) -> str:
    value = m.get(key)
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu-serving")
    parser.add_argument("--models", default="ouro-1.4b,melt-1.4b")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--budget", default="80GiB")
    parser.add_argument("--max-slots", type=int, default=512)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--engine", default="compiled")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = serve(args, Path(args.out) / "serve-concurrency.jsonl", ["--concurrency", args.concurrency])
    rows += serve(args, Path(args.out) / "serve-budget.jsonl",
                  ["--concurrency", str(args.max_slots), "--budget", args.budget, "--max-slots", str(args.max_slots)])
    print(f"\n{args.prompt_len:,}-token prompts, {args.output_len} output tokens, {args.loops} loops, {args.dtype} on "
          f"{args.device}, engine {args.engine}, {args.num_requests} requests per run (median of 2 timed runs)")
    print("| model | load | slots | output tok/s (CV) | req/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p90 ms "
          "| peak | K/V in use max | stability |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        m, p = row.metrics, row.point
        load = f"c={p['concurrency']}" + (" (budget)" if p.get("memory_budget_bytes") else "")
        if row.status != "ok" or not m.get("completed_requests"):
            print(f"| {p['model']} | {load} | {m.get('slots', '-')} | {row.status}: {row.error or m.get('serve_note')} "
                  "|" + " |" * 7)
            continue
        cv = m.get("output_tokens_per_s_cv")
        print(f"| {p['model']} | {load} | {m['slots']} | {cell(m, 'output_tokens_per_s')} "
              f"({'-' if cv is None else f'{cv:.0%}'}) | {cell(m, 'requests_per_s', 2)} | "
              f"{cell(m, 'ttft_ms_p50')}/{cell(m, 'ttft_ms_p90')}/{cell(m, 'ttft_ms_p99')} | "
              f"{cell(m, 'tpot_ms_p50')}/{cell(m, 'tpot_ms_p90')}/{cell(m, 'tpot_ms_p99')} | {cell(m, 'itl_ms_p90')} | "
              f"{m['peak_bytes'] / 2**30:.2f} GiB | {m['kv_in_use_bytes_max'] / 2**30:.2f} GiB | "
              f"{m['timing_stability']} |")
    print(f"\n{PUBLISHED}")


if __name__ == "__main__":
    main()
