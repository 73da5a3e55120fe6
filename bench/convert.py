"""`melt-bench convert`: MELT's two-phase post-training from an Ouro model (see
models/melt_transition.py for the equations and the choices the paper leaves open).

Phase 1 (`transition_steps`): next-token cross-entropy on the data while attention reads
alpha * KV_MELT + (1 - alpha) * KV_Ouro, alpha rising linearly 0 -> 1 (the phase-1 objective is
not reported; the LM loss is the plain choice). Phase 2 (`distill_steps`): KL to the frozen Ouro
teacher plus 0.1 x the attention-output MSE over layers and loops. Separate learning rates for the
base weights and the gate (paper: 8e-6 and 5e-4). Chunk-wise throughout (`chunk_size`).

Resumable: a checkpoint (model, optimiser, step, RNG states) is written atomically every
`checkpoint_every` steps; batches are a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would. A JSONL log gets one line per step."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from melt_bench.models import MeltForCausalLM, OuroForCausalLM, load_model
from melt_bench.models.melt_transition import ATTENTION_WEIGHT, distillation_loss, transition_alpha, transition_logits

from .jsonl import iter_jsonl

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class ConvertConfig:
    source: str  # an Ouro preset name or checkpoint directory / hub id
    out: str
    data: str  # JSONL (text, or question + answer) / plain text file / hub dataset id
    chunk_size: int = 500
    transition_steps: int = 500
    distill_steps: int = 300
    lr_base: float = 8e-6
    lr_gate: float = 5e-4
    batch_size: int = 8
    seq_len: int = 512
    loops: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every: int = 50
    seed: int = 0
    attention_weight: float = ATTENTION_WEIGHT


def load_texts(data: str) -> list[str]:
    """Training texts: JSONL rows with `text`, or `question` + `answer` (GSM8K style); a plain
    text file (one example per blank-line-separated block); else a hub dataset's train split."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for number, row in iter_jsonl(path):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: not a JSON object")
                if "text" in row:
                    texts.append(row["text"])
                elif "question" in row and "answer" in row:
                    texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
                else:
                    raise ValueError(f"{path}:{number}: needs a 'text' field or 'question' and 'answer'")
            return texts
        return [block for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    from datasets import load_dataset

    return [row["text"] for row in load_dataset(data, split="train")]


def batch_for_step(tokenizer, texts: list[str], config: ConvertConfig, step: int) -> torch.Tensor:
    """The step's batch: a pure function of (seed, step), right-padded with EOS to the longest."""
    rng = random.Random(config.seed * 1_000_003 + step)
    chosen = [texts[rng.randrange(len(texts))] for _ in range(config.batch_size)]
    encoded = [tokenizer(text).input_ids[: config.seq_len] for text in chosen]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.eos_token_id or 0
    return torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded])


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def _optimizer(melt: MeltForCausalLM, config: ConvertConfig) -> torch.optim.Optimizer:
    gate = [p for name, p in melt.named_parameters() if ".kv_gate." in name]
    base = [p for name, p in melt.named_parameters() if ".kv_gate." not in name]
    return torch.optim.AdamW([{"params": base, "lr": config.lr_base}, {"params": gate, "lr": config.lr_gate}],
                             weight_decay=0.0)


def _save_checkpoint(out: Path, melt, optimizer, step: int, config: ConvertConfig) -> None:
    state = {"model": melt.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": asdict(config), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)  # atomic: a kill leaves the old or the new checkpoint


def run_convert(config: ConvertConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> Path:
    """Train; returns the directory holding the final `save_pretrained` MELT model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .accuracy import load_tokenizer
    from .units import parse_dtype

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    dtype = parse_dtype(config.dtype)
    is_preset = not Path(config.source).exists() and "/" not in config.source
    teacher: OuroForCausalLM = load_model(config.source if is_preset else "ouro-tiny",
                                          None if is_preset else config.source, dtype=dtype, device=config.device)
    teacher.requires_grad_(False)
    tokenizer = load_tokenizer(None if is_preset else config.source, None)
    texts = load_texts(config.data)
    melt = MeltForCausalLM.from_ouro(teacher, chunk_size=config.chunk_size).train()
    optimizer = _optimizer(melt, config)
    step = 0
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        melt.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    total = config.transition_steps + config.distill_steps
    loops = config.loops or teacher.config.total_ut_steps
    columns = (TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}"))
    with Progress(*columns, disable=not progress) as bar, open(out / LOG, "a", encoding="utf-8") as log:
        task = bar.add_task("convert", total=total, completed=step, losses="")
        while step < total and (stop_after is None or step < stop_after):
            ids = batch_for_step(tokenizer, texts, config, step).to(config.device)
            if step < config.transition_steps:
                alpha = transition_alpha(step, config.transition_steps)
                loss = lm_loss(transition_logits(melt, ids, alpha, loops), ids)
                parts = {"phase": 1, "alpha": alpha, "loss": float(loss.detach())}
            else:
                loss, parts = distillation_loss(melt, teacher, ids, loops, config.attention_weight)
                parts = {"phase": 2, **parts}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            log.write(json.dumps({"step": step, **parts}) + "\n")
            log.flush()
            if step % config.checkpoint_every == 0 or step == total:
                _save_checkpoint(out, melt, optimizer, step, config)
            bar.update(task, completed=step, losses=" ".join(f"{k}={v:.4g}" for k, v in parts.items() if k != "phase"))
    if step >= total:
        final = out / "model"
        melt.save_pretrained(final)
        tokenizer.save_pretrained(final)
        return final
    return out
