"""The report's figures: matplotlib drawn to inline SVG, lines per series with the spread as bars
(timed runs' p10-p90, else the repeats' range), failed points marked, small multiples (one panel per
engine, ...) on shared axes."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, never a window
# SVG text stays text (searchable, sharp); ids from a fixed salt, so a report is reproducible
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "melt-bench"})
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from markupsafe import Markup  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

FAILED = ("oom", "timeout", "error")


@dataclass
class Figure:
    caption: str
    svg: Markup  # inline <svg> markup


def groups(frame: pd.DataFrame, keys: list[str]):
    keys = [k for k in keys if k in frame]
    return frame.groupby(keys, dropna=False, sort=True) if keys else [((), frame)]


def label_of(keys: tuple | str) -> str:
    return ", ".join(str(k) for k in (keys if isinstance(keys, tuple) else (keys,)))


MARKERS = ("o", "s", "^", "D", "v", "P")


def svg(fig) -> Markup:
    """The figure as inline SVG: sharp at any zoom, its text searchable, the file still offline."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # Inline in HTML an SVG needs no namespace declarations or RDF metadata: their URIs are names,
    # never fetched, but a page that names no address is plainly offline.
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return Markup(text)


def line_plot(frame: pd.DataFrame, x: str, y: str, series: list[str], title: str, ylabel: str, scale=1.0,
               mark_failures: bool = True, panels: str | None = None, annotate: str | None = None) -> Figure:
    """`y` against `x`, a line per `series`; with `panels`, small multiples: one panel per value of
    that setting (e.g. the engine), side by side on shared axes."""
    values = list(frame[panels].dropna().unique()) if panels else [None]
    fig, axes = plt.subplots(1, len(values), figsize=(7.5 if len(values) == 1 else 5 * len(values), 4.2),
                             sharey=True, squeeze=False)
    for ax, value in zip(axes[0], values):
        part = frame if value is None else frame[frame[panels] == value]
        _draw_lines(ax, part, x, y, series, scale, mark_failures, annotate)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(title if value is None else f"{panels} {value}", fontsize=10)
    axes[0][0].set_ylabel(ylabel)
    if panels:
        fig.suptitle(title, fontsize=10)
    return Figure(title, svg(fig))


def _draw_lines(ax, frame: pd.DataFrame, x: str, y: str, series: list[str], scale: float,
                mark_failures: bool, annotate: str | None = None) -> None:
    ok = frame[frame.status == "ok"]
    for index, (key, part) in enumerate(groups(ok, series)):
        part = part.sort_values(x)
        # Hollow markers of distinct shapes and shrinking sizes: series that coincide stay visible.
        line, = ax.plot(part[x], part[y] / scale, marker=MARKERS[index % len(MARKERS)], fillstyle="none",
                        markersize=max(9 - 1.5 * (index % 4), 4), label=label_of(key))
        for xv, yv, note in zip(part[x], part[y], part[annotate]) if annotate else ():  # e.g. the batch
            if pd.notna(yv) and pd.notna(note):
                ax.annotate(f"{note:g}" if isinstance(note, float) else str(note), (xv, yv / scale),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
        low, high = f"{y}_repeat_min", f"{y}_repeat_max"
        if f"{y}_p10" in part and part[f"{y}_p10"].notna().any():  # timed runs: bars span their p10 to p90
            low, high = f"{y}_p10", f"{y}_p90"
        if low in part and part[low].notna().any():  # repeated points: bars span lowest to highest
            # (a rate's median of an even count is the upper middle: it can lie above the p90)
            spread = [(part[y] - part[low]).fillna(0).clip(lower=0) / scale,
                      (part[high] - part[y]).fillna(0).clip(lower=0) / scale]
            ax.errorbar(part[x], part[y] / scale, yerr=spread, fmt="none", ecolor=line.get_color(), capsize=3)
    failed = frame[frame.status.isin(FAILED)]
    if mark_failures and len(failed):
        top = (ok[y].max() / scale) if len(ok) else 1.0
        for status, part in failed.groupby("status"):
            ax.scatter(part[x], [top * 1.05] * len(part), marker="x", s=60, color="#b3261e")
            for value in part[x]:
                ax.annotate(status.upper(), (value, top * 1.05), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, color="#b3261e")
    ax.grid(alpha=0.3)
    integer_axis(ax, frame[x])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def integer_axis(ax, values: pd.Series) -> None:
    """Whole-number ticks (no 1.5 loops); one value gets a single tick with room either side."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    distinct = sorted(set(values.dropna()))
    if len(distinct) == 1:
        only = distinct[0]
        ax.set_xlim(only - 1, only + 1)
        ax.set_xticks([only])
