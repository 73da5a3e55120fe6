"""Local copies of task data (--data-dir): where a task's files are and whether they are well
formed. Plain Python, so a missing or broken file is refused before lm-eval loads."""

from __future__ import annotations

from pathlib import Path

from melt_bench.running.jsonl import iter_jsonl

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


def checked_task_files(data_dir: Path, task: str) -> dict[str, Path]:
    """DATA_DIR/TASK/{train,validation,test}.jsonl (or DATA_DIR/{...}.jsonl for a single task),
    by split, each checked; FileNotFoundError or ValueError naming the file and line if not."""
    folder = data_dir / task if (data_dir / task).is_dir() else data_dir
    files = {split: folder / f"{split}.jsonl" for split in ("train", "validation", "test")}
    files = {split: path for split, path in files.items() if path.is_file()}
    if "test" not in files:
        raise FileNotFoundError(f"--data-dir {data_dir}: no {task}/test.jsonl or test.jsonl there")
    for path in files.values():
        check_jsonl(path, REQUIRED_FIELDS.get(task, ()))
    return files
