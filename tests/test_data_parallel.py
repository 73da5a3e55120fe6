"""Data parallel on CPU, two processes over gloo (torchrun with ACCELERATE_USE_CPU, which is what
accelerate launch does on GPUs): conversion equals one process accumulating the same global
batch; accuracy scores the same documents once each, with one set of rows and every rank's peak."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from melt_bench.cli import main
from melt_bench.models import load_model
from melt_bench.running.results import ResultsStore
from melt_bench.training.convert import ConvertConfig, micro_batches

DATA = Path(__file__).parent / "data"
CONVERT = ["convert", "--from", "ouro-tiny", "--data", str(DATA / "gsm8k" / "train.jsonl"), "--device", "cpu",
           "--no-progress", "--chunk-size", "16", "--transition-steps", "2", "--distill-steps", "2",
           "--batch-size", "2", "--seq-len", "40", "--tokens-per-step", "160", "--lr-base", "1e-3", "--lr-gate", "1e-2"]
ACCURACY = ["accuracy", "--tasks", "gsm8k", "--models", "ouro-tiny", "--loops", "2", "--limit", "3", "--num-fewshot",
            "0", "--max-gen-toks", "6", "--data-dir", str(DATA), "--device", "cpu", "--dtype", "float32"]


def melt_bench(args, ranks: int, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "melt_bench"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                    str(29400 + os.getpid() % 500), "-m", "melt_bench"]
    result = subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_micro_batches_round_up_to_the_ranks():
    config = ConvertConfig(source="ouro-tiny", out="x", data="d", batch_size=2, seq_len=40, tokens_per_step=200)
    assert micro_batches(config) == 3 and micro_batches(config, ranks=2) == 4 and micro_batches(config, ranks=3) == 3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The one-process conversion every data-parallel run is compared with."""
    out = tmp_path_factory.mktemp("one")
    melt_bench([*CONVERT, "--out", str(out)], 1, out)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The same conversion on two ranks, DDP's layout."""
    out = tmp_path_factory.mktemp("two")
    melt_bench([*CONVERT, "--out", str(out)], 2, out)
    return out


def test_two_ranks_convert_exactly_as_one_process_with_the_same_global_batch(one_process, two_ranks):
    assert_same_weights(one_process / "model", two_ranks / "model")
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in (one_process, two_ranks)]
    assert len(logs[1]) == 4 and [row["ranks"] for row in logs[1]] == [2] * 4  # one writer
    for a, b in zip(*logs):
        assert (a["micro_batches"], a["tokens"]) == (b["micro_batches"], b["tokens"]) == (2, 160)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def assert_same_weights(a: Path, b: Path) -> None:
    one, two = load_model("melt-tiny", weights=a).state_dict(), load_model("melt-tiny", weights=b).state_dict()
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def test_two_sharded_ranks_convert_as_one_process_and_resume_on_one(tmp_path, one_process, two_ranks):
    """FSDP: a sharded run (gradient checkpointing, resharding after forward) stopped at step 2
    holds half the state per rank, takes the one-process steps, and resumes on one process (its
    checkpoint holds the whole state) to end with the one-process parameters."""
    split = tmp_path / "split"
    stopped = melt_bench([*CONVERT, "--out", str(split), "--fsdp", "--gradient-checkpointing",
                          "--fsdp-reshard-after-forward", "--stop-after", "2", "--checkpoint-every", "5"], 2, tmp_path)
    assert "stopped after step 2" in stopped.stdout and not (split / "model").exists()
    assert torch.load(split / "checkpoint.pt", weights_only=False)["step"] == 2
    melt_bench([*CONVERT, "--out", str(split), "--resume"], 1, tmp_path)
    assert_same_weights(one_process / "model", split / "model")
    logs = [[json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
            for run in (one_process, two_ranks, split)]
    assert [row["step"] for row in logs[2]] == [1, 2, 3, 4]
    assert [row.get("ranks") for row in logs[2]] == [2, 2, None, None]
    for a, b in zip(logs[0], logs[2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for replicated, sharded in zip(*(
            [row["held_bytes_per_rank"] for row in log[:2]] for log in logs[1:])):
        # DDP's ranks hold it all, FSDP's a half each (shards of odd rows differ)
        assert len(set(replicated)) == 1 and replicated[0] <= sum(sharded) < 1.001 * replicated[0]
        assert all(0.49 < n / replicated[0] < 0.51 for n in sharded)


def test_resuming_on_ranks_that_change_the_global_batch_is_refused(tmp_path):
    args = [*CONVERT, "--tokens-per-step", "240", "--out", str(tmp_path / "o"), "--stop-after", "1"]
    melt_bench(args, 1, tmp_path)  # 3 micro-batches a step; on 2 ranks a step would take 4
    result = melt_bench([*args, "--resume"], 2, tmp_path, check=False)
    assert result.returncode != 0 and "took 3 micro-batches, on 2 ranks a step takes 4" in result.stderr


def test_two_ranks_score_the_same_documents_once_with_one_set_of_rows(tmp_path):
    melt_bench([*ACCURACY, "--out", str(tmp_path / "one.jsonl")], 1, tmp_path)
    melt_bench([*ACCURACY, "--out", str(tmp_path / "two.jsonl")], 2, tmp_path)
    one, two = ResultsStore(tmp_path / "one.jsonl").read(), ResultsStore(tmp_path / "two.jsonl").read()
    assert len(two) == len(one) == 2  # strict-match and flexible-extract, written once
    for a, b in zip(one, two):
        assert (a.metrics["value"], a.metrics["n_samples"]) == (b.metrics["value"], b.metrics["n_samples"])
        assert a.metrics["responses_sha256"] == b.metrics["responses_sha256"]  # the same answers to the same documents
        assert b.metrics["ranks"] == 2 and len(b.metrics["peak_bytes_per_rank"]) == 2
        assert b.metrics["peak_bytes"] == max(b.metrics["peak_bytes_per_rank"]) and "ranks" not in a.metrics


def test_a_rank_leaves_its_process_group_on_the_way_out(tmp_path):
    """A rank that exits with gloo's threads alive can abort after measuring everything
    ("terminate called without an active exception"): the command line destroys the group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["models"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
