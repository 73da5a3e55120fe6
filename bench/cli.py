"""The `melt-bench` command line. Commands import their heavy modules lazily, so `--help` is fast."""

from __future__ import annotations

import json
import os
import sys

# NVML and torch must agree on device indices; set before anything initialises CUDA.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

import typer
from rich.console import Console
from rich.table import Table

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
) -> None:
    """List model presets: parameters, layers, loops, and KV-cache bytes per token."""
    from .model_card import preset_cards
    from .units import format_bytes, format_count, parse_dtype

    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from exc
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


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Show torch / CUDA / NVML / driver / GPU facts of this machine."""
    from .envinfo import collect_env
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors (bad options included) become one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args or ["--help"], prog_name="melt-bench", standalone_mode=False)
    except UserError as exc:
        print(f"melt-bench: error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"melt-bench: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("melt-bench: aborted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
