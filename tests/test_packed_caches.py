"""Packed KV caches: KIVI's INT8/INT4 (--kv-quant) and FlashLoop's cross-loop INT4 cache
(--kv-policy flashloop; its computation against FlashLoop's own reference: test_flashloop.py).
Bytes held equal the formula to the byte; rows read back within the quantiser's bound; bad
combinations are refused in one line."""

import math

import pytest
import torch
from conftest import one_line_error

from melt_bench.models import get_preset, load_model, predict_kv_cache_bytes
from melt_bench.models.flashloop import FlashLoopCache
from melt_bench.models.kv_packing import PackedKeys, PackedValues, stream_bytes

PROMPT, DECODE = 150, 50  # the tail holds 86 rows after the prompt; decoding crosses 128 and packs


def tokens(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 500, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 63, 64, 130])
def test_rows_read_back_within_the_quantisers_bound(bits, rows):
    x = torch.randn(2, 3, rows, 80, generator=torch.Generator().manual_seed(rows)) * 3
    for cls, axis in ((PackedKeys, 2), (PackedValues, 3)):
        whole, split = cls(bits, 64), cls(bits, 64)
        whole.append(x)
        split.append(x[:, :, :rows // 2])  # two appends: a partial key group is requantised (as FlashLoop)
        split.append(x[:, :, rows // 2:])
        for stream in (whole, split):
            assert stream.nbytes() == stream_bytes("keys" if axis == 2 else "values", rows, 2, 3, 80, bits, 64)
        # half a step of the group's range, plus the fp16 rounding of its min and scale
        grouped = x.movedim(axis, -1)
        padded = torch.nn.functional.pad(grouped, (0, -grouped.shape[-1] % 64), value=float("nan"))
        span = padded.unflatten(-1, (-1, 64))
        step = (span.nan_to_num(-1e9).amax(-1) - span.nan_to_num(1e9).amin(-1)) / (2**bits - 1)
        bound = (step / 2 * 1.01 + 2e-3 * x.abs().max()).repeat_interleave(64, -1)[..., :grouped.shape[-1]]
        assert ((whole.read() - x).abs().movedim(axis, -1) <= bound).all()
        assert ((split.read() - x).abs().movedim(axis, -1) <= 2 * bound).all()  # quantised twice at most


def run(model, prompt: int = PROMPT, decode: int = DECODE, early_exit: float | None = None, check=None):
    """Prefill `prompt` tokens, then decode `decode` one at a time; `check(cache, tokens_held)`
    after the prompt and after every step. Returns the last step's logits."""
    ids = tokens(prompt + decode)
    cache = model.new_cache(4)
    with torch.no_grad():
        logits = model(ids[:, :prompt], past_key_values=cache, loops=4).logits
        check and check(cache, prompt)
        for position in range(prompt, prompt + decode):
            logits = model(ids[:, position:position + 1], past_key_values=cache, loops=4,
                           early_stop_threshold=early_exit).logits
            check and check(cache, position + 1)
    return logits[0, -1]


def exact(model):
    def check(cache, held):
        late = cache.selected_per_group() if isinstance(cache, FlashLoopCache) else None
        predicted = predict_kv_cache_bytes(model.config, 4, 1, held, torch.float32, prompt_tokens=PROMPT,
                                           flashloop_late_rows=late)
        assert cache.nbytes() == predicted, held
    return check


@pytest.mark.parametrize("model,policy,quant", [("ouro-tiny", None, "int4"), ("ouro-tiny", None, "int8"),
                                                ("ouro-tiny", "last-loop", "int4"), ("ouro-tiny", "mean", "int8"),
                                                ("melt-tiny", None, "int4"), ("ouro-tiny", "flashloop", None),
                                                ("ouro-tiny", None, "int4:flashloop-tail")])
def test_measured_bytes_equal_the_formula_through_prefill_decode_and_packing(model, policy, quant):
    model = load_model(model, kv_policy=policy, kv_quant=quant)
    run(model, check=exact(model))


def test_early_exit_keeps_the_bytes_exact():
    model = load_model("ouro-tiny", kv_quant="int4")
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(8.0)  # every token exits after its first loop
    run(model, early_exit=0.5, check=exact(model))


def kivi_full_precision_rows(prompt: int, decoded: int, residual: int = 64) -> list[tuple[int, int]]:
    """KIVI's own bookkeeping (jy-yuan/KIVI, models/llama_kivi.py, LlamaAttention_KIVI.forward), as
    counts: the full-precision keys and values it holds after the prompt and after each step."""
    keys = prompt % residual if prompt >= residual else prompt  # prefill: T mod R keys stay full
    values = min(prompt, residual)  # prefill: the last R values stay full
    held = [(keys, values)]
    for _ in range(decoded):
        keys += 1
        if keys == residual:  # the full keys reach R: all quantised
            keys = 0
        values += 1
        if values > residual:  # the window holds R + 1: the oldest is quantised
            values -= 1
        held.append((keys, values))
    return held


@pytest.mark.parametrize("prompt", [40, 64, 130, 340])
def test_int4_keeps_kivis_full_precision_rows(prompt):
    """#31 item 2: KIVI keeps the T mod 64 newest keys and the 64 newest values at full precision
    (FlashLoop's 64-127 rows of both only under int4:flashloop-tail), bytes exact at every step."""
    model = load_model("ouro-tiny", kv_quant="int4")
    held = iter(kivi_full_precision_rows(prompt, 70))

    def check(cache, tokens_held):
        keys, values = next(held)
        assert all(cache.keys[slot].shape[2] == keys and cache.values[slot].shape[2] == values
                   for slot in range(cache.num_slots)), tokens_held
        assert cache.packed_keys[0].rows == tokens_held - keys and cache.packed_values[0].rows == tokens_held - values
        exact(model)(cache, tokens_held)

    run(model, prompt, 70, check=check)


def test_kivi_bytes_at_340_tokens_are_kivis_not_flashloops_tail():
    """The figure an independent KIVI quantiser holds for this shape (4 layers, 2 KV heads x 64,
    3 loops, fp32, INT4, 340 tokens): 1,031,040 B; FlashLoop's tail rule holds 1,474,560 B."""
    from conftest import TINY

    from melt_bench.models import OuroConfig, OuroForCausalLM

    config = OuroConfig(**{**TINY, "head_dim": 64, "num_hidden_layers": 4})
    assert predict_kv_cache_bytes(config, 3, 1, 340, torch.float32, kv_quant="int4") == 1_031_040
    assert predict_kv_cache_bytes(config, 3, 1, 340, torch.float32, kv_quant="int4:flashloop-tail") == 1_474_560
    model = OuroForCausalLM(config).eval()
    model.use_kv_quant("int4")
    cache = model.new_cache(3)
    with torch.no_grad():
        model(tokens(300) % TINY["vocab_size"], past_key_values=cache, loops=3)
        for position in range(300, 340):
            model(tokens(1, position) % TINY["vocab_size"], past_key_values=cache, loops=3)
    assert cache.nbytes() == 1_031_040


def test_melt_prompt_in_chunks_packs_chunk_by_chunk():
    model = load_model("melt-tiny", kv_quant="int4")
    model.config.chunk_size = 48  # the prompt commits in 4 chunks
    model.model.policy._chunk_size = 48
    run(model, check=exact(model))


def test_int8_logits_stay_close_and_int4_drifts_further_but_finite():
    reference = run(load_model("ouro-tiny"))
    int8 = run(load_model("ouro-tiny", kv_quant="int8"))
    int4 = run(load_model("ouro-tiny", kv_quant="int4"))
    drift8, drift4 = (int8 - reference).abs().max(), (int4 - reference).abs().max()
    assert drift8 < 0.01 and drift8 < drift4 and torch.isfinite(int4).all() and drift4 < 1.0


def test_flashloop_keeps_residuals_for_the_tokens_its_late_loops_updated():
    """Packed loop-3 (4) rows of tokens loop 3 (4) did not update read their loop-2 (3) rows; the
    selection is FlashLoop's: ceil(P/4) and ceil(P/10) tokens, nested, the last one in."""
    model = load_model("ouro-tiny", kv_policy="flashloop")
    captured = {}
    run(model, prompt=300, decode=0, check=lambda cache, held: captured.setdefault("cache", cache))
    cache = captured["cache"]
    a3, a4 = cache.late_rows(0, 300)
    assert int(a3.sum()) == math.ceil(0.25 * 300) and int(a4.sum()) == math.ceil(0.10 * 300)
    assert not (a4 & ~a3).any() and a3[-1] and a4[-1]  # nested, the last prompt token in both
    packed = cache.layout.packed
    for layer in range(2):
        loop2, loop3, loop4 = (cache.read_packed(cache.slot(loop, layer))[0] for loop in (1, 2, 3))
        assert torch.equal(loop3[:, :, ~a3[:packed]], loop2[:, :, ~a3[:packed]])
        assert torch.equal(loop4[:, :, ~a4[:packed]], loop3[:, :, ~a4[:packed]])
        assert not torch.equal(loop3[:, :, a3[:packed]], loop2[:, :, a3[:packed]])


def test_flashloop_bytes_for_ouro_1_4b():
    """Ouro-1.4B shapes (bf16, 4 loops), selected tokens spread evenly: what we hold is 4.8x less
    than per-loop at a 4,096-token prompt, 4.9x at 8,192; FlashLoop's own count of the same cache
    (fp16 minima and scales) 5.4x and 5.6x (FlashLoop claims 5.85x at 8K)."""
    from melt_bench.models.flashloop import flashloop_audit_bytes

    config = get_preset("ouro-1.4b").config()
    for tokens, ours, theirs in ((4096, 4.77, 5.40), (8192, 4.92, 5.59)):
        per_loop = predict_kv_cache_bytes(config, 4, 1, tokens, torch.bfloat16)
        held = predict_kv_cache_bytes(config, 4, 1, tokens, torch.bfloat16, kv_policy="flashloop")
        counted = flashloop_audit_bytes(tokens, tokens, 4, 24, config.num_key_value_heads, config.head_dim)
        assert round(per_loop / held, 2) == ours and round(per_loop / counted, 2) == theirs


def test_measured_kv_per_token_of_packed_caches_is_taken_at_the_probe_length():
    from melt_bench.scenarios.measure_accuracy import KV_PROBE_TOKENS, measured_kv_bytes_per_token

    for spec in (dict(kv_policy="flashloop"), dict(kv_quant="int4"), {}):
        model = load_model("ouro-tiny", **spec)
        late = None
        if spec.get("kv_policy") == "flashloop":  # which tokens it chose over the probe's prompt
            cache = model.new_cache(4)
            with torch.no_grad():
                model(torch.full((1, KV_PROBE_TOKENS), model.config.eos_token_id or 0), past_key_values=cache,
                      loops=4, logits_to_keep=1)
            late = cache.selected_per_group()
        predicted = predict_kv_cache_bytes(model.config, 4, 1, KV_PROBE_TOKENS, torch.float32,
                                           flashloop_late_rows=late)
        assert measured_kv_bytes_per_token(model, 4) == predicted // KV_PROBE_TOKENS


@pytest.mark.parametrize("args,needle", [
    (["memory", "--kv-policy", "flashloop", "--kv-quant", "int4"], "FlashLoop's cache is INT4 already"),
    (["memory", "--kv-policy", "flashloop", "--loops", "5"], "defines loops 1-4"),
    (["memory", "--kv-policy", "flashloop", "--batch-sizes", "2"], "holds one sequence"),
    (["memory", "--kv-quant", "int3"], "--kv-quant: 'int3' is not one of none, int8, int4"),
    (["memory", "--kv-quant", "int4", "--prefill-chunk", "8"], "prefill it in one piece"),
    (["memory", "--models", "melt-tiny", "--kv-quant", "int8", "--decode-reads", "chunk"], "side buffer"),
    (["latency", "--kv-quant", "int4"], "needs --engine forward"),
    (["latency", "--kv-quant", "int4", "--engine", "forward", "--static-cache"], "never allocated ahead"),
    (["capacity", "--budget", "1GiB", "--kv-policy", "flashloop"], "largest batch is 1"),
    (["latency", "--kv-policy", "flashloop", "--engine", "forward", "--early-exit", "threshold:0.9"],
     "computes every loop"),
    (["accuracy", "--kv-policy", "flashloop", "--exit-mode", "expected", "--tasks", "addition"],
     "computes every loop"),
])
def test_bad_packed_cache_combinations_are_one_line(args, needle, capsys, tmp_path):
    out = tmp_path / "never.jsonl"
    base = ["--models", "ouro-tiny"] if "--models" not in args else []
    err = one_line_error([*args, *base, "--loops", "4", "--device", "cpu", "--out", str(out)]
                         if "--loops" not in args else [*args, *base, "--device", "cpu", "--out", str(out)], capsys)
    assert needle in err and not out.exists()


def test_rows_record_the_quantisation_and_latency_runs_on_the_forward_engine():
    from melt_bench.scenarios.latency import LatencyPoint
    from melt_bench.scenarios.measure_latency import measure_latency_point
    from melt_bench.scenarios.measure_memory import measure_memory_point
    from melt_bench.scenarios.memory import MemoryPoint

    point = MemoryPoint("memory", "melt-tiny", 2, 130, 1, "decode", 4, "float32", "cpu", kv_quant="int4", repeat=0)
    row = measure_memory_point(point)
    assert row["status"] == "ok", row["error"]
    metrics = row["metrics"]
    assert metrics["kv_quant"] == "int4" and metrics["kv_cache_bytes"] == metrics["kv_cache_bytes_predicted"]
    assert point.point_id != MemoryPoint("memory", "melt-tiny", 2, 130, 1, "decode", 4, "float32", "cpu").point_id
    flashloop = measure_memory_point(MemoryPoint("memory", "ouro-tiny", 4, 130, 1, "decode", 4, "float32", "cpu",
                                                 kv_policy="flashloop", repeat=0))["metrics"]
    assert flashloop["kv_cache_bytes"] == flashloop["kv_cache_bytes_predicted"]
    # FlashLoop's own count: fp16 minima and scales, a bf16 tail (we hold fp32 ones here)
    assert 0 < flashloop["kv_cache_bytes_flashloop_count"] < flashloop["kv_cache_bytes"]
    latency = LatencyPoint("latency", "ouro-tiny", 4, 130, 1, "decode", 3, "float32", "cpu", kv_policy="flashloop",
                         engine="forward", warmup=0, timed_runs=1)
    row = measure_latency_point(latency)
    assert row["status"] == "ok", row["error"]
    m = row["metrics"]
    assert m["kv_policy"] == "flashloop" and m["decode_ms_per_token_mean"] > 0 and m["prefill_mfu"] > 0
    # the byte model counts full-precision rows: no roofline claimed for a packed cache
    assert m["decode_mbu"] is None and m["roofline_source"].startswith("decode bytes unavailable")


def test_the_probe_length_is_an_option_and_short_sequences_pack_nothing(capsys):
    """On a 32-token sequence a packed cache holds every row in its full-precision tail: INT4
    saves nothing there, which a 2,048-token probe would hide (the row says which it measured)."""
    from melt_bench.scenarios.accuracy import AccuracyFlags, resolve_accuracy
    from melt_bench.scenarios.measure_accuracy import measured_kv_bytes_per_token

    plain, int4 = load_model("ouro-tiny"), load_model("ouro-tiny", kv_quant="int4")
    assert measured_kv_bytes_per_token(int4, 4, 32) == measured_kv_bytes_per_token(plain, 4, 32)
    assert measured_kv_bytes_per_token(int4, 4, 2048) < measured_kv_bytes_per_token(plain, 4, 2048) / 2
    flags = AccuracyFlags(tasks="addition", loops="4", models="ouro-tiny", kv_quant="none,int4", kv_probe_tokens=32,
                          device="cpu")
    plain_point, point = resolve_accuracy(flags)[0]
    assert point.kv_probe_tokens == 32 and point.score_continuation_as == "decode"
    assert plain_point.kv_probe_tokens is None  # a length does not change an unpacked cache's bytes: same id
    err = one_line_error(["accuracy", "--models", "ouro-tiny", "--tasks", "addition", "--kv-probe-tokens", "0",
                          "--device", "cpu"], capsys)
    assert "--kv-probe-tokens: 0 must be at least 1" in err


def test_a_pack_without_selected_tokens_and_a_rewind_into_packed_rows(monkeypatch):
    """The selected tokens all at the prompt's end (the first pack holds none of them) keeps the
    bytes exact; rewinding below the packed rows is refused, not silently lossy."""
    from melt_bench.models import flashloop

    monkeypatch.setattr(flashloop, "movement_scores", lambda current, previous: torch.arange(
        current.shape[0], dtype=torch.float32))  # later tokens "moved most"
    model = load_model("ouro-tiny", kv_policy="flashloop")
    ids = tokens(PROMPT + DECODE)
    cache = model.new_cache(4)
    check = exact(model)
    with torch.no_grad():
        model(ids[:, :PROMPT], past_key_values=cache, loops=4)
        assert cache.layout.packed == 64 and cache.selected_per_group() == [(0, 0)]  # none among them
        assert cache.groups[0][0][2] is None and cache.groups[0][0][3] is None
        for position in range(PROMPT, PROMPT + DECODE):
            model(ids[:, position:position + 1], past_key_values=cache, loops=4)
            check(cache, position + 1)
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.crop(100)  # packed up to 128
