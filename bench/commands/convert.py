"""`melt-bench convert`: MELT's two-phase post-training from an Ouro model."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from melt_bench.commands.app import UserError, app, console
from melt_bench.commands.options import DEVICE, PROGRESS
from melt_bench.running.interrupts import stop_if_interrupted
from melt_bench.training.convert_run_dir import CHECKPOINT

if TYPE_CHECKING:
    from melt_bench.training.convert import ConvertConfig


@app.command()
def convert(
    source: str = typer.Option(..., "--from", help="Ouro preset (e.g. ouro-1.4b) or checkpoint dir / hub id"),
    out: Path = typer.Option(..., help="output directory: checkpoint.pt, train_log.jsonl, model/"),
    data: str = typer.Option(..., help="training data: JSONL (text, or question+answer), text file, or hub id"),
    chunk_size: int = typer.Option(500, "--chunk-size", help="MELT's training chunk (paper: 500)"),
    transition_steps: int = typer.Option(500, "--transition-steps", help="phase 1 steps (paper: 500)"),
    distill_steps: int = typer.Option(300, "--distill-steps", help="phase 2 steps (paper: 300)"),
    lr_base: float = typer.Option(8e-6, "--lr-base", help="learning rate of the base weights (paper: 8e-6)"),
    lr_gate: float = typer.Option(5e-4, "--lr-gate", help="learning rate of the gate (paper: 5e-4)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per training sequence (a longer one loses its "
                                "prompt's start first)"),
    loops: Optional[int] = typer.Option(None, help="loops to train at (default: the model's total_ut_steps)"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
    seed: int = typer.Option(0),
    device: Optional[str] = DEVICE,
    dtype: str = typer.Option("float32", help="float32 | bfloat16"),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="recompute each layer's MLP block in backward (less memory)"),
    decode_chunks: bool = typer.Option(
        False, "--decode-chunks", help="train every target token as a chunk of its own, as MELT decodes; "
        "memory grows with answer length squared (default: the paper's fixed chunks)"),
    pack_to: Optional[int] = typer.Option(
        None, "--pack-to", help="pack examples into sequences of N tokens, EOS between them, attending across "
        "(paper: 10,000-token sequences; default: one example per row, --seq-len)"),
    tokens_per_step: Optional[int] = typer.Option(
        None, "--tokens-per-step", help="accumulate gradients over micro-batches of --batch-size rows up to N "
        "token positions per step (paper: 320,000; default: one micro-batch)"),
    gate: str = typer.Option("elementwise", "--gate", help="MELT's gate: elementwise (the paper's) | scalar | mean "
                             "| ema | last (the paper's ablation)"),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="under accelerate launch / torchrun: shard weights, gradients and optimiser state "
        "over the ranks (FSDP2, one unit per decoder layer; also on with accelerate's --use_fsdp); default: "
        "every rank holds all of them (DDP)"),
    fsdp_reshard_after_forward: bool = typer.Option(
        False, "--fsdp-reshard-after-forward", help="with --fsdp: free a layer's gathered weights after each of its "
        "loops x chunks calls (least memory, that many more all-gathers); default: gathered once per micro-batch"),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", help="stop after step N, checkpointed (e.g. within a Slurm time limit); --resume "
        "continues"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    progress: bool = PROGRESS,
) -> None:
    """MELT's two-phase post-training (interpolated transition, then distillation) from Ouro."""
    check_flags(out, data, resume, device, dtype, gate, decode_chunks, pack_to, lr_base, lr_gate,
                {"--chunk-size": (chunk_size, 1), "--transition-steps": (transition_steps, 0),
                 "--distill-steps": (distill_steps, 0), "--batch-size": (batch_size, 1), "--seq-len": (seq_len, 2),
                 "--checkpoint-every": (checkpoint_every, 1), "--pack-to": (pack_to, 2),
                 "--tokens-per-step": (tokens_per_step, 1), "--stop-after": (stop_after, 1)})
    from melt_bench.running.sweep_options import OptionError, resolve_device

    fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp_reshard_after_forward and not fsdp:
        raise UserError("--fsdp-reshard-after-forward needs --fsdp")
    source = checked_source(source)
    if resume and not (out / CHECKPOINT).is_file():
        print(f"melt-bench: --resume: {out} holds no checkpoint yet: starting at step 0", file=sys.stderr)
    from melt_bench.training.convert import ConvertConfig  # torch only once the flags are checked

    try:
        resolved_device = resolve_device(device or "auto")
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    config = ConvertConfig(source=source, out=str(out), data=data, chunk_size=chunk_size,
                           transition_steps=transition_steps, distill_steps=distill_steps, lr_base=lr_base,
                           lr_gate=lr_gate, batch_size=batch_size, seq_len=seq_len, loops=loops,
                           device=resolved_device, dtype=dtype, checkpoint_every=checkpoint_every, seed=seed,
                           gradient_checkpointing=gradient_checkpointing, decode_chunks=decode_chunks,
                           pack_to=pack_to, tokens_per_step=tokens_per_step, gate=gate,
                           fsdp=fsdp, fsdp_reshard_after_forward=fsdp_reshard_after_forward)
    stop_if_interrupted()  # a Ctrl-C that torch's import swallowed: no training starts
    final = train(config, resume, stop_after, progress)
    console.print(f"MELT model written to {final}" if final != out else
                  f"stopped after step {stop_after}, checkpoint in {final / CHECKPOINT}: --resume continues")


