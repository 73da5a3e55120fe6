"""The HTML report: sections from generated results, escaping, comparison, and a real browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from melt_bench.cli import main
from melt_bench.reporting.report import build_report, write_report
from melt_bench.running.results import ResultRow, ResultsStore

GiB = 2**30
EVIL = "<script>alert(1)</script>"


def memory_row(model, loops, status="ok", seq=1024, batch=1, peak=None, meta=None):
    point = dict(command="memory", model=model, loops=loops, seq_len=seq, batch_size=batch, phase="decode",
                 new_tokens=8, dtype="bfloat16", device="cuda:0", weights=None, repeat=0)
    kv = (loops if model.startswith("ouro") else 1) * GiB // 4
    metrics = {} if status != "ok" else {
        "peak_bytes": peak or 3 * GiB + kv, "peak_source": "torch.cuda.max_memory_allocated", "kv_cache_bytes": kv,
        "kv_cache_bytes_predicted": kv, "weights_bytes": 3 * GiB, "activation_peak_bytes": 0}
    return ResultRow("memory", f"{model}-{loops}-{seq}-{batch}", point, status,
                     None if status == "ok" else "CUDA out of memory", metrics,
                     meta or {"host": "gpu-box", "git_commit": "abc123", "torch": "2.11",
                              "nvml": {"driver_version": "580", "devices": [{"name": "NVIDIA H100"}]}}, 1.0)


def write_rows(path: Path, rows) -> Path:
    store = ResultsStore(path)
    for row in rows:
        store.append(row)
    return path


def memory_file(tmp_path, name="mem.jsonl", models=("ouro-1.4b", "melt-1.4b")):
    rows = [memory_row(m, t) for m in models for t in (1, 2, 4, 8)]
    rows.append(memory_row("ouro-1.4b", 16, status="oom"))
    rows.append(memory_row("melt-1.4b", 16))
    rows += [memory_row(m, t, seq=4096) for m in models for t in (1, 4)]
    return write_rows(tmp_path / name, rows)


def test_memory_only_report_has_memory_sections_and_not_the_others(tmp_path):
    html = build_report([memory_file(tmp_path)])
    assert 'id="memory"' in html and 'id="memory-seq"' in html and 'id="kv"' in html and 'id="provenance"' in html
    for absent in ('id="latency"', 'id="capacity"', 'id="accuracy"', 'id="compare"'):
        assert absent not in html
    assert "At 8 loops and 1,024 tokens (batch 1), ouro-1.4b needs 1.54x melt-1.4b&#39;s peak memory" in html
    assert "runs out of memory from 16 loops" in html
    assert html.count("<svg") >= 3 and ">oom<" in html  # inline SVG: text stays text
    assert "NVIDIA H100" in html and "abc123" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html  # no network fetches


def test_memory_rows_that_name_no_peak_source_still_make_a_report(tmp_path):
    rows = [memory_row("ouro-1.4b", loops) for loops in (1, 2)]
    for row in rows:  # as a hand-written file (or the interrupt tests' rows) leaves it out
        del row.metrics["peak_source"]
    html = build_report([write_rows(tmp_path / "bare.jsonl", rows)])
    assert 'id="memory"' in html and "its source not recorded" in html


def test_every_string_from_results_is_escaped(tmp_path):
    rows = [memory_row(EVIL, 1, meta={"host": EVIL, "git_commit": "<b>x</b>"}), memory_row(EVIL, 2, status="oom")]
    rows[1].error = EVIL
    html = build_report([write_rows(tmp_path / "evil.jsonl", rows)])
    assert EVIL not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def latency_row(model, loops, decode_ms):
    point = dict(command="latency", model=model, loops=loops, seq_len=512, batch_size=1, phase="decode",
                 new_tokens=16, dtype="bfloat16", device="cuda:0", weights=None, repeat=0, warmup=1, timed_runs=3)
    metrics = {"prefill_ms": 10.0 * loops, "decode_ms_per_token_mean": decode_ms, "decode_ms_per_token_p50": decode_ms,
               "decode_ms_per_token_p90": decode_ms, "decode_tokens_per_s": 1000 / decode_ms,
               "e2e_tokens_per_s": 900 / decode_ms, "loops_executed_mean": loops}
    return ResultRow("latency", f"lat-{model}-{loops}", point, "ok", None, metrics, {"host": "h"}, 1.0)


def capacity_row(model, loops, best):
    point = dict(command="capacity", model=model, loops=loops, seq_len=4096, batch_size=0, phase="decode",
                 new_tokens=8, dtype="bfloat16", device="cuda:0", weights=None, repeat=0, memory_budget_bytes=40 * GiB)
    metrics = {"max_batch": best, "probes": [{"batch_size": best, "fits": True, "status": "ok", "peak_bytes": GiB}]}
    return ResultRow("capacity", f"cap-{model}-{loops}", point, "ok", None, metrics, {"host": "h"}, 1.0)


def serve_row(model, concurrency, tokens_per_s, tpot_ms, in_flight, cv=0.02, budget=80 * GiB):
    point = dict(command="serve", model=model, loops=4, seq_len=1024, batch_size=0, phase="decode", new_tokens=128,
                 dtype="bfloat16", device="cuda:0", weights=None, repeat=0, load="concurrency",
                 concurrency=concurrency, request_rate=None, num_requests=64, engine="compiled",
                 memory_budget_bytes=budget)
    requests = [{"request_id": i, "ttft_ms": 50.0 + i, "tpot_ms": tpot_ms + i / 10} for i in range(8)]
    metrics = {"slots": in_flight, "output_tokens_per_s": tokens_per_s, "output_tokens_per_s_cv": cv,
               "output_tokens_per_s_p10": tokens_per_s * 0.98, "output_tokens_per_s_p90": tokens_per_s * 0.99,
               "tpot_ms_p90": tpot_ms, "tpot_ms_p90_cv": cv, "ttft_ms_p90": 60.0, "requests_per_s": 1.0,
               "requests_running_max": in_flight, "completed_requests": 64, "requests": requests,
               "timing_stability": "stable" if cv <= 0.1 else "unstable", "loadavg_1m_before": 0.5,
               "loadavg_1m_after": 0.7, "cpu_count": 16, "output_tokens_per_s_min": tokens_per_s * 0.9,
               "output_tokens_per_s_max": tokens_per_s * 1.1, "peak_bytes": 70 * GiB,
               "kv_in_use_bytes_max": 40 * GiB, "kv_allocated_bytes": 50 * GiB}
    return ResultRow("serve", f"serve-{model}-{concurrency}-{budget}", point, "ok", None, metrics, {"host": "h"}, 1.0)


def serve_rows() -> list:
    return [serve_row("ouro-1.4b", 8, 300.0, 20.0, 8), serve_row("melt-1.4b", 8, 310.0, 21.0, 8),
            serve_row("ouro-1.4b", 128, 900.0, 60.0, 40), serve_row("melt-1.4b", 128, 1500.0, 45.0, 128),
            serve_row("ouro-1.4b", 32, 500.0, 30.0, 32, cv=0.3, budget=40 * GiB),
            serve_row("melt-1.4b", 32, 600.0, 25.0, 32, budget=40 * GiB)]


def test_the_serving_section_draws_the_pareto_and_says_what_the_budget_keeps_in_flight(tmp_path):
    """#34 item 3: throughput vs p90 TPOT across the load, TTFT/TPOT per request, and the
    first-screen sentence from stable points only."""
    html = build_report([write_rows(tmp_path / "serve.jsonl", serve_rows())])
    assert 'id="serve"' in html and "serving throughput vs p90 TPOT" in html and "TTFT and TPOT per request" in html
    assert ("At 80.00 GiB and 1,024-token prompts, 128 output tokens (4 loops, load c=128, engine compiled), "
            "melt-1.4b keeps 128 requests in flight to ouro-1.4b&#39;s 40, at 1,500.0 vs 900.0 tokens/s and p90 "
            "TPOT 45.0 vs 60.0 ms.") in html
    shaky = re.search(r"At 40.00 GiB[^<]*", html)[0]
    assert "not stable enough to state" in shaky and "ouro-1.4b: CV 30%" in shaky and "tokens/s at" not in shaky


def accuracy_row(model, loops, value, weights=None, kv=None):
    point = dict(command="accuracy", model=model, loops=loops, task="gsm8k", exit_mode="last", num_fewshot=5,
                 limit=None, batch_size=1, max_gen_toks=None, dtype="bfloat16", device="cuda:0", weights=weights,
                 data_dir=None, metric="exact_match", filter="strict-match")
    metrics = {"value": value, "stderr": 0.01, "n_samples": 100, "peak_bytes": (loops + 3) * GiB}
    if kv is not None:
        metrics["kv_bytes_per_token"] = kv
    return ResultRow("accuracy", f"acc-{model}-{loops}-{weights}", point, "ok", None, metrics, {"host": "h"}, 1.0)


def test_one_model_with_several_weights_is_several_series(tmp_path):
    from melt_bench.reporting.summary_tables import summaries_for
    from melt_bench.scenarios.accuracy import SUMMARY

    rows = [accuracy_row("ouro-tiny", 4, 0.9, "/w/teacher", kv=8192),
            accuracy_row("melt-tiny", 4, 0.0, "/w/melt-fresh", kv=2048),
            accuracy_row("melt-tiny", 4, 0.8, "/w/melt-converted/model", kv=2048)]
    html = build_report([write_rows(tmp_path / "proof.jsonl", rows)])
    assert "melt-tiny @ w/melt-fresh" in html and "melt-tiny @ melt-converted/model" in html
    assert "accuracy vs KV bytes per token" in html and "8.00 KiB" in html
    [table] = [summary.wide() for summary in summaries_for(SUMMARY, rows)]
    headers = [str(column.header) for column in table.columns]
    assert "melt-tiny @ melt-converted/model" in headers and "melt-tiny @ w/melt-fresh KV/token" in headers
    cells = {str(column.header): list(column.cells) for column in table.columns}
    assert cells["melt-tiny @ melt-converted/model"][0].startswith("0.8000")


def full_files(tmp_path):
    lat = write_rows(tmp_path / "lat.jsonl", [latency_row(m, t, t * (20 if m[0] == "o" else 25))
                                             for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)])
    cap = write_rows(tmp_path / "cap.jsonl", [capacity_row("ouro-1.4b", 4, 5), capacity_row("melt-1.4b", 4, 21)])
    acc = write_rows(tmp_path / "acc.jsonl", [accuracy_row(m, t, v) for m, t, v in
                                             (("ouro-1.4b", 1, 0.4), ("ouro-1.4b", 4, 0.78), ("melt-1.4b", 4, 0.74))])
    return [memory_file(tmp_path), lat, cap, acc]


def test_full_report_and_comparison(tmp_path):
    files = full_files(tmp_path)
    other = memory_file(tmp_path / "old", models=("ouro-1.4b",)) if (tmp_path / "old").mkdir() is None else None
    html = build_report(files, compare=[other])
    for section in ("memory", "kv", "latency", "capacity", "accuracy", "compare", "provenance"):
        assert f'id="{section}"' in html
    assert "decode time per token" in html and "this/other" in html
    assert html.count("<table") >= 6


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page: Path, shot: Path) -> str:
    """Open `page` in headless Chromium, save a screenshot, return its log (console messages included)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={shot.parent / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2000", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    return result.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


def non_white_fraction(png: Path) -> float:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return float((pixels.min(axis=-1) < 0.95).mean())


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (.ci/run installs Debian's chromium; "
                                                 "it could not be installed on this machine)")
def test_report_renders_in_a_real_browser(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    assert console_errors(render(broken, tmp_path / "broken.png")), "the console check must catch a broken page"
    page = write_report(people_files(tmp_path), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    log = render(page, shot)
    assert shot.is_file() and not console_errors(log), console_errors(log)
    assert non_white_fraction(shot) > 0.03  # not a blank page
    shutil.copy(shot, Path(__file__).parent.parent / "reports" / "last-test-screenshot.png")
    # #25 item 5: what the browser built, read from its DOM at 1280 px
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                          f"--user-data-dir={tmp_path / 'dom-profile'}", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", dom)
    assert headers and not [h for h in headers if "_" in h], headers  # words, not field names
    verdicts = re.findall(r'<p class="note">([^<]*(?:falls short|matches it|beats it|is undecided)[^<]*)</p>',
                          dom)
    assert verdicts and len(verdicts) == len(set(verdicts))  # no verdict twice
    assert "&gt;= 64" in dom  # the search that stopped at --max-batch
    serving = dom[dom.index('id="serve"'):]  # #34: the serving section, its two figures and its table
    assert serving.count("<svg") >= 2 and "TPOT p90 ms" in serving and "keeps 128 requests in flight" in dom
    summary = dom[dom.index('id="summary"'):dom.index("<section")]
    assert summary.count("<figure") >= 2 and "KV cache per token" in summary
    # #32 item 7: laid out at 1280 px, no header is narrower than its longest word ("l o o p s")
    # and no number wraps ("64.00 / MiB"); a table wider than the page scrolls in its box
    layout = json.loads(re.search(r'<pre id="layout">([^<]*)</pre>', dump_dom(with_layout_probe(page), tmp_path))[1])
    assert layout["headers"] > 20 and layout["numbers"] > 100, layout
    assert not layout["narrow_headers"] and not layout["wrapped_numbers"], layout
    assert layout["page_overflow"] <= 0, layout


# Run in the page: each header's content width against its widest word (canvas, the header's
# font), and each number cell's count of lines; what it found goes into <pre id="layout">.
LAYOUT_PROBE = """<script>
(function () {
  var canvas = document.createElement("canvas").getContext("2d"), narrow = [], wrapped = [], numbers = 0;
  var headers = document.querySelectorAll("th");
  headers.forEach(function (th) {
    var style = getComputedStyle(th);
    canvas.font = style.fontWeight + " " + style.fontSize + " " + style.fontFamily;
    var room = th.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    th.textContent.split(/\\s+/).forEach(function (word) {
      if (word && canvas.measureText(word).width > room + 1) narrow.push(word + " in " + th.textContent);
    });
  });
  document.querySelectorAll("td.num").forEach(function (td) {
    numbers += 1;
    var range = document.createRange();
    range.selectNodeContents(td);
    var tops = new Set(Array.prototype.map.call(range.getClientRects(), function (r) { return Math.round(r.top); }));
    if (tops.size > 1) wrapped.push(td.textContent);
  });
  var out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({headers: headers.length, numbers: numbers, narrow_headers: narrow,
    wrapped_numbers: wrapped, page_overflow: document.documentElement.scrollWidth - window.innerWidth});
  document.body.appendChild(out);
})();
</script>"""


def with_layout_probe(page: Path) -> Path:
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    return probed


def dump_dom(page: Path, tmp_path: Path) -> str:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                           f"--user-data-dir={tmp_path / 'probe-profile'}", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120).stdout


def test_report_command_and_sweep_flag(tmp_path, monkeypatch, capsys):
    files = full_files(tmp_path)
    out = tmp_path / "r.html"
    assert main(["report", *map(str, files), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\n")
    assert main(["report", str(bad)]) == 2
    assert bad.read_text() == "garbage\n"
    monkeypatch.chdir(tmp_path)
    assert main(["memory", "--loops", "1", "--models", "ouro-tiny", "--seq-lens", "16", "--batch-sizes", "1",
                 "--new-tokens", "2", "--device", "cpu", "--dtype", "float32", "--no-progress",
                 "--out", "results/m.jsonl", "--report"]) == 0
    assert (tmp_path / "reports" / "m.html").is_file()


@pytest.mark.parametrize("loops,ticks,limits", [([1], [1], (0, 2)), ([4], [4], (3, 5))])
def test_a_single_loop_count_gets_one_whole_tick(loops, ticks, limits):
    import matplotlib.pyplot as plt
    import pandas as pd

    from melt_bench.reporting.report import integer_axis

    fig, ax = plt.subplots()
    ax.plot(loops, [1.0])
    integer_axis(ax, pd.Series(loops))
    assert list(ax.get_xticks()) == ticks and ax.get_xlim() == limits
    plt.close(fig)


def test_loop_axes_tick_whole_numbers_only():
    import matplotlib.pyplot as plt
    import pandas as pd

    from melt_bench.reporting.report import integer_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1.0, 2.0, 3.0])
    integer_axis(ax, pd.Series([1, 2, 3]))
    fig.canvas.draw()
    visible = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert visible and all(float(t).is_integer() for t in visible)
    plt.close(fig)


def test_key_ratios_compare_one_engine_at_a_time(tmp_path):
    """Eager and compiled rows in one report: one ratio per engine, each naming it, never the
    mean of the two (8.16 ms was once eager 13.68 and compiled 2.64 averaged)."""
    def engine_row(model, ms, engine):
        row = latency_row(model, 2, ms)
        row.point = {**row.point, "engine": engine}
        row.point_id += engine
        return row

    eager = write_rows(tmp_path / "eager.jsonl", [engine_row("ouro-tiny", 13.68, "eager"),
                                                  engine_row("melt-tiny", 19.0, "eager")])
    compiled = write_rows(tmp_path / "compiled.jsonl", [engine_row("ouro-tiny", 2.64, "compiled"),
                                                        engine_row("melt-tiny", 20.86, "compiled")])
    html = build_report([eager, compiled])
    assert "(batch 1; engine eager), ouro-tiny needs 0.72x melt-tiny&#39;s decode time per token (13.68 ms vs " \
           "19.00 ms)" in html
    assert "(batch 1; engine compiled), ouro-tiny needs 0.13x melt-tiny&#39;s decode time per token (2.64 ms vs " \
           "20.86 ms)" in html
    assert "8.16 ms" not in html


def test_every_point_setting_is_an_axis_a_label_or_compared_like_for_like(tmp_path):
    """A setting the key ratios did not know once crashed the report (two latency runs differing
    only in --repeats); now each differing setting is named, never mixed."""
    from dataclasses import fields

    from melt_bench.reporting.headlines import LIKE_FOR_LIKE
    from melt_bench.scenarios.capacity import CapacityPoint
    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.memory import MemoryPoint

    placed = {"command", "model", "loops", "seq_len", "batch_size", "repeat", "weights", "kv_policy", "decode_reads",
              "kv_quant"}
    settings = {f.name for point_type in (MemoryPoint, LatencyPoint, CapacityPoint) for f in fields(point_type)}
    assert settings - placed == set(LIKE_FOR_LIKE)

    def runs(model, ms, timed_runs):
        row = latency_row(model, 2, ms)
        row.point = {**row.point, "timed_runs": timed_runs}
        row.point_id += str(timed_runs)
        return row

    path = write_rows(tmp_path / "twice.jsonl", [runs("ouro-tiny", 10.0, 3), runs("melt-tiny", 20.0, 3),
                                                 runs("ouro-tiny", 12.0, 5), runs("melt-tiny", 24.0, 5)])
    html = build_report([path])
    assert "timed runs 3), ouro-tiny needs 0.50x" in html and "timed runs 5), ouro-tiny needs 0.50x" in html


@pytest.mark.parametrize("width,layout", [(260, "wide"), (258, "long"), (106, "long"), (105, "records"),
                                          (36, "records")])
def test_terminal_tables_fit_the_width_and_never_cut_a_header(width, layout):
    """#25 item 4: a table wider than the terminal switches to a row per (loops, model), then to
    named figures; no line is longer than the terminal and no header is cut (no ellipsis)."""
    import io

    from rich.console import Console

    from melt_bench.reporting.summary_tables import print_fitted
    from melt_bench.scenarios.latency import SUMMARY

    rows = [latency_row(m, t, t * (20 if m[0] == "o" else 25)) for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)]
    console = Console(width=width, file=io.StringIO(), color_system=None)
    print_fitted(SUMMARY, rows, console)
    text = console.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    words = " ".join(text.split())
    for header in ("prefill", "decode/token", "roofline/token", "MBU", "tok/s"):
        assert header in words, header  # whole, as a column header or a named figure
    assert "1.25x" in words or "0.80x" in words  # the Ouro/MELT ratio survives every layout
    # the wide table of two models needs 259 columns here, the long one 106
    chosen = "wide" if "ouro-1.4b decode/token" in words else "long" if "│ ouro-1.4b" in text else "records"
    assert chosen == layout, text


def test_report_tables_are_for_people(tmp_path):
    """#25 item 3: headers in words with units (the field name on hover), an empty cell an em dash
    saying why, a search stopped at --max-batch a lower bound, one labelled verdict block per
    (task, metric, filter), and a comparison with nothing in common saying what keeps them apart."""
    files = people_files(tmp_path)
    html = build_report(files)
    assert '<th title="decode_ms_per_token_mean">decode ms/token (median)</th>' in html
    assert "decode_ms_per_token_mean</th>" not in html  # no raw field name as a header
    assert "<td class=\"missing\" title=\"energy: NVML&#39;s energy counter" in html and "None" not in html
    assert "<td class=\"num\">&gt;= 64</td>" in html
    blocks = html.split("At equal KV memory | ")[1:]
    assert len(blocks) == 2 and {block.split(":")[0] for block in blocks} == {
        "gsm8k, exact_match, strict-match", "gsm8k, exact_match, flexible-extract"}
    assert "exact_match (strict-match) 0.400" in html and "exact_match (flexible-extract) 0.400" in html
    summary = html[html.index('id="summary"'):html.index("<section")]  # accuracy at equal memory up front
    assert "At equal KV memory (gsm8k, exact_match, flexible-extract): melt-tiny at 1 loop" in summary
    other = write_rows(tmp_path / "other.jsonl", [latency_row("ouro-1.4b", 8, 30.0)])
    html = build_report([files[1]], compare=[other])
    assert "The two runs share no points: loops 1, 4 here, 8 there." in html


def test_byte_axes_take_the_unit_of_their_data():
    """The KV plot once drew KiB values on a GiB axis, its ticks running together."""
    import pandas as pd

    from melt_bench.units import byte_scale

    assert byte_scale(pd.Series([2048.0, 8192.0])) == (1024.0, "KiB")
    assert byte_scale(pd.Series([3 * 2**20])) == (2.0**20, "MiB")
    assert byte_scale(pd.Series([5 * 2**30, None])) == (2.0**30, "GiB")
    assert byte_scale(pd.Series([100])) == (1.0, "B")


def test_the_first_screen_is_a_summary_with_the_headline_figures(tmp_path):
    """#25 item 1: before any section, the key sentences (each naming what it compares, KV bytes
    per token among them) and the headline figures: memory vs loops, decode time per token."""
    mem = [memory_row(m, t) for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)]
    for row in mem:
        row.metrics["kv_cache_tokens"] = 1024 + 8
    lat = [latency_row(m, t, t * (20 if m[0] == "o" else 25)) for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)]
    html = build_report([write_rows(tmp_path / "mem.jsonl", mem), write_rows(tmp_path / "lat.jsonl", lat)])
    summary = html[html.index('id="summary"'):html.index("<section")]
    assert "KV cache per token at 4 loops: ouro-1.4b 1,016.06 KiB, melt-1.4b 254.02 KiB" in summary
    assert "At 4 loops and 1,024 tokens (batch 1), ouro-1.4b needs" in summary
    captions = [part.split("</figcaption>")[0] for part in summary.split("<figcaption>")[1:]]
    assert [c.split(" |")[0] for c in captions] == ["peak memory vs loops", "decode latency per token"]


