"""convert's training examples, from a JSONL or text file (plain Python, so a broken file is
refused before torch loads) or a hub dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from melt_bench.running.jsonl import decoded_line, iter_jsonl


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
        text = "".join(decoded_line(raw, path, number) for number, raw in enumerate(path.open("rb"), start=1))
        return [TrainingText("", block) for block in text.split("\n\n") if block.strip()]
    from datasets import load_dataset

    try:
        return [TrainingText("", row["text"]) for row in load_dataset(data, split="train")]
    except (OSError, ValueError, KeyError) as exc:  # datasets' own errors (no data files, no 'text') among them
        raise ValueError(f"--data {data}: cannot read it as a dataset ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]})") from exc
