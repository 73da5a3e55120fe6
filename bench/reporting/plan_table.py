"""`--dry-run` for people: the settings every point shares on one line, then a table with a row
per point and a column per setting that varies (a line per point where the table would not fit)."""

from __future__ import annotations

from rich.measure import Measurement
from rich.table import Table


def print_plan(points: list[dict], console) -> None:
    """`points`: each point's settings (point_id first), as its results row will hold them."""
    if not points:
        console.print("no points")
        return
    names = [name for name in points[0] if name != "point_id"]
    varying = [name for name in names if len({repr(p.get(name)) for p in points}) > 1]
    shared = [f"{name} {points[0][name]}" for name in names if name not in varying and points[0][name] is not None]
    console.print("every point: " + ", ".join(shared), highlight=False, markup=False)
    table = Table(box=None, pad_edge=False)
    for name in ["point_id", *varying]:
        table.add_column(name, justify="left" if name in ("point_id", "model", "kv_policy") else "right")
    for point in points:
        table.add_row(*(_text(point.get(name)) for name in ["point_id", *varying]))
    if Measurement.get(console, console.options.update_width(100_000), table).maximum <= console.width:
        console.print(table)
        return
    for point in points:
        console.print(point["point_id"] + "  " + ", ".join(f"{name} {_text(point.get(name))}" for name in varying),
                      highlight=False, markup=False)


def _text(value) -> str:
    return "-" if value is None else str(value)  # None: the model's own setting