def test_engines_are_panels_of_one_figure_with_searchable_text(tmp_path):
    """#25 item 2: eager and compiled side by side on shared axes (small multiples), drawn as
    inline SVG whose text is text (a browser can search it), the file still offline."""
    rows = []
    for engine in ("eager", "compiled"):
        for row in (latency_row(m, t, t * (20 if m[0] == "o" else 25)) for m in ("ouro-1.4b", "melt-1.4b")
                    for t in (1, 4)):
            row.point["engine"], row.point_id = engine, f"{row.point_id}-{engine}"
            rows.append(row)
    html = build_report([write_rows(tmp_path / "lat.jsonl", rows)])
    latency = html[html.index('id="latency"'):]
    decode = [f for f in latency.split("<figure")[1:] if "<figcaption>decode latency per token" in f]
    assert len(decode) == 1  # one figure for both engines
    assert "engine eager" in decode[0] and "engine compiled" in decode[0] and "<svg" in decode[0]
    assert "<text" in decode[0] and "ouro-1.4b, 512" in decode[0]  # legend text as text, not paths


def people_files(tmp_path) -> list[Path]:
    """Memory, latency on two engines, capacity with a search stopped at its limit, accuracy with
    two lm-eval filters: what a report for people must show well."""
    mem = [memory_row(m, t) for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)]
    for row in mem:
        row.metrics["kv_cache_tokens"] = 1024 + 8
    lat = [latency_row(m, t, t * (20 if m[0] == "o" else 25)) for m in ("ouro-1.4b", "melt-1.4b") for t in (1, 4)]
    lat[0].metrics["energy_decode_j_per_token"] = 0.5  # the others have none: an em dash with the reason
    limited = capacity_row("ouro-1.4b", 4, 64)
    limited.metrics["hit_batch_limit"] = True
    acc = [accuracy_row(m, t, v, kv=8192 if m[0] == "o" else 2048) for m, v in (("ouro-tiny", 0.5), ("melt-tiny", 0.4))
           for t in (1, 4)]
    shared = accuracy_row("ouro-tiny", 4, 0.3, kv=2048)  # a training-free policy at MELT's KV memory
    for row in [*acc, shared]:  # checkpoints' scores (random weights get no verdict)
        row.metrics["weights_source"] = "local"
    shared.point["kv_policy"], shared.metrics["kv_policy"], shared.point_id = "last-loop", "last-loop", "acc-last"
    acc.append(shared)
    flexible = [ResultRow(r.kind, r.point_id + "-f", {**r.point, "filter": "flexible-extract"}, r.status, r.error,
                          dict(r.metrics), r.meta, r.wall_s) for r in acc]
    compiled = [ResultRow(r.kind, r.point_id + "-c", {**r.point, "engine": "compiled"}, r.status, r.error,
                          dict(r.metrics), r.meta, r.wall_s) for r in lat]
    return [write_rows(tmp_path / "mem.jsonl", mem), write_rows(tmp_path / "lat.jsonl", lat + compiled),
            write_rows(tmp_path / "cap.jsonl", [limited]), write_rows(tmp_path / "acc.jsonl", acc + flexible),
            write_rows(tmp_path / "serve.jsonl", serve_rows())]


