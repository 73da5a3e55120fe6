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
- `pack_to` packs examples into sequences of that many tokens, so a step crosses many chunk
  boundaries (the paper trains on 10,000-token sequences, about 20 chunks of 500): examples are
  joined with one EOS token between them and attend across the boundary (GPT-style packing: a
  later example's chunk reads the earlier ones' final rows, as a long document's would); an
  example that does not fit in what is left of a sequence starts the next one (never split, so
  its answer keeps its target mask); the rest of a sequence is EOS padding, not learned.
- `tokens_per_step` accumulates gradients over micro-batches of `batch_size` rows until a step
  has seen that many token positions (the paper: 320,000): ceil(tokens_per_step / (batch_size x
  sequence width)) micro-batches, each a pure function of (seed, step, micro-batch).
- `gate` picks MELT's gate or one of the paper's ablation variants (kv_policy.py).
- Data parallel (`accelerate launch -m melt_bench convert ...` on GPUs; `ACCELERATE_USE_CPU=true
  torchrun --nproc_per_node N -m melt_bench convert ...` on CPUs, gloo): a step's micro-batches
  (their count rounded up to a multiple of the ranks) are dealt round-robin to the ranks, each
  loss divided by the step's micro-batch count, and the gradients summed across ranks: the
  arithmetic of one process accumulating all of them, whatever the number of ranks (the batches
  are a function of (seed, step, micro-batch), not of the rank). By default every rank holds the
  whole model and optimiser and the gradients are summed by one all-reduce (DDP's layout); with
  `fsdp` they are sharded over the ranks and reduce-scattered (FSDP2, convert_parallel.py), for
  models whose weights, gradients and Adam state (16 bytes per parameter in fp32: 26 GB for
  Ouro-1.4B's 1.64 billion parameters, 49 GB for 2.6B's 3.07 billion, counted with untied
  embeddings; the frozen teacher adds 4 bytes each) leave no room for activations on one GPU. Rank 0 alone writes the
  log, the checkpoints and the model; checkpoints hold the whole state keyed by parameter name,
  so a run resumes sharded or not, on any number of ranks that keeps its micro-batch count.

Resumable: a checkpoint (model, optimiser, step, RNG states) is written atomically every
`checkpoint_every` steps; batches are a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would. A JSONL log gets one line per step: the losses,
the step's wall time and, on CUDA, the allocator's peak during the step; under data parallel,
every rank's peak (the largest as the headline) and the bytes each rank holds of the weights,
gradients and optimiser state."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from melt_bench.models import MeltForCausalLM, OuroForCausalLM, load_model
from melt_bench.models.melt_transition import ATTENTION_WEIGHT, distillation_loss, transition_alpha, transition_logits
from melt_bench.training.convert_parallel import (
    full_state,
    full_weights,
    held_bytes,
    load_full_state,
    process_group,
    shard,
    sum_across_ranks,
)
from melt_bench.training.convert_run_dir import CHECKPOINT, LOG
from melt_bench.training.training_texts import TrainingText, load_texts  # noqa: F401 (tests import them here)


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
    pack_to: int | None = None  # pack examples into sequences of this many tokens (see pack_rows)
    tokens_per_step: int | None = None  # gradient accumulation up to this many token positions per step
    gate: str = "elementwise"  # MeltConfig.gate: elementwise | scalar | mean | ema | last
    fsdp: bool = False  # shard weights, gradients and optimiser state over the ranks (convert_parallel.shard)
    fsdp_reshard_after_forward: bool = False  # free a gathered layer after every call (less memory, more traffic)


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


Row = tuple[list[int], list[int]]  # one tokenized example: (prompt ids, target ids)


def pack_rows(rows: list[Row], pack_to: int) -> list[list[Row]]:
    """Rows in order, packed greedily into sequences of at most `pack_to` tokens, one separator
    token between neighbours: a row that does not fit in what is left starts the next sequence,
    so no row is split or dropped (a row longer than `pack_to` must be cut before)."""
    packed: list[list[Row]] = []
    used = pack_to + 1  # nothing open yet
    for prompt, target in rows:
        size = len(prompt) + len(target)
        if size > pack_to:
            raise ValueError(f"a row of {size} tokens cannot be packed into {pack_to}")
        if used + 1 + size > pack_to:
            packed.append([])
            used = -1  # the first row needs no separator
        packed[-1].append((prompt, target))
        used += 1 + size
    return packed


def _fit(tokenizer, text: TrainingText, limit: int) -> Row:
    """Tokenize; a row longer than `limit` loses the start of its prompt, then the end of its target."""
    target = tokenizer(text.target).input_ids[:limit]
    prompt = tokenizer(text.prompt).input_ids if text.prompt else []
    return prompt[max(0, len(prompt) + len(target) - limit):], target


def _rng(config: ConvertConfig, step: int, micro: int) -> random.Random:
    # micro-batch 0 keeps the seeding of runs without accumulation
    return random.Random(config.seed * 1_000_003 + step + micro * 1_000_000_007)


def packed_batch(tokenizer, texts: list[TrainingText], config: ConvertConfig, step: int, micro: int = 0) -> Batch:
    """`batch_size` sequences of exactly `pack_to` tokens, filled with examples drawn as
    batch_for_step draws them (the draw that would open one sequence too many is not used)."""
    rng, pad = _rng(config, step, micro), tokenizer.eos_token_id or 0
    width = config.pack_to
    batch = Batch(torch.full((config.batch_size, width), pad), torch.zeros(config.batch_size, width, dtype=torch.bool),
                  torch.zeros(config.batch_size, width, dtype=torch.bool))
    rows: list[Row] = []
    while True:
        row = _fit(tokenizer, texts[rng.randrange(len(texts))], width)
        if len(pack_rows([*rows, row], width)) > config.batch_size:
            break
        rows.append(row)
    for i, sequence in enumerate(pack_rows(rows, width)):
        at = 0
        for prompt, target in sequence:
            if at:  # the separator: a real token, not a target
                batch.tokens[i, at] = True
                at += 1
            ids = prompt + target
            batch.ids[i, at:at + len(ids)] = torch.tensor(ids)
            batch.tokens[i, at:at + len(ids)] = True
            # position j predicts token j + 1: learned when j + 1 is a target token
            batch.targets[i, max(at + len(prompt), 1) - 1:at + len(ids) - 1] = True
            at += len(ids)
    return batch


def micro_batches(config: ConvertConfig, ranks: int = 1) -> int:
    """Micro-batches per optimiser step: enough for `tokens_per_step` token positions, rounded up
    to a multiple of the data-parallel ranks (every rank runs as many)."""
    count = 1
    if config.tokens_per_step is not None:
        per_micro = config.batch_size * (config.pack_to or config.seq_len)
        count = max(1, -(-config.tokens_per_step // per_micro))
    return -(-count // ranks) * ranks


def batch_for_step(tokenizer, texts: list[TrainingText], config: ConvertConfig, step: int, micro: int = 0) -> Batch:
    """The step's batch: a pure function of (seed, step), padded with EOS. A row longer than
    `seq_len` loses the start of its prompt, then the end of its target.

    Normally right-padded and chunked by the model's chunk_size. With `decode_chunks`, prompts
    are left-padded so every target starts at the same column P: columns before P are chunked by
    chunk_size and every column from P on is a chunk of its own, which is how MELT runs at
    inference (the prompt prefilled in chunks, then one token per decoding step), so targets are
    learned in the regime they will be generated in. (Prefill chunks count from column 0, pads
    included: the same split as inference when a prompt fits in one chunk.) With `pack_to`, the
    batch is packed_batch's."""
    if config.pack_to:
        return packed_batch(tokenizer, texts, config, step, micro)
    rng = _rng(config, step, micro)
    chosen = [texts[rng.randrange(len(texts))] for _ in range(config.batch_size)]
    rows = [_fit(tokenizer, text, config.seq_len) for text in chosen]
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


def _save_checkpoint(out: Path, melt, optimizer, step: int, config: ConvertConfig, rank: int, ranks: int) -> None:
    """Every rank calls it (gathering a sharded model is collective); rank 0 writes the whole
    state keyed by parameter name, which any layout and number of ranks can resume."""
    weights, optimizer_state = full_state(melt, optimizer)
    if rank != 0:
        return
    state = {"model": weights, "optimizer": optimizer_state, "step": step, "config": asdict(config),
             "micro_batches": micro_batches(config, ranks),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)  # atomic: a kill leaves the old or the new checkpoint


# Settings that may change between a run and its resumption: none of them changes the result.
RESUMABLE_CHANGES = {"out", "device", "checkpoint_every", "gradient_checkpointing", "fsdp",
                     "fsdp_reshard_after_forward"}


def _check_same_run(state: dict, config: ConvertConfig, ranks: int) -> None:
    # a checkpoint written before a setting existed ran it at its default
    saved = {**asdict(ConvertConfig(source="", out="", data="")), **state["config"]}
    changed = [f"{key}={saved.get(key)!r} -> {value!r}" for key, value in asdict(config).items()
               if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if changed:
        raise ValueError(f"--resume: the checkpoint was trained with other settings ({', '.join(changed)})")
    # the micro-batch count is rounded up to a multiple of the ranks: another rank count may change the global batch
    was, now = state.get("micro_batches", micro_batches(config)), micro_batches(config, ranks)
    if was != now:
        raise ValueError(f"--resume: the checkpoint's steps took {was} micro-batches, on {ranks} ranks a step takes "
                         f"{now}: resume on a number of ranks that divides {was}")


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint (a kill between logging and checkpointing
    leaves some): the resumed run logs them again."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            path.write_text("".join(kept), encoding="utf-8")


def train_step(melt, teacher, tokenizer, texts: list[TrainingText], config: ConvertConfig, step: int,
               loops: int, rank: int = 0, ranks: int = 1) -> dict:
    """Forward and backward over this rank's share of the step's micro-batches (gradients summed,
    each loss divided by the step's micro-batch count), then the gradients summed across ranks;
    returns the log line's losses, averaged over all micro-batches, and the token positions seen."""
    count, logged, tokens = micro_batches(config, ranks), [], 0
    for micro in range(rank, count, ranks):
        batch = batch_for_step(tokenizer, texts, config, step, micro).to(config.device)
        if step < config.transition_steps:
            alpha = transition_alpha(step, config.transition_steps)
            loss = lm_loss(transition_logits(melt, batch.ids, alpha, loops, **batch.forward_kwargs()), batch)
            parts = {"phase": 1, "alpha": alpha, "loss": float(loss.detach())}
        else:
            loss, parts = distillation_loss(melt, teacher, batch.ids, loops, config.attention_weight,
                                            kd_mask=batch.targets, token_mask=batch.tokens, **batch.forward_kwargs())
            parts = {"phase": 2, **parts}
        (loss / count).backward()
        logged.append(parts)
        tokens += batch.ids.numel()
    summed = {key: sum(p[key] for p in logged) for key in logged[0] if key not in ("phase", "alpha")}
    if ranks > 1:
        sum_across_ranks(melt, summed, tokens, gradients=not config.fsdp)
        tokens = summed.pop("tokens")
    merged = {**{key: logged[0][key] for key in ("phase", "alpha") if key in logged[0]},
              **{key: value / count for key, value in summed.items()}}
    if count > 1:
        merged.update(micro_batches=count, tokens=tokens)
    if ranks > 1:
        merged["ranks"] = ranks
    return merged


def _measured_step(melt, teacher, tokenizer, texts, config: ConvertConfig, optimizer, step: int, loops: int,
                   rank: int, ranks: int) -> dict:
    """One optimiser step, with what it cost: its time, and on CUDA its allocator peak (per rank
    and the largest); over ranks also the bytes each holds (what sharding saves, exact on any
    device)."""
    from melt_bench.running.ranks import gather_from_ranks

    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(config.device)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    parts = train_step(melt, teacher, tokenizer, texts, config, step, loops, rank, ranks)
    optimizer.step()
    if ranks > 1:
        parts["held_bytes_per_rank"] = gather_from_ranks(held_bytes([teacher, melt], optimizer))
    if cuda:
        torch.cuda.synchronize(config.device)
        parts["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(config.device)
        if ranks > 1:  # what sharding saves shows per rank; the headline is the largest
            parts["cuda_peak_allocated_bytes_per_rank"] = gather_from_ranks(parts["cuda_peak_allocated_bytes"])
            parts["cuda_peak_allocated_bytes"] = max(parts["cuda_peak_allocated_bytes_per_rank"])
    parts["step_s"] = time.perf_counter() - started
    return parts


def run_convert(config: ConvertConfig, resume: bool = False, stop_after: int | None = None,
                progress: bool = True) -> Path:
    """Train; returns the directory holding the final `save_pretrained` MELT model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from melt_bench.evaluation.byte_tokenizer import load_tokenizer
    from melt_bench.units import parse_dtype

    rank, ranks = process_group(cpu=torch.device(config.device).type == "cpu")
    if config.fsdp and ranks == 1:
        raise ValueError("--fsdp shards over data-parallel ranks: launch with accelerate launch or torchrun")
    if ranks > 1 and torch.device(config.device).type == "cuda":
        config = replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
        torch.cuda.set_device(config.device)
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
    melt = MeltForCausalLM.from_ouro(teacher, chunk_size=config.chunk_size, gate=config.gate).train()
    if config.gradient_checkpointing:
        melt.checkpoint_mlp_blocks()
    if config.fsdp:
        shard(teacher, reshard_after_forward=True)  # no backward would free its gathered layers
        shard(melt, config.fsdp_reshard_after_forward)
    optimizer = _optimizer(melt, config)
    step = 0
    if resume and (out / CHECKPOINT).is_file():
        # mapped, not read: ranks on one node share the pages instead of a copy each
        state = torch.load(out / CHECKPOINT, weights_only=False, mmap=True)
        _check_same_run(state, config, ranks)
        load_full_state(melt, optimizer, state["model"], state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        _truncate_log(out / LOG, step)
    total = config.transition_steps + config.distill_steps
    loops = config.loops or teacher.config.total_ut_steps
    columns = (TextColumn("[bold]convert"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}"))
    with Progress(*columns, disable=not progress or rank != 0) as bar, open(out / LOG, "a", encoding="utf-8") as log:
        task = bar.add_task("convert", total=total, completed=step, losses="")
        while step < total and (stop_after is None or step < stop_after):
            parts = _measured_step(melt, teacher, tokenizer, texts, config, optimizer, step, loops, rank, ranks)
            step += 1
            if rank == 0:  # one writer: the log, the checkpoints, the model
                log.write(json.dumps({"step": step, **parts}) + "\n")
                log.flush()
            if step % config.checkpoint_every == 0 or step in (total, stop_after):
                _save_checkpoint(out, melt, optimizer, step, config, rank, ranks)
            shown = {k: v for k, v in parts.items() if k in ("alpha", "loss", "kd", "attention_mse")}
            bar.update(task, completed=step, losses=" ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if step >= total:
        final = out / "model"
        weights = full_weights(melt) if config.fsdp else None
        if rank == 0:
            if config.fsdp:  # a plain copy to save: the sharded one holds only this rank's slices
                with torch.device("meta"):  # no initialisation: every weight is assigned
                    melt = MeltForCausalLM(melt.config)
                melt.load_state_dict(weights, assign=True)
            melt.save_pretrained(final)
            tokenizer.save_pretrained(final)
        return final
    return out
