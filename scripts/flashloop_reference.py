"""Write tests/fixtures/flashloop_reference.pt: what FlashLoop 0.1.0's own pure-torch reference
(`flashloop_torch.flashloop`) computes on two tiny random Ouro models, for melt-bench's tests to compare
against without needing FlashLoop installed.

This script never runs in melt-bench's environment: it needs flashloop==0.1.0, which pins
transformers==4.56.2. Build a venv of its own (Python 3.10+; these commands, on a CPU box, made the shipped
fixture with Python 3.11.7):

    python3 -m venv /tmp/flvenv
    /tmp/flvenv/bin/pip install "torch==2.13.0+cpu"
    /tmp/flvenv/bin/pip install flashloop==0.1.0 transformers==4.56.2 safetensors==0.8.0

(torch 2.13.0+cpu came from a local wheel here; without the first line pip pulls the newest torch, a CUDA
build. Everything runs on the CPU, and the fixture's float outputs are only promised for the torch version
it records.) It also needs the official Ouro modeling code, which melt-bench does not vendor:
a directory holding `modeling_ouro.py` and `configuration_ouro.py`, e.g. a snapshot of the hub repo
ByteDance/Ouro-1.4B (`/tmp/flvenv/bin/hf download ByteDance/Ouro-1.4B modeling_ouro.py configuration_ouro.py
--local-dir DIR`; not tried where the fixture was made, which had no hub access). Then, from the repository
root:

    /tmp/flvenv/bin/python scripts/flashloop_reference.py --ouro-code DIR

Cases: "mha" (hidden 128, 2 heads x 64, 2 KV heads, intermediate 256, 2 layers, vocab 128, a 180-token
prompt, 20 greedy decode steps; the cache packs a group after step 12) and "gqa" (the same weights with
k_proj/v_proj cut to KV head 0, so 1 KV head). Weights are rounded to bfloat16 and stored so; everything
runs on their float32 upcast. Per case the fixture holds the reference's prefill logits, loop-3/4 token
masks and scores, greedy tokens, decode logits, decode key selections with source mass, and its byte
audit; plain Ouro's greedy tokens; and, for "mha" only (the engine refuses GQA), the optimised
FlashLoopEngine's free-run tokens with its loop-4 mask and scores (all zero: an engine bug).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import math
import shlex
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from flashloop import FlashLoopEngine
from flashloop import engine as flashloop_engine
from flashloop_torch import flashloop as flashloop_hooks
from flashloop_torch import token_updates

BASE_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "total_ut_steps": 4,
    "early_exit_threshold": None,  # logits from the last loop, as FlashLoop assumes (Ouro's default is 1.0)
}
PROMPT_LEN = 180  # with FlashLoop's 64-row groups and 64-row tail this makes a pack after decode step 12
MIN_DISTINCT_TOKENS = 8  # greedy tokens that repeat one id would exercise little of the decode path

PACKAGE = "_ouro_code"  # the name the given modeling code is imported under (it imports its config relatively)
PATCH_REASON = (
    "deleted UniversalTransformerCache.get_mask_sizes after import: it returns kv_offset = tokens already "
    "cached, and transformers 4.56.2's masking shifts key indices by that offset, so every decode step's "
    "causal mask admits only key 0; the inherited Cache.get_mask_sizes returns (query length, 0), which "
    "gives the correct prefill mask and an all-visible decode mask"
)


def load_ouro_code(code_dir: Path) -> tuple[types.ModuleType, dict]:
    """Import DIR/modeling_ouro.py as a package module, repair its decode mask if needed, say what was done."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(code_dir)]
    sys.modules[PACKAGE] = package
    modeling = importlib.import_module(f"{PACKAGE}.modeling_ouro")
    patched = breaks_decode_mask(modeling.UniversalTransformerCache)
    if patched:
        del modeling.UniversalTransformerCache.get_mask_sizes
    info = {
        "modeling_ouro_sha256": hashlib.sha256((code_dir / "modeling_ouro.py").read_bytes()).hexdigest(),
        "configuration_ouro_sha256": hashlib.sha256((code_dir / "configuration_ouro.py").read_bytes()).hexdigest(),
        "patched_get_mask_sizes": patched,
        "patch": PATCH_REASON if patched else "none: the cache class does not override get_mask_sizes with an offset",
    }
    return modeling, info


