"""Repeated points (`--repeats N`: the same point measured in N fresh children) folded into one
row for tables and reports: the figures of the median repeat, and the spread (lowest and highest
over the repeats) of the headline figures, so that noise shows as noise.

One rule for every figure: the median repeat is the one whose headline (HEADLINE) is the lower
middle, and every figure of the row comes from it, so figures derived from one another (decode
ms/token and tokens/s, MBU) describe one measurement and never mix two middles."""

from __future__ import annotations

import json
from dataclasses import replace

from melt_bench.running.results import ResultRow

# Per kind, the figures whose spread over repeats is kept as `<name>_repeat_min` / `_repeat_max`.
SPREAD_METRICS = {
    "memory": ("peak_bytes",),
    "capacity": ("max_batch",),
    "latency": ("prefill_ms", "decode_ms_per_token_mean"),
    "accuracy": ("peak_bytes",),
}


# Per kind, the figure that picks the median repeat.
HEADLINE = {"memory": "peak_bytes", "capacity": "max_batch", "latency": "decode_ms_per_token_mean",
            "accuracy": "peak_bytes"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def combine_repeats(rows: list[ResultRow]) -> list[ResultRow]:
    """One row per point that differs only in `repeat`; single rows come back unchanged."""
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        point = {key: value for key, value in row.point.items() if key != "repeat"}
        groups.setdefault((row.kind, json.dumps(point, sort_keys=True, default=str)), []).append(row)
    return [group[0] if len(group) == 1 else _combine(group) for group in groups.values()]


def _combine(group: list[ResultRow]) -> ResultRow:
    ok = [row for row in group if row.status == "ok"]
    failed = [row for row in group if row.status != "ok"]
    first = median_repeat(ok) if ok else group[0]
    metrics = dict(first.metrics)
    for key in SPREAD_METRICS.get(first.kind, ()):
        values = [row.metrics[key] for row in ok if _number(row.metrics.get(key))]
        if values:
            metrics[f"{key}_repeat_min"], metrics[f"{key}_repeat_max"] = min(values), max(values)
    metrics.update(repeats=len(group), repeats_ok=len(ok))
    point = {key: value for key, value in first.point.items() if key != "repeat"}
    # A failure in any repeat marks the point (an OOM in one of three runs is at the wall).
    status, error = (failed[0].status, f"{len(failed)} of {len(group)} repeats failed: {failed[0].error}") \
        if failed else ("ok", None)
    return replace(first, point=point, status=status, error=error, metrics=metrics,
                   wall_s=sum(row.wall_s for row in group))


def median_repeat(rows: list[ResultRow]) -> ResultRow:
    """The repeat whose headline figure is the lower middle (an even count still reports a run
    that was measured); repeats without the figure come last."""
    headline = HEADLINE.get(rows[0].kind)
    measured = [row for row in rows if _number(row.metrics.get(headline))]
    if not measured:
        return rows[0]
    ordered = sorted(measured, key=lambda row: row.metrics[headline])
    return ordered[(len(ordered) - 1) // 2]


def spread_text(metrics: dict, key: str) -> str:
    """' ±0.4%' (half the range over repeats, relative to the median), or '' for one run."""
    low, high, mid = metrics.get(f"{key}_repeat_min"), metrics.get(f"{key}_repeat_max"), metrics.get(key)
    if low is None or high is None or not mid:
        return ""
    return f" ±{(high - low) / 2 / abs(mid):.1%}"
