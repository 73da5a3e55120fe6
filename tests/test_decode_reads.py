"""MELT's decode_reads: "chunk" continues the prompt's chunk grid while decoding (an open chunk's
same-loop rows come from a bounded side buffer), so prefill + token-by-token decoding equals one
chunked forward over the whole sequence; "final" (earlier tokens' final rows) is unchanged."""

import pytest
import torch
from conftest import TINY, make_melt, one_line_error

from melt_bench.models import MeltConfig, predict_kv_cache_bytes
from melt_bench.models.kv_policy import kv_side_buffer_bytes


def decode(model, ids, prompt_len, loops, capacity=None, mask=None):
    """Prefill `prompt_len` tokens, then one token per forward; logits of every position and the
    side buffer's bytes after each step."""
    cache = model.new_cache(loops, capacity)
    cut = (lambda end: None) if mask is None else (lambda end: mask[:, :end])
    logits = [model(ids[:, :prompt_len], attention_mask=cut(prompt_len), past_key_values=cache, loops=loops).logits]
    side = [cache.side_nbytes()]
    for i in range(prompt_len, ids.shape[1]):
        logits.append(model(ids[:, i:i + 1], attention_mask=cut(i + 1), past_key_values=cache, loops=loops).logits)
        side.append(cache.side_nbytes())
    return torch.cat(logits, dim=1), cache, side


def row_bytes(batch=2):
    return batch * 2 * TINY["num_key_value_heads"] * TINY["head_dim"] * 4  # K and V, fp32


@pytest.mark.parametrize("chunk", [3, 4, 5])  # prompt 6: 3 divides it, 4 and 5 do not
@pytest.mark.parametrize("loops", [1, 3, 4])
def test_chunk_reads_decode_equals_one_chunked_forward(ids, chunk, loops):
    model = make_melt(chunk_size=chunk, decode_reads="chunk")
    full = model(ids, use_cache=False, loops=loops).logits  # chunks of `chunk` over all 12 tokens
    decoded, cache, side = decode(model, ids, 6, loops)
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)
    # the buffer: at most C rows per (loop, layer), whatever the sequence length
    bound = loops * TINY["num_hidden_layers"] * chunk * row_bytes()
    assert 0 < max(side) <= bound and cache.side_nbytes() == bound


def test_a_later_multi_token_piece_continues_the_grid(ids):
    # 12 tokens fed as 5 + 4 + 3 follow the grid of 4 from position 0, not from each piece's start
    model = make_melt(chunk_size=4, decode_reads="chunk")
    full = model(ids, use_cache=False).logits
    cache = model.new_cache(4)
    pieces = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 5), (5, 9), (9, 12))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_final_reads_are_unchanged_and_differ_from_chunk_reads(ids):
    final, chunk = make_melt(chunk_size=4), make_melt(chunk_size=4, decode_reads="chunk")
    assert final.config.decode_reads == "final"
    by_final, cache, side = decode(final, ids, 6, 4)
    # "final": the prompt in chunks of 4 from 0, then every decoded token a chunk of its own
    reference = final(ids, use_cache=False, chunk_starts=[0, 4, *range(6, 12)]).logits
    torch.testing.assert_close(by_final, reference, rtol=1e-5, atol=1e-5)
    assert side == [0] * 7 and cache.nbytes() == 12 * TINY["num_hidden_layers"] * row_bytes()
    by_chunk, _, _ = decode(chunk, ids, 6, 4)
    torch.testing.assert_close(by_chunk[:, :6], by_final[:, :6])  # the prompt is chunked alike
    assert not torch.allclose(by_chunk[:, 6:], by_final[:, 6:], atol=1e-4)  # decoding reads other rows


