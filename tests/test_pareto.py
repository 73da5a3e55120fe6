"""Accuracy against KV memory: the Pareto frontier, the matched-memory comparison of MELT
points with training-free ones, its plain verdicts, and their place in the report."""

import pandas as pd

from melt_bench.reporting.pareto import kv_cost_per_token, matched_memory, pareto_mask, training_free_column, verdicts
from melt_bench.reporting.report import build_report
from melt_bench.running.results import ResultRow, ResultsStore, rows_to_frame


def test_frontier_keeps_only_undominated_points_and_ties():
    cost = [1, 1, 2, 4, 4, 8]
    value = [0.0, 0.5, 0.5, 1.0, 0.9, 1.0]
    # (1, 0.0) loses to (1, 0.5); (2, 0.5) to (1, 0.5); (4, 0.9) to (4, 1.0); (8, 1.0) to (4, 1.0)
    assert pareto_mask(cost, value) == [False, True, False, True, False, False]
    assert pareto_mask([2, 2], [0.7, 0.7]) == [True, True]


def row(model, loops, value, kv, policy=None, weights=None, stderr=0.01, record_policy=True):
    point = dict(command="accuracy", model=model, loops=loops, task="addition", exit_mode="last", num_fewshot=0,
                 limit=None, batch_size=25, max_gen_toks=None, dtype="float32", device="cpu", weights=weights,
                 data_dir=None, metric="exact_match", filter="strict-match")
    if policy:
        point["kv_policy"] = policy
    # per-document scores: the first round(200 x value) documents answered, so runs pair up
    scores = [[doc, float(doc < round(200 * value))] for doc in range(200)]
    metrics = {"value": value, "stderr": stderr, "n_samples": 200, "peak_bytes": 10**8, "kv_bytes_per_token": kv,
               "document_scores": scores}
    if record_policy:
        metrics["kv_policy"] = policy or ("shared-gated" if model.startswith("melt") else "per-loop")
    return ResultRow("accuracy", f"{model}-{policy}-{weights}-{loops}", point, "ok", None, metrics, {"host": "h"}, 1.0)


def proof_rows():
    return [row("ouro-tiny", 4, 1.0, 8192, "per-loop", "/w/teacher"),
            row("ouro-tiny", 2, 0.1, 4096, "per-loop", "/w/teacher"),
            row("ouro-tiny", 4, 0.9, 2048, "last-loop", "/w/teacher"),
            row("ouro-tiny", 3, 0.95, 2048, "last-loop", "/w/teacher"),
            row("ouro-tiny", 4, 0.2, 2048, "first-loop", "/w/teacher"),
            row("melt-tiny", 4, 1.0, 2048, None, "/w/melt-converted/model"),
            row("melt-tiny", 2, 0.0, 2048, None, "/w/melt-converted/model"),
            row("melt-tiny", 4, 0.0, 2048, None, "/w/melt-fresh")]


def test_each_trained_point_meets_the_best_training_free_point_within_its_memory():
    matched = matched_memory(rows_to_frame(proof_rows())).set_index(["MELT (gated shared cache)", "loops"])
    converted = matched.loc[("melt-tiny @ melt-converted/model", 4)]
    # per-loop's 1.0 costs 8 KiB, more than MELT's 2 KiB: the best within 2 KiB is last-loop at 3 loops
    assert converted["best training-free"] == "ouro-tiny (last-loop)" and converted["its loops"] == 3
    assert converted["its value"] == 0.95 and abs(converted["difference"] + 0.05) < 1e-12
    assert matched.loc[("melt-tiny @ w/melt-fresh", 4)]["difference"] == 0.95


def test_verdicts_say_plainly_who_wins_at_equal_memory():
    lines = verdicts(matched_memory(rows_to_frame(proof_rows())), "exact_match")
    converted, fresh = sorted(lines)
    assert converted.startswith("melt-tiny @ melt-converted/model at 4 loops: exact_match 1.000 with 2,048 KV")
    assert "ouro-tiny (last-loop) at 3 loops, scores 0.950 (-0.050): it falls short (paired over n = 200" in converted
    assert "discordant 0 (rival right only) vs 10" in converted
    assert "The best of 3 training-free points with no more KV memory" in converted  # chosen among 3
    assert "(+0.950): it beats it (paired over n = 200" in fresh
    # #31 item 4: within the larger standard error is no longer a match; the paired 95% interval
    # [-0.027, +0.007] reaches past the 0.02 margin, so it is undecided
    close = [row("ouro-tiny", 4, 0.97, 2048, "mean", stderr=0.02), row("melt-tiny", 4, 0.98, 2048)]
    [line] = verdicts(matched_memory(rows_to_frame(close)))
    assert "(-0.010): it is undecided at n = 200 (paired over n = 200 documents: difference -0.010, paired SE 0.007, " \
           "95% interval (Agresti-Min) [-0.027, +0.007]; discordant 0 (rival right only) vs 2" in line


