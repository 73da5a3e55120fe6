"""The table printed at the end of a memory sweep: peak memory per loop count for each model,
and the Ouro/MELT ratio, one table per (phase, sequence length, batch size)."""

from __future__ import annotations

from rich.table import Table

from .results import ResultRow
from .units import format_bytes


def latest_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """The last row of each point (a retried point keeps only its newest outcome)."""
    return list({row.point_id: row for row in rows}.values())


def melt_partner(model: str, models: list[str]) -> str | None:
    """The MELT model built on the same base as an Ouro one: ouro-1.4b -> melt-1.4b."""
    if not model.startswith("ouro"):
        return None
    partner = "melt" + model[len("ouro"):]
    return partner if partner in models else None


def _cell(row: ResultRow | None) -> str:
    if row is None:
        return "-"
    if row.status != "ok":
        return row.status.upper()
    return format_bytes(row.metrics.get("peak_bytes"))


def memory_tables(rows: list[ResultRow]) -> list[Table]:
    rows = [row for row in latest_rows(rows) if row.kind == "memory"]
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        p = row.point
        groups.setdefault((p["phase"], p["seq_len"], p["batch_size"], p["dtype"], p["device"]), []).append(row)
    tables = []
    for (phase, seq, batch, dtype, device), group in sorted(groups.items()):
        models = list(dict.fromkeys(row.point["model"] for row in group))
        pairs = [(m, melt_partner(m, models)) for m in models if melt_partner(m, models)]
        source = next((r.metrics.get("peak_source") for r in group if r.metrics.get("peak_source")), "peak")
        table = Table(title=f"peak memory ({source}) | {phase}, seq {seq}, batch {batch}, {dtype}, {device}")
        table.add_column("loops", justify="right")
        for model in models:
            table.add_column(model, justify="right")
            table.add_column(f"{model} KV", justify="right")
        for ouro, melt in pairs:
            table.add_column(f"{ouro}/{melt}", justify="right")
        by_key = {(r.point["model"], r.point["loops"]): r for r in group}
        for loops in sorted({r.point["loops"] for r in group}):
            cells = [str(loops)]
            for model in models:
                row = by_key.get((model, loops))
                cells.append(_cell(row))
                kv = row.metrics.get("kv_cache_bytes") if row is not None and row.status == "ok" else None
                cells.append(format_bytes(kv))
            for ouro, melt in pairs:
                a, b = by_key.get((ouro, loops)), by_key.get((melt, loops))
                ok = a is not None and b is not None and a.status == b.status == "ok" and b.metrics.get("peak_bytes")
                cells.append(f"{a.metrics['peak_bytes'] / b.metrics['peak_bytes']:.2f}x" if ok else "-")
            table.add_row(*cells)
        tables.append(table)
    return tables
