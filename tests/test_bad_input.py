"""Every bad input is one line and exit 2, refused before torch loads (issue 32 items 2-4): each
case once ended in a traceback, ran on nonsense, or took 5-15 s to refuse."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sweep_helpers import write_rows

from melt_bench.cli import main
from melt_bench.running.results import ResultsStore

# Runs the cases in one fresh interpreter (torch is imported in this one already), each through
# main(), and says for each its exit code, its stderr and whether torch had been imported by then.
_RUNNER = """
import contextlib, io, json, sys
from melt_bench.cli import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    print(json.dumps({"argv": argv, "code": code, "err": err.getvalue(), "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The bad inputs' files, in one folder."""
    root = tmp_path_factory.mktemp("bad")
    (root / "not-json").mkdir()
    (root / "not-json" / "config.json").write_text("{not json")
    (root / "empty-config").mkdir()
    (root / "empty-config" / "config.json").write_text("{}")
    (root / "empty-dir").mkdir()
    (root / "empty-tokenizer").mkdir()
    (root / "empty.txt").write_text("\n\n")
    (root / "binary.jsonl").write_bytes(b'{"text": "a"}\n\x00\xff\xfe\n')
    (root / "tasks" / "gsm8k").mkdir(parents=True)
    (root / "tasks" / "gsm8k" / "test.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "two.yaml").write_text('repeats: "two"\n')
    (root / "nan.yaml").write_text("point_timeout: .nan\n")
    (root / "a-file").write_text("x")
    write_rows(root / "latency.jsonl", "latency", 2)
    (root / "torn.jsonl").write_text('{"schema": "melt-bench')
    (root / "train.txt").write_text("some text\n\nmore text\n")
    return root


CASES = [  # (argv, what the line names); FILES is the fixture's folder
    (["memory", "--point-timeout", "nan"], "'--point-timeout': nan is not a finite number"),
    (["memory", "--point-timeout", "inf"], "inf is not a finite number"),
    (["accuracy", "--point-timeout", "nan"], "nan is not a finite number"),
    (["memory", "--nvml-interval-ms", "nan"], "'--nvml-interval-ms': nan"),
    (["convert", "--from", "ouro-tiny", "--out", "FILES/new", "--data", "FILES/train.txt", "--lr-base", "nan"],
     "'--lr-base': nan"),
    (["memory", "--suite", "FILES/two.yaml"], "repeats: 'two' is not an integer"),
    (["memory", "--suite", "FILES/nan.yaml"], "point_timeout: nan is not a finite number"),
    (["memory", "--repeats", "99999999999999999999"], "larger than any count"),
    (["convert", "--from", "FILES/not-json", "--out", "FILES/new", "--data", "FILES/train.txt"], "is not JSON"),
    (["convert", "--from", "ouro-tiny", "--out", "FILES/new", "--data", "FILES/empty-dir"], "an empty directory"),
    (["convert", "--from", "ouro-tiny", "--out", "FILES/new", "--data", "FILES/empty.txt"], "no training examples"),
    (["convert", "--from", "ouro-tiny", "--out", "FILES/new", "--data", "FILES/binary.jsonl"],
     "binary.jsonl:2: not UTF-8 text (byte 0xff"),
    (["accuracy", "--data-dir", "FILES/tasks", "--models", "ouro-tiny"], "test.jsonl:1: not UTF-8 text (byte 0x89"),
    (["accuracy", "--tasks", "", "--models", "ouro-tiny"], "--tasks: empty"),
    (["accuracy", "--limit", "0"], "--limit: 0 must be at least 1"),
    (["accuracy", "--exit-mode", "bogus"], "--exit-mode"),
    (["accuracy", "--tokenizer", "FILES/empty-tokenizer"], "no tokenizer files"),
    (["accuracy", "--out", "FILES/empty-dir"], "is a directory"),
    (["memory", "--weights", "FILES/empty-config"], "no model_type"),
    (["latency", "--weights", "FILES/not-json"], "is not JSON"),
    (["models", "--card", "--loops", "1..100000"], "--loops: 100000 is above the maximum of 64"),
    (["memory", "--kv-policy", "modulo:99999999999999999999"], "at most 64 slots"),
    (["memory", "--json"], "goes with --dry-run"),
    (["memory", "--resume"], "name it with --out"),
    (["memory", "--out", "FILES/empty-dir"], "is a directory"),
    (["memory", "--out", "FILES/a-file/x.jsonl"], "is a file, not a directory"),
    (["memory", "--out", "FILES/latency.jsonl", "--resume"], "holds latency results, not memory"),
    (["capacity", "--budget", "1GiB", "--out", "FILES/latency.jsonl", "--resume"], "holds latency results"),
    (["report", "FILES/torn.jsonl"], "holds no results rows: nothing to report (its last line is torn"),
    (["report", "FILES/latency.jsonl", "-o", "FILES/a-file/r.html"], "is a file, not a directory"),
]


@pytest.fixture(scope="module")
def outcomes(files) -> dict[str, dict]:
    argvs = [[arg.replace("FILES", str(files)) for arg in argv] for argv, _ in CASES]
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, cwd=files, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    rows = map(json.loads, done.stdout.splitlines())
    return {" ".join(row["argv"]).replace(str(files), "FILES"): row for row in rows}


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_torch(argv, needle, outcomes):
    outcome = outcomes[" ".join(argv)]
    lines = outcome["err"].strip().splitlines()
    assert outcome["code"] == 2 and len(lines) == 1 and needle in lines[0], outcome
    assert lines[0].startswith("melt-bench: error: ")
    assert not outcome["torch"], "refused only after torch was imported (seconds)"


def test_a_read_only_convert_out_is_refused_before_training(tmp_path, monkeypatch, capsys, files):
    from melt_bench.training import convert_run_dir

    monkeypatch.setattr(convert_run_dir.os, "access", lambda path, mode: False)  # as on a read-only mount
    assert main(["convert", "--from", "ouro-tiny", "--out", str(tmp_path / "run"), "--data",
                 str(files / "train.txt")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "is not writable" in line and not (tmp_path / "run").exists()


def test_resume_on_a_still_full_disk_is_one_line_and_changes_nothing(tmp_path, monkeypatch, capsys):
    from melt_bench.running import results

    out = tmp_path / "memory.jsonl"
    write_rows(out, "memory", 2)
    with open(out, "ab") as handle:
        handle.write(b'{"kind": "memory", "torn')
    before = out.read_bytes()
    real_open = open

    def no_space_for_the_torn_file(path, mode="r", *args, **kwargs):
        if str(path).endswith(".torn"):
            handle = real_open(path, mode, *args, **kwargs)  # created, as open() does, then the write fails
            handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(results, "open", no_space_for_the_torn_file, raising=False)
    assert main(["memory", "--loops", "1", "--models", "ouro-tiny", "--seq-lens", "32", "--batch-sizes", "1",
                 "--device", "cpu", "--no-progress", "--out", str(out), "--resume"]) == 1
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "no CUDA" not in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "unchanged" in lines[0], lines
    assert out.read_bytes() == before and not (tmp_path / "memory.jsonl.torn").exists()
    assert len(ResultsStore(out).read()) == 2