def test_rows_without_a_recorded_policy_fall_back_on_the_preset_family():
    frame = rows_to_frame([row("ouro-tiny", 4, 1.0, 8192, record_policy=False),
                           row("melt-tiny", 4, 1.0, 2048, record_policy=False),
                           row("ouro-tiny", 4, 1.0, 2048, "last-loop")])
    assert list(training_free_column(frame)) == [True, False, True]


def test_report_draws_the_frontier_and_states_the_verdict(tmp_path):
    store = ResultsStore(tmp_path / "proof.jsonl")
    for result in proof_rows():
        store.append(result)
    html = build_report([store.path])
    assert "accuracy vs KV bytes per token (Pareto)" in html
    assert "it falls short (paired over n = 200" in html and "best training-free" in html and "95% interval" in html
    # without a trained-gate point there is nothing to match: the plot stays, the verdict goes
    only_ouro = ResultsStore(tmp_path / "ouro.jsonl")
    for result in proof_rows()[:5]:
        only_ouro.append(result)
    html = build_report([only_ouro.path])
    assert "(Pareto)" in html and "best training-free" not in html
    assert isinstance(matched_memory(rows_to_frame(proof_rows()[:5])), pd.DataFrame)


def test_a_chunk_reading_melt_pays_for_its_side_buffer():
    # chunk reads at 4 loops, chunk 32: 2 KiB kept per token + 4 x 32 x 2 KiB of side buffer per
    # sequence, i.e. 8 KiB more per token of a one-chunk sequence: more than Ouro's 8 KiB in all
    chunk = row("melt-tiny", 4, 1.0, 2048, weights="/w/melt", stderr=0.0)
    chunk.metrics.update(kv_side_buffer_bytes_per_sequence=4 * 32 * 2048, chunk_size=32, decode_reads="chunk")
    frame = rows_to_frame([chunk, row("ouro-tiny", 4, 1.0, 8192, "per-loop"),
                           row("ouro-tiny", 4, 0.2, 2048, "last-loop")])
    assert list(kv_cost_per_token(frame)) == [10240.0, 8192.0, 2048.0]
    [line] = verdicts(matched_memory(frame))
    assert "with 10,240 KV bytes per token" in line
    assert "ouro-tiny (per-loop) at 4 loops, scores 1.000 (+0.000): it matches it (within +-0.02)" in line


def test_the_report_lists_the_side_buffer_of_chunk_reads(tmp_path):
    chunk = row("melt-tiny", 4, 1.0, 2048, weights="/w/melt", stderr=0.0)
    chunk.metrics.update(kv_side_buffer_bytes_per_sequence=4 * 32 * 2048, chunk_size=32, decode_reads="chunk")
    store = ResultsStore(tmp_path / "r.jsonl")
    for result in (chunk, row("ouro-tiny", 4, 1.0, 8192, "per-loop", "/w/teacher")):
        store.append(result)
    html = build_report([store.path])
    assert "side buffer/sequence" in html and "256.00 KiB" in html and "with 10,240 KV bytes per token" in html


def test_the_2026_rivals_join_the_frontier_and_the_verdicts():
    """FlashLoop and KV quantisation rows: training-free rivals when on Ouro weights (FlashLoop,
    per-loop + INT4), MELT + INT4 a trained point; each labelled with what it ran."""
    def quantised(model, value, kv, quant, policy=None):
        r = row(model, 4, value, kv, policy, "/w/" + ("teacher" if model.startswith("ouro") else "melt"))
        r.point = {**r.point, "kv_quant": quant}
        r.metrics = {**r.metrics, "kv_quant": quant}
        r.point_id += quant
        return r

    rows = [row("ouro-tiny", 4, 1.0, 8192, "per-loop", "/w/teacher"),
            row("ouro-tiny", 4, 0.97, 1400, "flashloop", "/w/teacher"),
            quantised("ouro-tiny", 0.99, 2400, "int4", "per-loop"),
            row("melt-tiny", 4, 0.95, 2048, None, "/w/melt"),
            quantised("melt-tiny", 0.93, 600, "int4")]
    frame = rows_to_frame(rows)
    assert list(training_free_column(frame)) == [True, True, True, False, False]
    matched = matched_memory(frame).set_index("MELT (gated shared cache)")
    assert matched.loc["melt-tiny"]["best training-free"] == "ouro-tiny (flashloop)"  # within 2,048 B: FlashLoop
    assert "melt-tiny (int4 KV)" not in matched.index  # no training-free point holds 600 B or less
    assert "ouro-tiny (per-loop) (int4 KV)" in set(frame.model)
