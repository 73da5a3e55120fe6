"""lm-eval glue: our looped models behind lm-eval's own HFLM (so prompts, few-shot selection,
filters and metrics are lm-eval's), with the loop count and exit mode set per run on the same
loaded weights, and local copies of task data for machines without the hub."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM

from melt_bench.evaluation.batched_generation import batcher_problem, generate_until_batched
from melt_bench.evaluation.exit_modes import CONTINUATION_SCORING, EXIT_MODES, GENERATE_WITH, exit_kwargs  # noqa: F401
from melt_bench.evaluation.task_files import checked_task_files, shipped_task
from melt_bench.models.huginn_kv import is_huginn_kv_policy, parse_huginn_kv_policy
from melt_bench.models.kv_policy import is_training_free, parse_kv_policy, policy_alters_rows
from melt_bench.models.packed_cache import quant_bits
from melt_bench.running.ranks import distributed_rank


def chunk_scoring_problem(kv_policy: str | None, loops: int, kv_quant: str | None = None) -> str | None:
    """Why `--score-continuation-as chunk` cannot score `kv_policy` (with `kv_quant`) at `loops`
    loops, or None: one forward reads the rows each loop computed, at full precision."""
    if quant_bits(kv_quant) is not None:
        return (f"chunk scoring with kv_quant={kv_quant} would read the context's full-precision rows in one forward, "
                "not the packed rows generation reads; use decode")
    if kv_policy is None:
        return None
    if is_huginn_kv_policy(kv_policy):  # (Huginn-0125's layer layout, which every Huginn preset has)
        if not parse_huginn_kv_policy(kv_policy).alters_rows(loops):
            return None
    elif not is_training_free(kv_policy) or not policy_alters_rows(kv_policy, loops):
        return None
    return (f"chunk scoring under KV policy {parse_kv_policy(kv_policy)!r} at {loops} loops would read every "
            "loop's own rows in one forward (as per-loop keeps them), not the rows the policy keeps; use decode")


def default_scoring(kv_policy: str | None, loops: int, kv_quant: str | None = None) -> str:
    """`chunk` (one forward, the faster) unless that would not compute the policy: then `decode`."""
    return "decode" if chunk_scoring_problem(kv_policy, loops, kv_quant) else "chunk"


class LoopedHFLM(HFLM):
    """HFLM over a LoopedForCausalLM; `loops` and `exit_mode` may change between evaluations.

    Under `accelerate launch` (data parallel), each process holds its own copy of the model on
    its own GPU; HFLM does not wire that up for a model passed as an object, so we do: requests
    are sharded by rank and lm-eval gathers the results on rank 0."""

    def __init__(self, model, tokenizer, loops: int, exit_mode: str = "last", score_continuation_as: str = "chunk",
                 generate_with: str = "continuous-batching", **kwargs) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        if score_continuation_as not in CONTINUATION_SCORING:
            raise ValueError(f"score_continuation_as must be one of {', '.join(CONTINUATION_SCORING)}")
        self.loops = loops
        self.exit_mode = exit_mode
        self.score_continuation_as = score_continuation_as
        if generate_with not in GENERATE_WITH:
            raise ValueError(f"generate_with must be one of {', '.join(GENERATE_WITH)}")
        self.generate_with = generate_with
        self.generation_path: str | None = None  # how generate_until ran (None: the task only scores)
        self.loglikelihood_requests = 0  # requests scored (0: the task only generates)
        # per-token exits seen by the forwards (threshold and official modes): [early, all]
        self.exit_counts = [0, 0]
        self.model.register_forward_hook(self._count_exits)
        rank, world = distributed_rank()
        if world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=self.model.device.type == "cpu")  # CPU ranks: gloo
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes

    def _count_exits(self, module, args, output) -> None:
        steps = getattr(output, "exit_steps", None)
        if steps is not None:
            self.exit_counts[0] += int((steps < self.loops - 1).sum())
            self.exit_counts[1] += steps.numel()

    @property
    def exited_early_fraction(self) -> float | None:
        """Of the positions whose logits the evaluation used, the fraction that exited before the
        last loop (None where the exit mode has no per-token exit)."""
        early, total = self.exit_counts
        return early / total if total else None

    @property
    def run_kwargs(self) -> dict:
        return {"loops": self.loops, **exit_kwargs(self.exit_mode)}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, use_cache=False, **self.run_kwargs).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        self.loglikelihood_requests += len(requests)
        if self.score_continuation_as == "chunk":
            policy = self.model.kv_policy
            problem = chunk_scoring_problem(policy.name if policy.training_free else None, self.loops,
                                            self.model.config.kv_quant)
            if problem:
                raise ValueError(problem)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        if self.model.config.model_type == "huginn_raven":
            # its prefill in pieces returns the last piece's logits only, not one per continuation token
            raise ValueError(f"log-likelihood tasks scored as decoded are not built for Huginn (KV policy "
                             f"{self.model.kv_policy.name} at {self.loops} steps shares rows); use --kv-policy full")
        return [self._score_as_decoded(*request) for request in requests]

    def _score_as_decoded(self, request_str, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """(log-probability of the continuation, whether greedy decoding yields it), each
        continuation token computed as when it is generated after the context (one request per
        forward: rows differ in where the context ends)."""
        tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]
        context = len(tokens) - len(continuation_enc)
        ids = torch.tensor([tokens[:-1]], device=self.device)
        with torch.no_grad():
            starts = decoding_chunk_starts(self.model, context, ids.shape[1], self.loops)
            logits = self.model(ids, use_cache=False, chunk_starts=starts, **self.run_kwargs).logits
        scored = torch.log_softmax(logits[0, context - 1:].float(), dim=-1)
        target = torch.tensor(continuation_enc, device=scored.device)
        answer = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
        if request_str is not None:
            self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answer

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation through the continuous batcher (--batch-size slots), or generate()
        where the batcher cannot serve the run, or when asked (generate_with="generate")."""
        problem = batcher_problem(self) if self.generate_with == "continuous-batching" else "asked for"
        batched = None if problem else generate_until_batched(
            self, requests, self.batch_size if isinstance(self.batch_size, int) else 1)
        if batched is not None:
            texts, slots = batched
            self.generation_path = f"continuous batching, {slots} slots, eager decode engine"
            return texts
        self.generation_path = f"generate(), left-padded batches of {self.batch_size} ({problem or 'sampling asked'})"
        return super().generate_until(requests, disable_tqdm)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        # HFLM passes the left-padding attention mask in generation_kwargs; our forward honours it.
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **self.run_kwargs)


