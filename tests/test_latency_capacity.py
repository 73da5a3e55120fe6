"""Latency and capacity: structure and invariants, never absolute speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.running.results import ResultsStore, load_results
from melt_bench.scenarios import measure_capacity
from melt_bench.scenarios.capacity import CapacityPoint, parse_bytes
from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.measure_capacity import Probe, find_max_batch, probe_fits, throughput_at_budget
from melt_bench.scenarios.measure_latency import RunTiming, measure_latency_point, percentile, summarise

SMALL = ["--models", "ouro-tiny,melt-tiny", "--seq-lens", "32", "--new-tokens", "4", "--device", "cpu",
         "--dtype", "float32", "--no-progress"]


def latency_point(**overrides):
    fields = dict(command="latency", model="melt-tiny", loops=4, seq_len=32, batch_size=2, phase="decode",
                  new_tokens=6, dtype="float32", device="cpu", warmup=1, timed_runs=3)
    return LatencyPoint(**{**fields, **overrides})


def test_percentiles_and_summary_invariants():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5
    runs = [RunTiming(10.0, [1.0, 2.0, 3.0, 10.0], [4] * 4), RunTiming(12.0, [1.0, 1.0, 1.0, 1.0], [4] * 4)]
    m = summarise(runs, batch=3)
    # an even count: the lower middle of each time (a value some run measured), and the rate of
    # the same run (3 sequences x 1000 / 1.0 ms), never the mean of the middles
    assert m["tokens_generated_per_run"] == 12 and m["ttft_ms"] == m["prefill_ms"] == 10.0
    assert m["decode_ms_per_token_mean"] == 1.0 and m["decode_tokens_per_s"] == 3 * 1000 / 1.0
    assert m["decode_ms_per_token_mean_min"] == 1.0 and m["decode_ms_per_token_mean_max"] == 4.0
    assert m["decode_tokens_per_s_max"] == 3 * 4 / (4 / 1000)
    assert m["loops_executed_mean"] == 4


@pytest.mark.parametrize("static_cache", [False, True])
def test_latency_point_measures_positive_ordered_times(static_cache):
    row = measure_latency_point(latency_point(static_cache=static_cache))
    m = row["metrics"]
    assert row["status"] == "ok", row["error"]
    for key in ("prefill_ms", "decode_ms_per_token_mean", "decode_tokens_per_s", "e2e_tokens_per_s"):
        assert 0 < m[f"{key}_min"] <= m[key] <= m[f"{key}_max"]
    assert m["decode_ms_per_token_p50"] <= m["decode_ms_per_token_p90"]
    assert m["e2e_tokens_per_s"] < m["decode_tokens_per_s"]  # the prefill counts in e2e
    assert m["tokens_generated_per_run"] == 2 * 6 and m["loops_executed_mean"] == 4
    assert m["timer"] == "perf_counter_ns" and m["first_run_s"] > 0


@pytest.mark.parametrize("model", ["ouro-tiny", "melt-tiny"])
def test_early_exit_loop_count_lies_in_range(model):
    m = measure_latency_point(latency_point(model=model, early_exit=0.5))["metrics"]
    assert 1 <= m["loops_executed_mean"] <= 4
    assert 1 <= m["exit_loop_mean_per_sequence"] <= m["loops_executed_mean"]


def test_latency_command_end_to_end(tmp_path):
    out = tmp_path / "lat.jsonl"
    assert main(["latency", "--loops", "1,3", "--batch-sizes", "1", "--warmup", "1", "--repeats", "2",
                 "--early-exit", "threshold:0.9", "--engine", "forward", "--static-cache", "--out", str(out),
                 *SMALL]) == 0
    frame = load_results(out)
    assert len(frame) == 4 and set(frame.status) == {"ok"} and set(frame.kind) == {"latency"}
    assert (frame.early_exit == 0.9).all() and frame.static_cache.all() and (frame.timed_runs == 2).all()
    assert (frame.loops_executed_mean <= frame.loops).all()
    # #32: a CPU child takes one intra-op thread unless --threads says otherwise, and every timed
    # figure carries its spread over the timed runs, its verdict and the machine's load
    assert (frame.torch_num_threads == 1).all() and frame.threads.isna().all()  # ids as before #32
    for key in ("prefill_ms", "decode_ms_per_token_mean"):
        assert (frame[f"{key}_min"] <= frame[f"{key}_p10"]).all() and (frame[f"{key}_p90"] <= frame[f"{key}_max"]).all()
        assert frame[f"{key}_cv"].notna().all()
    assert set(frame.timing_stability) <= {"stable", "unstable"} and frame.loadavg_1m_after.notna().all()


def test_latency_threads_flag_sets_the_childs_threads(tmp_path):
    out = tmp_path / "lat.jsonl"
    assert main(["latency", "--loops", "1", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--threads", "2",
                 "--out", str(out), *SMALL]) == 0
    rows = ResultsStore(out).read()
    assert len(rows) == 2  # ouro and melt
    for row in rows:
        assert row.metrics["torch_num_threads"] == 2 and row.point["threads"] == 2
        assert row.metrics["timing_stability"] == "unknown"  # one timed run: no spread to judge


@pytest.mark.parametrize("args,needle", [(["--early-exit", "sometimes"], "--early-exit"),
                                         (["--early-exit", "threshold:2"], "--early-exit"),
                                         (["--repeats", "0"], "--repeats")])
def test_latency_bad_input(args, needle, capsys):
    err = one_line_error(["latency", *args, *SMALL], capsys)
    assert needle in err


def fake_allocator(budget: int, base: int, per_sequence: int):
    """A probe whose peak is base + batch * per_sequence; it OOMs past the budget."""
    calls = []

    def probe(batch: int) -> Probe:
        calls.append(batch)
        peak = base + batch * per_sequence
        return probe_fits({"status": "ok" if peak <= budget else "oom", "metrics": {"peak_bytes": peak},
                           "batch_size": batch}, budget)
    return probe, calls


@pytest.mark.parametrize("start", [1, 3, 37, 100, 5000])
@pytest.mark.parametrize("budget", [1_000, 10_000, 123_457])
def test_capacity_search_finds_the_exact_largest_batch(start, budget):
    probe, calls = fake_allocator(budget, base=500, per_sequence=97)
    result = find_max_batch(probe, start, limit=4096)
    expected = max(0, (budget - 500) // 97)
    assert result.max_batch == expected
    assert 500 + result.max_batch * 97 <= budget < 500 + (result.max_batch + 1) * 97
    assert len(calls) == len(set(calls)) <= 30  # terminates, no batch probed twice
    assert all(p.fits == (500 + p.batch_size * 97 <= budget) for p in result.probes)


def test_capacity_search_stops_at_the_limit_and_at_zero():
    probe, _ = fake_allocator(10**12, base=0, per_sequence=1)
    result = find_max_batch(probe, 1, limit=64)
    assert result.max_batch == 64 and result.hit_limit
    probe, calls = fake_allocator(100, base=200, per_sequence=1)
    result = find_max_batch(probe, 16, limit=64)
    assert result.max_batch == 0 and 1 in calls


def test_probe_fits_needs_ok_and_peak_within_budget():
    assert probe_fits({"status": "ok", "metrics": {"peak_bytes": 10}, "batch_size": 2}, 10).fits
    assert not probe_fits({"status": "ok", "metrics": {"peak_bytes": 11}, "batch_size": 2}, 10).fits
    assert not probe_fits({"status": "oom", "metrics": {"peak_bytes": 5}, "batch_size": 2}, 10).fits


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512") == 512 and parse_bytes("64 MiB") == 64 * 2**20
    for bad in ("lots", "-1GiB", "0.1B", "80 GiBs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_capacity_command_on_cpu(tmp_path):
    out = tmp_path / "cap.jsonl"
    # small enough that most searches stop at --max-batch and Ouro's at 8 loops searches (5 probes)
    assert main(["capacity", "--budget", "48MiB", "--loops", "1,8", "--max-batch", "16", "--out", str(out),
                 "--models", "ouro-tiny,melt-tiny", "--seq-lens", "256", "--new-tokens", "4", "--device", "cpu",
                 "--dtype", "float32", "--no-progress", "--timed-runs", "0"]) == 0
    frame = load_results(out)
    assert set(frame.status) == {"ok"} and (frame.batch_size == 0).all()
    assert (frame.memory_budget_bytes == 48 * 2**20).all()
    for probes, best in zip(frame.probes, frame.max_batch):
        assert all(p["peak_bytes"] <= 48 * 2**20 for p in probes if p["fits"])
        assert any(p["fits"] and p["batch_size"] == best for p in probes) or best == 0
    cap = frame.set_index(["model", "loops"]).max_batch
    assert cap["ouro-tiny", 8] < cap["ouro-tiny", 1]
    assert "throughput_engine" not in frame  # --timed-runs 0: the batch only, as before (same point ids)


def test_capacity_measures_decode_throughput_at_the_largest_batch_and_at_batch_1(tmp_path):
    """#26: what the largest batch is worth, measured by the latency machinery at it and at
    batch 1, each in its own child; a budget no batch fits says so."""
    out = tmp_path / "cap.jsonl"
    assert main(["capacity", "--budget", "40MiB", "--loops", "2", "--max-batch", "16", "--models", "ouro-tiny",
                 "--seq-lens", "64", "--new-tokens", "4", "--device", "cpu", "--dtype", "float32", "--no-progress",
                 "--timed-runs", "2", "--warmup", "0", "--out", str(out)]) == 0
    frame = load_results(out)
    assert (frame.max_batch >= 2).all(), frame.max_batch
    assert (frame.throughput_engine == "eager").all() and frame.throughput_source.str.contains("2 timed runs").all()
    for name in ("decode_tokens_per_s", "decode_ms_per_step"):
        assert (frame[f"{name}_at_max_batch"] > 0).all() and (frame[f"{name}_at_batch_1"] > 0).all()
        assert frame[f"{name}_at_max_batch_cv"].notna().all() and frame[f"{name}_at_batch_1_p90"].notna().all()
    assert (frame.torch_num_threads == 1).all() and frame.timing_stability.isin(["stable", "unstable"]).all()
    # tokens/s counts every sequence: one step's tokens (the batch) over its measured time, from one run
    measured = frame.decode_tokens_per_s_at_max_batch * frame.decode_ms_per_step_at_max_batch / 1000
    assert (abs(measured - frame.max_batch) < 1e-6 * frame.max_batch).all()
    for peaks in frame.timed_run_peak_bytes_at_max_batch:  # each timed run's own peak, beside its figures
        assert len(peaks) == 2 and all(peak > 0 for peak in peaks)
    assert main(["capacity", "--budget", "1MiB", "--loops", "1", "--models", "ouro-tiny", "--seq-lens", "64",
                 "--new-tokens", "4", "--device", "cpu", "--dtype", "float32", "--no-progress", "--out",
                 str(tmp_path / "none.jsonl")]) == 1  # a budget nothing fits anywhere measured nothing (exit 1)
    [row] = ResultsStore(tmp_path / "none.jsonl").read()
    assert row.metrics["max_batch"] == 0 and "no batch fits" in row.metrics["throughput_note"]
    assert "decode_tokens_per_s_at_max_batch" not in row.metrics


def test_capacity_budget_errors(capsys):
    assert main(["capacity", "--budget", "auto", *SMALL]) == 2
    assert "--budget auto needs a CUDA device" in capsys.readouterr().err
    assert main(["capacity", "--budget", "lots", *SMALL]) == 2
    assert "--budget" in capsys.readouterr().err


def test_engines_agree_on_the_output_digest(tmp_path):
    """eager (the step function) and forward (the model's own forward) decode the same tokens."""
    rows = {}
    for engine in ("eager", "forward"):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["latency", "--loops", "2", "--batch-sizes", "2", "--warmup", "0", "--repeats", "2",
                     "--engine", engine, "--out", str(out), *SMALL]) == 0
        rows[engine] = load_results(out).set_index("model")
    for model in ("ouro-tiny", "melt-tiny"):
        eager, forward = rows["eager"].loc[model], rows["forward"].loc[model]
        assert eager.engine == "eager" and forward.engine == "forward"
        assert eager.output_digest == forward.output_digest and len(eager.output_digest) == 64
        assert eager.output_runs_identical and len(eager.output_token_ids) == 2  # batch 2
        assert len(eager.output_token_ids[0]) == 1 + 4  # prefill's pick + 4 new tokens


