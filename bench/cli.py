"""The `melt-bench` command line. Commands import their heavy modules lazily, so `--help` is fast."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

# NVML and torch must agree on device indices; set before anything initialises CUDA.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import typer
from rich.console import Console
from rich.table import Table

from melt_bench.running.sweep_options import COMMON_DEFAULTS, CPU_DEFAULTS, CPU_MEMORY_DEFAULTS, CUDA_DEFAULTS

try:  # typer >= 0.22 vendors click; older releases use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import UsageError
app = typer.Typer(
    name="melt-bench",
    help="Memory, latency and accuracy of looped LMs: Ouro (per-loop KV cache) vs MELT (shared gated KV cache).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets a wide fixed width instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 160)


class UserError(Exception):
    """A problem the user can fix: reported as one line, exit code 2."""


@app.command()
def models(
    dtype: str = typer.Option("bfloat16", help="dtype for the KV-byte columns"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    card: bool = typer.Option(False, "--card", help="predicted cost card: weights + KV + activation peak and the "
                              "roofline decode time per token on this machine's device, per loop count"),
    names: Optional[str] = typer.Option(None, "--models", help="--card: presets (default: all)"),
    loops: str = typer.Option("1,2,4,8", help="--card: loop counts"),
    seq_len: int = typer.Option(2048, "--seq-len", help="--card: prompt tokens"),
    batch_size: int = typer.Option(1, "--batch-size", help="--card: sequences"),
    device: str = typer.Option("auto", help="--card: where to measure the bandwidth (auto | cpu | cuda[:N])"),
) -> None:
    """List model presets: parameters, layers, loops, and KV-cache bytes per token."""
    from .units import check_dtype, format_bytes, format_count, parse_dtype

    try:
        check_dtype(dtype)
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from exc
    from melt_bench.models.kv_policy import STATED_TOKENS  # torch: only once the flags are checked
    from melt_bench.reporting.model_card import preset_cards

    torch_dtype = parse_dtype(dtype)
    if card:
        _print_cost_card(torch_dtype, names, loops, seq_len, batch_size, device, as_json)
        return
    cards = preset_cards(torch_dtype)
    if as_json:
        print(json.dumps([card.to_dict() for card in cards], indent=2))
        return
    table = Table(title=f"melt-bench model presets (parameters counted on the meta device; KV bytes analytic, {dtype})")
    for column in ("preset", "family", "params", "layers", "hidden", "heads/kv", "loops",
                   "KV B/token/loop", "KV B/token @ loops", "KV policy"):
        table.add_column(column, justify="left" if column in ("preset", "family", "KV policy") else "right")
    for c in cards:
        table.add_row(
            c.name, c.family, format_count(c.parameters), str(c.layers), str(c.hidden_size),
            f"{c.heads}/{c.kv_heads}", str(c.loops), f"{c.kv_bytes_per_token_per_loop:,}",
            f"{c.kv_bytes_per_token_at_loops:,} ({format_bytes(c.kv_bytes_per_token_at_loops)})", c.kv_policy,
        )
    console.print(table)
    console.print(
        "KV B/token/loop: what each extra loop adds to the cache per token "
        "(Ouro: one more cache per layer; MELT: 0, its cache is shared by all loops)."
    )
    for family, title in (("ouro", "training-free KV policies (--kv-policy) and KV quantisation (--kv-quant) on "
                                     "Ouro-family presets"),
                          ("melt", "MELT's own cache and KV quantisation (--kv-quant)")):
        members = [c for c in cards if c.family == family]
        policies = Table(title=f"{title}: KV bytes per token at the trained loop count, {dtype}; packed caches "
                               f"(flashloop, int8, int4) over a {STATED_TOKENS:,}-token prompt (their newest 64-127 "
                               "rows are full precision, so the figure depends on the length)")
        policies.add_column("KV policy")
        for c in members:
            policies.add_column(f"{c.name} ({c.loops} loops)", justify="right")
        for policy in members[0].kv_bytes_per_token_by_policy if members else []:
            policies.add_row(policy, *(f"{c.kv_bytes_per_token_by_policy[policy]:,} "
                                       f"({format_bytes(c.kv_bytes_per_token_by_policy[policy])})" for c in members))
        console.print(policies)


def _print_cost_card(dtype, names: str | None, loops: str, seq_len: int, batch_size: int, device: str,
                     as_json: bool) -> None:
    import torch

    from melt_bench.models import PRESETS, UnknownPresetError, get_preset
    from melt_bench.reporting.model_card import cost_cards
    from melt_bench.running.ranges import RangeError, parse_int_list, parse_name_list
    from melt_bench.running.sweep_options import OptionError, resolve_device
    from melt_bench.trackers.device_ceilings import measure_bandwidth

    from .units import format_bytes

    try:
        presets = parse_name_list(names, "--models") if names else list(PRESETS)
        for name in presets:
            get_preset(name)
        loop_counts = parse_int_list(loops, "--loops")
        where = resolve_device(device)
    except (RangeError, UnknownPresetError, OptionError) as exc:
        raise UserError(str(exc)) from exc
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"--seq-len and --batch-size must be at least 1 (got {seq_len}, {batch_size})")
    bandwidth, method = measure_bandwidth(torch.device(where))
    cards = cost_cards(presets, loop_counts, seq_len, batch_size, dtype, bandwidth)
    if as_json:
        print(json.dumps({"device": where, "bandwidth_bytes_per_s": bandwidth, "bandwidth_method": method,
                          "cards": [c.to_dict() for c in cards]}, indent=2))
        return
    table = Table(title=f"predicted costs | {seq_len:,}-token prompt, batch {batch_size}, {cards[0].dtype}; "
                        f"roofline at {bandwidth / 1e9:,.1f} GB/s measured on {where} ({method})")
    for column in ("preset", "loops", "weights", "KV", "activation peak", "predicted peak", "decode reads/token",
                   "roofline ms/token"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for c in cards:
        table.add_row(c.name, str(c.loops), format_bytes(c.weights_bytes), format_bytes(c.kv_cache_bytes),
                      format_bytes(c.activation_peak_bytes), format_bytes(c.predicted_peak_bytes),
                      format_bytes(c.decode_bytes_per_token), f"{c.roofline_decode_ms_per_token:,.3f}")
    console.print(table)
    console.print("Analytic (models/cost_model.py), not measured: the memory and latency commands measure; "
                  "memory rows carry predicted_peak_bytes beside the measured peak.")


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Show torch / CUDA / NVML / driver / GPU facts of this machine."""
    from melt_bench.trackers.envinfo import collect_env

    from .units import format_bytes

    facts = collect_env()
    if as_json:
        print(json.dumps(facts.to_dict(), indent=2))
        return
    table = Table(title="melt-bench environment", show_header=False)
    table.add_column("fact")
    table.add_column("value")
    rows = [
        ("melt-bench", f"{facts.melt_bench} (commit {facts.git_commit or 'unknown'})"),
        ("python", facts.python), ("platform", facts.platform), ("host", facts.host),
        ("CPU cores", str(facts.cpu_count)), ("RAM", format_bytes(facts.ram_total_bytes)),
        ("torch", facts.torch), ("transformers", facts.transformers),
        ("CUDA available (torch)", str(facts.cuda_available)),
        ("CUDA (torch build)", facts.torch_cuda or "none (CPU build)"),
        ("cuDNN", str(facts.cudnn) if facts.cudnn else "-"),
    ]
    for gpu in facts.gpus:
        rows.append((f"GPU {gpu.index} (torch)", f"{gpu.name}, sm_{gpu.capability.replace('.', '')}, "
                     f"{format_bytes(gpu.memory_total_bytes)}"))
    if facts.nvml is not None:
        rows += [("NVIDIA driver", facts.nvml["driver_version"]), ("NVML", facts.nvml["nvml_version"]),
                 ("CUDA (driver)", facts.nvml["cuda_driver_version"])]
        for dev in facts.nvml["devices"]:
            rows.append((f"GPU {dev['index']} (NVML)", f"{dev['name']}, used {format_bytes(dev['memory_used_bytes'])}"
                         f" of {format_bytes(dev['memory_total_bytes'])}"))
    else:
        rows.append(("NVML", f"unavailable: {facts.nvml_error}"))
    for fact, value in rows:
        table.add_row(fact, value)
    console.print(table)