def test_left_padded_batch_decodes_as_its_chunked_forward():
    torch.manual_seed(3)
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second sequence is left-padded by 3
    ids[1, :3] = 0
    model = make_melt(chunk_size=4, decode_reads="chunk")
    full = model(ids, attention_mask=mask, use_cache=False).logits
    decoded, _, _ = decode(model, ids, 5, 4, mask=mask)
    torch.testing.assert_close(decoded[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded[1, 3:], full[1, 3:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("capacity", [3, 12, 40])
def test_preallocated_side_buffer_equals_its_formula(ids, capacity):
    model = make_melt(chunk_size=5, decode_reads="chunk")
    cache = model.new_cache(3, capacity=capacity, batch_size=2)
    assert cache.nbytes() == predict_kv_cache_bytes(model.config, 3, 2, capacity, torch.float32)
    assert cache.side_nbytes() == 2 * kv_side_buffer_bytes(model.config, 3, torch.float32, capacity)
    assert cache.side_nbytes() == 3 * TINY["num_hidden_layers"] * min(5, capacity) * row_bytes()
    model(ids[:, :min(capacity, 12)], past_key_values=cache, loops=3)
    assert cache.nbytes() == predict_kv_cache_bytes(model.config, 3, 2, capacity, torch.float32)


def test_final_reads_have_no_side_buffer_and_chunk_reads_need_a_chunk_size():
    config = MeltConfig(**TINY, chunk_size=5)
    assert kv_side_buffer_bytes(config, 4, torch.float32, 100) == 0
    with pytest.raises(ValueError, match="needs a chunk_size"):
        MeltConfig(**TINY, chunk_size=None, decode_reads="chunk")
    with pytest.raises(ValueError, match="decode_reads must be one of final, chunk"):
        MeltConfig(**TINY, decode_reads="sometimes")


def test_the_decode_reads_axis_on_memory_records_the_side_buffer(tmp_path):
    from melt_bench.cli import main
    from melt_bench.running.results import ResultsStore

    out = tmp_path / "m.jsonl"
    assert main(["memory", "--loops", "3", "--models", "ouro-tiny,melt-tiny", "--seq-lens", "16", "--batch-sizes",
                 "2", "--new-tokens", "3", "--device", "cpu", "--repeats", "1", "--no-progress",
                 "--decode-reads", "final,chunk", "--out", str(out)]) == 0
    seen = {(row.point["model"], row.point["decode_reads"]): row.metrics for row in ResultsStore(out).read()}
    assert set(seen) == {("ouro-tiny", None), ("melt-tiny", "final"), ("melt-tiny", "chunk")}
    final, chunk = seen["melt-tiny", "final"], seen["melt-tiny", "chunk"]
    assert (final["decode_reads"], chunk["decode_reads"], chunk["chunk_size"]) == ("final", "chunk", 500)
    assert final["kv_side_buffer_bytes"] == 0 and "decode_reads" not in seen["ouro-tiny", None]
    # melt-tiny: 2 layers, 2 KV heads x 16 dims, fp32; 19 tokens < chunk 500: 19 rows per loop and layer
    assert chunk["kv_side_buffer_bytes"] == chunk["kv_side_buffer_bytes_predicted"] == 2 * 3 * 2 * 19 * 2 * 2 * 16 * 4
    for metrics in seen.values():
        assert metrics["kv_cache_bytes"] == metrics["kv_cache_bytes_predicted"]
    assert chunk["kv_cache_bytes"] == final["kv_cache_bytes"] + chunk["kv_side_buffer_bytes"]


def test_latency_runs_with_chunk_reads(tmp_path):
    from melt_bench.cli import main
    from melt_bench.running.results import ResultsStore

    out = tmp_path / "l.jsonl"
    assert main(["latency", "--loops", "2", "--models", "melt-tiny", "--seq-lens", "8", "--batch-sizes", "1",
                 "--new-tokens", "4", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--no-progress",
                 "--decode-reads", "chunk", "--out", str(out)]) == 0
    [row] = ResultsStore(out).read()
    assert row.status == "ok" and row.metrics["decode_reads"] == "chunk" and row.point["decode_reads"] == "chunk"


@pytest.mark.parametrize("args,needle", [
    (["memory", "--models", "ouro-tiny", "--decode-reads", "chunk"], "are not MELT models"),
    (["latency", "--models", "melt-tiny", "--decode-reads", "sometimes"], "'sometimes' is not one of final, chunk"),
    (["accuracy", "--models", "ouro-tiny", "--decode-reads", "final"], "are not MELT models"),
])
def test_bad_decode_reads_are_one_line_and_exit_2(args, needle, capsys, tmp_path):
    err = one_line_error([*args, "--loops", "1", "--device", "cpu", "--out", str(tmp_path / "x.jsonl")], capsys)
    assert needle in err
    assert not (tmp_path / "x.jsonl").exists()
