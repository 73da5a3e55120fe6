"""The tables printed at the end of a sweep: one per (phase, sequence length, batch size), a row
per loop count, columns per model, and the Ouro/MELT ratio of the headline figure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rich.table import Table

from melt_bench.running.repeats import combine_repeats, spread_text
from melt_bench.running.results import ResultRow, model_label, model_labels
from melt_bench.running.stability import UNSTABLE_CV, figure_verdict, timing_note
from melt_bench.units import format_bytes


def latest_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """The last row of each point and metric (a retried point keeps only its newest outcome)."""
    return list({(row.point_id, row.point.get("metric"), row.point.get("filter")): row for row in rows}.values())


def melt_partner(model: str, models: list[str]) -> str | None:
    """The MELT model built on the same base as an Ouro one: ouro-1.4b -> melt-1.4b."""
    if not model.startswith("ouro"):
        return None
    partner = "melt" + model[len("ouro"):]
    return partner if partner in models else None


@dataclass
class Column:
    name: str  # appended to the model name
    cell: Callable[[dict], str]  # from an ok row's metrics


@dataclass
class TableSpec:
    """How a command's rows are tabulated at the end of a sweep (each scenario module has one:
    scenarios/memory.SUMMARY, ...)."""

    command: str  # the kind of rows it tabulates
    title: str
    columns: list[Column]
    headline: str  # the metric the Ouro/MELT ratio divides
    headline_label: str  # how the ratio column names it
    group_fields: tuple[str, ...] = ("phase", "seq_len", "batch_size", "dtype", "device")
    # Whether an ok row's metrics hold a measurement, and what a run none of whose rows does says
    # (capacity: a budget no batch fits anywhere measured nothing); None: every ok row does.
    measured: Callable[[dict], bool] | None = None
    nothing_measured: str = ""


def ms_cell(key: str) -> Callable[[dict], str]:
    """A time in milliseconds, with the spread of repeats."""
    return lambda m: f"{m[key]:,.2f} ms{spread_text(m, key)}{timing_note(m, key)}" if m.get(key) is not None else "-"


def bytes_cell(key: str) -> Callable[[dict], str]:
    """A byte count in its unit, with the spread of repeats."""
    return lambda m: format_bytes(m.get(key)) + spread_text(m, key) if m.get(key) is not None else "-"


def rate_cell(key: str) -> Callable[[dict], str]:
    """A rate (tokens per second), one decimal."""
    return lambda m: f"{m[key]:,.1f}{timing_note(m, key)}" if m.get(key) is not None else "-"


@dataclass
class SummaryTable:
    """One end-of-sweep table before it is laid out: per loop count, each model's cells (one per
    column of the spec) and the Ouro/MELT ratios."""

    title: str
    spec: TableSpec
    models: list[str]
    pairs: list[tuple[str, str]]
    cells: dict[tuple[int, str], list[str]]  # (loops, model) -> the spec's columns
    ratios: dict[tuple[int, str], str]  # (loops, "ouro/melt") -> the headline ratio
    loops: list[int]

    def ratio_names(self) -> list[str]:
        return [f"{ouro}/{melt} {self.spec.headline_label}" for ouro, melt in self.pairs]

    def wide(self) -> Table:
        """A row per loop count, columns per model and metric: the most compact when it fits."""
        table = Table(title=self.title)
        table.add_column("loops", justify="right")
        for model in self.models:
            for column in self.spec.columns:
                table.add_column(model + column.name, justify="right")
        for name in self.ratio_names():
            table.add_column(name, justify="right")
        for loops in self.loops:
            cells = [str(loops)]
            for model in self.models:
                cells += self.cells[(loops, model)]
            table.add_row(*cells, *(self.ratios[(loops, name)] for name in self.ratio_names()))
        return table

    def long(self) -> Table:
        """A row per (loop count, model), a column per metric: for terminals too narrow for wide()."""
        table = Table(title=self.title)
        table.add_column("loops", justify="right")
        table.add_column("model")
        for column in self.spec.columns:
            table.add_column(column.name.strip() or self.spec.headline_label, justify="right")
        partner = dict(self.pairs)  # an Ouro model's row carries its ratio to its MELT partner
        if partner:
            table.add_column(f"Ouro/MELT {self.spec.headline_label}", justify="right")
        for loops in self.loops:
            for model in self.models:
                ratio = [self.ratios[(loops, f"{model}/{partner[model]} {self.spec.headline_label}")]
                         if model in partner else "-"] if partner else []
                table.add_row(str(loops), model, *self.cells[(loops, model)], *ratio)
        return table

    def records(self) -> list[str]:
        """One line per (loop count, model), each figure named: for the narrowest terminals."""
        names = [column.name.strip() or self.spec.headline_label for column in self.spec.columns]
        lines = [self.title]
        for loops in self.loops:
            for model in self.models:
                figures = ", ".join(f"{name} {cell}" for name, cell in zip(names, self.cells[(loops, model)]))
                lines.append(f"  loops {loops}, {model}: {figures}")
            lines += [f"  loops {loops}, {name}: {self.ratios[(loops, name)]}" for name in self.ratio_names()]
        return lines


def print_fitted(spec: TableSpec, rows: list[ResultRow], console) -> None:
    """Print the tables so every header stays whole in the console's width: wide where it fits,
    else a row per (loops, model), else a line per (loops, model) with each figure named."""
    from rich.measure import Measurement

    for summary in summaries_for(spec, rows):
        for table in (summary.wide(), summary.long()):
            natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
            if natural <= console.width:
                console.print(table)
                break
        else:
            for line in summary.records():
                console.print(line, highlight=False, markup=False)


def summaries_for(spec: TableSpec, rows: list[ResultRow]) -> list[SummaryTable]:
    """One table per group of `spec.group_fields` among the command's latest rows, repeats combined."""
    rows = combine_repeats([row for row in latest_rows(rows) if row.kind == spec.command])
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault(tuple(row.point.get(f) for f in spec.group_fields), []).append(row)
    return [_summary(spec, key, group) for key, group in sorted(groups.items(), key=lambda kv: _order(kv[0]))]


