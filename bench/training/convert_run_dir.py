"""What a convert run directory holds, and whether `--out` may be one: plain Python, so the
command refuses a bad --out before torch loads."""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def out_problem(out: Path, resume: bool) -> str | None:
    """Why `out` cannot take this run (one line), or None: a file, a previous run's checkpoint
    without --resume, or a non-empty directory that is no convert run (its files are not ours)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file: convert writes a directory ({CHECKPOINT}, {LOG}, model/)"
    if (out / CHECKPOINT).exists() and not resume:
        return f"--out {out} holds a checkpoint: pass --resume to continue it, or choose another directory"
    if out.is_dir() and any(out.iterdir()) and not (out / CHECKPOINT).exists() and not (out / LOG).exists():
        return f"--out {out} is a non-empty directory that is not a convert run: choose an empty or new one"
    existing = next(folder for folder in [out, *out.parents] if folder.exists())
    if not existing.is_dir():
        return f"--out {out}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only file system answers EROFS here
        return f"--out {out}: {existing} is not writable (read-only, or not yours)"
    return None