def test_tokens_per_second_at_the_budget_is_drawn_and_said(tmp_path):
    """#26 item 3: per budget, length and engine, tokens/s at the largest batch vs loops, each
    point's batch written by it, and one sentence per comparison at the largest loop count."""
    rows = []
    for model, batches, rate in (("ouro-1.4b", {1: 40, 4: 10}, 100.0), ("melt-1.4b", {1: 48, 4: 44}, 90.0)):
        for loops, batch in batches.items():
            row = capacity_row(model, loops, batch)
            row.metrics.update(decode_tokens_per_s_at_max_batch=rate * batch / loops, throughput_engine="compiled",
                               decode_ms_per_step_at_max_batch=1000 * loops / rate, decode_tokens_per_s_at_batch_1=rate)
            rows.append(row)
    html = build_report([write_rows(tmp_path / "cap.jsonl", rows)])
    assert "decode tokens/s at the budget vs loops | budget 40.00 GiB, cuda:0, 4,096 tokens, engine compiled" in html
    figure = html.split("decode tokens/s at the budget vs loops")[1]
    assert ">44<" in figure and ">10<" in figure  # the batches, written by their points (SVG text)
    assert ("At 4 loops and 4,096 tokens under 40.00 GiB (engine compiled), decoding at the largest batch that "
            "fits: melt-1.4b 990.0 tokens/s at batch 44, ouro-1.4b 250.0 tokens/s at batch 10.") in html
    assert '<th title="decode_tokens_per_s_at_max_batch">decode tokens/s at largest batch</th>' in html


def test_a_rate_whose_median_lies_above_its_p90_still_draws(tmp_path):
    """With two timed runs a rate's median is the higher run, above the interpolated p90: the
    error bar ends at the point instead of going negative (matplotlib raised on it)."""
    rows = []
    for loops in (1, 2):
        row = capacity_row("ouro-1.4b", loops, 8)
        row.metrics.update(decode_tokens_per_s_at_max_batch=200.0 / loops, throughput_engine="eager",
                           decode_tokens_per_s_at_max_batch_p10=180.0 / loops,
                           decode_tokens_per_s_at_max_batch_p90=198.0 / loops)
        rows.append(row)
    html = build_report([write_rows(tmp_path / "cap.jsonl", rows)])
    assert "decode tokens/s at the budget vs loops" in html