def _order(key: tuple) -> tuple:
    """Groups in the order of their settings, numbers as numbers (concurrency 8 before 32)."""
    return tuple((0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool)
                 else (1, 0, str(value)) for value in key)


def _summary(spec: TableSpec, key: tuple, group: list[ResultRow]) -> SummaryTable:
    labels = model_labels(group)
    models = list(dict.fromkeys(model_label(row, labels) for row in group))
    pairs = [(m, melt_partner(m, models)) for m in models if melt_partner(m, models)]
    described = ", ".join(f"{field} {_describe(field, value)}" for field, value in zip(spec.group_fields, key)
                          if value is not None)  # a setting the group does not have (serve: no rate in a closed loop)
    repeats = max(row.metrics.get("repeats", 1) for row in group)
    note = f" (median of {repeats} repeats, ± half their range)" if repeats > 1 else ""
    by_key = {(model_label(r, labels), r.point["loops"]): r for r in group}
    loops_list = sorted({r.point["loops"] for r in group})
    cells, ratios = {}, {}
    for loops in loops_list:
        for model in models:
            row = by_key.get((model, loops))
            cells[(loops, model)] = [_cell(row, column, index) for index, column in enumerate(spec.columns)]
        for ouro, melt in pairs:
            ratios[(loops, f"{ouro}/{melt} {spec.headline_label}")] = _ratio(
                by_key.get((ouro, loops)), by_key.get((melt, loops)), spec.headline)
    if any(f"{spec.headline}_cv" in row.metrics or "timing_stability" in row.metrics for row in group):
        note += f"; cv: spread over the timed runs, UNSTABLE above {UNSTABLE_CV:.0%} (no ratio stated)"
    return SummaryTable(f"{spec.title}{note} | {described}", spec, models, pairs, cells, ratios, loops_list)


def _cell(row: ResultRow | None, column: Column, index: int) -> str:
    if row is None:
        return "-"
    if row.status != "ok":
        return row.status.upper() if index == 0 else "-"
    return column.cell(row.metrics)


def _describe(field: str, value) -> str:
    return format_bytes(value) if field.endswith("_bytes") else str(value)


def _ratio(a: ResultRow | None, b: ResultRow | None, metric: str) -> str:
    if a is None or b is None or a.status != "ok" or b.status != "ok":
        return "-"
    verdicts = {figure_verdict(a.metrics, metric), figure_verdict(b.metrics, metric)}
    if verdicts != {"stable"}:  # noise is not a finding: no ratio between unstable or unjudged figures
        return "unstable" if "unstable" in verdicts else "1 run"
    x, y = a.metrics.get(metric), b.metrics.get(metric)
    return f"{x / y:.2f}x" if x is not None and y else "-"
