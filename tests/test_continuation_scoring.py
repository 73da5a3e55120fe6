"""--score-continuation-as: a log-likelihood continuation scored in one forward ("chunk") or as
generation computes it ("decode"); equal for per-loop Ouro, different for MELT reading final rows,
equal again when MELT's decoding continues the chunk grid; under a training-free policy that
shares rows across loops only "decode" computes the policy, and "chunk" is refused."""

import pytest
import torch
from conftest import one_line_error
from lm_eval.api.instance import Instance

from melt_bench.evaluation.byte_tokenizer import byte_tokenizer
from melt_bench.evaluation.lm_eval_adapter import LoopedHFLM
from melt_bench.models import load_model
from melt_bench.scenarios.accuracy import AccuracyPoint

CONTEXT, CONTINUATION = "Question: 12+30?\nAnswer:", " #### 42"


def scores(model, mode: str) -> tuple[float, bool]:
    lm = LoopedHFLM(model, byte_tokenizer(), loops=3, score_continuation_as=mode, batch_size=1, max_length=512)
    [answer] = lm.loglikelihood([Instance("loglikelihood", {}, (CONTEXT, CONTINUATION), 0)])
    assert lm.loglikelihood_requests == 1
    return answer


def decoded_logprob(model, loops: int = 3) -> float:
    """The reference: prefill the context, then feed the continuation one token at a time."""
    lm = LoopedHFLM(model, byte_tokenizer(), loops=loops, batch_size=1, max_length=512)
    context, continuation = lm._encode_pair(CONTEXT, CONTINUATION)
    cache = model.new_cache(loops)
    with torch.no_grad():
        logits = [model(torch.tensor([context]), past_key_values=cache, loops=loops).logits[0, -1]]
        for token in continuation[:-1]:
            logits.append(model(torch.tensor([[token]]), past_key_values=cache, loops=loops).logits[0, -1])
    return sum(float(torch.log_softmax(row.float(), -1)[token]) for row, token in zip(logits, continuation))


def melt(decode_reads: str = "final"):
    model = load_model("melt-tiny", decode_reads=decode_reads)
    with torch.no_grad():  # a gate that matters
        for layer in model.model.layers:
            layer.self_attn.kv_gate.w_z.weight.normal_(std=0.3)
            layer.self_attn.kv_gate.w_z.bias.zero_()
    return model


def test_melt_reading_final_rows_is_scored_as_decoded_only_in_decode_mode():
    model = melt()
    by_decode, by_chunk = scores(model, "decode"), scores(model, "chunk")
    assert by_decode[0] == pytest.approx(decoded_logprob(model), abs=1e-4)
    assert abs(by_chunk[0] - by_decode[0]) > 1e-3  # one forward reads the chunk's same-loop rows instead


def test_ouro_and_chunk_grid_melt_score_alike_either_way():
    ouro = load_model("ouro-tiny")
    assert scores(ouro, "decode")[0] == pytest.approx(scores(ouro, "chunk")[0], abs=1e-4)
    assert scores(ouro, "decode")[0] == pytest.approx(decoded_logprob(ouro), abs=1e-4)
    grid = melt("chunk")
    assert scores(grid, "decode")[0] == pytest.approx(scores(grid, "chunk")[0], abs=1e-4)
    assert scores(grid, "chunk")[0] == pytest.approx(decoded_logprob(grid), abs=1e-4)


def test_the_default_keeps_point_ids_and_a_bad_mode_is_one_line(capsys):
    import hashlib
    import json
    from dataclasses import asdict

    point = AccuracyPoint("melt-tiny", 2, "gsm8k")
    assert point.point_id != AccuracyPoint("melt-tiny", 2, "gsm8k", score_continuation_as="decode").point_id
    # the id of a point from before the new fields: results written then still --resume
    newer = ("kv_policy", "decode_reads", "score_continuation_as", "kv_quant", "kv_probe_tokens", "generate_with")
    older = {k: v for k, v in asdict(point).items() if k not in newer}
    blob = json.dumps({"command": "accuracy", **older}, sort_keys=True).encode()
    assert point.point_id == hashlib.sha256(blob).hexdigest()[:16]
    err = one_line_error(["accuracy", "--models", "melt-tiny", "--score-continuation-as", "greedy", "--device", "cpu"],
                         capsys)
    assert "--score-continuation-as: 'greedy' is not one of chunk, decode" in err


