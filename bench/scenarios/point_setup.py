"""What every scenario's child does around its measurement: how a failure is classified (an OOM
is data), how a model's weights and KV settings are read into the row, how the prompt is
prefilled. One place, so memory, latency, capacity and accuracy agree."""

from __future__ import annotations

from pathlib import Path

import torch

from melt_bench.models.packed_cache import QUANT_TAIL_RULES, quant_tail
from melt_bench.scenarios.latency import LatencyPoint
from melt_bench.scenarios.memory import MemoryPoint


def classify_failure(exc: BaseException) -> str:
    """'oom' for out-of-memory of any device, else 'error'."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return "oom"
    text = str(exc).lower()
    if "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text:
        return "oom"
    return "error"


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the storages behind a module's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def prefill_chunking(model, point: MemoryPoint | LatencyPoint) -> tuple[list[int] | None, dict]:
    """How the prompt is prefilled: chunk_starts for forward(), and the row's fields saying so:
    `prefill_chunk_tokens` (tokens per chunk) and `prompt_kv_shared`. An Ouro-family model takes
    `point.prefill_chunk`; MELT chunks by its config's chunk_size, which is part of the model (its
    results depend on it). A later chunk reads the earlier chunks' rows as the KV policy keeps
    them: exact for per-loop (each loop's own rows, as one whole prefill), but under a policy that
    shares rows across loops (last-loop, mean, modulo:N below the loops, MELT) the prompt itself
    is then processed under the sharing, not only the decoded tokens (the Ouro paper's KV-sharing
    study shares at decode, after a whole prefill): `prompt_kv_shared` is True there."""
    policy = model.kv_policy
    own = policy.chunk_size
    if own is not None:
        starts, tokens = None, min(own, point.seq_len)
    elif point.prefill_chunk is None or point.prefill_chunk >= point.seq_len:
        starts, tokens = None, point.seq_len
    else:
        starts, tokens = list(range(0, point.seq_len, point.prefill_chunk)), point.prefill_chunk
    shared = tokens < point.seq_len and policy.shares_rows(point.loops)
    return starts, {"prefill_chunk_tokens": tokens, "prompt_kv_shared": shared}


def kv_metrics(model) -> dict:
    """How the point's keys/values were kept: the KV policy it ran under, the KV quantisation and
    which rows it keeps at full precision, and, for MELT, its chunk size and what decoded tokens
    read (decode_reads)."""
    metrics = {"kv_policy": model.kv_policy.name, "kv_quant": model.config.kv_quant or "none"}
    if (tail := quant_tail(model.config.kv_quant)) is not None:
        metrics["kv_quant_rule"] = f"{tail}: {QUANT_TAIL_RULES[tail]}"
    if hasattr(model.config, "decode_reads"):
        metrics.update(chunk_size=model.config.chunk_size, decode_reads=model.config.decode_reads)
    return metrics


def weights_origin(preset: str, weights: str | None, model) -> dict:
    """Where the point's weights came from, for the row: `weights_source` "random" (the preset's
    seeded initialisation: its scores say nothing about the model), "local" (a checkpoint
    directory) or "hub" (a hub id, with the commit transformers resolved as `weights_revision`);
    and for a MELT model its gate's: "random", "fresh" (Ouro's weights under a new, untrained
    gate: MeltForCausalLM.from_ouro) or "checkpoint" (a MELT checkpoint's own gate). `weights_from`
    names the preset and seed, the resolved directory or the hub id."""
    if weights is None:
        origin = {"weights_source": "random", "weights_from": f"preset {preset}, torch.manual_seed(0)",
                  "weights_revision": None}
    else:
        local = Path(weights).expanduser().is_dir()
        origin = {"weights_source": "local" if local else "hub",
                  "weights_from": str(Path(weights).expanduser().resolve()) if local else weights,
                  "weights_revision": getattr(model.config, "_commit_hash", None)}
    if hasattr(model.config, "decode_reads"):  # a MELT model
        from transformers import PreTrainedConfig  # the file load_model read: cached, no download

        given = weights is not None and PreTrainedConfig.get_config_dict(str(weights))[0].get("model_type")
        origin["melt_gate"] = "random" if weights is None else "fresh" if given == "ouro" else "checkpoint"
    return origin
