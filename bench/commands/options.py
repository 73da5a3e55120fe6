"""Options the sweep commands share (None = not given, so a suite or a machine default decides), and
`run_flags`, which gives a command the flags every run takes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from melt_bench.running.sweep_options import COMMON_DEFAULTS, CPU_DEFAULTS, CPU_MEMORY_DEFAULTS, CUDA_DEFAULTS

_GPU, _CPU = CUDA_DEFAULTS, CPU_DEFAULTS


LOOPS = typer.Option(None, help="loop counts: 1..16, 1..16:2, 1,2,4,8 or mixes (default: 1..16)")


SEQ_LENS = typer.Option(None, "--seq-lens", help=f"prompt lengths in tokens (default: {_GPU['seq_lens']} on CUDA, "
                         f"{_CPU['seq_lens']} on CPU)")


BATCH_SIZES = typer.Option(None, "--batch-sizes", help=f"batch sizes (default: {_GPU['batch_sizes']} on CUDA, "
                            f"{_CPU['batch_sizes']} on CPU)")


MODELS = typer.Option(None, "--models", help=f"presets (default: {_GPU['models']} on CUDA, {_CPU['models']} on CPU)")


NEW_TOKENS = typer.Option(None, "--new-tokens", help=f"tokens to decode after the prompt (default: "
                           f"{COMMON_DEFAULTS['new_tokens']}; {CPU_MEMORY_DEFAULTS['new_tokens']} for memory on CPU)")


DTYPE = typer.Option(None, help=f"bfloat16 | float16 | float32 (default: {_GPU['dtype']} on CUDA, "
                      f"{_CPU['dtype']} on CPU)")


DEVICE = typer.Option(None, help="auto | cpu | cuda[:N] (default: auto)")


WEIGHTS = typer.Option(None, help="checkpoint directory or hub id (default: random weights)")


OUT = typer.Option(None, help="results file (default: results/COMMAND-TIMESTAMP.jsonl)")


RESUME = typer.Option(False, "--resume", help="continue --out, running only points not recorded yet")


RETRY = typer.Option(False, "--retry-failed", help="with --resume, also re-run timeout/error points")


SUITE = typer.Option(None, help="suite name (suites/NAME.yaml) or YAML path; flags win")


TIMEOUT = typer.Option(None, "--point-timeout", help="seconds one point may take (default: 600)")


DRY_RUN = typer.Option(False, "--dry-run", help="show the plan (what the points share, what varies) and exit")
JSON_PLAN = typer.Option(False, "--json", help="with --dry-run: a JSON line per point, for machines")


PROGRESS = typer.Option(True, "--progress/--no-progress", help="show the progress bar")


REPORT = typer.Option(False, "--report", help="write an HTML report of the results file at the end (reports/)")


KV_POLICY = typer.Option(None, "--kv-policy", help="training-free KV policies for Ouro-family models: "
                          "per-loop,last-loop,mean,first-loop,modulo:N,first-then-shared:S, flashloop "
                          "(FlashLoop 0.1.0's cross-loop INT4 cache: loops 1-4, batch 1) (default: each model's own; "
                          "MELT keeps its gated policy)")


GPUS = typer.Option(None, "--gpus", help="run up to one point per GPU at a time, each in a child pinned to its "
                     "GPU: 0,1,2,3 or all (CUDA sweeps; default: one point at a time)")


# a backslash before "[" keeps rich's markup from eating "[ray]" in the rendered help
EXECUTOR = typer.Option("local", "--executor", help="local (this machine) | ray (Ray tasks across a cluster; "
                         'pip install "melt-bench\\[ray]")')


RAY_ADDRESS = typer.Option(None, "--ray-address", help="--executor ray: the cluster to join (default: "
                            "RAY_ADDRESS, else a local Ray instance)")


ALLOW_BUSY = typer.Option(False, "--allow-busy-gpus", help="run on GPUs where other processes run (warned; "
                           "their memory and time mix with the points')")


DECODE_READS = typer.Option(None, "--decode-reads", help="MELT models: final (decoded tokens read earlier tokens' "
                             "final rows: the paper's decoding) | chunk (melt-bench's own construction, not the "
                             "paper's: they continue the prompt's chunk grid, the open chunk's rows kept per loop "
                             "in a side buffer); a comma list is an axis (default: the config's)")


KV_QUANT = typer.Option(None, "--kv-quant", help="none | int8 | int4: cached rows packed as KIVI packs them "
                         "(keys per channel, values per token, groups of 64, fp16 scales; at full precision the "
                         "T mod 64 newest keys and the 64 newest values, KIVI's rule); int8:flashloop-tail | "
                         "int4:flashloop-tail: the same packing with FlashLoop's tail (the newest 64-127 rows of "
                         "both); any model and KV policy, MELT included; a comma list is an axis (default: none)")


PREFILL_CHUNK = typer.Option(None, "--prefill-chunk", help="Ouro-family models: prefill in chunks of N tokens "
                              "(default one chunk). Exact under per-loop; under a KV policy that shares rows across "
                              "loops later chunks read the shared rows, so the prompt itself is shared (rows record "
                              "prompt_kv_shared). MELT always chunks by its config's chunk_size")


THREADS = typer.Option(None, "--threads", help="torch intra-op threads of each timed child (default: 1 on a CPU, "
                       "so a run does not fight its own threads and the machine's other work for the cores; "
                       "torch's default on CUDA); recorded in the row as torch_num_threads")


@dataclass(frozen=True)
class Flag:
    """A flag several commands take: its parameter name, type and typer option."""

    name: str
    annotation: Any
    option: Any


# Where results go and how the run goes (RunOptions), the plan (--dry-run), where points run (Placement).
RUN_FLAGS = (Flag("out", Optional[Path], OUT), Flag("resume", bool, RESUME), Flag("retry_failed", bool, RETRY),
             Flag("progress", bool, PROGRESS), Flag("report", bool, REPORT))
PLAN_FLAGS = (Flag("dry_run", bool, DRY_RUN), Flag("as_json", bool, JSON_PLAN))
PLACEMENT_FLAGS = (Flag("gpus", Optional[str], GPUS), Flag("executor", str, EXECUTOR),
                   Flag("ray_address", Optional[str], RAY_ADDRESS), Flag("allow_busy_gpus", bool, ALLOW_BUSY))
# The axes memory, latency and capacity share (SweepFlags; phase and repeats are memory's own).
SWEEP_FLAGS = (Flag("loops", Optional[str], LOOPS), Flag("seq_lens", Optional[str], SEQ_LENS),
               Flag("batch_sizes", Optional[str], BATCH_SIZES), Flag("models", Optional[str], MODELS),
               Flag("new_tokens", Optional[int], NEW_TOKENS), Flag("dtype", Optional[str], DTYPE),
               Flag("device", Optional[str], DEVICE), Flag("weights", Optional[str], WEIGHTS),
               Flag("point_timeout", Optional[float], TIMEOUT), Flag("kv_policy", Optional[str], KV_POLICY),
               Flag("decode_reads", Optional[str], DECODE_READS), Flag("kv_quant", Optional[str], KV_QUANT))


def run_flags(plan: bool = True) -> Callable[[Callable], Callable]:
    """A command decorator (below `@app.command()`): the flags every run takes, after the
    command's own, reaching it as `run: RunOptions` and `placement: Placement` (`plan`: it also
    takes --dry-run and --json)."""
    from melt_bench.commands.app import UserError
    from melt_bench.commands.support import Placement, RunOptions

    def build(given: dict) -> dict:
        if given["retry_failed"] and not given["resume"]:
            raise UserError("--retry-failed re-runs the failed points of an existing --out: it needs --resume")
        if given["resume"] and given["out"] is None:
            raise UserError("--resume continues an existing results file: name it with --out")
        if given.get("as_json") and not given.get("dry_run"):
            raise UserError("--json prints the plan as JSON lines: it goes with --dry-run")
        run = RunOptions(given["out"], given["resume"], given["retry_failed"], given["progress"], given["report"],
                         given.get("dry_run", False), given.get("as_json", False))
        placement = Placement(given["gpus"], given["executor"], given["ray_address"], given["allow_busy_gpus"])
        return {"run": run, "placement": placement}

    flags = [*RUN_FLAGS, *(PLAN_FLAGS if plan else ()), *PLACEMENT_FLAGS]
    return _flag_group(flags, ("run", "placement"), build, first=False)


def sweep_flags(batch_sizes: bool = True, without: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """A command decorator (below `@app.command()`): the sweep axes, before the command's own
    flags, reaching it as `flags: SweepFlags` (`batch_sizes` False, or named in `without`: the
    command sets those itself, under flags of its own)."""
    from melt_bench.running.sweep_options import SweepFlags

    left_out = set(without) | (set() if batch_sizes else {"batch_sizes"})
    flags = [flag for flag in SWEEP_FLAGS if flag.name not in left_out]
    return _flag_group(flags, ("flags",), lambda given: {"flags": SweepFlags(**given)}, first=True)


def _flag_group(flags: list[Flag], made: tuple[str, ...], build: Callable[[dict], dict],
                first: bool) -> Callable[[Callable], Callable]:
    """Add `flags` to a command's signature (typer reads it; `first`: before the command's own)
    and call the command with the parameters named `made`, which `build` makes of their values."""
    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True).parameters
        kept = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, param in own.items() if name not in made]
        added = [inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=flag.option,
                                   annotation=flag.annotation) for flag in flags]

        @functools.wraps(command)
        def with_flags(**given):
            values = {flag.name: given.pop(flag.name) for flag in flags}
            return command(**given, **build(values))

        params = added + kept if first else kept + added
        with_flags.__signature__ = inspect.Signature(params)
        with_flags.__annotations__ = {param.name: param.annotation for param in params}
        return with_flags

    return decorate