# Options shared by the sweep commands (None = not given, so a suite or a default decides).
_GPU, _CPU = CUDA_DEFAULTS, CPU_DEFAULTS
_LOOPS = typer.Option(None, help="loop counts: 1..16, 1..16:2, 1,2,4,8 or mixes (default: 1..16)")
_SEQ_LENS = typer.Option(None, "--seq-lens", help=f"prompt lengths in tokens (default: {_GPU['seq_lens']} on CUDA, "
                         f"{_CPU['seq_lens']} on CPU)")
_BATCH_SIZES = typer.Option(None, "--batch-sizes", help=f"batch sizes (default: {_GPU['batch_sizes']} on CUDA, "
                            f"{_CPU['batch_sizes']} on CPU)")
_MODELS = typer.Option(None, "--models", help=f"presets (default: {_GPU['models']} on CUDA, {_CPU['models']} on CPU)")
_NEW_TOKENS = typer.Option(None, "--new-tokens", help=f"tokens to decode after the prompt (default: "
                           f"{COMMON_DEFAULTS['new_tokens']}; {CPU_MEMORY_DEFAULTS['new_tokens']} for memory on CPU)")
_DTYPE = typer.Option(None, help=f"bfloat16 | float16 | float32 (default: {_GPU['dtype']} on CUDA, "
                      f"{_CPU['dtype']} on CPU)")
_DEVICE = typer.Option(None, help="auto | cpu | cuda[:N] (default: auto)")
_WEIGHTS = typer.Option(None, help="checkpoint directory or hub id (default: random weights)")
_OUT = typer.Option(None, help="results file (default: results/COMMAND-TIMESTAMP.jsonl)")
_RESUME = typer.Option(False, "--resume", help="continue --out, running only points not recorded yet")
_RETRY = typer.Option(False, "--retry-failed", help="with --resume, also re-run timeout/error points")
_SUITE = typer.Option(None, help="suite name (suites/NAME.yaml) or YAML path; flags win")
_TIMEOUT = typer.Option(None, "--point-timeout", help="seconds one point may take (default: 600)")
_DRY_RUN = typer.Option(False, "--dry-run", help="list the points and exit")
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="show the progress bar")
_REPORT = typer.Option(False, "--report", help="write an HTML report of the results file at the end (reports/)")
_KV_POLICY = typer.Option(None, "--kv-policy", help="training-free KV policies for Ouro-family models: "
                          "per-loop,last-loop,mean,first-loop,modulo:N,first-then-shared:S, flashloop "
                          "(FlashLoop 0.1.0's cross-loop INT4 cache: loops 1-4, batch 1) (default: each model's own; "
                          "MELT keeps its gated policy)")