@pytest.mark.parametrize("args,needle", [(["--engine", "turbo"], "--engine"),
                                         (["--static-cache"], "--static-cache"),
                                         (["--prefill-chunk", "0"], "--prefill-chunk")])
def test_latency_engine_options_bad_input(args, needle, capsys, tmp_path):
    out = tmp_path / "never.jsonl"
    err = one_line_error(["latency", *args, "--out", str(out), *SMALL], capsys)
    assert needle in err and not out.exists()


def test_memory_prefill_chunk_is_recorded_and_lowers_ouros_activation_prediction(tmp_path):
    out = tmp_path / "mem.jsonl"
    assert main(["memory", "--loops", "2", "--models", "ouro-tiny,melt-tiny", "--seq-lens", "64", "--batch-sizes", "1",
                 "--new-tokens", "2", "--device", "cpu", "--repeats", "1", "--no-progress", "--prefill-chunk", "16",
                 "--out", str(out)]) == 0
    frame = load_results(out).set_index("model")
    ouro, melt = frame.loc["ouro-tiny"], frame.loc["melt-tiny"]
    assert ouro.prefill_chunk == 16 and ouro.prefill_chunk_tokens == 16
    assert melt.prefill_chunk_tokens == 64  # MELT chunks by its own chunk_size (500 > 64 tokens)
    assert ouro.kv_cache_bytes == ouro.kv_cache_bytes_predicted
    assert ouro.predicted_peak_bytes == ouro.predicted_weights_bytes + ouro.kv_cache_bytes_predicted \
        + ouro.predicted_activation_peak_bytes


