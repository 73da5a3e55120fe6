"""lm-eval's own output during an accuracy run: its log records, its progress bars and what its
subprocesses print (git, outside a checkout) go to a log file beside the results; on the
terminal only the warnings melt-bench did not cause on purpose, each once."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Warnings that follow from how melt-bench drives lm-eval, by design; they stay in the log file.
EXPECTED_WARNINGS = (
    "overrides existing task",  # --data-dir: our local task YAML replaces lm-eval's hub one
    "`pretrained` model kwarg is not of type `str`",  # we hand HFLM our model object
    "Passed an already-initialized model through `pretrained`",
    "specified through cli, these settings will update",  # --max-gen-toks
)


def log_path_for(results: Path) -> Path:
    """results/accuracy-X.jsonl -> results/accuracy-X.lm-eval.log"""
    return results.with_name(results.stem + ".lm-eval.log")


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not any(expected in message for expected in EXPECTED_WARNINGS):
            self.messages.append(message.splitlines()[0][:300] if message else record.levelname)


@contextmanager
def lm_eval_output(log_path: Path | None, capture_stderr: bool = False) -> Iterator[list[str]]:
    """Inside the block, lm-eval's log records go to `log_path` (appended; None: nowhere) and
    its unexpected warnings into the list it yields. With `capture_stderr` (in a child that
    evaluates one point) everything written to file descriptor 2 goes to the log as well."""
    logger = logging.getLogger("lm_eval")
    collector = _Collector()
    handlers: list[logging.Handler] = [collector]
    if log_path is not None:
        file_handler = logging.FileHandler(log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        handlers.append(file_handler)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    logger.handlers = handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False
    saved_fd = None
    if capture_stderr and log_path is not None:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    try:
        yield collector.messages
    finally:
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        for handler in handlers:
            handler.close()
        logger.level, logger.propagate, logger.handlers = saved[0], saved[1], saved[2]
