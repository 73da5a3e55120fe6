"""MELT's decode time over Ouro's, paired: both models' engines built in one process and timed in
alternating rounds, so that drift of the machine between two children (minutes apart) does not
enter the ratio. Each round: prefill, one untimed step, then `--new-tokens` timed steps through
`DecodeEngine`, Ouro then MELT; the ratio is the median of the rounds' ratios, with their
spread and pyperf's 10% rule on its coefficient of variation. Random weights, nothing downloaded.

    python benchmarks/paired_decode.py --engine compiled --dtype bfloat16 --threads 1   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from melt_bench.models.names import STEP_ENGINES
from melt_bench.running.stability import figure_verdict, load_average, spread_fields


def time_steps(engine, prompt, new_tokens: int) -> float:
    """ms per decode step over `new_tokens` steps after a prefill and one untimed step."""
    token = engine.step(engine.prefill(prompt).token).token
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = engine.step(token).token
    return (time.perf_counter() - started) / new_tokens * 1000


def paired_ratio(models: tuple[str, str], engine: str, dtype: str, loops: int, seq_len: int, new_tokens: int,
                 rounds: int) -> dict:
    import torch

    from melt_bench.models import load_model
    from melt_bench.models.decode_engine import DecodeEngine

    built = [load_model(name, dtype=getattr(torch, dtype)).eval() for name in models]
    vocab = min(model.config.vocab_size for model in built)
    prompt = torch.randint(1, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    load_before = load_average()
    with torch.inference_mode():
        engines = [DecodeEngine(model, loops, 1, seq_len + new_tokens + 1, engine) for model in built]
        for each in engines:  # compile (or warm) outside the timed rounds
            time_steps(each, prompt, 2)
        times = [[], []]
        for _ in range(rounds):
            for timed, each in zip(times, engines):
                timed.append(time_steps(each, prompt, new_tokens))
    ratios = [second / first for first, second in zip(*times)]
    spread = spread_fields("ratio", ratios)
    return {"models": list(models), "engine": engine, "dtype": dtype, "threads": torch.get_num_threads(),
            "rounds": rounds, "ms_per_token": [statistics.median(timed) for timed in times],
            "ratio": statistics.median(ratios), "ratio_min": spread["ratio_min"], "ratio_max": spread["ratio_max"],
            "ratio_cv": spread["ratio_cv"],
            "stable": figure_verdict(spread, "ratio") == "stable",
            "loadavg_1m_before": load_before, "loadavg_1m_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ouro-mid,melt-mid", help="the baseline, then the model over it")
    parser.add_argument("--engine", choices=STEP_ENGINES, default="compiled")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    models = tuple(args.models.split(","))
    if len(models) != 2 or args.rounds < 2 or args.threads < 1:
        parser.error("--models takes two presets, --rounds at least 2, --threads at least 1")
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(paired_ratio(models, args.engine, args.dtype, args.loops, args.seq_len, args.new_tokens,
                                  args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