def _capacity_point(**overrides) -> CapacityPoint:
    fields = dict(command="capacity", model="ouro-tiny", loops=4, seq_len=2048, batch_size=0, phase="decode",
                  new_tokens=4, dtype="float32", device="cpu", warmup=1, timed_runs=3,
                  memory_budget_bytes=40 * 2**20)
    return CapacityPoint(**{**fields, **overrides})


def test_capacity_times_batch_1_when_it_is_the_largest_and_names_runs_over_the_budget(monkeypatch):
    """#31 item 3: a largest batch of 1 is measured (once), not copied from a measurement never
    made; a timed run that peaked above the budget is named in the row."""
    timed = []

    def fake_timed_decode(point, batch, timeout_s, gpu):
        timed.append(batch)
        return {"decode_tokens_per_s": 50.0 * batch, "decode_ms_per_token_mean": 20.0, "decode_mbu": 0.5,
                "timed_run_peak_bytes": [30 * 2**20, 41 * 2**20, 39 * 2**20], "timed_run_peak_source": "fake"}, None

    monkeypatch.setattr(measure_capacity, "_timed_decode", fake_timed_decode)
    point = _capacity_point()
    one = throughput_at_budget(point, 1, 60.0, None)
    assert timed == [1]
    assert one["decode_tokens_per_s_at_max_batch"] == one["decode_tokens_per_s_at_batch_1"] == 50.0
    assert "largest batch, which is 1" in one["throughput_at_batch_1_source"]
    assert "at batch 1" in one["throughput_source"] and "3 timed runs" in one["throughput_source"]
    assert one["timed_run_peak_bytes_at_max_batch"] == [30 * 2**20, 41 * 2**20, 39 * 2**20]
    assert one["throughput_over_budget_at_max_batch"].startswith("1 of 3 timed runs at batch 1 peaked above")
    timed.clear()
    four = throughput_at_budget(point, 4, 60.0, None)
    assert timed == [4, 1] and four["decode_tokens_per_s_at_max_batch"] == 200.0
    assert "at batch 4 and batch 1" in four["throughput_source"]
    assert "throughput_at_batch_1_source" not in four


