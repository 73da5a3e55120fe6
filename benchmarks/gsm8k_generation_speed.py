"""Issue #34 item 4: GSM8K seconds per problem, generate() (transformers, left-padded batches)
against the continuous batcher (the decode engine, --batch-size slots), on the same model,
documents and settings, each evaluation a `melt-bench accuracy` point in a fresh child.

Prints per model: seconds per problem each way (the evaluation's wall time, eval_s, over the
documents), their ratio, and whether the two scored the same responses (responses_sha256).

    python benchmarks/gsm8k_generation_speed.py --data-dir ../shared/data --limit 16 --batch-size 4
    python benchmarks/gsm8k_generation_speed.py --models ouro-1.4b --weights ByteDance/Ouro-1.4B --device cuda \\
        --dtype bfloat16 --limit 64 --batch-size 16 --max-gen-toks 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PATHS = ("generate", "continuous-batching")


def evaluate(out: Path, args, generate_with: str) -> list[dict]:
    command = [sys.executable, "-m", "melt_bench", "accuracy", "--tasks", "gsm8k", "--models", args.models,
               "--loops", str(args.loops), "--limit", str(args.limit), "--batch-size", str(args.batch_size),
               "--num-fewshot", str(args.num_fewshot), "--max-gen-toks", str(args.max_gen_toks),
               "--dtype", args.dtype, "--device", args.device, "--generate-with", generate_with, "--out", str(out),
               "--no-progress"]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    if args.weights:
        command += ["--weights", args.weights]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"melt-bench accuracy exited {done.returncode}: {done.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [row for row in rows if "metrics" in row and row["point"].get("filter") == "strict-match"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ouro-tiny,melt-tiny")
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-fewshot", type=int, default=1)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", type=Path, default=None, help="a local GSM8K copy (default: the hub)")
    parser.add_argument("--weights", default=None, help="a checkpoint directory or hub id (default: random weights)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="gsm8k-speed-"))
    rows = {path: {r["point"]["model"]: r for r in evaluate(scratch / f"{path}.jsonl", args, path)} for path in PATHS}
    print(f"GSM8K, {args.limit} problems, {args.num_fewshot}-shot, at most {args.max_gen_toks} tokens, "
          f"{args.loops} loops, batch size {args.batch_size}, {args.dtype} on {args.device}")
    print("| model | generate() s/problem | continuous batching s/problem | speed-up | same responses | path |")
    print("|---|---|---|---|---|---|")
    for model, old in rows["generate"].items():
        new = rows["continuous-batching"][model]
        before, after = (r["metrics"]["eval_s"] / r["metrics"]["n_samples"] for r in (old, new))
        same = old["metrics"]["responses_sha256"] == new["metrics"]["responses_sha256"]
        print(f"| {model} | {before:.3f} | {after:.3f} | {before / after:.2f}x | {same} | "
              f"{new['metrics'].get('generation')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
