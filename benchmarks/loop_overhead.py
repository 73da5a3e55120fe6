"""Does our looped model carry overhead beyond the extra layers it runs?

Times prefill (one forward over the prompt) and per-token decode for:
  looped: our Ouro, L layers x T loops;
  flat:   our code with L*T layers and 1 loop (same kernels, no loop machinery);
  llama:  transformers' LlamaForCausalLM with L*T layers (an independent implementation);
and prints the ratios looped/flat and looped/llama (1.00 = no overhead). Weights are random;
only the time matters. Timing: CUDA events on a GPU, perf_counter on a CPU; all models warmed up, then timed
round-robin.

    python benchmarks/loop_overhead.py                      # small CPU config
    python benchmarks/loop_overhead.py --preset ouro-1.4b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from melt_bench.models import OuroConfig, OuroForCausalLM, get_preset
from melt_bench.models.presets import default_dtype
from melt_bench.units import parse_dtype


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1000
    return run


def one_run(model, loops_kwargs: dict, ids: torch.Tensor, new_tokens: int, run) -> tuple[float, float]:
    """One prefill and `new_tokens` decode steps; returns (prefill ms, decode ms per token)."""
    cache = model.new_cache(capacity=ids.shape[1] + new_tokens, batch_size=ids.shape[0], **loops_kwargs) \
        if hasattr(model, "new_cache") else None
    state = {}

    def do_prefill():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **_fwd(loops_kwargs))
        state["cache"], state["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def do_decode():
        for _ in range(new_tokens):
            out = model(state["token"], past_key_values=state["cache"], use_cache=True, **_fwd(loops_kwargs))
            state["token"] = out.logits[:, -1:].argmax(-1)

    return run(do_prefill), run(do_decode) / new_tokens


def time_models(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int, device) -> dict:
    """Median prefill ms and decode ms/token per model. Every model is warmed up first, then the
    timed runs go round-robin, so clock ramp-up and drift do not favour whoever runs last."""
    run = timer(device)
    for model, loops_kwargs in models.values():
        one_run(model, loops_kwargs, ids, new_tokens, run)
    times = {name: ([], []) for name in models}
    for _ in range(repeats):
        for name, (model, loops_kwargs) in models.items():
            prefill, decode = one_run(model, loops_kwargs, ids, new_tokens, run)
            times[name][0].append(prefill)
            times[name][1].append(decode)
    return {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}


def _fwd(loops_kwargs: dict) -> dict:
    return {"loops": loops_kwargs["loops"]} if "loops" in loops_kwargs else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="take sizes from a preset (e.g. ouro-1.4b)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.preset:
        fields = get_preset(args.preset).fields
    else:
        fields = dict(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 64), head_dim=64, max_position_embeddings=8192)
    layers, loops = fields["num_hidden_layers"], args.loops
    shared = {k: v for k, v in fields.items() if k not in ("num_hidden_layers", "total_ut_steps")}
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype), torch.inference_mode():
        looped = OuroForCausalLM(OuroConfig(**shared, num_hidden_layers=layers, total_ut_steps=loops)).eval()
        flat = OuroForCausalLM(OuroConfig(**shared, num_hidden_layers=layers * loops, total_ut_steps=1)).eval()
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
            intermediate_size=fields["intermediate_size"], num_hidden_layers=layers * loops,
            num_attention_heads=fields["num_attention_heads"], num_key_value_heads=fields["num_key_value_heads"],
            head_dim=fields.get("head_dim"), max_position_embeddings=fields["max_position_embeddings"],
            rope_theta=fields.get("rope_theta", 10_000.0), attn_implementation="sdpa")).eval()
        ids = torch.randint(1, fields["vocab_size"], (1, args.seq), device=device)
        models = {"looped": (looped, {"loops": loops}), "flat": (flat, {"loops": 1}), "llama": (llama, {})}
        results = time_models(models, ids, args.new_tokens, args.repeats, device)
    print(f"config: hidden {fields['hidden_size']}, {layers} layers x {loops} loops (= {layers * loops} flat), "
          f"seq {args.seq}, {args.new_tokens} new tokens, {args.dtype} on {device}")
    for name, (prefill, decode) in results.items():
        print(f"  {name:7s} prefill {prefill:9.2f} ms   decode {decode:8.3f} ms/token")
    for other in ("flat", "llama"):
        p = results["looped"][0] / results[other][0]
        d = results["looped"][1] / results[other][1]
        print(f"ratio looped/{other}: prefill {p:.2f}x, decode {d:.2f}x")


if __name__ == "__main__":
    main()
