"""The tiny addition task used by the small-scale MELT conversion proof."""

import json

from melt_bench.cli import main
from melt_bench.evaluation.tiny_tasks import write_addition
from melt_bench.running.results import load_results


def test_addition_splits_are_held_out_and_correct(tmp_path):
    folder = write_addition(tmp_path, digits=2, train=300, test=50, seed=1)
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert len(train) == 300 and len(test) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train + test:
        a, b = map(int, row["question"].split("+"))
        assert row["answer"] == f"#### {a + b}" and 10 <= a <= 99 and 10 <= b <= 99


def test_addition_task_runs_through_melt_bench_accuracy(tmp_path):
    write_addition(tmp_path, train=20, test=10)
    out = tmp_path / "acc.jsonl"
    assert main(["accuracy", "--tasks", "addition", "--models", "melt-tiny", "--loops", "2", "--data-dir",
                 str(tmp_path), "--limit", "3", "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    frame = load_results(out)
    assert list(frame["filter"]) == ["strict-match"] and frame.n_samples.iloc[0] == 3
