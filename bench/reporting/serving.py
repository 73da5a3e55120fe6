"""The report's serving section (`melt-bench serve` rows): throughput against p90 TPOT across the
load (the serving Pareto), each request's TTFT and TPOT distributions, the table, and the
first-screen sentence at a memory budget, stated from stable points only."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from melt_bench.reporting.html_table import html_table
from melt_bench.reporting.plots import MARKERS, Figure, groups, label_of, svg
from melt_bench.running.stability import instability
from melt_bench.units import format_bytes

SETTINGS = ["seq_len", "new_tokens", "dtype", "device", "engine", "memory_budget_bytes"]  # a figure per combination
SERIES = ["model", "kv_policy", "loops"]  # one line per combination


def load_label(row) -> str:
    """c=8 (closed loop) or 4/s (Poisson)."""
    if pd.notna(row.get("concurrency")):
        return f"c={int(row.concurrency)}"
    return f"{row.request_rate:g}/s"


def _lengths(seq_len, new_tokens) -> str:
    prompt = "GSM8K prompts" if seq_len == 0 else f"{int(seq_len):,}-token prompts"
    return f"{prompt}, {int(new_tokens)} output tokens"


def settings_label(part: pd.DataFrame) -> str:
    """What a figure's points share, in words: lengths, dtype, device, engine, budget."""
    row = part.iloc[0]
    budget = row.get("memory_budget_bytes")
    slots = f"slots within {format_bytes(budget)}" if pd.notna(budget) else "slots given"
    return f"{_lengths(row.seq_len, row.new_tokens)}, {row.dtype}, {row.device}, engine {row.engine}, {slots}"


def pareto_figure(part: pd.DataFrame) -> Figure:
    """Output tokens/s against p90 TPOT, a line per model (policy, loops) across the loads, each
    point named by its load; bars span the timed runs' lowest to highest."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for index, (series_key, series) in enumerate(groups(part, [c for c in SERIES if c in part])):
        series = series.sort_values("tpot_ms_p90")
        line, = ax.plot(series.tpot_ms_p90, series.output_tokens_per_s, marker=MARKERS[index % len(MARKERS)],
                        fillstyle="none", label=label_of(series_key))
        if "output_tokens_per_s_min" in series:  # the timed runs' range (the median of two is the higher)
            spread = [(series.output_tokens_per_s - series.output_tokens_per_s_min).fillna(0).clip(lower=0),
                      (series.output_tokens_per_s_max - series.output_tokens_per_s).fillna(0).clip(lower=0)]
            ax.errorbar(series.tpot_ms_p90, series.output_tokens_per_s, yerr=spread, fmt="none",
                        ecolor=line.get_color(), capsize=3)
        for _, row in series.iterrows():
            ax.annotate(load_label(row), (row.tpot_ms_p90, row.output_tokens_per_s), fontsize=7, xytext=(4, 4),
                        textcoords="offset points", color=line.get_color())
    ax.set_xlabel("p90 time per output token (ms)")
    ax.set_ylabel("output tokens / s")
    title = f"serving throughput vs p90 TPOT | {settings_label(part)}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(title, svg(fig))


def distribution_figure(part: pd.DataFrame) -> Figure:
    """Every request's TTFT and TPOT (the median timed run's), a box per model and load."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    boxes, names = {"ttft_ms": [], "tpot_ms": []}, []
    for _, row in part.sort_values(["model", "loops"]).iterrows():
        requests = row.requests if isinstance(row.requests, list) else []
        names.append(f"{row.model} T={row.loops} {load_label(row)}")
        for figure in boxes:
            boxes[figure].append([r[figure] for r in requests if r.get(figure) is not None] or [float("nan")])
    for ax, (figure, data) in zip((left, right), boxes.items()):
        ax.boxplot(data, vert=False)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_xlabel(f"{figure.replace('_ms', '').upper()} per request (ms)")
        ax.grid(alpha=0.3)
    title = f"TTFT and TPOT per request | {settings_label(part)}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return Figure(title, svg(fig))