_GPUS = typer.Option(None, "--gpus", help="run up to one point per GPU at a time, each in a child pinned to its "
                     "GPU: 0,1,2,3 or all (CUDA sweeps; default: one point at a time)")
# a backslash before "[" keeps rich's markup from eating "[ray]" in the rendered help
_EXECUTOR = typer.Option("local", "--executor", help="local (this machine) | ray (Ray tasks across a cluster; "
                         'pip install "melt-bench\\[ray]")')
_RAY_ADDRESS = typer.Option(None, "--ray-address", help="--executor ray: the cluster to join (default: "
                            "RAY_ADDRESS, else a local Ray instance)")
_ALLOW_BUSY = typer.Option(False, "--allow-busy-gpus", help="run on GPUs where other processes run (warned; "
                           "their memory and time mix with the points')")
_DECODE_READS = typer.Option(None, "--decode-reads", help="MELT models: final (decoded tokens read earlier tokens' "
                             "final rows: the paper's decoding) | chunk (melt-bench's own construction, not the "
                             "paper's: they continue the prompt's chunk grid, the open chunk's rows kept per loop "
                             "in a side buffer); a comma list is an axis (default: the config's)")
_KV_QUANT = typer.Option(None, "--kv-quant", help="none | int8 | int4: cached rows packed KIVI-style once final "
                         "(keys per channel, values per token, groups of 64, fp16 scales; the newest 64-127 rows "
                         "at full precision), any model and KV policy, MELT included; a comma list is an axis "
                         "(default: none)")
_PREFILL_CHUNK = typer.Option(None, "--prefill-chunk", help="Ouro-family models: prefill in chunks of N tokens "
                              "(default one chunk). Exact under per-loop; under a KV policy that shares rows across "
                              "loops later chunks read the shared rows, so the prompt itself is shared (rows record "
                              "prompt_kv_shared). MELT always chunks by its config's chunk_size")


@app.command()
def memory(
    loops: Optional[str] = _LOOPS,
    seq_lens: Optional[str] = _SEQ_LENS,
    batch_sizes: Optional[str] = _BATCH_SIZES,
    models: Optional[str] = _MODELS,
    phase: Optional[str] = typer.Option(None, help="prefill | decode | generate (default: decode)"),
    new_tokens: Optional[int] = _NEW_TOKENS,
    dtype: Optional[str] = _DTYPE,
    device: Optional[str] = _DEVICE,
    weights: Optional[str] = _WEIGHTS,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    retry_failed: bool = _RETRY,
    suite: Optional[str] = _SUITE,
    point_timeout: Optional[float] = _TIMEOUT,
    repeats: Optional[int] = typer.Option(None, help="measure each point this many times, each in a fresh process "
                                          "(default: 2 on CPU, 1 on CUDA)"),
    nvml_interval_ms: float = typer.Option(10.0, "--nvml-interval-ms", help="NVML sampling interval"),
    cpu_workers: Optional[int] = typer.Option(None, "--cpu-workers", help="CPU sweeps: points measured at once, each "
                                              "in its own child with one intra-op thread (its peak is its own "
                                              "resident set); default: the machine's cores"),
    prefill_chunk: Optional[int] = _PREFILL_CHUNK,
    kv_policy: Optional[str] = _KV_POLICY,
    decode_reads: Optional[str] = _DECODE_READS,
    kv_quant: Optional[str] = _KV_QUANT,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
    report: bool = _REPORT,
    gpus: Optional[str] = _GPUS,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY_ADDRESS,
    allow_busy_gpus: bool = _ALLOW_BUSY,
) -> None:
    """Peak memory across loops x sequence lengths x batch sizes x models, every source measured."""
    if nvml_interval_ms <= 0:
        raise UserError(f"--nvml-interval-ms: {nvml_interval_ms:g} must be positive")
    if cpu_workers is not None and cpu_workers < 1:
        raise UserError(f"--cpu-workers: {cpu_workers} must be at least 1")
    flags = dict(models=models, loops=loops, seq_lens=seq_lens, batch_sizes=batch_sizes, phase=phase,
                 new_tokens=new_tokens, dtype=dtype, device=device, weights=weights, repeats=repeats,
                 point_timeout=point_timeout, kv_policy=kv_policy, decode_reads=decode_reads, kv_quant=kv_quant)
    resolved = _resolve("memory", flags, suite, dry_run)
    from melt_bench.running.sweep import in_child
    from melt_bench.scenarios.measure_memory import measure_memory_point  # torch: only once the flags are checked

    resolved.spec.point_options = dict(prefill_chunk=_check_prefill_chunk(prefill_chunk))
    points = _checked_points(resolved, "memory")
    placement = dict(gpus=gpus, executor=executor, ray_address=ray_address, allow_busy_gpus=allow_busy_gpus,
                     cpu_workers=(cpu_workers or os.cpu_count() or 1) if resolved.spec.device == "cpu" else 1)
    if not _dry_run(points, dry_run, out, placement):
        runner = in_child(measure_memory_point, (nvml_interval_ms,), resolved.point_timeout)
        _run_sweep_command("memory", points, runner, out, resume, retry_failed, progress, report,
                           _executor(placement, resolved.spec.device), resolved.notices)


