"""The report's first screen in words: the Ouro/MELT ratios like for like, KV bytes per token,
the out-of-memory wall, throughput under a budget and accuracy at equal memory; a figure whose
timing is not stable is named with its spread and load instead of given a ratio."""

from __future__ import annotations

import pandas as pd

from melt_bench.reporting.pareto import matched_memory, random_weights_column, verdicts
from melt_bench.reporting.plots import groups, label_of
from melt_bench.reporting.serving import serve_headlines
from melt_bench.running.stability import figure_verdict, instability
from melt_bench.units import format_bytes

# Point settings that change a figure (every field of the sweeps' point types but those that place
# a point on the axes or in the model's label): a ratio compares two models only where all of them
# agree, and names those that differ across the file (eager vs compiled, bf16 vs fp32, ...).
LIKE_FOR_LIKE = ("engine", "dtype", "device", "phase", "new_tokens", "prefill_chunk", "early_exit", "static_cache",
                 "warmup", "timed_runs", "memory_budget_bytes", "threads")
# and what the child measured of how it ran: the threads it took (a CPU child: 1 unless told,
# since #32; 2 on 2 cores before), so a ratio never mixes the two
MEASURED_LIKE_FOR_LIKE = ("torch_num_threads",)


def _settings(keys: tuple, axes: list[str]) -> str:
    named = [f"{axis.replace('_', ' ')} {value}" for axis, value in zip(axes, keys) if not pd.isna(value)]
    return "; " + ", ".join(named) if named else ""


def headlines(frame: pd.DataFrame) -> list[str]:
    """The key Ouro/MELT ratios, at the largest loop count where both models finished: one per
    combination of the settings in LIKE_FOR_LIKE that the rows hold (never an average across
    engines, dtypes or devices), each naming the settings that vary; latency always names its
    engine."""
    lines = []
    pairs = [(m, "melt" + m[4:]) for m in frame.get("model", pd.Series(dtype=str)).dropna().unique()
             if str(m).startswith("ouro") and "melt" + m[4:] in set(frame.model)]
    for ouro, melt in pairs:
        for kind, metric, phrase in (("memory", "peak_bytes", "peak memory"),
                                     ("latency", "decode_ms_per_token_mean", "decode time per token")):
            part = frame[(frame.kind == kind) & (frame.status == "ok") & frame.model.isin([ouro, melt])]
            if part.empty or metric not in part:
                continue
            axes = [a for a in (*LIKE_FOR_LIKE, *MEASURED_LIKE_FOR_LIKE)
                    if a in part and (part[a].nunique(dropna=False) > 1 or (a == "engine" and kind == "latency"))]
            if part.duplicated([*axes, "loops", "seq_len", "batch_size", "model"]).any() and "source" in part:
                axes.append("source")  # the same point in two files: each file on its own
            # anything still doubled differs in no setting we know: the latest row stands
            part = part.sort_values("created_at").drop_duplicates([*axes, "loops", "seq_len", "batch_size", "model"],
                                                                  keep="last")
            for keys, same in groups(part, axes):
                keys = keys if isinstance(keys, tuple) else (keys,)
                both = same.pivot(index=["loops", "seq_len", "batch_size"], columns="model", values=metric)
                both = both.dropna() if ouro in both and melt in both else both.iloc[0:0]
                if not len(both):
                    continue
                (loops, seq, batch), row = max(both.iterrows(), key=lambda kv: kv[0])
                where = f"At {loops} loops and {seq:,} tokens (batch {batch}{_settings(keys, axes)})"
                at = same[(same.loops == loops) & (same.seq_len == seq) & (same.batch_size == batch)]
                figures = {model: _metrics_of(at[at.model == model].iloc[0]) for model in (ouro, melt)}
                shaky = {m: f for m, f in figures.items() if figure_verdict(f, metric) != "stable"}
                if shaky:  # noise is not a finding: say which point, its spread and the load
                    why = "; ".join(f"{model}: {instability(f, metric)}" for model, f in shaky.items())
                    lines.append(f"{where}, the {phrase} is not stable enough to compare ({why}): no ratio stated.")
                    continue
                ratio = row[ouro] / row[melt]
                value = format_bytes if metric.endswith("bytes") else (lambda v: f"{v:,.2f} ms")
                lines.append(f"{where}, {ouro} needs {ratio:.2f}x {melt}'s {phrase} ({value(row[ouro])} vs "
                             f"{value(row[melt])}).")
        lines.extend(_kv_per_token(frame, ouro, melt))
        failed = frame[(frame.kind == "memory") & (frame.model == ouro) & (frame.status == "oom")]
        if len(failed):
            first = failed.sort_values("loops").iloc[0]
            lines.append(f"{ouro} runs out of memory from {first.loops} loops at {first.seq_len:,} tokens, "
                         f"batch {first.batch_size}.")
    lines.extend(_throughput_at_budget(frame))
    lines.extend(serve_headlines(frame))
    lines.extend(_accuracy_at_equal_memory(frame))
    return lines


def _metrics_of(row: pd.Series) -> dict:
    """A frame row as a metrics dict (NaN left out), for the stability rules."""
    return {key: value for key, value in row.items() if not (isinstance(value, float) and pd.isna(value))}


