"""Does our looped model carry overhead beyond the extra layers it runs?

Times prefill (one forward over the prompt) and per-token decode for:
  looped: our Ouro, L layers x T loops;
  flat:   our code with L*T layers and 1 loop (same kernels, no loop machinery);
  llama:  transformers' LlamaForCausalLM with L*T layers (an independent implementation);
under each engine: `eager` (our static-shape decode step as is; Llama's forward over a
StaticCache) and `compiled` (the same through torch.compile, CUDA graphs on CUDA). Prints the
ratios looped/flat and looped/llama per engine (1.00 = no overhead) and compiled/eager. Weights
are random; only the time matters. Timing: CUDA events on a GPU, perf_counter on a CPU; all
models warmed up (compiled ones captured), then timed round-robin.

    python benchmarks/loop_overhead.py                      # small CPU config
    python benchmarks/loop_overhead.py --preset ouro-1.4b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from melt_bench.models import OuroConfig, OuroForCausalLM, get_preset
from melt_bench.models.decode_engine import DecodeEngine
from melt_bench.models.presets import default_dtype
from melt_bench.trackers.device_ceilings import device_timer
from melt_bench.units import parse_dtype


def timer(device: torch.device):
    """Milliseconds one call takes (CUDA events on a GPU)."""
    seconds = device_timer(device)
    return lambda fn: seconds(fn) * 1000


class OursRunner:
    """Prefill with the model's forward, decode through models/decode_engine.py."""

    def __init__(self, model, loops: int, ids: torch.Tensor, new_tokens: int, engine: str) -> None:
        self.engine = DecodeEngine(model, loops, ids.shape[0], ids.shape[1] + new_tokens, engine)
        self.ids, self.new_tokens = ids, new_tokens

    def prefill(self) -> None:
        self.token = self.engine.prefill(self.ids).token

    def decode(self) -> None:
        for _ in range(self.new_tokens):
            self.token = self.engine.step(self.token).token


def llama_step(model, token: torch.Tensor, cache, position: torch.Tensor) -> torch.Tensor:
    logits = model(token, past_key_values=cache, cache_position=position, position_ids=position[None],
                   use_cache=True).logits[:, -1]
    return logits.argmax(-1, keepdim=True)


class LlamaRunner:
    """transformers' Llama over its StaticCache: eager forward, or the decode step compiled."""

    def __init__(self, model, ids: torch.Tensor, new_tokens: int, engine: str) -> None:
        self.model, self.ids, self.new_tokens = model, ids, new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
        self.cuda_graphs = engine == "compiled" and ids.device.type == "cuda"
        options = dict(mode="reduce-overhead") if self.cuda_graphs else {}
        self.step = torch.compile(llama_step, fullgraph=True, dynamic=False, **options) if engine == "compiled" \
            else llama_step

    def prefill(self) -> None:
        self.cache.reset()
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        logits = self.model(self.ids, past_key_values=self.cache, cache_position=positions, use_cache=True,
                            logits_to_keep=1).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)

    def decode(self) -> None:
        for offset in range(self.new_tokens):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            position = torch.tensor([self.ids.shape[1] + offset], device=self.ids.device)
            self.token = self.step(self.model, self.token, self.cache, position).clone()


def time_runners(runners: dict, repeats: int, device) -> dict:
    """Median prefill ms and decode ms/token per runner. Every runner is warmed up first (twice:
    the first run compiles, the second captures CUDA graphs), then the timed runs go
    round-robin, so clock ramp-up and drift do not favour whoever runs last."""
    run = timer(device)
    for runner in runners.values():
        for _ in range(2):
            runner.prefill()
            runner.decode()
    times = {name: ([], []) for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            times[name][0].append(run(runner.prefill))
            times[name][1].append(run(runner.decode) / runner.new_tokens)
    return {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}


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
    parser.add_argument("--engines", default="eager,compiled", help="eager, compiled or both")
    args = parser.parse_args()
    engines = args.engines.split(",")
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
        runners = {}
        for engine in engines:
            runners[("looped", engine)] = OursRunner(looped, loops, ids, args.new_tokens, engine)
            runners[("flat", engine)] = OursRunner(flat, 1, ids, args.new_tokens, engine)
            runners[("llama", engine)] = LlamaRunner(llama, ids, args.new_tokens, engine)
        results = time_runners(runners, args.repeats, device)
    print(f"config: hidden {fields['hidden_size']}, {layers} layers x {loops} loops (= {layers * loops} flat), "
          f"seq {args.seq}, {args.new_tokens} new tokens, {args.dtype} on {device}")
    for (name, engine), (prefill, decode) in results.items():
        print(f"  {name:7s} {engine:9s} prefill {prefill:9.2f} ms   decode {decode:8.3f} ms/token")
    for engine in engines:
        for other in ("flat", "llama"):
            p = results[("looped", engine)][0] / results[(other, engine)][0]
            d = results[("looped", engine)][1] / results[(other, engine)][1]
            print(f"ratio looped/{other} ({engine}): prefill {p:.2f}x, decode {d:.2f}x")
    if len(engines) == 2:
        for name in ("looped", "flat", "llama"):
            d = results[(name, engines[1])][1] / results[(name, engines[0])][1]
            print(f"ratio {engines[1]}/{engines[0]} decode ({name}): {d:.2f}x")


if __name__ == "__main__":
    main()