@app.command()
def latency(
    loops: Optional[str] = _LOOPS,
    seq_lens: Optional[str] = _SEQ_LENS,
    batch_sizes: Optional[str] = _BATCH_SIZES,
    models: Optional[str] = _MODELS,
    new_tokens: Optional[int] = _NEW_TOKENS,
    warmup: int = typer.Option(2, help="untimed runs before the timed ones (the first one's time is reported apart)"),
    repeats: int = typer.Option(5, help="timed runs per point; figures are medians with min and max"),
    early_exit: str = typer.Option("off", "--early-exit", help="off | threshold:P (stop the loop once every "
                                   "sequence's exit probability reaches P)"),
    engine: str = typer.Option("eager", "--engine", help="eager | compiled: the same static-shape decode step, "
                               "as is or through torch.compile (CUDA graphs on CUDA); forward: the model's "
                               "forward() per token, as generate() calls it"),
    static_cache: bool = typer.Option(False, "--static-cache", help="--engine forward: allocate the KV cache ahead "
                                      "at full size (default: a growing cache; eager and compiled always do)"),
    prefill_chunk: Optional[int] = _PREFILL_CHUNK,
    kv_policy: Optional[str] = _KV_POLICY,
    decode_reads: Optional[str] = _DECODE_READS,
    kv_quant: Optional[str] = _KV_QUANT,
    dtype: Optional[str] = _DTYPE,
    device: Optional[str] = _DEVICE,
    weights: Optional[str] = _WEIGHTS,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    retry_failed: bool = _RETRY,
    suite: Optional[str] = _SUITE,
    point_timeout: Optional[float] = _TIMEOUT,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
    report: bool = _REPORT,
    gpus: Optional[str] = _GPUS,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY_ADDRESS,
    allow_busy_gpus: bool = _ALLOW_BUSY,
) -> None:
    """Prefill (time to first token), per-token decode latency and tokens/s across loops."""
    if warmup < 0 or repeats < 1:
        raise UserError(f"--warmup must be >= 0 and --repeats >= 1 (got {warmup}, {repeats})")
    flags = dict(models=models, loops=loops, seq_lens=seq_lens, batch_sizes=batch_sizes, phase="decode",
                 new_tokens=new_tokens, dtype=dtype, device=device, weights=weights, point_timeout=point_timeout,
                 kv_policy=kv_policy, decode_reads=decode_reads, kv_quant=kv_quant)
    from melt_bench.models.names import LATENCY_ENGINES

    if engine not in LATENCY_ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(LATENCY_ENGINES)}")
    _check_syntax(flags)
    from melt_bench.running.sweep import in_child
    from melt_bench.scenarios.measure_latency import measure_latency_point  # torch: only once the flags are checked

    if static_cache and engine != "forward":
        raise UserError("--static-cache applies to --engine forward (eager and compiled always preallocate)")
    resolved = _resolve("latency", flags, suite, dry_run)
    resolved.spec.point_options = dict(warmup=warmup, timed_runs=repeats, early_exit=_parse_early_exit(early_exit),
                                       engine=engine, static_cache=static_cache,
                                       prefill_chunk=_check_prefill_chunk(prefill_chunk))
    points = _checked_points(resolved, "latency")
    placement = dict(gpus=gpus, executor=executor, ray_address=ray_address, allow_busy_gpus=allow_busy_gpus)
    if not _dry_run(points, dry_run, out, placement):
        runner = in_child(measure_latency_point, (), resolved.point_timeout)
        _run_sweep_command("latency", points, runner, out, resume, retry_failed, progress, report,
                           _executor(placement, resolved.spec.device), resolved.notices)


@app.command()
def capacity(
    budget: str = typer.Option(..., help="memory budget, e.g. 80GiB, 512MiB, or auto (a GPU's total memory)"),
    loops: Optional[str] = _LOOPS,
    seq_lens: Optional[str] = _SEQ_LENS,
    models: Optional[str] = _MODELS,
    new_tokens: Optional[int] = _NEW_TOKENS,
    max_batch: int = typer.Option(4096, "--max-batch", help="largest batch the search tries"),
    prefill_chunk: Optional[int] = _PREFILL_CHUNK,
    kv_policy: Optional[str] = _KV_POLICY,
    decode_reads: Optional[str] = _DECODE_READS,
    kv_quant: Optional[str] = _KV_QUANT,
    dtype: Optional[str] = _DTYPE,
    device: Optional[str] = _DEVICE,
    weights: Optional[str] = _WEIGHTS,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    retry_failed: bool = _RETRY,
    suite: Optional[str] = _SUITE,
    point_timeout: Optional[float] = _TIMEOUT,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
    report: bool = _REPORT,
    gpus: Optional[str] = _GPUS,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY_ADDRESS,
    allow_busy_gpus: bool = _ALLOW_BUSY,
) -> None:
    """The largest batch that decodes N new tokens within a memory budget, searched by real runs."""
    if max_batch < 1:
        raise UserError(f"--max-batch: {max_batch} must be at least 1")
    flags = dict(models=models, loops=loops, seq_lens=seq_lens, batch_sizes="1", phase="decode",
                 new_tokens=new_tokens, dtype=dtype, device=device, weights=weights, point_timeout=point_timeout,
                 kv_policy=kv_policy, decode_reads=decode_reads, kv_quant=kv_quant)
    resolved = _resolve("capacity", flags, suite, dry_run)
    from melt_bench.running.launcher import ChildOutcome
    from melt_bench.scenarios.capacity import search_capacity  # torch: only once the flags are checked

    budget_bytes = _parse_budget(budget, resolved.spec.device)
    resolved.spec.point_options = dict(batch_size=0, memory_budget_bytes=budget_bytes,
                                       prefill_chunk=_check_prefill_chunk(prefill_chunk))
    points = _checked_points(resolved, "capacity")
    placement = dict(gpus=gpus, executor=executor, ray_address=ray_address, allow_busy_gpus=allow_busy_gpus)
    if not _dry_run(points, dry_run, out, placement):
        timeout_s = resolved.point_timeout

        def runner(point, gpu=None):
            started = time.monotonic()
            value = search_capacity(point, budget_bytes, timeout_s, max_batch, gpu)
            return ChildOutcome("ok", value=value, wall_s=time.monotonic() - started)

        _run_sweep_command("capacity", points, runner, out, resume, retry_failed, progress, report,
                           _executor(placement, resolved.spec.device), resolved.notices)