def breaks_decode_mask(cache_class: type) -> bool:
    """True if the class's own get_mask_sizes gives a non-zero kv_offset once tokens are cached."""
    if "get_mask_sizes" not in cache_class.__dict__:
        return False
    cache = cache_class()
    cache.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), 0)
    _, kv_offset = cache.get_mask_sizes(torch.tensor([8]), 0)
    return int(kv_offset) != 0


def make_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights with Ouro's key names: N(0, 1/fan_in) linears, RMSNorm weights in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim = (cfg["hidden_size"], cfg["num_attention_heads"],
                                         cfg["num_key_value_heads"], cfg["head_dim"])

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * (gain / math.sqrt(in_features))

    def norm() -> torch.Tensor:
        return torch.rand(hidden, generator=gen) + 0.5

    sd = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], hidden, generator=gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = linear(heads * head_dim, hidden, 1.5)  # gain 1.5: peakier attention
        sd[p + "self_attn.k_proj.weight"] = linear(kv_heads * head_dim, hidden, 1.5)
        sd[p + "self_attn.v_proj.weight"] = linear(kv_heads * head_dim, hidden)
        sd[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        sd[p + "mlp.gate_proj.weight"] = linear(cfg["intermediate_size"], hidden)
        sd[p + "mlp.up_proj.weight"] = linear(cfg["intermediate_size"], hidden)
        sd[p + "mlp.down_proj.weight"] = linear(hidden, cfg["intermediate_size"])
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                     "post_attention_layernorm_2"):
            sd[p + name + ".weight"] = norm()
    sd["model.norm.weight"] = norm()
    sd["model.early_exit_gate.weight"] = linear(1, hidden, 0.1)
    sd["model.early_exit_gate.bias"] = torch.zeros(1)
    sd["lm_head.weight"] = linear(cfg["vocab_size"], hidden, 3.0)  # gain 3: decisive greedy tokens
    return sd