def load_cpu_decode_limit():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_decode_limit.py"
    spec = importlib.util.spec_from_file_location("cpu_decode_limit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_row(model: str, ms: float, stability: str, bytes_per_token: float = 477e6) -> dict:
    metrics = {"decode_ms_per_token_mean": ms, "decode_ms_per_token_mean_min": ms * 0.95,
               "decode_ms_per_token_mean_max": ms * 1.2, "timing_stability": stability,
               "decode_bytes_per_token": bytes_per_token, "device_bandwidth_bytes_per_s": 19e9, "decode_mbu": 0.61,
               "loadavg_1m_before": 0.5, "loadavg_1m_after": 0.7}
    return {"point": {"model": model}, "status": "ok", "error": None, "metrics": metrics}


def test_the_cpu_decode_limit_table_states_melt_over_ouro_only_from_stable_points():
    bench = load_cpu_decode_limit()
    stable = bench.table_rows([decode_row("ouro-mid", 40.0, "stable"),
                               decode_row("melt-mid", 42.0, "stable", 477e6 * 1.11)],
                              "compiled", "float32", 1, {"float32": 30.0})
    assert "| 40.0 | 38.0-48.0 | stable | 477.0 | 19.0 | 61% |" in stable[0]
    assert stable[0].endswith(f"| {40.0 / (1.15 * 30.0):.2f}x of 34.5 |")  # the goal: 1.15x llama.cpp's 30 ms
    assert "1.05x time, 1.11x bytes (goal <= 1.1x)" in stable[2]  # the gate's bytes beside the time
    shaky = bench.table_rows([decode_row("ouro-mid", 40.0, "stable"), decode_row("melt-mid", 80.0, "unstable")],
                             "eager", "float32", 1, {})
    assert "not stated" in shaky[2] and "2.00x" not in shaky[2]
    assert shaky[0].endswith("| - |")  # no goal without a reference figure


def test_the_cpu_decode_limit_table_takes_melt_over_ouro_from_the_paired_run_where_there_is_one():
    bench = load_cpu_decode_limit()
    points = [decode_row("ouro-mid", 40.0, "stable"), decode_row("melt-mid", 52.0, "unstable", 477e6 * 1.09)]
    paired = {"ratio": 1.04, "ratio_min": 1.02, "ratio_max": 1.07, "ratio_cv": 0.02, "stable": True, "rounds": 5}
    line = bench.table_rows(points, "compiled", "float32", 1, {}, paired)[2]
    # the drifted unpaired 1.30x is not printed, the paired ratio is
    assert "1.04x time paired (1.02-1.07 over 5 alternating rounds in one child), 1.09x bytes" in line
    assert "1.30" not in line
    shaky = bench.table_rows(points, "compiled", "float32", 1, {}, dict(paired, ratio_cv=0.15, stable=False))[2]
    assert "not stated: the paired ratio is unstable" in shaky and "1.04x" not in shaky
    failed = bench.table_rows(points, "eager", "float32", 1, {}, "paired run exited 1: boom")[2]
    assert "not stated" in failed and failed.count("paired run exited 1: boom") == 1


def test_the_paired_decode_run_times_both_models_in_alternating_rounds():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_decode.py"
    done = subprocess.run([sys.executable, str(script), "--models", "ouro-tiny,melt-tiny", "--engine", "eager",
                           "--seq-len", "8", "--new-tokens", "2", "--loops", "2", "--rounds", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["models"] == ["ouro-tiny", "melt-tiny"] and result["rounds"] == 3 and result["threads"] == 1
    assert all(ms > 0 for ms in result["ms_per_token"])
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
    assert result["stable"] == (result["ratio_cv"] <= 0.10)
    refused = subprocess.run([sys.executable, str(script), "--models", "ouro-tiny", "--rounds", "1"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--models takes two presets" in refused.stderr


def test_the_llama_cpp_reference_keeps_the_faster_attention_path_and_each_runs_time(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_cpp_reference.py"
    spec = importlib.util.spec_from_file_location("llama_cpp_reference", path)
    reference = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = reference  # dataclasses look their module up there
    spec.loader.exec_module(reference)
    tokens, scores, types = reference.spm_vocab(300)
    assert len(tokens) == len(scores) == len(types) == 300 and tokens[3 + 10] == "<0x0A>" and types[13] == 6
    # A stand-in llama-bench: its JSON for -fa 0,1 (64 tokens per run), and its arguments kept.
    runs = [{"flash_attn": False, "samples_ns": [2.4e9, 2.56e9, 2.32e9], "build_commit": "abc", "build_number": 7},
            {"flash_attn": True, "samples_ns": [3.9e9, 4.0e9, 4.1e9], "build_commit": "abc", "build_number": 7}]
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat <<'END'\n{json.dumps(runs)}\nEND\n")
    fake.chmod(0o755)
    timing = reference.time_decode(fake, tmp_path / "m.gguf", "float32", 512, 64, 1, 3)
    assert (timing.ms_per_token, timing.ms_min, timing.ms_max, timing.flash_attention) == (37.5, 36.25, 40.0, False)
    assert "-d 512" in (tmp_path / "args").read_text() and "-ctk f32" in (tmp_path / "args").read_text()
    assert "abc (build 7)" in timing.label()


def test_the_cpu_decode_limit_benchmark_runs_each_point_through_melt_bench(tmp_path):
    bench = load_cpu_decode_limit()
    done = subprocess.run([sys.executable, bench.__file__, "--models", "ouro-tiny,melt-tiny", "--engines", "forward",
                           "--dtypes", "float32", "--threads", "1", "--seq-len", "8", "--new-tokens", "2",
                           "--loops", "2", "--repeats", "2", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("| forward |")]
    assert [line.split(" | ")[3] for line in lines] == ["ouro-tiny", "melt-tiny", "MELT / Ouro"]
    rows = [json.loads(line) for line in (tmp_path / "forward-float32-1t.jsonl").read_text().splitlines()]
    assert {row["metrics"]["torch_num_threads"] for row in rows} == {1}
    assert {row["point"]["batch_size"] for row in rows} == {1}  # llama.cpp's figure is one sequence's
    ouro = next(row for row in rows if row["point"]["model"] == "ouro-tiny")
    assert lines[0].split(" | ")[4] == f"{ouro['metrics']['decode_ms_per_token_mean']:.1f}"