@app.command()
def accuracy(
    tasks: str = typer.Option("gsm8k", help="lm-eval task names, comma-separated"),
    loops: Optional[str] = typer.Option(None, help="loop counts (default: 1,2,4)"),
    models: Optional[str] = _MODELS,
    weights: Optional[str] = _WEIGHTS,
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
    kv_policy: Optional[str] = _KV_POLICY,
    decode_reads: Optional[str] = _DECODE_READS,
    kv_quant: Optional[str] = _KV_QUANT,
    kv_probe_tokens: Optional[int] = typer.Option(
        None, "--kv-probe-tokens", help="the length the row's KV bytes per token are measured at, one prompt of N "
        "tokens (default 2048). Packed caches (flashloop, --kv-quant) keep their newest 64-127 rows at full "
        "precision, so their bytes per token depend on it: give the task's sequence length to see what they hold "
        "there"),
    score_continuation_as: Optional[str] = typer.Option(
        None, "--score-continuation-as", help="log-likelihood tasks: chunk (context + continuation in one "
        "forward: for MELT the continuation reads its chunk's same-loop rows) | decode (the context prefilled, then "
        "each continuation token as generation computes it under the KV policy); equal for per-loop Ouro and "
        "chunk-grid MELT. Default: chunk, but decode under a KV policy that shares rows across loops (last-loop, "
        "mean, ...), where one forward would score per-loop Ouro; chunk is refused there"),
    dtype: Optional[str] = _DTYPE,
    device: Optional[str] = _DEVICE,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    retry_failed: bool = _RETRY,
    point_timeout: Optional[float] = typer.Option(None, "--point-timeout", help="seconds one point may take "
                                                  "(default: no limit; an evaluation can take hours)"),
    progress: bool = _PROGRESS,
    report: bool = _REPORT,
    gpus: Optional[str] = _GPUS,
    executor: str = _EXECUTOR,
    ray_address: Optional[str] = _RAY_ADDRESS,
    allow_busy_gpus: bool = _ALLOW_BUSY,
) -> None:
    """lm-eval tasks (gsm8k first) for each model across loop counts, with peak memory."""
    flags = dict(tasks=tasks, loops=loops, models=models, weights=weights, num_fewshot=num_fewshot, limit=limit,
                 batch_size=batch_size, max_gen_toks=max_gen_toks, data_dir=data_dir, exit_mode=exit_mode,
                 dtype=dtype, device=device, kv_policy=kv_policy, decode_reads=decode_reads, kv_quant=kv_quant,
                 kv_probe_tokens=kv_probe_tokens, score_continuation_as=score_continuation_as,
                 point_timeout=point_timeout)
    _check_syntax(flags)
    if retry_failed and not resume:
        raise UserError("--retry-failed re-runs the failed points of an existing --out: it needs --resume")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and (gpus is not None or executor != "local"):
        raise UserError("--gpus / --executor ray place points in children; under accelerate launch every rank "
                        "evaluates each point in its own process")
    if ranks == 1:  # one process: each point in a child (accuracy.py)
        from melt_bench.running.launcher import start_fork_server

        start_fork_server("melt_bench.scenarios.accuracy", "melt_bench.evaluation.lm_eval_adapter")
    import tempfile

    from melt_bench.evaluation.lm_eval_logs import lm_eval_output, log_path_for
    from melt_bench.running.sweep_options import OptionError, check_tokenizer
    from melt_bench.scenarios.accuracy import run_accuracy
    from melt_bench.scenarios.accuracy_options import check_tasks, resolve_accuracy
    with tempfile.TemporaryDirectory() as scratch:
        try:
            tokenizer = check_tokenizer(tokenizer)
            points, notices = resolve_accuracy(flags)
            with lm_eval_output(None) as warnings:
                task_manager = check_tasks(sorted({p.task for p in points}), points[0].data_dir, Path(scratch))
        except OptionError as exc:
            raise UserError(str(exc)) from exc
        placement = dict(gpus=gpus, executor=executor, ray_address=ray_address, allow_busy_gpus=allow_busy_gpus)
        runs_on = None if ranks > 1 else _executor(placement, points[0].device)
        for line in [*notices, *(f"lm-eval warning: {w}" for w in warnings)]:
            print(f"melt-bench: {line}", file=sys.stderr)
        store, meta = _open_store("accuracy", out, resume)
        log = log_path_for(store.path)
        console.print(f"lm-eval's own output (progress, log lines): {log}", highlight=False)
        before = len(store.read())
        try:
            ran, skipped = run_accuracy(points, store, meta, task_manager, tokenizer, log, show_progress=progress,
                                        executor=runs_on, retry_failed=retry_failed, timeout_s=point_timeout)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from exc
    _print_tables("accuracy", store, {p.point_id for p in points})
    console.print(f"{_count(ran, 'run')}, {skipped} already recorded; results in {store.path}")
    if report:
        console.print(f"report written to {_write_report([store.path], None)}")
    _check_something_measured(store, before)


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results files (JSONL) to draw"),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="HTML file (default: reports/<first file's name>.html)"),
    compare: Optional[list[Path]] = typer.Option(None, "--compare",
                                                 help="a second run's results, shown side by side with ratios"),
) -> None:
    """A self-contained HTML report (plots, tables, key ratios, provenance) from results files."""
    path = _write_report(results, output, compare or None)
    console.print(f"report written to {path}")


