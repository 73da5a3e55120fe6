"""lm-eval glue: our looped models behind lm-eval's own HFLM (so prompts, few-shot selection,
filters and metrics are lm-eval's), with the loop count and exit mode set per run on the same
loaded weights, and local copies of task data for machines without the hub."""

from __future__ import annotations

import os
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM

from .jsonl import iter_jsonl

EXIT_MODES = ("last", "step:K", "threshold:P", "expected", "official")


def exit_kwargs(mode: str) -> dict:
    """'last' -> {}; 'step:2' -> exit after loop 2 (exit_at_step=1); 'threshold:0.9';
    'expected' (exit-probability-weighted logits); 'official' (the released code's default rule,
    early_exit_threshold in the model's dtype). The official Ouro keyword names."""
    if mode == "last":
        return {}
    if mode == "expected":
        return {"use_weighted_exit": True}
    if mode == "official":
        return {"official_exit": True}
    kind, _, value = mode.partition(":")
    try:
        if kind == "step" and int(value) >= 1:
            return {"exit_at_step": int(value) - 1}
        if kind == "threshold" and 0 < float(value) <= 1:
            return {"exit_threshold": float(value)}
    except ValueError:
        pass
    raise ValueError(f"exit mode {mode!r} is not one of {', '.join(EXIT_MODES)} (K >= 1, 0 < P <= 1)")


def distributed_rank() -> tuple[int, int]:
    """(local rank, world size) under `accelerate launch` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class LoopedHFLM(HFLM):
    """HFLM over a LoopedForCausalLM; `loops` and `exit_mode` may change between evaluations.

    Under `accelerate launch` (data parallel), each process holds its own copy of the model on
    its own GPU; HFLM does not wire that up for a model passed as an object, so we do: requests
    are sharded by rank and lm-eval gathers the results on rank 0."""

    def __init__(self, model, tokenizer, loops: int, exit_mode: str = "last", **kwargs) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.loops = loops
        self.exit_mode = exit_mode
        # per-token exits seen by the forwards (threshold and official modes): [early, all]
        self.exit_counts = [0, 0]
        self.model.register_forward_hook(self._count_exits)
        rank, world = distributed_rank()
        if world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
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

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        # HFLM passes the left-padding attention mask in generation_kwargs; our forward honours it.
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **self.run_kwargs)


REQUIRED_FIELDS = {"gsm8k": ("question", "answer"), "addition": ("question", "answer")}


def shipped_task(task: str) -> Path | None:
    """melt-bench's own task YAMLs (suites/tasks/), e.g. the tiny `addition` task."""
    from importlib import resources

    path = resources.files("melt_bench.suites") / "tasks" / f"{task}.yaml"
    return Path(str(path)) if path.is_file() else None


def check_jsonl(path: Path, fields: tuple[str, ...]) -> None:
    """Every line a JSON object holding `fields`; ValueError naming the file and line if not."""
    for number, row in iter_jsonl(path):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {', '.join(missing)}")


def local_task_dir(data_dir: Path, tasks: list[str], into: Path) -> Path:
    """Task YAMLs that read local JSONL copies instead of the hub; each overrides lm-eval's task
    of the same name (prompts, filters and metrics still come from lm-eval's own YAML via
    `include`). Looks for DATA_DIR/TASK/{train,test}.jsonl, or DATA_DIR/{train,test}.jsonl for
    a single task. Returns `into`, for TaskManager(include_path=...)."""
    builtin = Path(lm_eval.__file__).parent / "tasks"
    into.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        folder = data_dir / task if (data_dir / task).is_dir() else data_dir
        files = {split: folder / f"{split}.jsonl" for split in ("train", "validation", "test")}
        files = {split: path for split, path in files.items() if path.is_file()}
        if "test" not in files:
            raise FileNotFoundError(f"--data-dir {data_dir}: no {task}/test.jsonl or test.jsonl there")
        for path in files.values():
            check_jsonl(path, REQUIRED_FIELDS.get(task, ()))
        base = shipped_task(task) or next(iter(sorted(builtin.rglob(f"{task}.yaml"))), None)
        if base is None:
            raise FileNotFoundError(f"lm-eval has no task YAML named {task}.yaml to take prompts and metrics from")
        lines = [f"include: {base}", f"task: {task}", "dataset_path: json", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:"]
        lines += [f"    {split}: {path.resolve()}" for split, path in files.items()]
        (into / f"{task}_local.yaml").write_text("\n".join(lines) + "\n")
    return into