def train(config: ConvertConfig, resume: bool, stop_after: int | None, progress: bool) -> Path:
    """Run the conversion; a failure the user can act on becomes one line (exit 2, or 1 for a failed write)."""
    import torch

    from melt_bench.training.convert import run_convert

    try:
        final = run_convert(config, resume=resume, stop_after=stop_after, progress=progress)
    except ValueError as exc:  # malformed data, or a resumption with other settings
        raise UserError(str(exc)) from exc
    except torch.OutOfMemoryError as exc:
        raise UserError(out_of_memory_line(config, exc)) from exc
    except OSError as exc:  # a full disk, a file system gone read-only mid-run: exit 1, the last checkpoint kept
        from melt_bench.running.results import ResultsWriteError

        raise ResultsWriteError(exc.errno, f"convert could not write to {config.out} ({exc.strerror or exc}); "
                                f"{out_of_memory_line(config, exc).split('; ')[1]}") from exc
    return final


def check_flags(out: Path, data: str, resume: bool, device: str | None, dtype: str, gate: str, decode_chunks: bool,
                pack_to: int | None, lr_base: float, lr_gate: float, counts: dict[str, tuple[int | None, int]]) -> None:
    """Everything convert can refuse before torch loads (`counts`: each count flag's value and its
    least), each as one line."""
    from melt_bench.models.names import GATES
    from melt_bench.running.sweep_options import OptionError, check_device_name
    from melt_bench.training.convert_run_dir import out_problem
    from melt_bench.units import check_dtype

    for name, (value, least) in counts.items():
        if value is not None and value < least:
            raise UserError(f"{name}: {value} must be at least {least}")
    if counts["--transition-steps"][0] + counts["--distill-steps"][0] == 0 or lr_base < 0 or lr_gate < 0:
        raise UserError("--transition-steps + --distill-steps must be positive and learning rates non-negative")
    if pack_to is not None and decode_chunks:
        raise UserError("--pack-to and --decode-chunks do not combine: packed sequences are chunked by --chunk-size")
    if gate not in GATES:
        raise UserError(f"--gate: {gate!r} is not one of {', '.join(GATES)}")
    try:
        check_dtype(dtype)
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from exc
    try:
        check_device_name(device or "auto")
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    if problem := out_problem(out, resume):
        raise UserError(problem)
    if not Path(data).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", data):
        raise UserError(f"--data {data}: no such file (and not a hub id like org/name)")
    if Path(data).is_dir() and not any(path.is_file() for path in Path(data).rglob("*")):
        raise UserError(f"--data {data}: an empty directory (give a JSONL or text file, or a dataset's directory)")
    if Path(data).is_file():
        from melt_bench.training.training_texts import load_texts

        try:
            examples = load_texts(data)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if not examples:
            raise UserError(f"--data {data}: holds no training examples (JSONL rows with text, or question and "
                            "answer; or blank-line-separated blocks of text)")
    if not Path(data).exists():
        from melt_bench.running import hub

        if problem := hub.hub_problem(data, "dataset"):
            raise UserError(f"--data {data}: {problem}; pass a local JSONL or text file instead")


def checked_source(source: str) -> str:
    """--from: an Ouro preset, or a checkpoint directory (made absolute) / hub id; one line
    (UserError) otherwise, before torch loads."""
    from melt_bench.models import UnknownPresetError, get_preset
    from melt_bench.running.sweep_options import OptionError, check_weights

    try:
        if Path(source).exists() or "/" in source:
            return check_weights(source, "--from")
        family = get_preset(source).family
    except (OptionError, UnknownPresetError) as exc:
        raise UserError(str(exc)) from exc
    if family != "ouro":
        raise UserError(f"--from: {source!r} is not an Ouro model")
    return source


def out_of_memory_line(config, exc: BaseException) -> str:
    """What a convert that ran out of memory says: where, what is kept, what to lower."""
    from melt_bench.training.convert_run_dir import CHECKPOINT

    out = Path(config.out)
    kept = f"the checkpoint in {out} is intact" if (out / CHECKPOINT).exists() else "no checkpoint was written yet"
    advice = "lower --batch-size or --seq-len" + ("" if config.gradient_checkpointing
                                                   else ", or add --gradient-checkpointing")
    return f"convert ran out of memory on {config.device} ({str(exc).splitlines()[0][:80]}); {kept}; {advice}"