def decoding_chunk_starts(model, context: int, length: int, loops: int) -> list[int] | None:
    """The chunk split under which one forward over `length` tokens computes what prefilling the
    first `context` and then decoding one token at a time computes: the context in the chunks
    generation prefills it in (MELT: chunk_size; Ouro-family: one), then one chunk per token.
    MELT continuing the chunk grid, and an Ouro-family policy that keeps every loop's rows at
    `loops` loops (per-loop), compute that in one forward (None)."""
    policy = model.kv_policy
    exact = not policy.alters_rows(loops) and quant_bits(model.config.kv_quant) is None
    if policy.open_chunk is not None or (policy.chunk_size is None and exact):
        return None
    return [*range(0, context, policy.chunk_size or max(context, 1)), *range(context, length)]


def local_task_dir(data_dir: Path, tasks: list[str], into: Path) -> Path:
    """Task YAMLs that read local JSONL copies instead of the hub; each overrides lm-eval's task
    of the same name (prompts, filters and metrics still come from lm-eval's own YAML via
    `include`). Looks for DATA_DIR/TASK/{train,test}.jsonl, or DATA_DIR/{train,test}.jsonl for
    a single task. Returns `into`, for TaskManager(include_path=...)."""
    builtin = Path(lm_eval.__file__).parent / "tasks"
    into.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        files = checked_task_files(data_dir, task)
        base = shipped_task(task) or next(iter(sorted(builtin.rglob(f"{task}.yaml"))), None)
        if base is None:
            raise FileNotFoundError(f"lm-eval has no task YAML named {task}.yaml to take prompts and metrics from")
        lines = [f"include: {base}", f"task: {task}", "dataset_path: json", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {path.resolve()}" for split, path in files.items()]
        (into / f"{task}_local.yaml").write_text("\n".join(lines) + "\n")
    return into
