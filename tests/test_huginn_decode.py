"""Huginn through the static-shape decode engine (models/huginn_decode.py): its logits equal the
model's own forward under every lookup strategy, eager and compiled, from the same random
states; and every command runs on huginn-tiny (latency's three engines give the same tokens,
capacity, serve, accuracy)."""

import json

import pytest
import torch
from conftest import make_huginn

from melt_bench.cli import main
from melt_bench.models.decode_engine import DecodeEngine
from melt_bench.running.results import load_results

STEPS, PROMPT, NEW = 3, 7, 5


def forward_decode(model, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The reference: prefill and one forward per token over a growing cache (as generate())."""
    cache = model.new_cache(steps)
    logits = [model(ids, past_key_values=cache, num_steps=steps, logits_to_keep=1).logits[:, -1]]
    for _ in range(NEW):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(token, past_key_values=cache, num_steps=steps, logits_to_keep=1).logits[:, -1])
    return logits


def engine_decode(engine: DecodeEngine, ids: torch.Tensor) -> list[torch.Tensor]:
    out = engine.prefill(ids)
    logits = [out.logits]
    for _ in range(NEW):
        out = engine.step(out.token)
        logits.append(out.logits)
    return logits


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, 512, (2, PROMPT), generator=torch.Generator().manual_seed(5))


# compress-anchor shares slots past 8 steps only
@pytest.mark.parametrize("strategy,steps", [("full", STEPS), ("compress-s3", STEPS), ("compress-r3", STEPS),
                                            ("compress-anchor", 10), ("latest-m4", STEPS)])
@torch.no_grad()
def test_the_eager_engine_gives_the_forward_logits_under_every_strategy(strategy, steps, prompt):
    """Same seed, same draws: the engine draws each step's random state as forward does."""
    model = make_huginn(strategy)
    assert model.policy.shares_rows(steps) == (strategy not in ("full", "latest-m4"))
    torch.manual_seed(11)
    expected = forward_decode(model, prompt, steps)
    engine = DecodeEngine(model, steps, 2, PROMPT + NEW + 4, "eager")
    torch.manual_seed(11)
    assert max_diff(engine_decode(engine, prompt), expected) < 1e-5
    assert engine.cache.nbytes() == engine.cache.num_slots * 2 * 2 * 4 * 16 * (PROMPT + NEW + 4) * 4
    # the state matters: other draws give other logits
    engine.reset()
    assert max_diff(engine_decode(engine, prompt), expected) > 1e-3


@torch.no_grad()
def test_the_compiled_engine_gives_the_eager_logits_and_one_graph_per_step(prompt):
    model = make_huginn("compress-s4")
    eager = DecodeEngine(model, 2, 2, PROMPT + NEW, "eager")
    torch.manual_seed(3)
    expected = engine_decode(eager, prompt)
    compiled = DecodeEngine(model, 2, 2, PROMPT + NEW, "compiled")
    torch.manual_seed(3)
    assert max_diff(engine_decode(compiled, prompt), expected) < 1e-4
    assert "huginn_decode_one_token, torch.compile" in compiled.description


def test_the_engine_refuses_an_exit_threshold_and_a_capacity_past_the_rope_table():
    model = make_huginn()
    with pytest.raises(ValueError, match="every recurrence step"):
        DecodeEngine(model, 2, 1, 16, "eager", early_stop_threshold=0.5)
    with pytest.raises(ValueError, match="RoPE table"):
        DecodeEngine(model, 2, 1, model.config.block_size + 1, "eager")


def test_latency_engines_give_the_same_tokens_on_huginn():
    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.measure_latency import measure_latency_point

    digests = {}
    for engine in ("forward", "eager"):
        point = LatencyPoint(command="latency", model="huginn-tiny", loops=2, seq_len=8, batch_size=1,
                             phase="decode", new_tokens=4, dtype="float32", device="cpu", engine=engine,
                             timed_runs=2)
        row = measure_latency_point(point)
        assert row["status"] == "ok", row["error"]
        assert row["metrics"]["output_runs_identical"]  # each run draws the same random states
        digests[engine] = row["metrics"]["output_digest"]
        assert row["metrics"]["decode_mbu"] > 0
    assert digests["forward"] == digests["eager"]


def test_capacity_serve_and_accuracy_run_on_huginn(tmp_path, capsys):
    from pathlib import Path

    common = ["--models", "huginn-tiny", "--device", "cpu", "--dtype", "float32"]
    assert main(["capacity", "--budget", "40MiB", "--loops", "2,8", "--seq-lens", "8", "--new-tokens", "4",
                 "--max-batch", "256", "--timed-runs", "1", "--engine", "eager", "--out", str(tmp_path / "c.jsonl"),
                 *common]) == 0
    frame = load_results(tmp_path / "c.jsonl")
    batches = dict(zip(frame.loops, frame.max_batch))
    assert 1 <= batches[8] < batches[2]  # more steps, more cache rows per sequence: fewer fit
    assert (frame.decode_tokens_per_s_at_max_batch > 0).all()

    assert main(["serve", "--loops", "2", "--concurrency", "2", "--num-requests", "3", "--slots", "2",
                 "--prompt-lens", "6", "--output-lens", "3", "--timed-runs", "1", "--warmup", "0",
                 "--out", str(tmp_path / "s.jsonl"), *common]) == 0
    serve = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert serve[0]["status"] == "ok" and serve[0]["metrics"]["output_tokens_per_s"] > 0

    data = Path(__file__).parent / "data"
    assert main(["accuracy", "--loops", "2", "--kv-policy", "full,compress-s4", "--limit", "2", "--num-fewshot",
                 "0", "--max-gen-toks", "4", "--data-dir", str(data), "--out", str(tmp_path / "a.jsonl"),
                 *common]) == 0
    accuracy = load_results(tmp_path / "a.jsonl")
    assert set(accuracy.status) == {"ok"}
    kv = accuracy.groupby("kv_policy").kv_bytes_per_token.first()
    # 2 + 4 x 2 + 2 rows per token (full) and 2 + 4 + 2 (compress-s4), keys and values, 4 x 16 fp32
    assert kv["full"] == 12 * 2 * 64 * 4 and kv["compress-s4"] == 8 * 2 * 64 * 4
    assert set(accuracy.generation) == {"continuous batching, 1 slots, eager decode engine"}

    # and one report over the three
    html = tmp_path / "huginn.html"
    assert main(["report", *(str(tmp_path / name) for name in ("c.jsonl", "s.jsonl", "a.jsonl")), "-o", str(html)]) == 0
    page = html.read_text()
    assert "huginn-tiny" in page and "compress-s4" in page


def test_log_likelihood_scored_as_decoded_under_a_sharing_strategy_is_refused_by_name():
    from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
    from melt_bench.evaluation.lm_eval_adapter import LoopedHFLM

    lm = LoopedHFLM(make_huginn("compress-s4"), byte_tokenizer(), loops=2, score_continuation_as="decode",
                    batch_size=1, max_length=64)
    with pytest.raises(ValueError, match="not built for Huginn"):
        lm._loglikelihood_tokens([(("a", "b"), [5, 6, 7], [8, 9])])
