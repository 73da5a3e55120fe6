"""Accuracy across loop counts: lm-eval tasks on our models, one results row per (model, loops,
task, metric, filter), with the peak memory of the evaluation. Each model is loaded once; the
loop count and exit mode change between runs on the same weights."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from melt_bench.models import load_model

from .measure_memory import classify_failure
from .memory_trackers import CudaAllocatorTracker, RssTracker
from .results import ResultRow, ResultsStore
from .units import parse_dtype


@dataclass(frozen=True)
class AccuracyPoint:
    """One evaluation run: a model at a loop count and exit mode on one task."""

    model: str
    loops: int
    task: str
    exit_mode: str = "last"
    num_fewshot: int | None = None  # None = the task's default
    limit: int | None = None
    batch_size: int = 1
    max_gen_toks: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    weights: str | None = None
    data_dir: str | None = None

    @property
    def point_id(self) -> str:
        blob = json.dumps({"command": "accuracy", **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"command": "accuracy", **asdict(self)}


def metric_rows(results: dict, task: str) -> list[tuple[str, str, float, float | None, int]]:
    """(metric, filter, value, stderr, n) for every metric lm-eval reported for `task`."""
    scores = results["results"][task]
    n = int(results["n-samples"][task]["effective"])
    rows = []
    for key, value in scores.items():
        metric, sep, filter_name = key.partition(",")
        if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = scores.get(f"{metric}_stderr,{filter_name}")
        rows.append((metric, filter_name, float(value), None if stderr in (None, "N/A") else float(stderr), n))
    return rows


def load_tokenizer(weights: str | None, tokenizer: str | None):
    """The tokenizer to use: --tokenizer, else the checkpoint's, else the built-in byte tokenizer
    (random weights have no tokenizer of their own)."""
    source = tokenizer or weights
    if source is None:
        from .byte_tokenizer import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def run_accuracy(
    points: list[AccuracyPoint],
    store: ResultsStore,
    meta: dict,
    tokenizer_source: str | None = None,
    on_point: Callable[[AccuracyPoint], None] | None = None,
) -> tuple[int, int]:
    """Evaluate every point not yet in `store`. Returns (run, skipped)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .lm_eval_adapter import LoopedHFLM, distributed_rank, local_task_dir

    done = store.recorded_ids()
    todo = [p for p in points if p.point_id not in done]
    by_model: dict[tuple, list[AccuracyPoint]] = {}
    for point in todo:
        by_model.setdefault((point.model, point.weights, point.dtype, point.device, point.batch_size), []).append(point)
    with tempfile.TemporaryDirectory() as scratch:
        data_dirs = {p.data_dir for p in todo if p.data_dir}
        include = [str(local_task_dir(Path(d), sorted({p.task for p in todo}), Path(scratch) / str(i)))
                   for i, d in enumerate(sorted(data_dirs))]
        task_manager = TaskManager(include_path=include or None)
        for (model_name, weights, dtype, device, batch_size), group in by_model.items():
            local_rank, world = distributed_rank()
            if world > 1 and device.startswith("cuda"):
                device = f"cuda:{local_rank}"  # data parallel: one model copy per GPU
            model = load_model(model_name, weights, dtype=parse_dtype(dtype), device=device)
            tokenizer = load_tokenizer(weights, tokenizer_source)
            lm = LoopedHFLM(model, tokenizer, loops=group[0].loops, batch_size=batch_size,
                            max_length=model.config.max_position_embeddings)
            for point in group:
                lm.loops, lm.exit_mode = point.loops, point.exit_mode
                for row in _evaluate(lm, point, task_manager, simple_evaluate, meta):
                    store.append(row)
                if on_point is not None:
                    on_point(point)
            del lm, model
    return len(todo), len(points) - len(todo)


KV_PROBE_TOKENS = 16


def measured_kv_bytes_per_token(model, loops: int) -> int:
    """KV-cache bytes per token the model holds at `loops` loops, measured: the storage bytes of
    a cache sized to exactly KV_PROBE_TOKENS tokens after a forward over them (batch 1)."""
    cache = model.new_cache(loops, capacity=KV_PROBE_TOKENS)
    ids = torch.full((1, KV_PROBE_TOKENS), model.config.eos_token_id or 0, device=model.device)
    with torch.no_grad():
        model(ids, past_key_values=cache, loops=loops, logits_to_keep=1)
    return cache.nbytes() // KV_PROBE_TOKENS


def _evaluate(lm, point: AccuracyPoint, task_manager, simple_evaluate, meta: dict) -> list[ResultRow]:
    device = torch.device(point.device)
    rss, allocator = RssTracker(), (CudaAllocatorTracker(torch.cuda, device) if device.type == "cuda" else None)
    rss.start()
    if allocator is not None:
        allocator.start()
    started = time.perf_counter()
    try:
        results = simple_evaluate(
            model=lm, tasks=[point.task], num_fewshot=point.num_fewshot, limit=point.limit,
            task_manager=task_manager, log_samples=False,
            gen_kwargs=f"max_gen_toks={point.max_gen_toks}" if point.max_gen_toks else None,
        )
        if results is None:  # a non-zero rank under accelerate launch: rank 0 writes the rows
            return []
        scores, status, error = metric_rows(results, point.task), "ok", None
    except Exception as exc:
        scores, status, error = [], classify_failure(exc), f"{type(exc).__name__}: {exc}"[:2000]
    wall = time.perf_counter() - started
    memory = {"rss_peak_above_baseline_bytes": rss.result().peak_above_baseline_bytes, "rss_source": rss.source}
    if allocator is not None:
        memory["cuda_max_allocated_bytes"] = allocator.result().max_allocated_bytes
    memory["peak_bytes"] = memory.get("cuda_max_allocated_bytes", memory["rss_peak_above_baseline_bytes"])
    memory["peak_source"] = "torch.cuda.max_memory_allocated" if allocator else "process RSS above baseline (in-process)"
    if status != "ok":
        return [ResultRow("accuracy", point.point_id, point.to_dict(), status, error, memory, meta, wall)]
    kv = {"kv_bytes_per_token": measured_kv_bytes_per_token(lm.model, point.loops),
          "kv_source": f"LoopedKVCache.nbytes() / {KV_PROBE_TOKENS} after a {KV_PROBE_TOKENS}-token forward"}
    return [
        ResultRow("accuracy", point.point_id, {**point.to_dict(), "metric": metric, "filter": filter_name}, "ok", None,
                  {"value": value, "stderr": stderr, "n_samples": n, "eval_s": wall, **memory, **kv}, meta, wall)
        for metric, filter_name, value, stderr, n in scores
    ]