def serve_section(frame: pd.DataFrame, section_type):
    """The section, or None without serve rows (`section_type`: report.Section)."""
    rows = frame[frame.kind == "serve"]
    if rows.empty:
        return None
    section = section_type("Serving: continuous batching under load", "serve")
    section.notes.append(
        "Requests arrive (closed loop: a finished one replaced at once; or Poisson at a rate), are prefilled one at "
        "a time into a free slot while the others pause, and decode together one token a step. TTFT, TPOT, ITL and "
        "E2E are each request's own, read after its tokens reached the host; a point's percentiles are over its "
        "requests, and its figure is the median over the timed runs (bars: their range).")
    ok = rows[(rows.status == "ok") & rows.get("output_tokens_per_s", pd.Series(index=rows.index)).notna()]
    for _, part in groups(ok, [c for c in SETTINGS if c in ok]):
        section.figures.append(pareto_figure(part))
        if "requests" in part:
            section.figures.append(distribution_figure(part))
    columns = ["model", "kv_policy", "loops", "seq_len", "new_tokens", "load", "slots", "status",
               "output_tokens_per_s", "output_tokens_per_s_cv", "requests_per_s", "ttft_ms_p50", "ttft_ms_p90",
               "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "itl_ms_p90", "e2e_ms_p90",
               "queue_ms_p90", "goodput_requests_per_s", "timing_stability", "engine", "torch_num_threads",
               "loadavg_1m_before", "loadavg_1m_after"]
    table = rows[[c for c in columns if c in rows]].copy()
    table["load"] = [load_label(row) for _, row in rows.iterrows()]
    for column in ("peak_bytes", "kv_in_use_bytes_max", "kv_allocated_bytes", "memory_budget_bytes"):
        if column in rows:
            table[column.replace("_bytes", "")] = rows[column].map(lambda v: format_bytes(v) if pd.notna(v) else "-")
    if "output_tokens_per_s_cv" in table:
        table["output_tokens_per_s_cv"] = table.output_tokens_per_s_cv.map(lambda v: f"{v:.1%}" if pd.notna(v) else "-")
    section.tables.append(html_table(table.round(2).sort_values(["model", "loops"])))
    return section


def serve_headlines(frame: pd.DataFrame) -> list[str]:
    """Per budget, lengths, load and loop count where an Ouro model and its MELT both served:
    'at BUDGET and N-token requests, MELT keeps A requests in flight to Ouro's B, at X vs Y
    tokens/s and p90 TPOT P vs Q ms', from stable points only (else why not)."""
    rows = frame[(frame.kind == "serve") & (frame.status == "ok")]
    if rows.empty or "memory_budget_bytes" not in rows or "output_tokens_per_s" not in rows:
        return []
    rows = rows[rows.memory_budget_bytes.notna() & rows.output_tokens_per_s.notna()]
    lines = []
    keys = ["memory_budget_bytes", "seq_len", "new_tokens", "load", "concurrency", "request_rate", "loops", "engine",
            "dtype", "device"]
    for key, part in groups(rows, [k for k in keys if k in rows]):
        by_model = {row.model: row for _, row in part.iterrows()}
        for ouro in [m for m in by_model if str(m).startswith("ouro") and "melt" + m[4:] in by_model]:
            a, b = by_model["melt" + ouro[4:]], by_model[ouro]
            where = (f"At {format_bytes(a.memory_budget_bytes)} and {_lengths(a.seq_len, a.new_tokens)} "
                     f"({a.loops} loops, load {load_label(a)}, engine {a.engine})")
            shaky = [(r.model, r) for r in (a, b) if r.timing_stability != "stable"]
            if shaky:
                why = "; ".join(f"{model}: {instability(r.to_dict(), 'output_tokens_per_s', 'tokens/s')}"
                                for model, r in shaky)
                lines.append(f"{where}, serving is not stable enough to state ({why}).")
                continue
            lines.append(f"{where}, {a.model} keeps {int(a.requests_running_max)} requests in flight to {b.model}'s "
                         f"{int(b.requests_running_max)}, at {a.output_tokens_per_s:,.1f} vs "
                         f"{b.output_tokens_per_s:,.1f} tokens/s and p90 TPOT {a.tpot_ms_p90:,.1f} vs "
                         f"{b.tpot_ms_p90:,.1f} ms.")
    return lines
