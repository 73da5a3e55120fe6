"""Issue 11's latency targets, measured: run this on a GPU and paste its table.

Runs `melt-bench latency` for Ouro and MELT with the eager and the compiled engine (one results
file per engine), then prints per model and engine: prefill, decode ms/token, the roofline
ms/token, MBU, MFU and energy per token, and the targets (on an H100, bf16, batch 1, 2,048-token
prompt, 4 loops):
  compiled decode MBU >= 50 %;  MELT/Ouro decode <= 1.25x (compiled);  MELT/Ouro prefill <= 1.3x;
  eager and compiled decode the same tokens (or the fraction that agrees, in bf16).
Then runs benchmarks/loop_overhead.py at the same shape (targets: looped/flat decode <= 1.05x
and looped/Llama decode <= 1.0x, compiled).

    python benchmarks/gpu_latency_targets.py --out results/gpu-targets
    python benchmarks/gpu_latency_targets.py --models ouro-tiny,melt-tiny --device cpu --dtype float32 \\
        --seq-len 64 --skip-overhead      # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from melt_bench.cli import main as melt_bench
from melt_bench.running.results import load_results
from melt_bench.scenarios.measure_latency import token_agreement


def run_engine(args, engine: str) -> Path:
    out = Path(args.out) / f"latency-{engine}.jsonl"
    resume = ["--resume"] if out.exists() else []
    code = melt_bench(["latency", "--models", args.models, "--loops", str(args.loops), "--seq-lens", str(args.seq_len),
                       "--batch-sizes", "1", "--new-tokens", str(args.new_tokens), "--warmup", "2", "--repeats", "5",
                       "--engine", engine, "--dtype", args.dtype, "--device", args.device, "--no-progress",
                       "--out", str(out), *resume])
    if code != 0:
        sys.exit(f"melt-bench latency --engine {engine} failed with exit code {code}")
    return out


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu-latency-targets")
    parser.add_argument("--models", default="ouro-1.4b,melt-1.4b")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-overhead", action="store_true", help="do not run loop_overhead.py")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    frames = {engine: load_results(run_engine(args, engine)) for engine in ("eager", "compiled")}
    ouro, melt = args.models.split(",")

    print(f"\n{args.seq_len:,}-token prompt, batch 1, {args.loops} loops, {args.dtype} on {args.device}")
    print(f"{'model':12s} {'engine':9s} {'prefill ms':>11s} {'decode ms/tok':>14s} {'roofline ms':>12s} "
          f"{'MBU':>7s} {'prefill MFU':>12s} {'J/token':>9s}")
    rows = {}
    for engine, frame in frames.items():
        for _, row in frame.iterrows():
            rows[(row.model, engine)] = row
            if row.status != "ok":
                print(f"{row.model:12s} {engine:9s} {row.status.upper()}: {row.error}")
                continue
            energy = row.get("energy_decode_j_per_token")
            print(f"{row.model:12s} {engine:9s} {row.prefill_ms:11.2f} {row.decode_ms_per_token_mean:14.3f} "
                  f"{row.roofline_decode_ms_per_token:12.3f} {row.decode_mbu:7.1%} {row.prefill_mfu:12.1%} "
                  f"{energy if energy is not None else float('nan'):9.4f}")
    print()
    try:
        compiled_ouro, compiled_melt = rows[(ouro, "compiled")], rows[(melt, "compiled")]
        print(f"compiled decode MBU >= 50%: {ouro} {compiled_ouro.decode_mbu:.1%}, "
              f"{melt} {compiled_melt.decode_mbu:.1%} "
              f"-> {verdict(min(compiled_ouro.decode_mbu, compiled_melt.decode_mbu) >= 0.5)}")
        decode_ratio = compiled_melt.decode_ms_per_token_mean / compiled_ouro.decode_ms_per_token_mean
        print(f"MELT/Ouro decode (compiled) <= 1.25x: {decode_ratio:.2f}x -> {verdict(decode_ratio <= 1.25)}")
        for engine in ("eager", "compiled"):
            prefill_ratio = rows[(melt, engine)].prefill_ms / rows[(ouro, engine)].prefill_ms
            print(f"MELT/Ouro prefill ({engine}) <= 1.3x: {prefill_ratio:.2f}x -> {verdict(prefill_ratio <= 1.3)}")
        for model in (ouro, melt):
            eager, compiled = rows[(model, "eager")], rows[(model, "compiled")]
            same = eager.output_digest == compiled.output_digest
            agreement = token_agreement(eager.output_token_ids, compiled.output_token_ids)
            print(f"{model}: eager and compiled tokens {'identical' if same else 'differ'} "
                  f"({agreement:.1%} of the first run's tokens agree)")
    except (KeyError, AttributeError, TypeError) as exc:
        print(f"targets not evaluated: a point failed ({exc})")
    if not args.skip_overhead:
        script = Path(__file__).with_name("loop_overhead.py")
        preset = ouro if not ouro.endswith("tiny") else None
        command = [sys.executable, str(script), "--device", args.device, "--dtype", args.dtype,
                   "--seq", str(args.seq_len), "--loops", str(args.loops), *(["--preset", preset] if preset else [])]
        print("\n$ " + " ".join(command), flush=True)
        subprocess.run(command, check=False)
        print("targets: looped/flat decode <= 1.05x and looped/llama decode <= 1.00x, compiled")


if __name__ == "__main__":
    main()
