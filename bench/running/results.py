"""One results schema for every command: a `ResultRow` per point, one JSON line each, appended
and fsynced at once; `load_results` turns files into a pandas DataFrame.

A file that is not ours, or has a line that does not parse, is refused and never written to. The
one exception is a torn last line: bytes after the last newline that do not parse are a write
that never finished (the writer puts a whole line and its newline in one write()), so readers
skip them (`torn_tail`), and `--resume` moves them to a file beside the results before appending
(`set_torn_tail_aside`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "melt-bench/results/v1"
STATUSES = ("ok", "oom", "timeout", "error")
_REQUIRED = ("schema", "kind", "point_id", "point", "status", "metrics", "meta")


class ResultsFileError(ValueError):
    """A results file that cannot be used; the message names the file and the problem."""


class ResultsWriteError(OSError):
    """Writing results failed (disk full, ...): the run ends there (exit 1), what was written before kept."""


@dataclass
class ResultRow:
    kind: str  # "memory", later "latency", "accuracy", ...
    point_id: str
    point: dict
    status: str  # one of STATUSES
    error: str | None
    metrics: dict  # names carry the unit (_bytes, _s, _ms) and the source (cuda_, nvml_, rss_)
    meta: dict  # machine and software the point ran on
    wall_s: float
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


class ResultsStore:
    """An append-only JSONL results file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.torn_tail: bytes = b""  # set by read(): a last line whose write never finished

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[ResultRow]:
        """Every row, validated; ResultsFileError on a foreign or corrupt file."""
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise ResultsFileError(f"{self.path} is not a file")
        rows = []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ResultsFileError(f"{self.path}: cannot be read as melt-bench results ({exc})") from exc
        complete, _, tail = data.rpartition(b"\n")
        self.torn_tail = b""
        if tail.strip() and not _is_row(tail):
            self.torn_tail, data = tail, complete + b"\n" if complete else b""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ResultsFileError(f"{self.path}: cannot be read as melt-bench results ({exc})") from exc
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_parse_line(self.path, number, line))
        return rows

    def set_torn_tail_aside(self) -> Path | None:
        """After read(): move a torn last line into PATH.torn (appended, never overwritten) and
        cut it from the file; a last row that only lacks its newline gets it. Returns where the
        torn bytes went (None: nothing torn)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n") and not self.torn_tail:
            with open(self.path, "ab") as handle:  # a complete row without its newline
                handle.write(b"\n")
            return None
        if not self.torn_tail:
            return None
        aside = self.path.with_name(self.path.name + ".torn")
        existed = aside.exists()
        try:
            with open(aside, "ab") as handle:
                handle.write(self.torn_tail + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # disk still full: the results file stays as it was, no empty .torn beside it
            if not existed and aside.exists() and aside.stat().st_size == 0:
                aside.unlink()
            raise ResultsWriteError(exc.errno, f"{self.path}: cannot set its torn last line aside in {aside} "
                                    f"({exc.strerror or exc}); the file is unchanged: free space and run again") \
                from exc
        os.truncate(self.path, len(data) - len(self.torn_tail))
        self.torn_tail = b""
        return aside

    def append(self, row: ResultRow) -> None:
        """Append one row and fsync, so a killed sweep loses no finished point. One write() of
        one whole line keeps lines intact."""
        line = (row.to_json() + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "short write (no space left?)")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ResultsWriteError(f"{self.path}: writing a row failed ({exc.strerror or exc}); the rows before it "
                                    "are intact: free the space and run the same command with --resume") from exc


def _is_row(raw: bytes) -> bool:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def _parse_line(path: Path, number: int, line: str) -> ResultRow:
    where = f"{path}:{number}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ResultsFileError(f"{where}: corrupt line, not JSON ({exc.msg}); the file was left untouched") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ResultsFileError(f"{where}: not a melt-bench results line (schema {found!r}, expected {SCHEMA!r})")
    missing = [key for key in _REQUIRED if key not in data]
    if missing or data["status"] not in STATUSES:
        raise ResultsFileError(f"{where}: malformed row (missing {missing or 'nothing'}, "
                               f"status {data.get('status')!r})")
    known = {key: data[key] for key in ResultRow.__dataclass_fields__ if key in data}
    return ResultRow(**{"error": None, "wall_s": 0.0, **known})


def model_labels(rows: list[ResultRow]) -> dict[tuple[str, str | None], str]:
    """A display name per (model, weights): the model name, plus the end of the weights path
    where one model name was run with several weights (a teacher's two MELT conversions, say)."""
    weights: dict[str, set] = {}
    for row in rows:
        weights.setdefault(row.point.get("model"), set()).add(row.point.get("weights"))
    labels = {}
    for model, paths in weights.items():
        for path in paths:
            tail = "/".join(Path(path).parts[-2:]) if path else "random init"
            labels[(model, path)] = model if len(paths) == 1 else f"{model} @ {tail}"
    return labels


def model_label(row: ResultRow, labels: dict[tuple[str, str | None], str]) -> str:
    """The display name; a training-free KV policy run on the model, or the decode_reads mode a
    MELT was asked to run with, follows it in parentheses."""
    label = labels[(row.point.get("model"), row.point.get("weights"))]
    if row.point.get("kv_policy"):
        label = f"{label} ({row.point['kv_policy']})"
    if row.point.get("decode_reads"):
        label = f"{label} ({row.point['decode_reads']} reads)"
    if row.point.get("kv_quant"):
        label = f"{label} ({row.point['kv_quant']} KV)"
    return label


def rows_to_frame(rows: list[ResultRow]):
    """Flat DataFrame: point fields and metrics as columns, meta fields as `meta.*`. `model` holds
    the display name of `model_labels` (`model_name` the bare preset name)."""
    import pandas as pd

    records = []
    labels = model_labels(rows)
    for row in rows:
        record = {"kind": row.kind, "point_id": row.point_id, "status": row.status, "error": row.error,
                  "wall_s": row.wall_s, "created_at": row.created_at}
        record.update(row.point)
        record.update(model_name=row.point.get("model"), model=model_label(row, labels))
        record.update(row.metrics)
        record.update({f"meta.{key}": value for key, value in _flatten(row.meta).items()})
        records.append(record)
    return pd.DataFrame.from_records(records)


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_results(*paths: str | Path):
    """All rows of the given results files as one DataFrame (ResultsFileError if one is bad)."""
    for path in paths:
        if not Path(path).exists():
            raise ResultsFileError(f"no results file {path}")
    rows = [row for path in paths for row in ResultsStore(path).read()]
    return rows_to_frame(rows)