def _kv_per_token(frame: pd.DataFrame, ouro: str, melt: str) -> list[str]:
    """KV-cache bytes per cached token, measured (the cache objects' bytes over the tokens they
    hold), for the pair at the largest loop count where both have a finished memory point."""
    mem = frame[(frame.kind == "memory") & (frame.status == "ok")]
    if mem.empty or "kv_cache_tokens" not in mem:
        return []
    mem = mem.assign(per_token=mem.kv_cache_bytes / (mem.kv_cache_tokens * mem.batch_size))
    both = mem[mem.model.isin([ouro, melt])].pivot_table(index="loops", columns="model", values="per_token")
    both = both.dropna() if ouro in both and melt in both else both.iloc[0:0]
    if not len(both):
        return []
    loops = both.index.max()
    return [f"KV cache per token at {loops} loops: {ouro} {format_bytes(both[ouro][loops])}, {melt} "
            f"{format_bytes(both[melt][loops])} (measured from the cache objects)."]


def _accuracy_at_equal_memory(frame: pd.DataFrame) -> list[str]:
    """The matched-memory verdicts of the first (task, metric, filter), for the first screen; first
    of all, that scores from random weights measure nothing (and no verdict is drawn from them),
    and which MELT models ran with a fresh, untrained gate on Ouro's weights."""
    acc = frame[(frame.kind == "accuracy") & (frame.status == "ok")] if "value" in frame else frame.iloc[0:0]
    if acc.empty:
        return []
    lines = [random_weights_line(acc)] if random_weights_column(acc).any() else []
    fresh = acc[acc.melt_gate.eq("fresh")].model.unique() if "melt_gate" in acc else []
    if len(fresh):
        lines.append(f"{', '.join(map(str, fresh))} ran on Ouro's weights with a fresh, untrained MELT gate "
                     "(not converted): their scores are those of an unconverted MELT.")
    acc = acc[~random_weights_column(acc)]
    if acc.empty or "kv_bytes_per_token" not in acc:
        return lines
    for key, part in groups(acc, ["task", "metric", "filter"]):
        matched = matched_memory(part) if part.kv_bytes_per_token.notna().all() else []
        if len(matched):
            return lines + [f"At equal KV memory ({label_of(key)}): {line}" for line in verdicts(matched, f"{key[1]}")]
    return lines


def random_weights_line(acc: pd.DataFrame) -> str:
    """The sentence the report leads with when scores come from random weights."""
    names = acc.model_name if "model_name" in acc else acc.model  # the preset, not its policy's label
    models = ", ".join(map(str, names[random_weights_column(acc)].unique()))
    return (f"Accuracy scores of {models} come from random weights (the presets' seeded initialisation, no "
            "checkpoint): they measure nothing about the models, and no verdict is drawn from them.")


def weights_labels(acc: pd.DataFrame) -> list[str]:
    """Per accuracy row, where its weights came from, in a few words."""
    random = random_weights_column(acc)
    given = acc["weights"] if "weights" in acc else pd.Series(None, index=acc.index)
    gate = acc["melt_gate"] if "melt_gate" in acc else pd.Series(None, index=acc.index)
    source = acc["weights_source"] if "weights_source" in acc else pd.Series(None, index=acc.index)
    return ["random (preset)" if is_random else
            f"{path if isinstance(path, str) else kind}{' + fresh gate' if g == 'fresh' else ''}"
            for is_random, path, kind, g in zip(random, given, source, gate)]


def _throughput_at_budget(frame: pd.DataFrame) -> list[str]:
    """Per budget, length and engine, at the largest loop count every model finished: what each
    model decodes at its largest batch under the budget (measured, capacity rows)."""
    metric = "decode_tokens_per_s_at_max_batch"
    cap = frame[(frame.kind == "capacity") & (frame.status == "ok")]
    if cap.empty or metric not in cap:
        return []
    lines = []
    for key, part in groups(cap[cap[metric].notna()], ["memory_budget_bytes", "seq_len", "throughput_engine"]):
        loops = part.groupby("loops").model.nunique()
        if loops.max() < 2:
            continue
        at = loops[loops == loops.max()].index.max()
        models = part[part.loops == at].sort_values(metric, ascending=False)
        shaky = [(r.model, _metrics_of(r)) for _, r in models.iterrows()
                 if figure_verdict(_metrics_of(r), metric) != "stable"]
        if shaky:
            why = "; ".join(f"{model}: {instability(f, metric, 'tokens/s')}" for model, f in shaky)
            lines.append(f"At {at} loops and {key[1]:,} tokens under {format_bytes(key[0])} (engine {key[2]}), "
                         f"decode throughput at the largest batch is not stable enough to state ({why}).")
            continue
        said = ", ".join(f"{r.model} {r[metric]:,.1f} tokens/s at batch {int(r.max_batch)}"
                         for _, r in models.iterrows())
        lines.append(f"At {at} loops and {key[1]:,} tokens under {format_bytes(key[0])} (engine {key[2]}), "
                     f"decoding at the largest batch that fits: {said}.")
    return lines
