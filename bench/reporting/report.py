"""`melt-bench report`: one self-contained HTML file (plots as inline SVG, CSS and a few lines of
JS inline, no network) from results files. matplotlib draws (plots.py), tables are written for
people (html_table.py), Jinja2 (with autoescaping: every string from results is shown as text)
lays out. The first screen is a summary; a section appears only when its data does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from melt_bench import __version__
from melt_bench.reporting.fields import label
from melt_bench.reporting.headlines import headlines, random_weights_line, weights_labels
from melt_bench.reporting.html_table import html_table
from melt_bench.reporting.pareto import kv_cost_per_token, matched_memory, pareto_mask, random_weights_column, verdicts
from melt_bench.reporting.plots import MARKERS, Figure, groups, integer_axis, label_of, line_plot, svg
from melt_bench.reporting.serving import serve_section
from melt_bench.reporting.summary_tables import latest_rows
from melt_bench.running.interrupts import stop_if_interrupted
from melt_bench.running.repeats import combine_repeats
from melt_bench.running.results import ResultsStore, rows_to_frame
from melt_bench.running.stability import UNSTABLE_CV
from melt_bench.units import byte_scale, format_bytes

INTEGER_COLUMNS = ("loops", "seq_len", "batch_size", "new_tokens", "max_batch", "n_samples", "num_fewshot", "limit",
                   "memory_budget_bytes")


@dataclass
class Section:
    title: str
    anchor: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Markup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_frame(paths: list[Path]) -> pd.DataFrame:
    """Latest row per point and metric from all files, with a `source` column."""
    frames = []
    for path in paths:
        rows = combine_repeats(latest_rows(ResultsStore(path).read()))
        frame = rows_to_frame(rows)
        frame["source"] = str(path)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for column in INTEGER_COLUMNS:  # kinds without a field leave NaN, which would make floats
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


def memory_section(frame: pd.DataFrame) -> Section | None:
    mem = frame[frame.kind == "memory"]
    if mem.empty:
        return None
    section = Section("Memory vs loops", "memory")
    sources = mem["peak_source"].dropna() if "peak_source" in mem else mem.model.iloc[0:0]  # rows that name none
    source = sources.iloc[0] if len(sources) else "peak, its source not recorded"
    section.notes.append(f"Peak memory per point ({source}); OOM and timeout points marked at the top.")
    if "repeats" in mem and mem.repeats.notna().any():
        section.notes.append(f"Points measured {int(mem.repeats.max())} times, each in a fresh process: the median, "
                             "with bars and a range column from the lowest to the highest repeat.")
    for key, part in groups(mem, ["phase", "dtype", "device"]):
        title = f"peak memory vs loops | phase {key[0]}, {key[1]}, {key[2]}"
        scale, unit = byte_scale(part.peak_bytes)
        # one panel per batch size, on shared axes; a line per model and sequence length
        section.figures.append(line_plot(part, "loops", "peak_bytes", ["model", "seq_len"], title, unit, scale,
                                         panels="batch_size" if part.batch_size.nunique() > 1 else None))
    table = mem[["model", "loops", "seq_len", "batch_size", "phase", "status"]].copy()
    for column in ("peak_bytes", "kv_cache_bytes", "weights_bytes", "activation_peak_bytes",
                   "nvml_device_peak_above_baseline_bytes", "rss_peak_above_baseline_bytes"):
        if column in mem:
            table[column.replace("_bytes", "")] = mem[column].map(lambda v: format_bytes(v) if pd.notna(v) else "-")
        if column == "peak_bytes" and "peak_bytes_repeat_min" in mem:
            table["peak range"] = [f"{format_bytes(low)} - {format_bytes(high)}" if pd.notna(low) else "-"
                                   for low, high in zip(mem.peak_bytes_repeat_min, mem.peak_bytes_repeat_max)]
            table["repeats"] = mem.repeats
    section.tables.append(html_table(table.sort_values(["model", "seq_len", "batch_size", "loops"])))
    if "predicted_peak_bytes" in mem and mem.predicted_peak_bytes.notna().any():
        section.figures.append(predicted_vs_measured(mem))
        if "peak_source" in mem and (mem.peak_source == "process RSS above baseline").any():
            section.notes.append("Predicted peaks count tensors (weights, KV, activations). On a CPU the measured peak "
                                 "is the process's resident set above its start (glibc set to return freed blocks of "
                                 "64 KiB or more at once, so it follows the tensors held), which also holds what the "
                                 "runtime loads and allocates on first use, so it lies above the prediction by a "
                                 "constant; on a GPU the allocator peak compares like with like.")
    return section


def predicted_vs_measured(mem: pd.DataFrame) -> Figure:
    """The analytic peak (weights + KV + activation model) against the measured one, per point."""
    ok = mem[(mem.status == "ok") & mem.predicted_peak_bytes.notna()]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scale, unit = byte_scale(pd.concat([ok.predicted_peak_bytes, ok.peak_bytes]))
    for model, part in ok.groupby("model"):
        ax.scatter(part.predicted_peak_bytes / scale, part.peak_bytes / scale, label=str(model), alpha=0.8)
    top = max(ok.predicted_peak_bytes.max(), ok.peak_bytes.max()) / scale * 1.05 if len(ok) else 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="measured = predicted")
    ax.set_xlabel(f"predicted peak ({unit})")
    ax.set_ylabel(f"measured peak ({unit})")
    ax.set_title("memory: predicted vs measured peak", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure("memory: predicted vs measured peak", svg(fig))


def seq_len_section(frame: pd.DataFrame) -> Section | None:
    mem = frame[(frame.kind == "memory")]
    if mem.empty or mem.seq_len.nunique() < 2:
        return None
    section = Section("Memory vs sequence length", "memory-seq")
    for key, part in groups(mem, ["phase", "batch_size"]):
        title = f"peak memory vs sequence length | phase {key[0]}, batch {key[1]}"
        scale, unit = byte_scale(part.peak_bytes)
        section.figures.append(line_plot(part, "seq_len", "peak_bytes", ["model", "loops"], title, unit, scale))
    return section


def kv_section(frame: pd.DataFrame) -> Section | None:
    mem = frame[(frame.kind == "memory") & (frame.status == "ok")]
    if mem.empty or "kv_cache_bytes_predicted" not in mem:
        return None
    section = Section("KV cache: measured vs analytic", "kv")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    scale, unit = byte_scale(pd.concat([mem.kv_cache_bytes, mem.kv_cache_bytes_predicted]))  # KiB on CPU
    for model, part in mem.groupby("model"):
        ax.scatter(part.kv_cache_bytes_predicted / scale, part.kv_cache_bytes / scale, label=str(model), s=18)
    high = max(mem.kv_cache_bytes.max(), mem.kv_cache_bytes_predicted.max()) / scale
    ax.plot([0, high], [0, high], color="#888", linewidth=1, label="measured = analytic")
    ax.set_xlabel(f"analytic KV ({unit})")
    ax.set_ylabel(f"measured KV, from the cache objects ({unit})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    section.figures.append(Figure("KV cache bytes: measured vs analytic", svg(fig)))
    mismatched = int((mem.kv_cache_bytes != mem.kv_cache_bytes_predicted).sum())
    section.notes.append(f"{len(mem) - mismatched} of {len(mem)} points match the analytic prediction to the byte.")
    return section


def latency_section(frame: pd.DataFrame) -> Section | None:
    lat = frame[frame.kind == "latency"]
    if lat.empty:
        return None
    section = Section("Latency vs loops", "latency")
    section.notes.append("MBU: the bytes a decode step must read (weights once per loop, the lm head, the KV rows "
                         "attended; models/cost_model.py) per measured step time, over the device bandwidth measured "
                         "by a large copy in the same process. 100% is the roofline.")
    keys = [k for k in ("batch_size", "device") if k in lat]
    for key, part in groups(lat, keys):
        named = zip(keys, key if isinstance(key, tuple) else (key,))
        suffix = ", ".join(f"{name.replace('_size', '')} {value}" for name, value in named if pd.notna(value))
        for metric, title, unit, scale in (
                ("prefill_ms", "prefill (time to first token)", "ms", 1.0),
                ("decode_ms_per_token_mean", "decode latency per token", "ms / token", 1.0),
                ("decode_tokens_per_s", "decode throughput", "tokens / s", 1.0),
                ("decode_mbu", "decode bandwidth utilisation (MBU)", "% of measured bandwidth", 0.01)):
            if metric in part and part[metric].notna().any():  # absent where every point failed
                # one panel per engine, on shared axes: eager and compiled side by side
                section.figures.append(line_plot(part, "loops", metric, ["model", "seq_len"], f"{title} | {suffix}",
                                                  unit, scale, panels="engine" if "engine" in part else None))
    section.notes.append(f"Spread: over the timed runs of each point (min, p10, p90, max; error bars p10-p90); cv is "
                         f"their coefficient of variation, and a point above {UNSTABLE_CV:.0%} is unstable: no ratio "
                         "is stated from it. Load: the machine's 1-minute load average before and after the point.")
    columns = [c for c in ("model", "engine", "loops", "seq_len", "batch_size", "status", "torch_num_threads",
                           "prefill_ms", "prefill_ms_cv", "decode_ms_per_token_mean", "decode_ms_per_token_mean_min",
                           "decode_ms_per_token_mean_p10", "decode_ms_per_token_mean_p90",
                           "decode_ms_per_token_mean_max", "decode_ms_per_token_mean_cv", "timing_stability",
                           "loadavg_1m_before", "loadavg_1m_after", "roofline_decode_ms_per_token", "decode_mbu",
                           "prefill_mfu", "decode_ms_per_token_p50", "decode_ms_per_token_p90", "decode_tokens_per_s",
                           "e2e_tokens_per_s", "loops_executed_mean", "energy_decode_j_per_token", "output_digest")
               if c in lat]
    table = lat[columns].round(3)
    for column in ("decode_mbu", "prefill_mfu", "prefill_ms_cv", "decode_ms_per_token_mean_cv"):
        if column in table:  # one unit everywhere: a percentage, as the plots and the terminal show it
            table[column] = lat[column].map(lambda v: f"{v:.1%}" if pd.notna(v) else "-")
    if "output_digest" in table:
        table["output_digest"] = table.output_digest.map(lambda d: d[:12] if isinstance(d, str) else "-")
    section.tables.append(html_table(table.sort_values(["model", "seq_len", "loops"])))
    return section


def capacity_section(frame: pd.DataFrame) -> Section | None:
    cap = frame[frame.kind == "capacity"]
    if cap.empty:
        return None
    section = Section("Capacity: largest batch within the budget", "capacity")
    for key, part in groups(cap, ["memory_budget_bytes", "device"]):
        title = f"largest batch vs loops | budget {format_bytes(key[0])}, {key[1]}"
        section.figures.append(line_plot(part, "loops", "max_batch", ["model", "seq_len"], title, "sequences"))
    if "decode_tokens_per_s_at_max_batch" in cap and cap.decode_tokens_per_s_at_max_batch.notna().any():
        section.notes.append("Decode tokens/s at the largest batch: steady-state decode at a fixed batch (every "
                             "sequence one token a step), timed by the latency engine named; not a serving "
                             "simulation with arrivals. The numbers by the points are the batches.")
        for key, part in groups(cap, ["memory_budget_bytes", "device", "seq_len", "throughput_engine"]):
            title = (f"decode tokens/s at the budget vs loops | budget {format_bytes(key[0])}, {key[1]}, "
                     f"{key[2]:,} tokens, engine {key[3]}")
            section.figures.append(line_plot(part, "loops", "decode_tokens_per_s_at_max_batch", ["model"], title,
                                             "tokens / s", annotate="max_batch"))
    table = cap[["model", "loops", "seq_len", "new_tokens", "status", "max_batch"]].copy()
    if "hit_batch_limit" in cap:  # the search stopped at --max-batch: a lower bound, not the answer
        table["max_batch"] = [f">= {int(b)}" if hit is True and pd.notna(b) else b
                              for b, hit in zip(cap.max_batch, cap.hit_batch_limit)]
    table["budget"] = cap.memory_budget_bytes.map(format_bytes)
    table["probes"] = cap.probes.map(lambda p: len(p) if isinstance(p, list) else 0)
    for column in ("decode_tokens_per_s_at_max_batch", "decode_tokens_per_s_at_max_batch_cv",
                   "decode_ms_per_step_at_max_batch", "decode_tokens_per_s_at_batch_1",
                   "decode_tokens_per_s_at_batch_1_cv", "decode_ms_per_step_at_batch_1", "timing_stability",
                   "torch_num_threads", "loadavg_1m_before", "loadavg_1m_after", "throughput_engine"):
        if column in cap and column.endswith("_cv"):
            table[column] = cap[column].map(lambda v: f"{v:.1%}" if pd.notna(v) else "-")
        elif column in cap:
            table[column] = cap[column].round(2) if cap[column].dtype.kind == "f" else cap[column]
    section.tables.append(html_table(table.sort_values(["model", "seq_len", "loops"])))
    return section


def accuracy_section(frame: pd.DataFrame) -> Section | None:
    acc = frame[(frame.kind == "accuracy") & (frame.status == "ok")] if "value" in frame else frame.iloc[0:0]
    if acc.empty:
        return None
    section = Section("Accuracy vs loops", "accuracy")
    for key, part in groups(acc, ["task", "metric", "filter"]):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for model, series in part.groupby("model"):
            series = series.sort_values("loops")
            ax.errorbar(series.loops, series.value, yerr=series.stderr.fillna(0), marker="o", capsize=3,
                        label=str(model))
        ax.set_xlabel("loops")
        integer_axis(ax, part.loops)
        ax.set_ylabel(str(key[1]))
        ax.set_title(f"{label_of(key)}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        section.figures.append(Figure(f"accuracy vs loops | {label_of(key)}", svg(fig)))
        scale, unit = byte_scale(part.peak_bytes)
        section.figures.append(_accuracy_scatter(part, key, "peak_bytes", scale,
                                                 f"peak memory during the evaluation ({unit})",
                                                 "accuracy vs peak memory"))
        if part.get("kv_bytes_per_token") is not None and part.kv_bytes_per_token.notna().all():
            section.figures.append(_pareto_figure(part, key))
            matched = matched_memory(part[~random_weights_column(part)])  # random weights: no verdict
            if len(matched):  # one labelled block per (task, metric, filter)
                section.notes.append(f"At equal KV memory | {label_of(key)}:")
                section.notes.extend(verdicts(matched, f"{key[1]} ({key[2]})"))
                section.tables.append(html_table(matched.drop(columns=["evidence"]).round(4)))
    if random_weights_column(acc).any():
        section.notes.insert(0, random_weights_line(acc))
    table = acc[["model", "loops", "task", "metric", "filter", "exit_mode", "value", "stderr", "n_samples"]].copy()
    table.insert(6, "few-shot", acc.num_fewshot_used if "num_fewshot_used" in acc else acc.num_fewshot)
    table["weights"] = weights_labels(acc)
    table["peak"] = acc.peak_bytes.map(format_bytes)
    if "kv_bytes_per_token" in acc:
        table["KV/token"] = acc.kv_bytes_per_token.map(lambda v: format_bytes(v) if pd.notna(v) else "-")
    if "kv_side_buffer_bytes_per_sequence" in acc and acc.kv_side_buffer_bytes_per_sequence.fillna(0).any():
        # MELT reading its chunk grid: the open chunk's per-loop rows, per sequence
        table["side buffer/sequence"] = acc.kv_side_buffer_bytes_per_sequence.map(
            lambda v: format_bytes(v) if pd.notna(v) and v else "-")
    section.tables.append(html_table(table.round(4).sort_values(["task", "filter", "model", "loops"])))
    return section


def _accuracy_scatter(part: pd.DataFrame, key, column: str, scale: float, xlabel: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for model, series in part.groupby("model"):
        ax.scatter(series[column] / scale, series.value, label=str(model))
        for _, row in series.iterrows():
            ax.annotate(f"T={row.loops}", (row[column] / scale, row.value), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(str(key[1]))
    ax.set_title(f"{title} | {label_of(key)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(f"{title} | {label_of(key)}", svg(fig))


def _pareto_figure(part: pd.DataFrame, key) -> Figure:
    """Accuracy against measured KV bytes per token, one point per model (and KV policy) and loop
    count; the points no other beats are joined by the frontier line and ringed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    part = part.assign(kv_bytes_per_token=kv_cost_per_token(part))
    for index, (model, series) in enumerate(part.groupby("model")):
        ax.scatter(series.kv_bytes_per_token / 1024, series.value, marker=MARKERS[index % len(MARKERS)],
                   facecolors="none", edgecolors=f"C{index % 10}", s=max(70 - 12 * (index % 4), 25), label=str(model))
        for _, row in series.iterrows():
            ax.annotate(f"T={row.loops}", (row.kv_bytes_per_token / 1024, row.value), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    front = part[pareto_mask(part.kv_bytes_per_token, part.value)].sort_values(["kv_bytes_per_token", "value"])
    ax.step(front.kv_bytes_per_token / 1024, front.value, where="post", color="black", lw=1, alpha=0.6,
            label="Pareto frontier")
    ax.scatter(front.kv_bytes_per_token / 1024, front.value, s=160, facecolors="none", edgecolors="black", lw=0.8)
    ax.set_xlabel("KV cache per token, measured (KiB; MELT reading its chunk grid: + its side buffer / chunk size)")
    ax.set_ylabel(str(key[1]))
    title = f"accuracy vs KV bytes per token (Pareto) | {label_of(key)}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return Figure(title, svg(fig))


def summary_figures(sections: list[Section]) -> list[Figure]:
    """The figures the first screen shows: memory vs loops, decode time per token, and accuracy
    at its KV memory, the first of each the sections hold."""
    wanted = ("peak memory vs loops", "decode latency per token", "accuracy vs KV bytes per token")
    found = []
    for prefix in wanted:
        figure = next((f for s in sections for f in s.figures if f.caption.startswith(prefix)), None)
        if figure is not None:
            found.append(figure)
    return found


def provenance(frame: pd.DataFrame, paths: list[Path]) -> list[Markup]:
    wanted = {"source": "file", "meta.git_commit": "commit", "meta.melt_bench": "melt-bench", "meta.host": "host",
              "meta.torch": "torch", "meta.transformers": "transformers", "meta.torch_cuda": "CUDA (torch)",
              "meta.nvml.driver_version": "driver"}
    columns = [c for c in wanted if c in frame]
    table = frame[columns].drop_duplicates().rename(columns=wanted) if columns else pd.DataFrame()
    if "meta.nvml.devices" in frame:
        gpus = frame.groupby("source")["meta.nvml.devices"].first().map(
            lambda devices: ", ".join(d["name"] for d in devices) if isinstance(devices, list) else "-")
        table = table.merge(gpus.rename("GPU").reset_index().rename(columns={"source": "file"}), on="file", how="left")
    counts = frame.groupby("source").agg(rows=("kind", "size"), kinds=("kind", lambda k: ", ".join(sorted(set(k)))),
                                         first=("created_at", "min"), last=("created_at", "max")).reset_index()
    return [html_table(counts.rename(columns={"source": "file"})), html_table(table)]


def compare_section(frame: pd.DataFrame, other: pd.DataFrame) -> Section:
    """The same points in two runs side by side, with new/old ratios."""
    section = Section("Comparison with a second run", "compare")
    keys = ["kind", "model", "loops", "seq_len", "batch_size", "phase"]
    metrics = {"memory": "peak_bytes", "latency": "decode_ms_per_token_mean", "capacity": "max_batch",
               "accuracy": "value"}
    rows = []
    for kind, metric in metrics.items():
        a, b = frame[frame.kind == kind], other[other.kind == kind]
        if a.empty or b.empty or metric not in a or metric not in b:
            continue
        extra = ["task", "metric", "filter"] if kind == "accuracy" else []
        on = [k for k in keys + extra if k in a and k in b]
        merged = a[on + [metric, "status"]].merge(b[on + [metric, "status"]], on=on, suffixes=(" (this)", " (other)"))
        merged["metric"] = metric if kind != "accuracy" else merged.get("metric", metric)
        merged["this/other"] = (merged[f"{metric} (this)"] / merged[f"{metric} (other)"]).round(3)
        rows.append(merged.rename(columns={f"{metric} (this)": "this", f"{metric} (other)": "other"}))
    rows = [part for part in rows if len(part)]
    if rows:
        section.tables.append(html_table(pd.concat(rows, ignore_index=True)))
    else:
        section.notes.append(f"The two runs share no points: {_why_apart(frame, other, keys)}.")
    return section


def _why_apart(frame: pd.DataFrame, other: pd.DataFrame, keys: list[str]) -> str:
    """The settings whose values the two runs never share (what keeps every point apart)."""
    apart = []
    for key in keys:
        if key in frame and key in other:
            mine, theirs = set(frame[key].dropna()), set(other[key].dropna())
            if mine and theirs and not mine & theirs:
                apart.append(f"{label(key)} {', '.join(map(str, sorted(mine, key=str)))} here, "
                             f"{', '.join(map(str, sorted(theirs, key=str)))} there")
    return "; ".join(apart) or "no point has the same settings in both (kind, model, loops, length, batch, phase)"


def build_report(paths: list[Path], compare: list[Path] | None = None, title: str | None = None) -> str:
    frame = load_frame(paths)
    sections = [s for s in (memory_section(frame), seq_len_section(frame), kv_section(frame),
                            latency_section(frame), capacity_section(frame), serve_section(frame, Section),
                            accuracy_section(frame)) if s]
    if compare:
        sections.append(compare_section(frame, load_frame(compare)))
    environment = Environment(loader=PackageLoader("melt_bench.reporting", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    return environment.get_template("report.html.j2").render(
        title=title or "melt-bench report: " + ", ".join(p.name for p in paths),
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=__version__, sources=[str(p) for p in paths], headlines=headlines(frame),
        summary_figures=summary_figures(sections), sections=sections, provenance=provenance(frame, paths),
    )


def write_report(paths: list[Path], out: Path, compare: list[Path] | None = None) -> Path:
    html = build_report(paths, compare)
    stop_if_interrupted()  # a Ctrl-C that matplotlib's import swallowed: no report written
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over: a failed write never leaves half a report in its place.
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(html, encoding="utf-8")
    os.replace(partial, out)
    return out


__all__ = ["build_report", "write_report"]
