"""`melt-bench convert`: MELT's two-phase post-training from an Ouro model (see
models/melt_transition.py for the equations and the choices the paper leaves open).

Phase 1 (`transition_steps`): next-token cross-entropy on the data while attention reads
alpha * KV_MELT + (1 - alpha) * KV_Ouro, alpha rising linearly 0 -> 1 (the phase-1 objective is
not reported; the LM loss is the plain choice). Phase 2 (`distill_steps`): KL to the frozen Ouro
teacher plus 0.1 x the attention-output MSE over layers and loops. Separate learning rates for the
base weights and the gate (paper: 8e-6 and 5e-4). Chunk-wise throughout (`chunk_size`).

Choices of ours:
- The optimiser (not reported): AdamW, no weight decay, constant learning rates, no warm-up; the
  teacher is the Ouro model the MELT starts from, frozen; both run `loops` loops (default: the
  model's total_ut_steps), and the converted MELT is trained, so best used, at that loop count.
- Both phases learn the target tokens only: every token of a `text` row, the answer of a
  question/answer row (as in SFT: a teacher fine-tuned on answers has meaningless prompt
  predictions, and their gradients wreck it), never padding.
- `decode_chunks` (off by default: the paper's fixed chunks) trains every target token as a
  chunk of its own, after the prompt's chunks: what MELT computes when it generates. Inside a
  chunk tokens read each other's same-loop rows, while a generated token reads only final rows,
  so a model trained in fixed chunks can be right under chunked processing and wrong when it
  generates (the small-scale proof shows exactly that). Its cost: autograd keeps every chunk's
  K/V prefix, so activation memory grows with (sequence length x number of chunks): fine for
  short answers, out of memory for Ouro-1.4B on GSM8K-length answers (batch 1 x 512 tokens,
  answers of ~300 byte-level tokens, needed more than 80 GB on an H100, where fixed 500-token
  chunks peak at 34 GiB at batch 4; both with gradient checkpointing).
- `gradient_checkpointing` recomputes each layer's MLP block in backward (about a quarter less
  peak memory for Ouro-1.4B-sized models; attention is not recomputed, as it writes cache rows).

Resumable: a checkpoint (model, optimiser, step, RNG states) is written atomically every
`checkpoint_every` steps; batches are a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would. A JSONL log gets one line per step: the losses,
the step's wall time and, on CUDA, the allocator's peak during the step."""

from __future__ import annotations

import json
import os
import random
import time
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
    gradient_checkpointing: bool = False  # recompute each layer's MLP block in backward
    decode_chunks: bool = False  # targets one token per chunk, as MELT decodes (see batch_for_step)


@dataclass(frozen=True)
class TrainingText:
    """One training example: `prompt` is context only, `target` the tokens that are learned."""

    prompt: str
    target: str


