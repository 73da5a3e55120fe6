"""`melt-bench serve`: continuous batching under closed-loop or Poisson load, every point in a
fresh child, through the sweeps' runner (results schema, --resume, --gpus, Ray)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from melt_bench.commands.app import UserError, app
from melt_bench.commands.options import SUITE, THREADS, run_flags, sweep_flags
from melt_bench.commands.support import Placement, RunOptions, parse_budget, parse_early_exit, plan_and_run, resolve
from melt_bench.commands.sweeps import check_threads
from melt_bench.running.sweep_options import SweepFlags

DEFAULT_CONCURRENCY = "1,8"


@app.command()
@sweep_flags(batch_sizes=False, without=("seq_lens", "new_tokens"))
@run_flags()
def serve(
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="closed loop: requests in the system, a "
                                              "finished one replaced at once; a list is an axis (default: "
                                              f"{DEFAULT_CONCURRENCY} unless --request-rate is given)"),
    request_rate: Optional[str] = typer.Option(None, "--request-rate", help="open loop: Poisson arrivals, requests "
                                               "per second (seeded; inf: all at once); a list is an axis"),
    num_requests: int = typer.Option(16, "--num-requests", help="requests per timed run"),
    prompt_lens: Optional[str] = typer.Option(None, "--prompt-lens", help="prompt tokens of every request; a list "
                                              "is an axis (default: 1024 on CUDA, 128 on CPU; --dataset gsm8k: "
                                              "each question's own)"),
    output_lens: Optional[str] = typer.Option(None, "--output-lens", help="output tokens of every request (EOS "
                                              "ignored); a list is an axis (default: 128 on CUDA, 32 on CPU; "
                                              "--dataset gsm8k: at most this many, each answer's own length)"),
    dataset: str = typer.Option("random", "--dataset", help="random (token ids) | gsm8k (test questions, "
                                "tokenised by the checkpoint's tokenizer or, for random weights, a byte tokenizer)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="--dataset gsm8k from a local copy: "
                                            "DIR/gsm8k/test.jsonl or DIR/test.jsonl (default: the hub)"),
    slots: Optional[str] = typer.Option(None, "--slots", help="sequences decoded at once (a list is an axis; "
                                        "default: the concurrency, closed loop)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="instead of --slots: as many slots as fit this "
                                         "memory budget (capacity's search), e.g. 80GiB or auto (the GPU's memory)"),
    max_slots: int = typer.Option(256, "--max-slots", help="--budget: the search goes no higher (vLLM's "
                                  "max_num_seqs)"),
    slo: Optional[str] = typer.Option(None, "--slo", help="goodput: requests within ttft=MS,tpot=MS (either or both)"),
    engine: str = typer.Option("eager", "--engine", help="eager | compiled: the static-shape decode step, as is or "
                               "through torch.compile (CUDA graphs on CUDA)"),
    early_exit: str = typer.Option("off", "--early-exit", help="off | threshold:P (each token's exit depth and "
                                   "the loops its batch saved are recorded)"),
    warmup: int = typer.Option(1, help="untimed serve runs first (a compiled engine compiles in the first)"),
    timed_runs: int = typer.Option(2, "--timed-runs", help="timed serve runs of all the requests; figures are "
                                   "medians with their spread"),
    seed: int = typer.Option(0, help="seed of the prompts, the GSM8K sample and the Poisson arrivals"),
    threads: Optional[int] = THREADS,
    suite: Optional[str] = SUITE,
    flags: SweepFlags = None,
    run: RunOptions = None,
    placement: Placement = None,
) -> None:
    """Serving: requests arriving, continuous batching, TTFT/TPOT/ITL percentiles and goodput."""
    options = serve_options(concurrency, request_rate, num_requests, output_lens, dataset, data_dir, slots, budget,
                            slo, engine, early_exit, warmup, timed_runs, seed, threads)
    if max_slots < 1:
        raise UserError(f"--max-slots: {max_slots} must be at least 1")
    options = replace(options, max_slots=max_slots)
    if prompt_lens is not None:
        parse_list(prompt_lens, "--prompt-lens")
    if dataset == "gsm8k" and prompt_lens is not None:
        raise UserError("--prompt-lens with --dataset gsm8k: the prompts are the questions (give --dataset random)")
    flags = replace(flags, seq_lens=prompt_lens, batch_sizes="1", phase="decode")  # serve sets the slots itself
    resolved = resolve("serve", flags, suite, run)
    from melt_bench.running.sweep import in_this_process
    from melt_bench.running.sweep_options import OptionError, check_family_support
    from melt_bench.scenarios import serve as scenario

    if options.budget_bytes == -1:  # auto
        from melt_bench.commands.support import device_total_bytes

        options = replace(options, budget_bytes=device_total_bytes(resolved.spec.device))
    if not options.output_lens:  # the machine's default
        options = replace(options, output_lens=(128,) if resolved.spec.device.startswith("cuda") else (32,))
    points = [point for axes in resolved.spec.points() for point in options.points(axes)]
    try:
        check_family_support(points)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    for point in points:
        if point.kv_quant is not None or point.kv_policy == "flashloop":
            raise UserError("serve runs the static-shape decode engine, which reads the cache's raw rows: packed "
                            "caches (--kv-quant, --kv-policy flashloop) are not served")

    # a budget point's search runs its probes, and the serve run its child
    runner = in_this_process(scenario.measure, (resolved.point_timeout,))
    plan_and_run(scenario.SUMMARY, resolved, points, lambda: runner, run, placement)


def parse_list(text: str, option: str) -> list[int]:
    from melt_bench.running.ranges import RangeError, parse_int_list

    try:
        return parse_int_list(text, option)
    except RangeError as exc:
        raise UserError(str(exc)) from exc


def parse_rates(text: str) -> tuple[float, ...]:
    """--request-rate: positive numbers of requests per second, or inf."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            rate = -1.0
        if not rate > 0 or math.isnan(rate):
            raise UserError(f"--request-rate: {item.strip()!r} is not a positive number of requests per second "
                            "(or inf)")
        rates.append(rate)
    return tuple(dict.fromkeys(rates))