def gqa_from_mha(sd: dict[str, torch.Tensor], kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The same weights with k_proj/v_proj cut to the first KV heads; views, so torch.save stores them once."""
    rows = kv_heads * head_dim
    return {k: v[:rows] if k.endswith(("k_proj.weight", "v_proj.weight")) else v for k, v in sd.items()}


def build_model(modeling: types.ModuleType, cfg: dict, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    config = modeling.OuroConfig(**cfg)
    config._attn_implementation = "eager"  # flashloop_torch reads the attention probabilities eager returns
    model = modeling.OuroForCausalLM(config).eval()
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


@contextlib.contextmanager
def recording(module: types.ModuleType, name: str) -> Iterator[list[tuple[tuple, object]]]:
    """Wrap module.name for the block; yields the (args, result) of each call."""
    original: Callable = getattr(module, name)
    calls: list[tuple[tuple, object]] = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    setattr(module, name, wrapper)
    try:
        yield calls
    finally:
        setattr(module, name, original)


@torch.inference_mode()
def run_dense(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    """Plain Ouro greedy decode with its cache, checked against one cache-free forward of the same tokens."""
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[0, -1]]
    for _ in range(steps):
        token = logits[-1].argmax().view(1, 1)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1])
    tokens = [int(x.argmax()) for x in logits]
    full = model(input_ids=torch.cat([ids, torch.tensor([tokens[:-1]])], 1), use_cache=False).logits[0]
    gap = float((full[ids.shape[1] - 1:] - torch.stack(logits)).abs().max())
    if gap > 1e-3:  # a wrong decode mask shows up here, not in the reference's own numbers
        raise SystemExit(f"cached decode differs from a cache-free forward by {gap:.3g}: the Ouro code's "
                         "mask handling does not work with this transformers")
    return tokens


@torch.inference_mode()
def run_reference(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> dict:
    """flashloop_torch driven like plain Ouro (FlashLoop's examples/generate.py --backend torch): greedy."""
    layers = int(model.config.num_hidden_layers)
    with recording(token_updates, "select_active_mask") as selections, flashloop_hooks(model) as hooks:
        prefill, attention = hooks["attention_and_prefill"].prefill, hooks["attention_and_prefill"].attention
        kv = hooks["kv"]
        out = model(input_ids=ids, use_cache=True)
        logits = out.logits[0].clone()
        case = {
            "prefill_logits": logits,
            "mask_loop3": prefill.active_masks[2][0].clone(),
            "mask_loop4": prefill.active_masks[3][0].clone(),
            "score_loop3": selections[0][0][0][0].float().clone(),  # the scores select_active_mask was given
            "score_loop4": selections[1][0][0][0].float().clone(),
        }
        tokens, decode_logits, decode_selections = [int(logits[-1].argmax())], [], []
        audit_bytes, pack_steps = [int(kv.audit()["total_packed_bytes"])], []
        for step in range(1, steps + 1):
            next_start = list(kv.compressor.next_start)
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            decode_logits.append(out.logits[0, -1].clone())
            tokens.append(int(decode_logits[-1].argmax()))
            decode_selections.append([{
                "indices": [row.nonzero().flatten().tolist() for row in attention.masks[layer][0, :, 0]],
                "source_mass": attention.source_masses[layer][0, :, 0, 0].float().clone(),
            } for layer in range(layers)])
            audit_bytes.append(int(kv.audit()["total_packed_bytes"]))
            if list(kv.compressor.next_start) != next_start:
                pack_steps.append(step)
    return case | {"tokens": tokens, "decode_logits": torch.stack(decode_logits),
                   "decode_selections": decode_selections, "bytes": audit_bytes, "pack_steps": pack_steps}


@torch.inference_mode()
def run_engine(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> dict:
    """FlashLoopEngine (validate_model=False, so it accepts a tiny model) free-running greedy on the CPU."""
    with recording(flashloop_engine, "_hidden_delta_score") as scores:
        engine = FlashLoopEngine(model, validate_model=False)
        result = engine.prefill(ids)
        mask_loop4 = result.state.mask_loop4[0].clone()
        tokens = [int(result.logits[0].argmax())]
        for _ in range(steps):
            tokens.append(int(engine.decode(torch.tensor([[tokens[-1]]])).logits[0].argmax()))
    return {"engine_tokens": tokens, "engine_mask_loop4": mask_loop4,
            "engine_score_loop4": scores[1][1][0].float().clone()}  # second call: loop 4's scores


def make_case(modeling: types.ModuleType, cfg: dict, sd: dict[str, torch.Tensor], prompt: list[int],
              steps: int, with_engine: bool) -> dict:
    ids = torch.tensor([prompt])
    case = {"config": cfg, "state_dict": sd, "prompt": prompt}
    case |= run_reference(build_model(modeling, cfg, sd), ids, steps)
    case["dense_tokens"] = run_dense(build_model(modeling, cfg, sd), ids, steps)
    if with_engine:
        case |= run_engine(build_model(modeling, cfg, sd), ids, steps)
    distinct = len(set(case["tokens"]))
    if distinct < MIN_DISTINCT_TOKENS:
        raise SystemExit(f"degenerate weights: only {distinct} distinct reference tokens; try another --seed")
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ouro-code", type=Path, required=True,
                        help="directory with the official modeling_ouro.py and configuration_ouro.py")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/flashloop_reference.pt"))
    parser.add_argument("--seed", type=int, default=0)  # with q/k gain 1.5: varied tokens, stable fp32 sums
    parser.add_argument("--decode-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one summation order, so a rerun on the same torch gives the same bits
    started = time.perf_counter()

    modeling, ouro_code = load_ouro_code(args.ouro_code.resolve())
    mha_sd = {k: v.to(torch.bfloat16) for k, v in make_weights(BASE_CONFIG, args.seed).items()}
    gqa_cfg = BASE_CONFIG | {"num_key_value_heads": 1}
    gqa_sd = gqa_from_mha(mha_sd, gqa_cfg["num_key_value_heads"], gqa_cfg["head_dim"])
    prompt = torch.randint(0, BASE_CONFIG["vocab_size"], (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    fixture = {
        "versions": {"torch": str(torch.__version__), "transformers": transformers.__version__,
                     "flashloop": importlib.metadata.version("flashloop")},
        "generated_by": "python " + shlex.join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": args.seed,
        "ouro_code": ouro_code,
        "cases": {
            "mha": make_case(modeling, BASE_CONFIG, mha_sd, prompt, args.decode_steps, with_engine=True),
            "gqa": make_case(modeling, gqa_cfg, gqa_sd, prompt, args.decode_steps, with_engine=False),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)  # plain containers only, so torch.load(weights_only=True) reads it
    for name, case in fixture["cases"].items():
        print(f"{name}: tokens {case['tokens']} packs after {case['pack_steps']} bytes {case['bytes'][0]}.."
              f"{case['bytes'][-1]}")
    print(f"{args.out}: {args.out.stat().st_size} bytes in {time.perf_counter() - started:.1f} s; "
          f"Ouro code patch: {ouro_code['patch']}")


if __name__ == "__main__":
    main()