def load_texts(data: str) -> list[TrainingText]:
    """Training examples: JSONL rows with `text` (every token a target), or `question` + `answer`
    (GSM8K style: prompt 'Question: q\\nAnswer:', target ' a\\n', the format of the accuracy
    tasks); a plain text file (one example per blank-line-separated block); else a hub dataset's
    train split (`text`)."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for number, row in iter_jsonl(path):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: not a JSON object")
                if "text" in row:
                    texts.append(TrainingText("", row["text"]))
                elif "question" in row and "answer" in row:
                    texts.append(TrainingText(f"Question: {row['question']}\nAnswer:", f" {row['answer']}\n"))
                else:
                    raise ValueError(f"{path}:{number}: needs a 'text' field or 'question' and 'answer'")
            return texts
        return [TrainingText("", block) for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    from datasets import load_dataset

    return [TrainingText("", row["text"]) for row in load_dataset(data, split="train")]


@dataclass
class Batch:
    ids: torch.Tensor  # (batch, seq)
    tokens: torch.Tensor  # (batch, seq) bool: real tokens (not padding)
    targets: torch.Tensor  # (batch, seq) bool: positions whose NEXT token is learned
    chunk_starts: list[int] | None = None  # decode-like chunking (None: the model's chunk_size)
    left_padded: bool = False

    def to(self, device: str) -> "Batch":
        return Batch(self.ids.to(device), self.tokens.to(device), self.targets.to(device), self.chunk_starts,
                     self.left_padded)

    def forward_kwargs(self) -> dict:
        """What the models' forward needs to read this batch: the padding mask when padding is on
        the left (right padding is invisible to causal attention), and the chunking."""
        return {"attention_mask": self.tokens if self.left_padded else None, "chunk_starts": self.chunk_starts}


def batch_for_step(tokenizer, texts: list[TrainingText], config: ConvertConfig, step: int) -> Batch:
    """The step's batch: a pure function of (seed, step), padded with EOS. A row longer than
    `seq_len` loses the start of its prompt, then the end of its target.

    Normally right-padded and chunked by the model's chunk_size. With `decode_chunks`, prompts
    are left-padded so every target starts at the same column P: columns before P are chunked by
    chunk_size and every column from P on is a chunk of its own, which is how MELT runs at
    inference (the prompt prefilled in chunks, then one token per decoding step), so targets are
    learned in the regime they will be generated in. (Prefill chunks count from column 0, pads
    included: the same split as inference when a prompt fits in one chunk.)"""
    rng = random.Random(config.seed * 1_000_003 + step)
    chosen = [texts[rng.randrange(len(texts))] for _ in range(config.batch_size)]
    rows = []
    for text in chosen:
        target = tokenizer(text.target).input_ids[: config.seq_len]
        prompt = tokenizer(text.prompt).input_ids if text.prompt else []
        prompt = prompt[max(0, len(prompt) + len(target) - config.seq_len):]  # too long: keep its end
        rows.append((prompt, target))
    pad = tokenizer.eos_token_id or 0
    lead = max(len(p) for p, _ in rows) if config.decode_chunks else 0  # common target column
    width = max(lead + len(t) if config.decode_chunks else len(p) + len(t) for p, t in rows)
    batch = Batch(torch.full((len(rows), width), pad), torch.zeros(len(rows), width, dtype=torch.bool),
                  torch.zeros(len(rows), width, dtype=torch.bool), left_padded=config.decode_chunks and
                  any(len(p) < lead for p, _ in rows))
    for i, (prompt, target) in enumerate(rows):
        begin = lead - len(prompt) if config.decode_chunks else 0
        ids = prompt + target
        batch.ids[i, begin : begin + len(ids)] = torch.tensor(ids)
        batch.tokens[i, begin : begin + len(ids)] = True
        # position j predicts token j + 1: learned when j + 1 is a target token
        batch.targets[i, max(begin + len(prompt), 1) - 1 : begin + len(ids) - 1] = True
    if config.decode_chunks:  # prefill the prompts, then one target token per step
        batch.chunk_starts = [*range(0, lead, config.chunk_size), *range(lead, width)]
    return batch


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens."""
    targets = batch.ids[:, 1:][batch.targets[:, :-1]]
    return F.cross_entropy(logits[:, :-1][batch.targets[:, :-1]].float(), targets)


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


# Settings that may change between a run and its resumption: none of them changes the result.
RESUMABLE_CHANGES = {"out", "device", "checkpoint_every", "gradient_checkpointing"}


def _check_same_run(saved: dict, config: ConvertConfig) -> None:
    changed = [f"{key}={saved.get(key)!r} -> {value!r}" for key, value in asdict(config).items()
               if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume: the checkpoint was trained with other settings ({', '.join(changed)})")


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint (a kill between logging and checkpointing
    leaves some): the resumed run logs them again."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            path.write_text("".join(kept), encoding="utf-8")


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
    if config.gradient_checkpointing:
        melt.checkpoint_mlp_blocks()
    optimizer = _optimizer(melt, config)
    step = 0
    if resume and (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        _check_same_run(state["config"], config)
        melt.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        _truncate_log(out / LOG, step)
    total = config.transition_steps + config.distill_steps
    loops = config.loops or teacher.config.total_ut_steps
    columns = (TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}"))
    cuda = torch.device(config.device).type == "cuda"
    with Progress(*columns, disable=not progress) as bar, open(out / LOG, "a", encoding="utf-8") as log:
        task = bar.add_task("convert", total=total, completed=step, losses="")
        while step < total and (stop_after is None or step < stop_after):
            if cuda:
                torch.cuda.reset_peak_memory_stats(config.device)
            started = time.perf_counter()
            batch = batch_for_step(tokenizer, texts, config, step).to(config.device)
            if step < config.transition_steps:
                alpha = transition_alpha(step, config.transition_steps)
                loss = lm_loss(transition_logits(melt, batch.ids, alpha, loops, **batch.forward_kwargs()), batch)
                parts = {"phase": 1, "alpha": alpha, "loss": float(loss.detach())}
            else:
                loss, parts = distillation_loss(melt, teacher, batch.ids, loops, config.attention_weight,
                                                kd_mask=batch.targets, token_mask=batch.tokens,
                                                **batch.forward_kwargs())
                parts = {"phase": 2, **parts}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(config.device)
                parts["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(config.device)
            parts["step_s"] = time.perf_counter() - started
            step += 1
            log.write(json.dumps({"step": step, **parts}) + "\n")
            log.flush()
            if step % config.checkpoint_every == 0 or step == total:
                _save_checkpoint(out, melt, optimizer, step, config)
            shown = {k: v for k, v in parts.items() if k in ("alpha", "loss", "kd", "attention_mse")}
            bar.update(task, completed=step, losses=" ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if step >= total:
        final = out / "model"
        melt.save_pretrained(final)
        tokenizer.save_pretrained(final)
        return final
    return out
