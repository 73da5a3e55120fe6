"""Under `accelerate launch` / torchrun: which rank this process is, and every rank's value of
something (memory per rank). A single process is rank 0 of 1."""

from __future__ import annotations

import os
import sys


def distributed_rank() -> tuple[int, int]:
    """(local rank, world size) under `accelerate launch` / torchrun; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def gather_from_ranks(value):
    """Under accelerate launch: every rank's `value`, in rank order (all ranks must call this);
    None in a single process."""
    import torch

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def leave_process_group() -> None:
    """Destroy the process group this process joined under accelerate launch / torchrun (none:
    nothing to do; torch is not imported for it). Called on the way out, while the interpreter is
    whole: a rank that exits with gloo's worker threads alive can abort ("terminate called
    without an active exception") and fail a run that measured everything."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
