"""Accuracy across loop counts: lm-eval tasks on our models, one results row per (model, loops,
task, metric, filter), with the peak memory of the evaluation. Each point runs in a fresh child
that loads the model, so its peak memory is its own whatever ran before it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from melt_bench.evaluation.byte_tokenizer import load_tokenizer
from melt_bench.evaluation.lm_eval_logs import lm_eval_output
from melt_bench.models import load_model
from melt_bench.running.ranks import distributed_rank, gather_from_ranks
from melt_bench.running.results import ResultRow, ResultsStore
from melt_bench.running.sweep import in_child, pending_points, run_sweep
from melt_bench.scenarios.accuracy import AccuracyPoint
from melt_bench.scenarios.point_setup import classify_failure, kv_metrics, weights_origin
from melt_bench.trackers.memory_trackers import CudaAllocatorTracker, RssTracker
from melt_bench.units import parse_dtype


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


def run_accuracy(
    points: list[AccuracyPoint],
    store: ResultsStore,
    meta: dict,
    task_manager,
    tokenizer_source: str | None = None,
    log_path: Path | None = None,
    show_progress: bool = True,
    executor=None,
    retry_failed: bool = False,
    timeout_s: float | None = None,
) -> tuple[int, int]:
    """Evaluate every point not yet in `store` through the sweeps' runner: each point in a fresh
    child that loads the model (so no point's peak memory depends on what ran before it), on
    `executor` (one at a time, one per GPU, or Ray tasks). Under `accelerate launch` every rank
    evaluates in its own process instead (the ranks form one process group). lm-eval's output
    goes to `log_path`. Returns (run, skipped)."""
    args = (task_manager, tokenizer_source, meta, log_path)
    if distributed_rank()[1] > 1:
        return _run_on_ranks(points, store, args, retry_failed)
    status = run_sweep("accuracy", points, store, in_child(measure_accuracy_point, args, timeout_s), meta,
                       retry_failed, show_progress=show_progress, executor=executor)
    return status.ran, status.skipped


def _run_on_ranks(points: list[AccuracyPoint], store: ResultsStore, args: tuple, retry_failed: bool) -> tuple[int, int]:
    """Under accelerate launch: every rank evaluates each point in its own process, together;
    rank 0 writes the rows."""
    todo = pending_points(points, store, retry_failed)
    for point in todo:
        rows, _ = evaluate_point(point, *args)
        for row in rows:
            store.append(row)
    return len(todo), len(points) - len(todo)


def measure_accuracy_point(point: AccuracyPoint, task_manager, tokenizer_source: str | None, meta: dict,
                           log_path: Path | None) -> dict:
    """In the point's child: its rows and the unexpected lm-eval warnings, for the runner."""
    rows, warnings = evaluate_point(point, task_manager, tokenizer_source, meta, log_path)
    return {"rows": rows, "warnings": [f"lm-eval warning: {warning}" for warning in warnings]}


def evaluate_point(point: AccuracyPoint, task_manager, tokenizer_source: str | None, meta: dict,
                   log_path: Path | None) -> tuple[list[ResultRow], list[str]]:
    """Load the point's model and evaluate it (in the child). Returns its rows and the
    unexpected lm-eval warnings (the rest is in `log_path`)."""
    from lm_eval import simple_evaluate

    from melt_bench.evaluation.lm_eval_adapter import LoopedHFLM
    device = point.device
    local_rank, world = distributed_rank()
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # data parallel: one model copy per GPU
    with lm_eval_output(log_path, capture_stderr=world == 1) as warnings:
        model = load_model(point.model, point.weights, dtype=parse_dtype(point.dtype), device=device,
                           kv_policy=point.kv_policy, decode_reads=point.decode_reads, kv_quant=point.kv_quant)
        tokenizer = load_tokenizer(point.weights, tokenizer_source)
        lm = LoopedHFLM(model, tokenizer, loops=point.loops, exit_mode=point.exit_mode,
                        score_continuation_as=point.score_continuation_as, batch_size=point.batch_size,
                        generate_with=point.generate_with,
                        max_length=model.config.max_position_embeddings)
        rows = _evaluate(lm, point, task_manager, simple_evaluate, meta)
    return rows, list(warnings)


# The probe's length: a packed cache (flashloop, --kv-quant) keeps its newest rows at full
# precision, so its bytes per token depend on the length; every policy is measured at this one.
KV_PROBE_TOKENS = 2048


def measured_kv_bytes_per_token(model, loops: int, tokens: int = KV_PROBE_TOKENS) -> int:
    """KV-cache bytes per token the model holds at `loops` loops, measured: the storage bytes of
    a cache sized to exactly `tokens` tokens after a forward over them (batch 1, as one prompt),
    less MELT's open-chunk side buffer, which is per sequence (measured_side_buffer_bytes)."""
    cache = model.new_cache(loops, capacity=tokens)
    ids = torch.full((1, tokens), model.config.eos_token_id or 0, device=model.device)
    with torch.no_grad():
        model(ids, past_key_values=cache, loops=loops, logits_to_keep=1)
    return (cache.nbytes() - cache.side_nbytes()) // tokens


def measured_side_buffer_bytes(model, loops: int) -> int:
    """Bytes of the open-chunk side buffer one sequence holds at `loops` loops, at full size (a
    cache of one chunk's capacity, allocated; 0 where decoded tokens read final rows)."""
    chunk = model.kv_policy.open_chunk
    return 0 if chunk is None else model.new_cache(loops, capacity=chunk, batch_size=1).side_nbytes()


def responses_hash(results: dict, task: str) -> str:
    """SHA-256 of every document's id and raw responses (the model's generations or
    log-likelihoods before lm-eval's filters), in document order: equal hashes mean the same
    documents got the same answers (one process or several). Not the filtered answers: those
    collapse every unparsable generation to "[invalid]", equal across models that differ."""
    # each filter logs the same raw responses; a rank's padding request (lm-eval evens out the
    # ranks' shares) adds its copy to the last request's responses: each request keeps its repeats
    repeats = int(results.get("configs", {}).get(task, {}).get("repeats") or 1)
    raw = {s["doc_id"]: [responses[:repeats] for responses in s["resps"]] for s in results["samples"][task]}
    return hashlib.sha256(json.dumps(sorted(raw.items()), default=str).encode()).hexdigest()


def fewshot_used(results: dict, task: str) -> int | None:
    """The few-shot count lm-eval ran the task with (the task's default where none was asked)."""
    shots = results.get("n-shot", {}).get(task)
    return int(shots) if isinstance(shots, (int, float)) else None


def document_scores(results: dict, task: str, metric: str, filter_name: str) -> list[list] | None:
    """[doc_id, score] of every scored document for one metric and filter, in document order, from
    lm-eval's per-sample log: what a paired comparison of two runs over the same documents needs
    (reporting/paired.py). None where the metric has no number per document (a corpus metric)."""
    scores = []
    for sample in results["samples"][task]:
        if sample.get("filter") != filter_name:
            continue
        value = sample.get(metric)
        if not isinstance(value, (bool, int, float)):  # bool is an int: a 0/1 score
            return None
        scores.append([sample["doc_id"], float(value)])
    return sorted(scores) or None


def _evaluate(lm, point: AccuracyPoint, task_manager, simple_evaluate, meta: dict) -> list[ResultRow]:
    device = torch.device(point.device)
    rss, allocator = RssTracker(), (CudaAllocatorTracker(torch.cuda, device) if device.type == "cuda" else None)
    rss.start()
    if allocator is not None:
        allocator.start()
    started = time.perf_counter()
    results = None
    try:
        # samples logged: their responses' hash says which answers produced the score
        results = simple_evaluate(
            model=lm, tasks=[point.task], num_fewshot=point.num_fewshot, limit=point.limit,
            task_manager=task_manager, log_samples=True,
            gen_kwargs=f"max_gen_toks={point.max_gen_toks}" if point.max_gen_toks else None,
        )
        scores, status, error = (metric_rows(results, point.task) if results else []), "ok", None
    except Exception as exc:
        scores, status, error = [], classify_failure(exc), f"{type(exc).__name__}: {exc}"[:2000]
    wall = time.perf_counter() - started
    rss_result = rss.result()
    memory = {"rss_peak_above_baseline_bytes": rss_result.peak_above_baseline_bytes, "rss_source": rss_result.source,
              "rss_malloc": rss_result.malloc}
    if allocator is not None:
        memory["cuda_max_allocated_bytes"] = allocator.result().max_allocated_bytes
    memory["peak_bytes"] = memory.get("cuda_max_allocated_bytes", memory["rss_peak_above_baseline_bytes"])
    memory["peak_source"] = ("torch.cuda.max_memory_allocated" if allocator
                             else "process RSS above baseline (in-process)")
    per_rank = gather_from_ranks(memory["peak_bytes"])  # every rank takes part; rank 0 keeps the list
    if results is None and status == "ok":  # a non-zero rank under accelerate launch: rank 0 writes the rows
        return []
    if per_rank is not None:
        memory.update(peak_bytes_per_rank=per_rank, peak_bytes=max(per_rank), ranks=len(per_rank),
                      peak_source=memory["peak_source"] + ", the largest of the ranks")
    if status != "ok":
        return [ResultRow("accuracy", point.point_id, point.to_dict(), status, error, memory, meta, wall)]
    memory["responses_sha256"] = responses_hash(results, point.task)
    memory["num_fewshot_used"] = fewshot_used(results, point.task)
    memory.update(weights_origin(point.model, point.weights, lm.model))
    probe = point.kv_probe_tokens or KV_PROBE_TOKENS
    kv = {"kv_bytes_per_token": measured_kv_bytes_per_token(lm.model, point.loops, probe),
          "kv_side_buffer_bytes_per_sequence": measured_side_buffer_bytes(lm.model, point.loops),
          "kv_source": f"LoopedKVCache.nbytes() / {probe} after a {probe}-token forward",
          "kv_probe_tokens": probe, "torch_num_threads": torch.get_num_threads(),
          "exited_early_fraction": lm.exited_early_fraction, "exit_tokens": lm.exit_counts[1],
          # log-likelihood requests and how their continuations were scored (none: the task generates)
          "loglikelihood_requests": lm.loglikelihood_requests,
          "continuation_scored_as": point.score_continuation_as if lm.loglikelihood_requests else None,
          "generation": lm.generation_path,
          **kv_metrics(lm.model)}
    return [
        ResultRow("accuracy", point.point_id, {**point.to_dict(), "metric": metric, "filter": filter_name}, "ok", None,
                  {"value": value, "stderr": stderr, "n_samples": n, "eval_s": wall, **memory, **kv,
                   "document_scores": document_scores(results, point.task, metric, filter_name)}, meta, wall)
        for metric, filter_name, value, stderr, n in scores
    ]
