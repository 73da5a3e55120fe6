"""`melt-bench models` (presets, cost cards) and `melt-bench env` (the machine)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from melt_bench.commands.app import UserError, app, console


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
    from melt_bench.units import check_dtype, format_bytes, format_count, parse_dtype

    try:
        check_dtype(dtype)
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from exc
    if card:
        _check_card_flags(names, loops, seq_len, batch_size, device)
    from rich.table import Table

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
                          ("melt", "MELT's own cache and KV quantisation (--kv-quant)"),
                          ("huginn", "Huginn's cache lookup strategies (--kv-policy) on Huginn presets, loops = "
                                     "recurrence steps")):
        members = [c for c in cards if c.family == family]
        packed = "" if family == "huginn" else (
            f"; packed caches (flashloop, int8, int4) over a {STATED_TOKENS:,}-token prompt (their newest rows are "
            "full precision, so the figure depends on the length); int8 / int4 keep KIVI's full-precision rows (the "
            "T mod 64 newest keys, the 64 newest values), :flashloop-tail FlashLoop's (the newest 64-127 of both)")
        policies = Table(title=f"{title}: KV bytes per token at the trained loop count, {dtype}{packed}")
        policies.add_column("KV policy")
        for c in members:
            policies.add_column(f"{c.name} ({c.loops} loops)", justify="right")
        for policy in members[0].kv_bytes_per_token_by_policy if members else []:
            policies.add_row(policy, *(f"{c.kv_bytes_per_token_by_policy[policy]:,} "
                                       f"({format_bytes(c.kv_bytes_per_token_by_policy[policy])})" for c in members))
        console.print(policies)


def _check_card_flags(names: str | None, loops: str, seq_len: int, batch_size: int, device: str) -> None:
    """--card's flags, refused in one line before torch loads (the sweeps' own rules: the loop limit too)."""
    from melt_bench.running.sweep_options import OptionError, check_names

    if seq_len < 1 or batch_size < 1:
        raise UserError(f"--seq-len and --batch-size must be at least 1 (got {seq_len}, {batch_size})")
    try:
        check_names({"models": names, "loops": loops, "device": device})
    except OptionError as exc:
        raise UserError(str(exc)) from exc


def _print_cost_card(dtype, names: str | None, loops: str, seq_len: int, batch_size: int, device: str,
                     as_json: bool) -> None:
    import torch
    from rich.table import Table

    from melt_bench.models import PRESETS, UnknownPresetError, get_preset
    from melt_bench.reporting.model_card import cost_cards
    from melt_bench.running.ranges import RangeError, parse_int_list, parse_name_list
    from melt_bench.running.sweep_options import OptionError, resolve_device
    from melt_bench.trackers.device_ceilings import measure_bandwidth
    from melt_bench.units import format_bytes

    try:
        presets = parse_name_list(names, "--models") if names else list(PRESETS)
        for name in presets:
            get_preset(name)
        loop_counts = parse_int_list(loops, "--loops")
        where = resolve_device(device)
    except (RangeError, UnknownPresetError, OptionError) as exc:
        raise UserError(str(exc)) from exc
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
    from rich.table import Table

    from melt_bench.trackers.envinfo import collect_env
    from melt_bench.units import format_bytes

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
