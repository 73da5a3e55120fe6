"""lm-eval's `generate_until` through the continuous batcher (models/continuous_batching.py):
every request prefilled into a free slot and decoded beside the others, `--batch-size` slots,
instead of `generate()` over left-padded batches. Greedy only; encoding, stop strings and the
text's post-processing are lm-eval's own calls, so the text equals HFLM's
(tests/test_batched_generation.py)."""

from __future__ import annotations

import torch
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from melt_bench.models.continuous_batching import ContinuousBatcher, Request


def batcher_problem(lm) -> str | None:
    """Why `lm` (a LoopedHFLM) generates through generate() instead, or None."""
    if lm.exit_mode != "last":
        return f"exit mode {lm.exit_mode}: the decode engine runs every loop and reads the last"
    if lm.model.config.kv_quant is not None or lm.model.kv_policy.name == "flashloop":
        return "a packed KV cache: the decode engine reads the cache's raw rows"
    if isinstance(lm.think_end_token, int):
        return "a thinking-token id: HFLM's own post-processing"
    return None


def sampling_asked(kwargs: dict) -> bool:
    return bool(kwargs.get("do_sample")) or float(kwargs.get("temperature") or 0.0) > 0


def generate_until_batched(lm, requests: list, slots: int) -> tuple[list[str], int] | None:
    """The continuations of lm-eval's `requests` (their .args: context, gen_kwargs), in order,
    and the slots they ran in (at most one per request); None when one asks for sampling (the
    caller falls back to generate())."""
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    prepared = []
    for index, request in enumerate(requests):
        context, gen_kwargs = request.args
        kwargs = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        if sampling_asked(kwargs):
            return None
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        encoded, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - max_gen_toks,
                                         truncation=lm.truncation)
        prepared.append((context, gen_kwargs, until, Request(
            index, tuple(encoded[0].tolist()), max_gen_toks, stop_token_ids=(lm.eot_token_id,),
            stop_check=_stop_strings(lm, until))))
    capacity = max(len(r.prompt) + r.max_new_tokens for *_, r in prepared)
    slots = min(slots, len(prepared))
    with torch.no_grad():
        batcher = ContinuousBatcher(lm.model, lm.loops, slots, capacity)
        done = {c.request_id: c for c in batcher.run([r for *_, r in prepared], concurrency=len(prepared))}
    texts = []
    for context, gen_kwargs, until, request in prepared:
        text = postprocess_generated_text(generation=lm.tok_decode(done[request.request_id].tokens), stop=until,
                                          think_end_token=lm.think_end_token
                                          if isinstance(lm.think_end_token, str) else None)
        lm.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        texts.append(text)
    return texts, slots


def _stop_strings(lm, until: list[str]):
    """Stop once the decoded output holds a stop string (the text is cut at the first after)."""
    terms = [term for term in until if term]

    def stop(tokens: list[int]) -> bool:
        text = lm.tok_decode(tokens)
        return any(term in text for term in terms)

    return stop