def _write_report(results: list[Path], output: Path | None, compare: list[Path] | None = None) -> Path:
    from melt_bench.reporting.report import write_report
    from melt_bench.running.results import ResultsFileError, ResultsStore

    inputs = list(results) + list(compare or [])
    for path in inputs:
        if not path.is_file():
            raise UserError(f"no results file {path}")
        store = ResultsStore(path)
        try:
            rows = store.read()
        except ResultsFileError as exc:
            raise UserError(str(exc)) from exc
        if store.torn_tail:
            print(f"melt-bench: warning: {path}: its last line is torn (a write that never finished, "
                  f"{len(store.torn_tail)} bytes): reporting the {len(rows)} complete rows", file=sys.stderr)
        if not rows:
            raise UserError(f"{path} holds no results rows: nothing to report")
    output = output or Path("reports") / f"{results[0].stem}.html"
    _check_writable(output, "-o")
    if output.exists() and (any(output.resolve() == path.resolve() for path in inputs) or _is_results_file(output)):
        raise UserError(f"-o {output} is a results file: a report never replaces results; choose another name")
    try:
        return write_report(list(results), output, compare)
    except OSError as exc:
        raise UserError(f"-o {output}: cannot write the report ({exc.strerror or exc})") from exc


def _is_results_file(path: Path) -> bool:
    """Whether `path` holds melt-bench results (its first line carries our schema)."""
    from melt_bench.running.results import SCHEMA

    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return SCHEMA in handle.readline()
    except OSError:
        return False


