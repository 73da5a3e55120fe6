"""Every name a user can type for a model setting, with nothing heavy imported: the command line
checks its flags against these before torch loads (several seconds), so a bad flag is refused at
once. The classes behind the names live elsewhere; tests/test_names.py keeps the two in step."""

from __future__ import annotations

import re
from typing import Literal, get_args

MAX_LOOPS = 64
# dtype names -> the torch attribute (units.parse_dtype)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DecodeReads = Literal["final", "chunk"]  # MeltConfig.decode_reads
DECODE_READS: tuple[str, ...] = get_args(DecodeReads)
GATES = ("elementwise", "scalar", "mean", "ema", "last")  # MeltConfig.gate: the paper's ablation (melt_gates.py)
# packed_cache.py: "int8" / "int4" keep KIVI's full-precision rows (kivi_cache.py), ":flashloop-tail"
# FlashLoop's tail rule; "none" on the command line: full precision
KvQuant = Literal["int8", "int4", "int8:flashloop-tail", "int4:flashloop-tail"]
KV_QUANT: tuple[str, ...] = ("none", *get_args(KvQuant))
# latency --engine: eager and compiled run decode_engine.py's static-shape decode step, forward
# the model's own forward()
Engine = Literal["eager", "compiled", "forward"]
LATENCY_ENGINES: tuple[str, ...] = get_args(Engine)
STEP_ENGINES = LATENCY_ENGINES[:2]

# KV policies (kv_policy.py) by the name `--kv-policy` takes; "KIND:N" passes N slots per layer.
PLAIN_KV_POLICIES = ("per-loop", "last-loop", "mean", "first-loop", "flashloop", "shared-gated")
SLOTTED_KV_POLICIES = {"modulo": 1, "first-then-shared": 2}  # kind -> the fewest slots it takes
TRAINING_FREE_POLICIES = ("per-loop", "last-loop", "mean", "first-loop", "modulo:N", "first-then-shared:S",
                          "flashloop")
_LEGACY = {"per_loop": "per-loop", "shared_gated": "shared-gated"}  # names of earlier releases


class UnknownKVPolicyError(ValueError):
    pass


# Huginn's own cache lookup strategies (models/huginn_kv.py), named as its code names them.
HUGINN_KV_POLICIES = ("full", "compress-sN", "compress-rN", "compress-anchor", "latest-m4")
HUGINN_FROM_OURO = ("per-loop", "last-loop")  # Ouro's policies with a Huginn equivalent (full, compress-s4)


def is_huginn_kv_policy(spec: str) -> bool:
    return spec in ("full", "compress-anchor", "latest-m4") or re.fullmatch(r"compress-[sr][1-9]\d*", spec) is not None


def parse_kv_policy(spec: str) -> str:
    """The canonical name of a policy spec ('modulo:2', 'first-then-shared' -> 'first-then-shared:2');
    UnknownKVPolicyError naming the choices otherwise."""
    spec = _LEGACY.get(spec, spec)
    if spec in PLAIN_KV_POLICIES or is_huginn_kv_policy(spec):
        return spec
    kind, sep, count = spec.partition(":")
    if kind == "first-then-shared" and not sep:
        return "first-then-shared:2"
    if kind in SLOTTED_KV_POLICIES and count.isdigit() and int(count) >= 1:
        if int(count) < SLOTTED_KV_POLICIES[kind]:
            raise UnknownKVPolicyError(f"KV policy {spec!r}: {kind} needs at least {SLOTTED_KV_POLICIES[kind]} slots")
        if int(count) > MAX_LOOPS:  # no run has more loops than that, so more slots are never used
            raise UnknownKVPolicyError(f"KV policy {spec!r}: at most {MAX_LOOPS} slots (the loop limit)")
        return f"{kind}:{int(count)}"
    raise UnknownKVPolicyError(f"unknown KV policy {spec!r}; choose from {', '.join(TRAINING_FREE_POLICIES)} "
                               f"(N, S: slots per layer), or for Huginn models {', '.join(HUGINN_KV_POLICIES)}")