SHARING = ["last-loop", "mean", "first-loop", "modulo:2", "first-then-shared:2"]


@pytest.mark.parametrize("policy", ["per-loop", *SHARING])
def test_decode_scoring_computes_what_each_kv_policy_generates(policy):
    """Every policy scored as prefill + token-by-token decoding under that policy, to 1e-4; the
    sharing policies differ from per-loop (one forward would have scored per-loop for all)."""
    ouro = load_model("ouro-tiny", kv_policy=policy)
    by_decode = scores(ouro, "decode")[0]
    assert by_decode == pytest.approx(decoded_logprob(ouro), abs=1e-4)
    per_loop = decoded_logprob(load_model("ouro-tiny"))
    if policy == "per-loop":
        assert by_decode == pytest.approx(per_loop, abs=1e-4)
    else:  # 3 loops: every one of these keeps fewer rows than loops
        assert abs(by_decode - per_loop) > 1e-3


def test_chunk_scoring_of_a_sharing_policy_is_refused():
    with pytest.raises(ValueError, match="chunk scoring under KV policy 'last-loop' at 3 loops"):
        scores(load_model("ouro-tiny", kv_policy="last-loop"), "chunk")
    # at a loop count where the policy keeps every loop's rows, one forward is exact and allowed
    lm = LoopedHFLM(load_model("ouro-tiny", kv_policy="modulo:2"), byte_tokenizer(), loops=2,
                    score_continuation_as="chunk", batch_size=1, max_length=512)
    [(chunk, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (CONTEXT, CONTINUATION), 0)])
    assert chunk == pytest.approx(decoded_logprob(load_model("ouro-tiny", kv_policy="modulo:2"), loops=2), abs=1e-4)


def test_the_cli_scores_sharing_policies_as_decoded_and_refuses_chunk(capsys):
    from melt_bench.scenarios.accuracy import AccuracyFlags, resolve_accuracy

    flags = AccuracyFlags(tasks="addition", loops="1,3", models="ouro-tiny", kv_policy="per-loop,last-loop",
                          device="cpu")
    points, _ = resolve_accuracy(flags)
    scored = {(p.kv_policy, p.loops): p.score_continuation_as for p in points}
    assert scored == {("per-loop", 1): "chunk", ("per-loop", 3): "chunk", ("last-loop", 1): "chunk",
                      ("last-loop", 3): "decode"}
    err = one_line_error(["accuracy", "--models", "ouro-tiny", "--kv-policy", "mean", "--loops", "2",
                          "--score-continuation-as", "chunk", "--tasks", "addition", "--device", "cpu"], capsys)
    assert "--score-continuation-as: chunk scoring under KV policy 'mean' at 2 loops" in err


@pytest.mark.parametrize("spec", [dict(kv_policy="flashloop"), dict(kv_quant="int4"), dict(kv_quant="int8")])
def test_packed_caches_are_scored_as_generation_reads_them(spec):
    """A context long enough to pack (160 byte tokens): decode scoring reads the packed rows, as a
    hand-written prefill + token-by-token decode does; chunk scoring is refused."""
    global CONTEXT
    short, CONTEXT = CONTEXT, "Question: 12+30? " * 10 + "\nAnswer:"
    try:
        model = load_model("ouro-tiny", **spec)
        assert scores(model, "decode")[0] == pytest.approx(decoded_logprob(model), abs=1e-4)
        assert abs(scores(model, "decode")[0] - decoded_logprob(load_model("ouro-tiny"))) > 1e-5  # packed rows read
        with pytest.raises(ValueError, match="use decode"):
            scores(model, "chunk")
    finally:
        CONTEXT = short
