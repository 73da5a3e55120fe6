"""Noise shown as noise (issue 32 item 5): every timed figure carries its spread over the timed
runs and a verdict, and no ratio or finding is stated from an unstable point."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from test_report import latency_row, write_rows

from melt_bench.reporting.headlines import headlines
from melt_bench.reporting.plots import _draw_lines
from melt_bench.reporting.report import load_frame
from melt_bench.reporting.summary_tables import summaries_for
from melt_bench.running.stability import figure_verdict, spread_fields, stability_fields
from melt_bench.scenarios.latency import SUMMARY
from melt_bench.scenarios.measure_latency import RunTiming, summarise


def test_spread_and_verdict_follow_the_coefficient_of_variation():
    steady = spread_fields("t", [10.0, 10.2, 9.9, 10.1, 10.0])
    assert steady["t_min"] == 9.9 and steady["t_max"] == 10.2 and steady["t_p10"] < steady["t_p90"]
    assert stability_fields(steady, ("t",), 5)["timing_stability"] == "stable"
    shaky = spread_fields("t", [10.0, 30.0, 10.0, 11.0, 10.0])  # one run three times slower: CV ~ 60%
    verdict = stability_fields(shaky, ("t",), 5)
    assert verdict["timing_stability"] == "unstable" and verdict["unstable_figures"] == ["t"]
    one = spread_fields("t", [10.0])
    assert one["t_cv"] is None and stability_fields(one, ("t",), 1)["timing_stability"] == "unknown"


def test_summarise_gives_every_timed_figure_its_spread():
    timings = ((5.0, 0.0), (5.1, 0.1), (9.0, 2.0))
    runs = [RunTiming(prefill, [1.0, 1.0 + jitter], loops_run=[2, 2]) for prefill, jitter in timings]
    metrics = summarise(runs, batch=1)
    assert metrics["decode_ms_per_token_mean_min"] == 1.0 and metrics["decode_ms_per_token_mean_max"] == 2.0
    assert metrics["prefill_ms_cv"] > 0.10 and metrics["timing_stability"] == "unstable"
    assert "prefill_ms" in metrics["unstable_figures"]


def shaky(row, cv: float, load: tuple[float, float] = (1.9, 3.4)):
    mean = row.metrics["decode_ms_per_token_mean"]
    row.metrics.update(decode_ms_per_token_mean_cv=cv, decode_ms_per_token_mean_min=mean * (1 - cv),
                       decode_ms_per_token_mean_p10=mean * (1 - cv / 2), decode_ms_per_token_mean_p90=mean * (1 + cv),
                       decode_ms_per_token_mean_max=mean * (1 + 2 * cv), loadavg_1m_before=load[0],
                       loadavg_1m_after=load[1], cpu_count=2,
                       timing_stability="unstable" if cv > 0.10 else "stable")
    return row


def test_no_ratio_is_stated_from_an_unstable_point(tmp_path):
    rows = [shaky(latency_row("ouro-tiny", 4, 8.0), 0.35), shaky(latency_row("melt-tiny", 4, 2.0), 0.02),
            shaky(latency_row("ouro-tiny", 2, 4.0), 0.01), shaky(latency_row("melt-tiny", 2, 2.0), 0.03)]
    [table] = summaries_for(SUMMARY, rows)
    assert table.ratios[(4, "ouro-tiny/melt-tiny decode ms/token")] == "unstable"
    assert table.ratios[(2, "ouro-tiny/melt-tiny decode ms/token")] == "2.00x"
    assert "UNSTABLE" in " ".join(table.cells[(4, "ouro-tiny")]) and "UNSTABLE" in table.title
    lines = headlines(load_frame([write_rows(tmp_path / "lat.jsonl", rows)]))
    [said] = [line for line in lines if "decode time per token" in line]
    assert "At 4 loops" in said and "not stable enough" in said and "needs" not in said and "4.00x" not in said
    assert "ouro-tiny: CV 35%" in said and "load 1.9 -> 3.4 on 2 cores" in said and "melt-tiny:" not in said


def test_a_figure_that_is_not_timed_is_not_judged():
    assert figure_verdict({"peak_bytes": 10}, "peak_bytes") == "stable"
    assert figure_verdict({"x": 1.0, "x_cv": None}, "x") == "unknown"


def test_plots_draw_the_timed_runs_spread_as_error_bars():
    frame = pd.DataFrame({"loops": [1, 2], "status": ["ok", "ok"], "model": ["m", "m"], "y": [2.0, 3.0],
                          "y_p10": [1.5, 2.0], "y_p90": [2.5, 4.5]})
    fig, ax = plt.subplots()
    _draw_lines(ax, frame, "loops", "y", ["model"], 1.0, True)
    [bars] = [c for c in ax.collections if c.get_segments()]
    assert [tuple(seg[:, 1]) for seg in bars.get_segments()] == [(1.5, 2.5), (2.0, 4.5)]
    plt.close(fig)
