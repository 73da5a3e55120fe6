"""`melt-bench accuracy`: lm-eval tasks per model and loop count, through the sweeps' runner."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from melt_bench.commands.app import UserError, app, console
from melt_bench.commands.options import (
    DECODE_READS,
    DEVICE,
    DTYPE,
    KV_POLICY,
    KV_QUANT,
    MODELS,
    WEIGHTS,
    run_flags,
)
from melt_bench.commands.support import (
    Placement,
    RunOptions,
    check_out,
    check_syntax,
    executor_for,
    finish_run,
    open_store,
    plural,
)
from melt_bench.running.ranks import distributed_rank

if TYPE_CHECKING:
    from melt_bench.scenarios.accuracy import AccuracyFlags


@app.command()
@run_flags(plan=False)
def accuracy(
    tasks: str = typer.Option("gsm8k", help="lm-eval task names, comma-separated"),
    loops: Optional[str] = typer.Option(None, help="loop counts (default: 1,2,4)"),
    models: Optional[str] = MODELS,
    weights: Optional[str] = WEIGHTS,
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer dir or hub id (default: the checkpoint's; a byte "
                                            "tokenizer for random weights)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="few-shot examples (default: the task's)"),
    limit: Optional[int] = typer.Option(None, help="evaluate only the first N documents"),
    batch_size: int = typer.Option(1, "--batch-size", help="sequences per forward / generate call"),
    max_gen_toks: Optional[int] = typer.Option(None, "--max-gen-toks", help="generation cap (default: lm-eval's)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="local task data: DIR/TASK/{train,test}.jsonl "
                                            "(default: the hub)"),
    exit_mode: str = typer.Option("last", "--exit-mode", help="last | step:K | threshold:P | expected | official "
                                  "(the released Ouro code's default rule, in the model's dtype)"),
    kv_policy: Optional[str] = KV_POLICY,
    decode_reads: Optional[str] = DECODE_READS,
    kv_quant: Optional[str] = KV_QUANT,
    kv_probe_tokens: Optional[int] = typer.Option(
        None, "--kv-probe-tokens", help="the length the row's KV bytes per token are measured at, one prompt of N "
        "tokens (default 2048). Packed caches (flashloop, --kv-quant) keep their newest rows at full "
        "precision, so their bytes per token depend on it: give the task's sequence length to see what they hold "
        "there"),
    score_continuation_as: Optional[str] = typer.Option(
        None, "--score-continuation-as", help="log-likelihood tasks: chunk (context + continuation in one "
        "forward: for MELT the continuation reads its chunk's same-loop rows) | decode (the context prefilled, then "
        "each continuation token as generation computes it under the KV policy); equal for per-loop Ouro and "
        "chunk-grid MELT. Default: chunk, but decode under a KV policy that shares rows across loops (last-loop, "
        "mean, ...), where one forward would score per-loop Ouro; chunk is refused there"),
    generate_with: Optional[str] = typer.Option(
        None, "--generate-with", help="generation tasks: continuous-batching (the decode engine, --batch-size "
        "slots, each request prefilled alone and decoded beside the others; default) | generate (transformers' "
        "generate() over left-padded batches); the same greedy text"),
    dtype: Optional[str] = DTYPE,
    device: Optional[str] = DEVICE,
    point_timeout: Optional[float] = typer.Option(None, "--point-timeout", help="seconds one point may take "
                                                  "(default: no limit; an evaluation can take hours)"),
    run: RunOptions = None,
    placement: Placement = None,
) -> None:
    """lm-eval tasks (gsm8k first) for each model across loop counts, with peak memory."""
    from melt_bench.scenarios.accuracy import AccuracyFlags  # its table spec loads rich: not at every start

    flags = AccuracyFlags(tasks=tasks, loops=loops, models=models, weights=weights, num_fewshot=num_fewshot,
                          limit=limit, batch_size=batch_size, max_gen_toks=max_gen_toks, data_dir=data_dir,
                          exit_mode=exit_mode, dtype=dtype, device=device, kv_policy=kv_policy,
                          decode_reads=decode_reads, kv_quant=kv_quant, kv_probe_tokens=kv_probe_tokens,
                          score_continuation_as=score_continuation_as, generate_with=generate_with,
                          point_timeout=point_timeout)
    check_syntax(flags)
    flags, tokenizer = checked_before_torch(flags, tokenizer, run)
    ranks = distributed_rank()[1]
    if ranks > 1 and (placement.gpus is not None or placement.executor != "local"):
        raise UserError("--gpus / --executor ray place points in children; under accelerate launch every rank "
                        "evaluates each point in its own process")
    if ranks == 1:  # one process: each point in a child (measure_accuracy.py)
        from melt_bench.running.launcher import start_fork_server

        start_fork_server("melt_bench.scenarios.measure_accuracy", "melt_bench.evaluation.lm_eval_adapter")
    evaluate(flags, tokenizer, None if ranks > 1 else placement, run)


def checked_before_torch(flags: AccuracyFlags, tokenizer: str | None,
                         run: RunOptions) -> tuple[AccuracyFlags, str | None]:
    """What accuracy refuses in under a second, before torch and lm-eval load: its flags, the
    task files of --data-dir, --weights, --tokenizer and --out."""
    from melt_bench.running.sweep_options import OptionError, check_tokenizer
    from melt_bench.scenarios.accuracy import check_accuracy_flags

    try:
        flags, tokenizer = check_accuracy_flags(flags), check_tokenizer(tokenizer)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    check_out("accuracy", run.out, run.resume)
    return flags, tokenizer


def evaluate(flags: AccuracyFlags, tokenizer: str | None, placement: Placement | None, run: RunOptions) -> None:
    """The checked flags' points, their tasks resolved, evaluated into the results file through
    the runner (`placement` None: under accelerate launch, every rank in its own process)."""
    import tempfile

    from melt_bench.evaluation.lm_eval_logs import lm_eval_output, log_path_for
    from melt_bench.running.sweep_options import OptionError
    from melt_bench.scenarios.accuracy import SUMMARY, check_tasks, resolve_accuracy
    from melt_bench.scenarios.measure_accuracy import run_accuracy
    with tempfile.TemporaryDirectory() as scratch:
        try:
            points, notices = resolve_accuracy(flags)
            with lm_eval_output(None) as warnings:
                task_manager = check_tasks(sorted({p.task for p in points}), points[0].data_dir, Path(scratch))
        except OptionError as exc:
            raise UserError(str(exc)) from exc
        runs_on = None if placement is None else executor_for(placement, points[0].device)
        for line in [*notices, *(f"lm-eval warning: {w}" for w in warnings)]:
            print(f"melt-bench: {line}", file=sys.stderr)
        store, meta = open_store("accuracy", run.out, run.resume)
        log = log_path_for(store.path)
        console.print(f"lm-eval's own output (progress, log lines): {log}", highlight=False)
        before = len(store.read())
        try:
            ran, skipped = run_accuracy(points, store, meta, task_manager, tokenizer, log, show_progress=run.progress,
                                        executor=runs_on, retry_failed=run.retry_failed,
                                        timeout_s=flags.point_timeout)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from exc
    finish_run(SUMMARY, store, points, before, f"{plural(ran, 'run')}, {skipped}", run)
