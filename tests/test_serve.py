"""`melt-bench serve` on the tiny CPU presets: closed loop, Poisson arrivals, a budget's slots,
goodput under an SLO, GSM8K prompts, --resume; and every bad flag refused in one line."""

from pathlib import Path

import pytest
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.models.continuous_batching import Completion
from melt_bench.running.results import ResultsStore
from melt_bench.scenarios.measure_serve import arrivals, meets_slo
from melt_bench.scenarios.serve import ServePoint, parse_slo

DATA = Path(__file__).parent / "data"
TINY = ["--device", "cpu", "--dtype", "float32", "--no-progress", "--loops", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def closed_loop(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("serve") / "serve.jsonl"
    assert main(["serve", "--models", "ouro-tiny,melt-tiny", "--concurrency", "1,3", "--num-requests", "5",
                 "--prompt-lens", "24", "--output-lens", "4", "--timed-runs", "2", "--out", str(out), *TINY]) == 0
    return out, ResultsStore(out).read()


def test_closed_loop_serves_every_request_and_measures_each_one(closed_loop):
    _, rows = closed_loop
    assert len(rows) == 4 and {row.status for row in rows} == {"ok"}
    for row in rows:
        m, concurrency = row.metrics, row.point["concurrency"]
        assert m["slots"] == row.point["batch_size"] == concurrency  # slots default to the concurrency
        assert m["completed_requests"] == 5 and m["output_tokens"] == 5 * 4 and m["input_tokens"] == 5 * 24
        assert len(m["requests"]) == 5
        for request in m["requests"]:
            assert request["output_tokens"] == 4 and len(request["itl_ms"]) == 3
            assert request["e2e_ms"] >= request["ttft_ms"] >= request["queue_ms"] >= 0
            assert request["tpot_ms"] == pytest.approx(sum(request["itl_ms"]) / 3)
        assert m["ttft_ms_p50"] <= m["ttft_ms_p90"] <= m["ttft_ms_p99"]
        assert m["output_tokens_per_s"] == pytest.approx(m["output_tokens"] / m["duration_s"])
        assert m["output_tokens_per_s_cv"] is not None and m["timing_stability"] in ("stable", "unstable")
        assert m["requests_running_max"] == concurrency  # a closed loop keeps that many in flight
        assert 0 < m["kv_in_use_bytes_max"] <= m["kv_allocated_bytes"]
        assert m["peak_bytes"] > 0 and "goodput_requests_per_s" not in m  # no SLO given
    by = {(row.point["model"], row.point["concurrency"]): row.metrics for row in rows}
    # Ouro keeps a row per loop, MELT one shared: at 2 loops Ouro holds twice MELT's bytes per token
    assert by["ouro-tiny", 1]["kv_bytes_per_token"] == 2 * by["melt-tiny", 1]["kv_bytes_per_token"]
    # at concurrency 1 requests never wait for a slot; at 3 through 3 slots none waits either
    assert all(r["queue_ms"] < 50 for r in by["ouro-tiny", 1]["requests"])


def test_resume_runs_nothing_already_recorded(closed_loop, capsys):
    out, rows = closed_loop
    assert main(["serve", "--models", "ouro-tiny,melt-tiny", "--concurrency", "1,3", "--num-requests", "5",
                 "--prompt-lens", "24", "--output-lens", "4", "--timed-runs", "2", "--out", str(out), "--resume",
                 *TINY]) == 0
    assert len(ResultsStore(out).read()) == len(rows)
    assert "4 already recorded" in capsys.readouterr().out.replace("\n", " ")


def test_poisson_arrivals_with_slots_an_slo_and_gsm8k_prompts(tmp_path):
    out = tmp_path / "serve.jsonl"
    assert main(["serve", "--models", "ouro-tiny", "--request-rate", "200", "--slots", "2", "--num-requests", "4",
                 "--dataset", "gsm8k", "--data-dir", str(DATA), "--output-lens", "3", "--timed-runs", "1",
                 "--slo", "ttft=60000,tpot=60000", "--out", str(out), *TINY]) == 0
    [row] = ResultsStore(out).read()
    m = row.metrics
    assert row.status == "ok" and row.point["load"] == "rate" and row.point["seq_len"] == 0
    assert "GSM8K test, 4 questions" in m["dataset_source"]
    prompts = [r["prompt_tokens"] for r in m["requests"]]
    assert len(set(prompts)) > 1 and min(prompts) > 20  # each question its own length, byte-tokenised
    assert m["requests_running_max"] <= 2 and m["slots"] == 2
    assert m["slo_attained_fraction"] == 1.0  # a minute each: every request within it
    assert m["goodput_requests_per_s"] == pytest.approx(m["requests_per_s"])
    assert m["timing_stability"] == "unknown"  # one timed run: no spread to judge


def test_a_budget_sets_the_slots_by_capacitys_search(tmp_path):
    out = tmp_path / "serve.jsonl"
    assert main(["serve", "--models", "ouro-tiny", "--concurrency", "2", "--budget", "64MiB", "--max-slots", "3",
                 "--num-requests", "3", "--prompt-lens", "16", "--output-lens", "2", "--timed-runs", "1",
                 "--early-exit", "threshold:0.5", "--out", str(out), *TINY]) == 0
    [row] = ResultsStore(out).read()
    m = row.metrics
    assert row.point["batch_size"] == 0 and row.point["memory_budget_bytes"] == 64 * 2**20
    assert m["slots"] == m["max_batch"] == 3 and m["hit_slot_limit"]  # the tiny model fits --max-slots
    assert all(p["fits"] and p["peak_bytes"] <= 64 * 2**20 for p in m["slot_search_probes"])
    assert 1 <= m["exit_loop_mean"] <= m["loops_run_mean"] <= 2  # early exit: each token's depth recorded
    assert m["loops_saved_fraction"] == pytest.approx(1 - m["loops_run_mean"] / 2)


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    point = ServePoint("serve", "ouro-tiny", 2, 16, 2, "decode", 4, "float32", "cpu", load="rate",
                       request_rate=4.0, num_requests=400, seed=7)
    times = arrivals(point)
    assert times == arrivals(point) and times[0] == 0.0 and times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.15)
    assert arrivals(ServePoint(**{**point.__dict__, "seed": 8})) != times


def test_the_slo_needs_every_limit_given():
    done = Completion(0, 8, [1, 2, 3], "length", 0, 0.0, 0.0, [0.010, 0.030, 0.050], [2] * 3, [2] * 3, [1] * 3)
    assert meets_slo(done, 10.0, 20.0) and not meets_slo(done, 9.0, 20.0) and not meets_slo(done, 10.0, 19.0)
    assert meets_slo(done, None, 20.0) and meets_slo(done, 10.0, None)
    assert parse_slo("ttft=200,tpot=50") == (200.0, 50.0) and parse_slo("tpot=5") == (None, 5.0)


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "4"], "--request-rate needs --slots N or --budget SIZE"),
    (["--request-rate", "fast", "--slots", "2"], "--request-rate: 'fast' is not a positive number"),
    (["--concurrency", "0"], "--concurrency: '0' must be a positive integer"),
    (["--slots", "2", "--budget", "1GiB"], "--slots and --budget"),
    (["--slo", "ttft=fast"], "--slo: 'ttft=fast': 'fast' is not a number of milliseconds"),
    (["--slo", "latency=5"], "--slo: 'latency=5' is not ttft=MS,tpot=MS"),
    (["--engine", "forward"], "--engine: 'forward' is not one of eager, compiled"),
    (["--dataset", "sharegpt"], "--dataset: 'sharegpt' is not one of random, gsm8k"),
    (["--dataset", "gsm8k", "--data-dir", "/nonexistent"], "no gsm8k/test.jsonl or test.jsonl there"),
    (["--data-dir", str(DATA)], "--data-dir is where --dataset gsm8k's questions are"),
    (["--prompt-lens", "1..0"], "--prompt-lens: '1..0' descends"),
    (["--num-requests", "0"], "--num-requests: 0 must be at least 1"),
    (["--kv-quant", "int8"], "packed caches (--kv-quant, --kv-policy flashloop) are not served"),
])
def test_bad_serve_flags_are_refused_in_one_line(argv, message, capsys, tmp_path):
    line = one_line_error(["serve", "--models", "ouro-tiny", "--device", "cpu", *argv,
                           "--out", str(tmp_path / "x.jsonl")], capsys)
    assert message in line
