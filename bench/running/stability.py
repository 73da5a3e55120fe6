"""Whether a timed figure can be believed: its spread over the timed runs (min, p10, p90, max),
the coefficient of variation, and a verdict, "unstable" above 10% as pyperf warns; with the
machine's load average before and after the point. Summaries state ratios only between stable
points and say why otherwise. Torch-free: tables and the report read it too."""

from __future__ import annotations

import os
import statistics

UNSTABLE_CV = 0.10  # pyperf's threshold: a standard deviation above 10% of the mean


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread_fields(key: str, values: list[float]) -> dict:
    """`key`'s spread over the timed runs: _min, _p10, _p90, _max and _cv (None for one run)."""
    mean = statistics.fmean(values)
    cv = statistics.stdev(values) / abs(mean) if len(values) > 1 and mean else None
    return {f"{key}_min": min(values), f"{key}_p10": percentile(values, 10), f"{key}_p90": percentile(values, 90),
            f"{key}_max": max(values), f"{key}_cv": cv}


def stability_fields(metrics: dict, keys: tuple[str, ...], runs: int) -> dict:
    """The verdict over the figures `keys` (their _cv in `metrics`): stable, unstable (which
    figures, their CV), or unknown (one timed run: no spread to judge)."""
    cvs = {key: metrics.get(f"{key}_cv") for key in keys}
    if runs < 2 or any(cv is None for cv in cvs.values()):
        return {"timing_stability": "unknown", "timing_cv": None, "unstable_figures": [],
                "timing_stability_rule": f"one timed run: no spread to judge (CV > {UNSTABLE_CV:.0%} is unstable)"}
    unstable = [key for key, cv in cvs.items() if cv > UNSTABLE_CV]
    return {"timing_stability": "unstable" if unstable else "stable", "timing_cv": max(cvs.values()),
            "unstable_figures": unstable,
            "timing_stability_rule": f"coefficient of variation over {runs} timed runs; above {UNSTABLE_CV:.0%} "
                                     "is unstable (pyperf's rule)"}


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def figure_verdict(metrics: dict, key: str) -> str:
    """stable | unstable | unknown for one figure of a row: by its CV over the timed runs; a
    figure that is not timed (bytes, a batch size) is stable."""
    if f"{key}_cv" not in metrics:
        return "stable"
    cv = metrics[f"{key}_cv"]
    return "unknown" if cv is None else "unstable" if cv > UNSTABLE_CV else "stable"


def timing_note(metrics: dict, key: str) -> str:
    """' cv 3%', or ' cv 23% UNSTABLE', for a table cell; '' for a figure that is not timed."""
    cv = metrics.get(f"{key}_cv")
    if cv is None:
        return " (1 run)" if f"{key}_cv" in metrics else ""
    return f" cv {cv:.0%}" + (" UNSTABLE" if cv > UNSTABLE_CV else "")


def instability(metrics: dict, key: str, unit: str = "ms") -> str:
    """Why a row's `key` is not stated: its CV, spread over the timed runs and the load."""
    if metrics.get("timing_stability") == "unknown":
        return "one timed run, no spread to judge"
    cv, low, high = metrics.get(f"{key}_cv"), metrics.get(f"{key}_min"), metrics.get(f"{key}_max")
    said = [f"CV {cv:.0%}" if cv is not None else "CV unknown"]
    if low is not None and high is not None:
        said.append(f"{low:,.2f}-{high:,.2f} {unit}")
    before, after = metrics.get("loadavg_1m_before"), metrics.get("loadavg_1m_after")
    if before is not None and after is not None:
        said.append(f"load {before:.1f} -> {after:.1f} on {metrics.get('cpu_count', '?')} cores")
    return ", ".join(said)