@app.command()
def convert(
    source: str = typer.Option(..., "--from", help="Ouro preset (e.g. ouro-1.4b) or checkpoint dir / hub id"),
    out: Path = typer.Option(..., help="output directory: checkpoint.pt, train_log.jsonl, model/"),
    data: str = typer.Option(..., help="training data: JSONL (text, or question+answer), text file, or hub id"),
    chunk_size: int = typer.Option(500, "--chunk-size", help="MELT's training chunk (paper: 500)"),
    transition_steps: int = typer.Option(500, "--transition-steps", help="phase 1 steps (paper: 500)"),
    distill_steps: int = typer.Option(300, "--distill-steps", help="phase 2 steps (paper: 300)"),
    lr_base: float = typer.Option(8e-6, "--lr-base", help="learning rate of the base weights (paper: 8e-6)"),
    lr_gate: float = typer.Option(5e-4, "--lr-gate", help="learning rate of the gate (paper: 5e-4)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per training sequence (a longer one loses its "
                                "prompt's start first)"),
    loops: Optional[int] = typer.Option(None, help="loops to train at (default: the model's total_ut_steps)"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
    seed: int = typer.Option(0),
    device: Optional[str] = _DEVICE,
    dtype: str = typer.Option("float32", help="float32 | bfloat16"),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="recompute each layer's MLP block in backward (less memory)"),
    decode_chunks: bool = typer.Option(
        False, "--decode-chunks", help="train every target token as a chunk of its own, as MELT decodes; "
        "memory grows with answer length squared (default: the paper's fixed chunks)"),
    pack_to: Optional[int] = typer.Option(
        None, "--pack-to", help="pack examples into sequences of N tokens, EOS between them, attending across "
        "(paper: 10,000-token sequences; default: one example per row, --seq-len)"),
    tokens_per_step: Optional[int] = typer.Option(
        None, "--tokens-per-step", help="accumulate gradients over micro-batches of --batch-size rows up to N "
        "token positions per step (paper: 320,000; default: one micro-batch)"),
    gate: str = typer.Option("elementwise", "--gate", help="MELT's gate: elementwise (the paper's) | scalar | mean "
                             "| ema | last (the paper's ablation)"),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="under accelerate launch / torchrun: shard weights, gradients and optimiser state "
        "over the ranks (FSDP2, one unit per decoder layer; also on with accelerate's --use_fsdp); default: "
        "every rank holds all of them (DDP)"),
    fsdp_reshard_after_forward: bool = typer.Option(
        False, "--fsdp-reshard-after-forward", help="with --fsdp: free a layer's gathered weights after each of its "
        "loops x chunks calls (least memory, that many more all-gathers); default: gathered once per micro-batch"),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", help="stop after step N, checkpointed (e.g. within a Slurm time limit); --resume "
        "continues"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    progress: bool = _PROGRESS,
) -> None:
    """MELT's two-phase post-training (interpolated transition, then distillation) from Ouro."""
    from melt_bench.models.names import GATES
    from melt_bench.running.sweep_options import OptionError, check_device_name
    from melt_bench.training.convert_run_dir import CHECKPOINT, out_problem

    from .units import check_dtype

    for name, value, least in (("--chunk-size", chunk_size, 1), ("--transition-steps", transition_steps, 0),
                               ("--distill-steps", distill_steps, 0), ("--batch-size", batch_size, 1),
                               ("--seq-len", seq_len, 2), ("--checkpoint-every", checkpoint_every, 1),
                               ("--pack-to", pack_to, 2), ("--tokens-per-step", tokens_per_step, 1),
                               ("--stop-after", stop_after, 1)):
        if value is not None and value < least:
            raise UserError(f"{name}: {value} must be at least {least}")
    if transition_steps + distill_steps == 0 or lr_base < 0 or lr_gate < 0:
        raise UserError("--transition-steps + --distill-steps must be positive and learning rates non-negative")
    if pack_to is not None and decode_chunks:
        raise UserError("--pack-to and --decode-chunks do not combine: packed sequences are chunked by --chunk-size")
    if gate not in GATES:
        raise UserError(f"--gate: {gate!r} is not one of {', '.join(GATES)}")
    try:
        check_dtype(dtype)
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from exc
    try:
        check_device_name(device or "auto")
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    if problem := out_problem(out, resume):
        raise UserError(problem)
    if not Path(data).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", data):
        raise UserError(f"--data {data}: no such file (and not a hub id like org/name)")
    if not Path(data).exists():
        from melt_bench.running import hub

        if problem := hub.hub_problem(data, "dataset"):
            raise UserError(f"--data {data}: {problem}; pass a local JSONL or text file instead")
    import torch  # only once the flags are checked

    from melt_bench.running.sweep_options import resolve_device
    from melt_bench.training.convert import ConvertConfig, run_convert

    try:
        resolved_device = resolve_device(device or "auto")
        if Path(source).exists() or "/" in source:
            from melt_bench.running.sweep_options import check_weights

            source = check_weights(source, "--from")
        else:
            from melt_bench.models import get_preset

            if get_preset(source).family != "ouro":
                raise OptionError(f"--from: {source!r} is not an Ouro model")
    except (OptionError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    config = ConvertConfig(source=source, out=str(out), data=data, chunk_size=chunk_size,
                           transition_steps=transition_steps, distill_steps=distill_steps, lr_base=lr_base,
                           lr_gate=lr_gate, batch_size=batch_size, seq_len=seq_len, loops=loops,
                           device=resolved_device, dtype=dtype, checkpoint_every=checkpoint_every, seed=seed,
                           gradient_checkpointing=gradient_checkpointing, decode_chunks=decode_chunks,
                           pack_to=pack_to, tokens_per_step=tokens_per_step, gate=gate,
                           fsdp=fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"),
                           fsdp_reshard_after_forward=fsdp_reshard_after_forward)
    if fsdp_reshard_after_forward and not config.fsdp:
        raise UserError("--fsdp-reshard-after-forward needs --fsdp")
    try:
        final = run_convert(config, resume=resume, stop_after=stop_after, progress=progress)
    except ValueError as exc:  # malformed data, or a resumption with other settings
        raise UserError(str(exc)) from exc
    except torch.OutOfMemoryError as exc:
        kept = f"the checkpoint in {out} is intact" if (out / CHECKPOINT).exists() else "no checkpoint was written yet"
        advice = "lower --batch-size or --seq-len" + (
            "" if gradient_checkpointing else ", or add --gradient-checkpointing")
        raise UserError(f"convert ran out of memory on {resolved_device} ({str(exc).splitlines()[0][:80]}); "
                        f"{kept}; {advice}") from exc
    if final != out:
        console.print(f"MELT model written to {final}")
    else:
        console.print(f"stopped after step {stop_after}, checkpoint in {final / CHECKPOINT}: --resume continues")


def _check_syntax(flags: dict) -> None:
    """What can be refused without torch, before it is imported (several seconds): the list
    grammar of --loops, --seq-lens and --batch-sizes, counts that must be positive, and every
    name given (models, dtype, device, KV policies, ...: sweep_options.check_names)."""
    from melt_bench.running.ranges import RangeError, parse_int_list
    from melt_bench.running.sweep_options import OptionError, check_names

    for key in ("loops", "seq_lens", "batch_sizes"):
        if isinstance(flags.get(key), str):
            try:
                parse_int_list(flags[key], f"--{key.replace('_', '-')}")
            except RangeError as exc:
                raise UserError(str(exc)) from exc
    for key, least in (("new_tokens", 0), ("repeats", 1), ("point_timeout", 1e-9)):
        if flags.get(key) is not None and flags[key] < least:
            bound = "positive" if least else "at least 0"
            raise UserError(f"--{key.replace('_', '-')}: {flags[key]:g} must be {bound}")
    try:
        check_names(flags)
    except OptionError as exc:
        raise UserError(str(exc)) from exc


def _resolve(command: str, flags: dict, suite: str | None, dry_run: bool):
    _check_syntax(flags)
    if not dry_run:  # the children's imports start now, beside this process's own (launcher.py)
        from melt_bench.running.launcher import start_fork_server

        start_fork_server()
    from melt_bench.running.sweep_options import OptionError, resolve_sweep

    try:
        resolved = resolve_sweep(command, flags, suite)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    return resolved  # its notices are printed once a run starts (_run_sweep_command), not before a refusal


def _checked_points(resolved, command: str) -> list:
    """The sweep's points, once what a packed cache cannot run is refused (sweep_options)."""
    from melt_bench.running.sweep_options import OptionError, check_packed_caches

    points = resolved.spec.points()
    try:
        check_packed_caches(points, command)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    return points


def _check_prefill_chunk(tokens: int | None) -> int | None:
    if tokens is not None and tokens < 1:
        raise UserError(f"--prefill-chunk: {tokens} must be at least 1")
    return tokens


def _parse_early_exit(text: str) -> float | None:
    if text == "off":
        return None
    prefix, _, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if prefix != "threshold" or not 0 < threshold <= 1:
        raise UserError(f"--early-exit: {text!r} is not off or threshold:P with 0 < P <= 1")
    return threshold


def _parse_budget(text: str, device: str) -> int:
    from melt_bench.scenarios.capacity import parse_bytes

    if text != "auto":
        try:
            return parse_bytes(text)
        except ValueError as exc:
            raise UserError(f"--budget: {exc}") from exc
    if not device.startswith("cuda"):
        raise UserError("--budget auto needs a CUDA device; on a CPU give the budget, e.g. --budget 2GiB")
    from melt_bench.trackers.nvml import NvmlUnavailable, read_nvml

    index = int(device.partition(":")[2] or 0)
    try:
        return read_nvml().devices[index].memory_total_bytes
    except (NvmlUnavailable, IndexError):
        import torch

        return torch.cuda.get_device_properties(index).total_memory


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _dry_run(points, dry_run: bool, out: Path | None = None, placement: dict | None = None) -> bool:
    """--dry-run: list the points, then how many there are and, timed from the rows already in
    --out, about how long the pending ones take on the chosen workers."""
    if dry_run:
        from melt_bench.running.sweep_estimate import estimate_wall_time, planned_workers

        for point in points:
            print(json.dumps({"point_id": point.point_id, **point.to_dict()}))
        console.print(_count(len(points), "point"))
        console.print(estimate_wall_time(points, out, planned_workers(placement or {})))
    return dry_run


def _open_store(kind: str, out: Path | None, resume: bool):
    """The results store for --out (refusing an existing file without --resume, and a corrupt or
    foreign one always, before anything runs) and the run metadata."""
    from melt_bench.running.results import ResultsFileError, ResultsStore
    from melt_bench.trackers.envinfo import collect_env

    out = out or Path("results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    _check_writable(out, "--out")
    store = ResultsStore(out)
    if store.exists() and not resume:
        raise UserError(f"--out {out} already exists: pass --resume to continue it, or choose another file")
    try:
        kinds = {row.kind for row in store.read()}
    except ResultsFileError as exc:
        raise UserError(str(exc)) from exc
    if kinds - {kind}:
        raise UserError(f"--out {out} holds {', '.join(sorted(kinds))} results, not {kind}: a results file holds "
                        f"one kind; choose another file")
    torn = len(store.torn_tail)
    aside = store.set_torn_tail_aside()
    if aside is not None:
        print(f"melt-bench: {out}: its last line was torn (a write that never finished, {torn} bytes): moved to "
              f"{aside}; resuming from the {len(store.read())} complete rows", file=sys.stderr)
    return store, collect_env(probe_cuda=False).to_dict()


def _check_writable(path: Path, option: str) -> None:
    """Before anything runs: `path` can be created (or appended to) as a file. Creates missing
    parent folders; writes nothing else."""
    import tempfile

    if path.is_dir() or str(path).endswith(os.sep):
        raise UserError(f"{option} {path} is a directory: name a file, e.g. {Path(path) / 'results.jsonl'}")
    parent = path.parent
    for folder in [parent, *parent.parents]:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {path}: {folder} is a file, not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: the file is not writable")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create a file in {parent} ({exc.strerror or exc})") from exc


def _print_tables(kind: str, store, planned: set[str]) -> None:
    from melt_bench.reporting.summary_tables import tables_for

    for table in tables_for(kind, [row for row in store.read() if row.point_id in planned]):
        console.print(table)


def _executor(placement: dict, device: str):
    """The executor of --gpus / --executor / --ray-address (executors.py); one line on a bad one."""
    from melt_bench.running.executors import ExecutorError, make_executor

    try:
        return make_executor(placement["gpus"], placement["executor"], placement["ray_address"],
                             placement["allow_busy_gpus"], device,
                             warn=lambda line: print(f"melt-bench: warning: {line}", file=sys.stderr),
                             cpu_workers=placement.get("cpu_workers") or 1)
    except ExecutorError as exc:
        raise UserError(str(exc)) from exc


def _run_sweep_command(kind, points, runner, out, resume, retry_failed, progress, report=False,
                       executor=None, notices: tuple[str, ...] = ()) -> None:
    from melt_bench.running.sweep import run_sweep

    if retry_failed and not resume:
        raise UserError("--retry-failed re-runs the failed points of an existing --out: it needs --resume")
    store, meta = _open_store(kind, out, resume)
    for notice in notices:
        print(f"melt-bench: {notice}", file=sys.stderr)
    before = len(store.read())
    status = run_sweep(kind, points, store, runner, meta, retry_failed, show_progress=progress, executor=executor)
    _print_tables(kind, store, {point.point_id for point in points})
    console.print(f"{_count(status.ran, 'point')} run, {status.skipped} already recorded; results in {store.path}")
    if report:
        console.print(f"report written to {_write_report([store.path], None)}")
    _check_something_measured(store, before)


class NothingMeasured(Exception):
    """Every point this run wrote failed: exit 1 (the rows are kept)."""


def _check_something_measured(store, before: int) -> None:
    """The run wrote rows and none of them is ok: say so in one line, exit 1."""
    new = store.read()[before:]
    if new and not any(row.status == "ok" for row in new):
        statuses = ", ".join(f"{sum(r.status == s for r in new)} {s}" for s in sorted({r.status for r in new}))
        raise NothingMeasured(f"no point succeeded: {len(new)} rows written, all failed ({statuses}); the rows are "
                              f"kept in {store.path} (see their error field)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors (bad options included) become one line on stderr and exit code 2."""
    from melt_bench.running.results import ResultsWriteError
    from melt_bench.running.sweep import SweepInterrupted

    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args or ["--help"], prog_name="melt-bench", standalone_mode=False)
    except UserError as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"melt-bench: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("melt-bench: interrupted", file=sys.stderr)
        return 130
    except SweepInterrupted as exc:
        print(f"melt-bench: {exc}", file=sys.stderr)
        return 130
    except (ResultsWriteError, NothingMeasured) as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