def serve_options(concurrency, request_rate, num_requests, output_lens, dataset, data_dir, slots, budget, slo,
                  engine, early_exit, warmup, timed_runs, seed, threads):
    """serve's own flags as ServeOptions, each refused in one line before torch loads (a budget
    of auto: -1 until the device is known)."""
    from melt_bench.models.names import STEP_ENGINES
    from melt_bench.scenarios.serve import DATASETS, ServeOptions, parse_slo

    if concurrency is None and request_rate is None:
        concurrency = DEFAULT_CONCURRENCY
    loads = tuple(parse_list(concurrency, "--concurrency")) if concurrency else ()
    rates = parse_rates(request_rate) if request_rate else ()
    if num_requests < 1:
        raise UserError(f"--num-requests: {num_requests} must be at least 1")
    if slots is not None and budget is not None:
        raise UserError("--slots and --budget both say how many sequences decode at once: give one")
    if rates and slots is None and budget is None:
        raise UserError("--request-rate needs --slots N or --budget SIZE: an open loop has no concurrency to size "
                        "the batch by")
    if engine not in STEP_ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(STEP_ENGINES)} (serve runs the static-shape "
                        "decode step)")
    if dataset not in DATASETS:
        raise UserError(f"--dataset: {dataset!r} is not one of {', '.join(DATASETS)}")
    if data_dir is not None:
        if dataset != "gsm8k":
            raise UserError("--data-dir is where --dataset gsm8k's questions are: give --dataset gsm8k")
        from melt_bench.evaluation.task_files import checked_task_files

        try:
            checked_task_files(data_dir, "gsm8k")
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from exc
    if warmup < 0 or timed_runs < 1:
        raise UserError(f"--warmup must be >= 0 and --timed-runs >= 1 (got {warmup}, {timed_runs})")
    check_threads(threads)
    try:
        slo_ttft, slo_tpot = parse_slo(slo)
    except ValueError as exc:
        raise UserError(f"--slo: {exc}") from exc
    budget_bytes = None
    if budget is not None:
        budget_bytes = parse_budget(budget)
        budget_bytes = -1 if budget_bytes is None else budget_bytes
    return ServeOptions(
        concurrency=loads, request_rates=rates,
        output_lens=tuple(parse_list(output_lens, "--output-lens")) if output_lens else (),
        num_requests=num_requests, slots=tuple(parse_list(slots, "--slots")) if slots else None,
        budget_bytes=budget_bytes, dataset=dataset, data_dir=str(data_dir.resolve()) if data_dir else None,
        seed=seed, warmup=warmup, timed_runs=timed_runs, early_exit=parse_early_exit(early_exit), engine=engine,
        threads=threads, slo_ttft_ms=slo_ttft, slo_tpot_ms=slo_tpot)
