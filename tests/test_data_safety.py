"""Nothing lost, nothing mixed, every failure one line (issue 12): each test fails on the code
before the fix."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import write_rows

from melt_bench.cli import main
from melt_bench.running.results import ResultsStore

SWEEP = ["--models", "ouro-tiny,melt-tiny", "--seq-lens", "32", "--batch-sizes", "1", "--new-tokens", "2",
         "--device", "cpu", "--dtype", "float32", "--no-progress"]


def one_error_line(capsys, needle: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    return lines[0]


@pytest.fixture
def latency_results(tmp_path):
    path = tmp_path / "latency.jsonl"
    write_rows(path, "latency", 3)
    return path


@pytest.mark.parametrize("target", ["same", "other"])
def test_a_report_never_replaces_a_results_file(target, latency_results, tmp_path, capsys):
    other = tmp_path / "memory.jsonl"
    write_rows(other, "memory", 2)
    output = latency_results if target == "same" else other
    before = output.read_bytes()
    assert main(["report", str(latency_results), "-o", str(output)]) == 2
    one_error_line(capsys, "a report never replaces results")
    assert output.read_bytes() == before


def test_an_older_report_may_be_overwritten(latency_results, tmp_path):
    output = tmp_path / "report.html"
    output.write_text("<html>STALE-REPORT-7f3a</html>")
    assert main(["report", str(latency_results), "-o", str(output)]) == 0
    assert "STALE-REPORT-7f3a" not in output.read_text() and "<html" in output.read_text()
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_report_of_an_empty_file_is_one_line(content, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    one_error_line(capsys, "holds no results rows")


def test_report_to_an_unwritable_place_is_one_line(latency_results, capsys):
    assert main(["report", str(latency_results), "-o", "/proc/melt-bench-report.html"]) == 2
    one_error_line(capsys, "cannot create a file in /proc")


@pytest.mark.parametrize("command,extra", [
    ("memory", ["--loops", "1"]),
    ("latency", ["--loops", "1", "--warmup", "0", "--repeats", "1"]),
])
def test_resuming_into_another_kind_is_refused(command, extra, latency_results, tmp_path, capsys):
    target = latency_results if command == "memory" else tmp_path / "memory.jsonl"
    if command == "latency":
        write_rows(target, "memory", 2)
    before = target.read_bytes()
    assert main([command, *extra, *SWEEP, "--resume", "--out", str(target)]) == 2
    one_error_line(capsys, "a results file holds one kind")
    assert target.read_bytes() == before


def test_accuracy_resuming_into_memory_results_is_refused(tmp_path, capsys):
    target = tmp_path / "memory.jsonl"
    write_rows(target, "memory", 2)
    before = target.read_bytes()
    data = os.path.join(os.path.dirname(__file__), "data")
    assert main(["accuracy", "--tasks", "gsm8k", "--data-dir", data, "--limit", "1", "--loops", "1",
                 "--models", "ouro-tiny", "--device", "cpu", "--resume", "--out", str(target)]) == 2
    one_error_line(capsys, "a results file holds one kind")
    assert target.read_bytes() == before


@pytest.mark.parametrize("out,needle", [("/proc/melt-bench.jsonl", "cannot create a file in /proc"),
                                        ("FILE/x.jsonl", "is a file, not a directory"),
                                        ("DIR/", "is a directory")])
def test_output_paths_are_checked_before_any_point_runs(out, needle, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "DIR").mkdir()
    path = out if out.startswith("/") else str(tmp_path / out) + ("/" if out.endswith("/") else "")
    started = time.monotonic()
    assert main(["memory", "--loops", "1", *SWEEP, "--out", path]) == 2
    one_error_line(capsys, needle)
    assert time.monotonic() - started < 5  # refused up front, not after a point ran
    assert list((tmp_path / "DIR").iterdir()) == []


def test_ctrl_c_stops_the_sweep_keeps_rows_and_exits_130(tmp_path):
    """A real SIGINT to the sweep's process group, as a terminal sends it."""
    out = tmp_path / "sweep.jsonl"
    command = [sys.executable, "-m", "melt_bench", "memory", "--loops", "1..16", "--models", "ouro-tiny,melt-tiny",
               "--seq-lens", "512", "--batch-sizes", "4", "--device", "cpu", "--repeats", "1", "--no-progress",
               "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    rows = ResultsStore(out).read()
    assert proc.returncode == 130, stderr
    assert 2 <= len(rows) < 32 and all(row.status == "ok" for row in rows)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"{len(rows)} of 32 points recorded" in lines[0] and "--resume" in lines[0], stderr
    assert stdout.strip() == ""


@pytest.fixture
def offline(monkeypatch):
    """A machine whose hub is out of reach (the probe answers at once) and whose cache is empty."""
    from melt_bench.running import hub

    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda timeout_s=3.0: "huggingface.co:443 unreachable (test)")
    monkeypatch.setattr(hub, "in_local_cache", lambda repo_id, repo_type="model": False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_unreachable_hub_id_stops_before_any_point(offline, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["memory", "--loops", "1", *SWEEP, "--weights", "ByteDance/Ouro-1.4B", "--out", str(out)]) == 2
    one_error_line(capsys, "pass a local checkpoint directory")
    assert not out.exists()


def test_hf_hub_offline_without_a_cached_copy_is_one_line(offline, tmp_path, capsys):
    offline.setenv("HF_HUB_OFFLINE", "1")
    assert main(["latency", "--loops", "1", *SWEEP, "--weights", "ByteDance/Ouro-1.4B",
                 "--out", str(tmp_path / "l.jsonl")]) == 2
    one_error_line(capsys, "HF_HUB_OFFLINE is set")


def test_a_cached_hub_id_passes_offline(offline):
    from melt_bench.running import hub
    from melt_bench.running.sweep_options import check_weights

    offline.setattr(hub, "in_local_cache", lambda repo_id, repo_type="model": True)
    assert check_weights("ByteDance/Ouro-1.4B") == "ByteDance/Ouro-1.4B"


def test_accuracy_without_data_dir_offline_names_data_dir(offline, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert main(["accuracy", "--tasks", "gsm8k", "--loops", "1", "--models", "ouro-tiny", "--device", "cpu",
                 "--out", str(out)]) == 2
    one_error_line(capsys, "--data-dir")
    assert not out.exists()


DATA = Path(__file__).parent / "data"


def run_accuracy_cli(models: str, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The accuracy command as a user runs it, from a folder that is no git checkout."""
    command = [sys.executable, "-m", "melt_bench", "accuracy", "--tasks", "gsm8k", "--data-dir", str(DATA),
               "--loops", "2", "--limit", "2", "--num-fewshot", "1", "--max-gen-toks", "4", "--models", models,
               "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}  # git must not find a repository above
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_accuracy_peaks_do_not_depend_on_model_order_and_lm_eval_stays_in_its_log(tmp_path):
    """Item 5: swapping the model order gives the same peaks (each point in a fresh child);
    item 8: outside a checkout stderr holds neither git's complaint nor lm-eval's log lines."""
    peaks = {}
    for order in ("ouro-tiny,melt-tiny", "melt-tiny,ouro-tiny"):
        out = tmp_path / f"{order.split(',')[0]}-first.jsonl"
        done = run_accuracy_cli(order, out, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "fatal" not in done.stderr and "Running generate_until" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [], done.stderr
        log = out.with_name(out.stem + ".lm-eval.log").read_text()
        assert "Running generate_until" in log and "not a git repository" in log
        peaks[order] = {row.point["model"]: row.metrics["peak_bytes"] for row in ResultsStore(out).read()}
    first, second = peaks.values()
    for model in ("ouro-tiny", "melt-tiny"):
        # the defect this guards was 54 vs 16 MiB; a fresh child per point differs by 3.4% at most
        # seen (2026-12-06, lm-eval's lazy imports while another job shared the cores)
        assert abs(first[model] - second[model]) <= 0.06 * max(first[model], second[model]), peaks


def test_unexpected_lm_eval_warnings_reach_the_terminal_expected_ones_only_the_log(tmp_path):
    import logging

    from melt_bench.evaluation.lm_eval_logs import lm_eval_output

    log = tmp_path / "x.lm-eval.log"
    with lm_eval_output(log) as warnings:
        logging.getLogger("lm_eval.models").warning("Passed an already-initialized model through `pretrained`, ...")
        logging.getLogger("lm_eval.tasks").warning("dataset revision is deprecated")
        logging.getLogger("lm_eval.evaluator").info("Building contexts")
    assert warnings == ["dataset revision is deprecated"]
    text = log.read_text()
    assert "already-initialized" in text and "deprecated" in text and "Building contexts" in text
    assert logging.getLogger("lm_eval").handlers == [] or all(
        not isinstance(h, logging.FileHandler) for h in logging.getLogger("lm_eval").handlers)


def test_cpu_memory_repeats_are_stable_and_show_their_spread(tmp_path, capsys):
    """Item 6: the default CPU preset (2048 tokens x batch 2), one point in three fresh processes."""
    out = tmp_path / "m.jsonl"
    assert main(["memory", "--loops", "8", "--models", "ouro-tiny", "--device", "cpu", "--repeats", "3",
                 "--no-progress", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    peaks = [row.metrics["peak_bytes"] for row in ResultsStore(out).read()]
    assert len(peaks) == 3
    # glibc's default: 3-10%; with our mallopt settings up to 1.2% was seen (clean-clone CI, 2026-12-06)
    assert (max(peaks) - min(peaks)) / sorted(peaks)[1] < 0.02, peaks
    assert "median of 3 repeats" in table and re.search(r"MiB ±\d+\.\d%", table)
    assert all(row.metrics["rss_malloc"].startswith("glibc mallopt") for row in ResultsStore(out).read())


def test_the_default_cpu_memory_sweep_repeats_each_point():
    from melt_bench.running.sweep_options import SweepFlags, resolve_sweep

    assert resolve_sweep("memory", SweepFlags(device="cpu"), None).spec.repeats == 2
    assert resolve_sweep("latency", SweepFlags(device="cpu"), None).spec.repeats == 1
    assert resolve_sweep("memory", SweepFlags(device="cpu", repeats=1), None).spec.repeats == 1


def test_repeats_fold_into_a_median_with_their_range_and_a_failure_marks_the_point(tmp_path):
    from melt_bench.reporting.report import build_report
    from melt_bench.running.repeats import combine_repeats
    from melt_bench.running.results import ResultRow

    def row(loops, repeat, peak, status="ok"):
        point = {"model": "ouro-tiny", "loops": loops, "seq_len": 32, "batch_size": 1, "phase": "decode",
                 "dtype": "float32", "device": "cpu", "repeat": repeat}
        metrics = {"peak_bytes": peak, "peak_source": "process RSS above baseline"} if status == "ok" else {}
        return ResultRow("memory", f"p{loops}-{repeat}", point, status, None if status == "ok" else "boom",
                         metrics, {}, 1.0)

    rows = [row(1, 0, 300), row(1, 1, 100), row(1, 2, 200), row(1, 3, 400), row(2, 0, 500), row(2, 1, 0, "oom")]
    combined = {r.point["loops"]: r for r in combine_repeats(rows)}
    one, two = combined[1], combined[2]
    assert one.status == "ok" and one.metrics["peak_bytes"] == 200  # the lower middle: a value some repeat measured
    assert (one.metrics["peak_bytes_repeat_min"], one.metrics["peak_bytes_repeat_max"], one.metrics["repeats"]) \
        == (100, 400, 4)
    assert "repeat" not in one.point
    assert two.status == "oom" and "1 of 2 repeats failed" in two.error
    path = tmp_path / "m.jsonl"
    store = ResultsStore(path)
    for r in rows:
        store.append(r)
    html = build_report([path])
    assert "peak range" in html and "measured 4 times" in html


def test_an_even_number_of_repeats_takes_every_figure_from_one_repeat():
    """ms/token and tokens/s of one row once came from different middles (6.14 ms/token beside
    628.9 tok/s): the row now holds the figures of the lower-middle repeat, all of them."""
    from melt_bench.running.repeats import combine_repeats
    from melt_bench.running.results import ResultRow

    def row(repeat, ms):
        point = {"model": "ouro-tiny", "loops": 2, "seq_len": 32, "batch_size": 4, "repeat": repeat}
        metrics = {"decode_ms_per_token_mean": ms, "decode_tokens_per_s": 4 * 1000 / ms, "decode_mbu": 0.01 / ms}
        return ResultRow("latency", f"l{repeat}", point, "ok", None, metrics, {}, 1.0)

    [one] = combine_repeats([row(0, 6.5), row(1, 6.14), row(2, 7.0), row(3, 5.9)])
    m = one.metrics
    assert m["decode_ms_per_token_mean"] == 6.14  # the lower middle of 5.9, 6.14, 6.5, 7.0
    assert m["decode_tokens_per_s"] == 4 * 1000 / 6.14 and m["decode_mbu"] == 0.01 / 6.14
    assert (m["decode_ms_per_token_mean_repeat_min"], m["decode_ms_per_token_mean_repeat_max"]) == (5.9, 7.0)


def test_a_child_whose_parent_stopped_listening_ends_quietly():
    """Ctrl-C once left a BrokenPipeError traceback: the parent had closed its end when the child
    sent its row. The child's send now swallows a closed pipe, whichever comes first."""
    from melt_bench.running.launcher import _child_main

    class ClosedPipe:
        closed = False

        def send(self, message):
            raise BrokenPipeError(32, "Broken pipe")

        def close(self):
            self.closed = True

    import signal

    handler = signal.getsignal(signal.SIGINT)  # _child_main ignores Ctrl-C, as a child should
    try:
        for target in (lambda: 42, lambda: 1 / 0):
            pipe = ClosedPipe()
            _child_main(pipe, target, ())  # no exception escapes
            assert pipe.closed
    finally:
        signal.signal(signal.SIGINT, handler)


def torn_file(tmp_path) -> Path:
    """Two complete memory rows, then the first 31 bytes of a third: a write that never finished."""
    path = tmp_path / "torn.jsonl"
    write_rows(path, "latency", 3)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:31])
    return path


def test_a_torn_last_line_is_set_aside_on_resume_and_reported_around(tmp_path, capsys):
    from melt_bench.running.results import ResultsStore

    path = torn_file(tmp_path)
    torn = path.read_bytes().rsplit(b"\n", 1)[1]
    # the report reads the complete rows and warns
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
    assert "its last line is torn" in capsys.readouterr().err and (tmp_path / "r.html").exists()
    # --resume moves the torn bytes beside the file, says so in one line, and goes on
    store = ResultsStore(path)
    assert len(store.read()) == 2 and store.torn_tail == torn
    from melt_bench.commands.support import open_store

    open_store("latency", path, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last line was torn" in err[0] and "torn.jsonl.torn" in err[0]
    assert path.with_name("torn.jsonl.torn").read_bytes() == torn + b"\n"
    assert path.read_bytes().endswith(b"\n") and len(ResultsStore(path).read()) == 2


def test_a_corrupt_line_in_the_middle_stays_refused(tmp_path, capsys):
    path = tmp_path / "mid.jsonl"
    write_rows(path, "memory", 3)
    lines = path.read_bytes().splitlines(keepends=True)
    before = lines[0] + b"{not json\n" + b"".join(lines[1:])
    path.write_bytes(before)
    assert main(["memory", "--out", str(path), "--resume", *SWEEP]) == 2
    one_error_line(capsys, "corrupt line, not JSON")
    assert path.read_bytes() == before


def test_a_failed_write_ends_the_sweep_in_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    import melt_bench.running.results as results

    path = tmp_path / "full.jsonl"
    real_write, writes = os.write, []

    def disk_full_on_the_second_row(fd, data):
        if data.startswith(b'{"'):  # a results row (the patch reaches every os.write of this process)
            writes.append(data)
        if len(writes) == 2 and data.startswith(b'{"'):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(results.os, "write", disk_full_on_the_second_row)
    assert main(["memory", "--loops", "1,2,3", "--out", str(path), "--repeats", "1", *SWEEP,
                 "--models", "ouro-tiny"]) == 1
    line = one_error_line(capsys, "writing a row failed (No space left on device)")
    assert "--resume" in line and len(ResultsStore(path).read()) == 1


def test_a_run_where_no_point_succeeded_exits_1_and_keeps_its_rows(tmp_path, capsys):
    path = tmp_path / "slow.jsonl"
    assert main(["memory", "--loops", "1", "--out", str(path), "--repeats", "1", "--point-timeout", "0.001", *SWEEP,
                 "--models", "ouro-tiny"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no point succeeded: 1 rows written, all failed (1 timeout)" in line
    assert [row.status for row in ResultsStore(path).read()] == ["timeout"]


@pytest.mark.parametrize("args,needle", [
    (["accuracy", "--tokenizer", "/nonexistent/tok", "--models", "ouro-tiny", "--tasks", "addition"],
     "--tokenizer /nonexistent/tok: no such directory"),
    (["memory", "--suite", "BINARY"], "not a readable YAML text file"),
    (["memory", "--retry-failed"], "--retry-failed re-runs the failed points of an existing --out: it needs --resume"),
    (["convert", "--from", "ouro-tiny", "--data", "DATA", "--out", "FILE"], "is a file: convert writes a directory"),
    (["convert", "--from", "ouro-tiny", "--data", "DATA", "--out", "BUSY"],
     "non-empty directory that is not a convert"),
])
def test_more_bad_input_is_one_line_and_writes_nothing(args, needle, tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "data.jsonl").write_text('{"text": "1+1=2"}\n')
    swap = {"BINARY": str(tmp_path / "binary.yaml"), "FILE": str(tmp_path / "file"), "BUSY": str(tmp_path / "busy"),
            "DATA": str(tmp_path / "data.jsonl")}
    out = tmp_path / "never.jsonl"
    argv = [swap.get(a, a) for a in args]
    if argv[0] != "convert":
        argv += ["--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    one_error_line(capsys, needle)
    assert not out.exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


BAD_FLAGS = [  # (argv, what the one line names)
    (["memory", "--loops", "1..0"], "descends"),
    (["latency", "--seq-lens", "0"], "--seq-lens"),
    (["capacity", "--budget", "1GiB", "--loops", "2..1"], "descends"),
    (["memory", "--models", "ouro-7b"], "unknown model 'ouro-7b'"),
    (["memory", "--dtype", "fp64"], "unknown dtype 'fp64'"),
    (["memory", "--loops", "65"], "maximum of 64"),
    (["memory", "--phase", "train"], "--phase"),
    (["memory", "--device", "gpu"], "--device"),
    (["memory", "--kv-policy", "every-other"], "unknown KV policy"),
    (["memory", "--kv-quant", "int3"], "--kv-quant"),
    (["latency", "--engine", "turbo"], "--engine"),
    (["latency", "--decode-reads", "all"], "--decode-reads"),
    (["latency", "--early-exit", "sometimes"], "--early-exit"),
    (["memory", "--prefill-chunk", "0"], "--prefill-chunk"),
    (["capacity", "--budget", "lots"], "--budget"),
    (["accuracy", "--models", "gpt2"], "unknown model 'gpt2'"),
    (["models", "--dtype", "fp64"], "unknown dtype"),
    (["convert", "--from", "ouro-tiny", "--data", "org/set", "--out", "o", "--gate", "sigmoid"], "--gate"),
    (["convert", "--from", "ouro-tiny", "--data", "org/set", "--out", "o", "--dtype", "fp8"], "unknown dtype"),
    (["convert", "--from", "melt-tiny", "--data", str(DATA / "gsm8k" / "train.jsonl"), "--out", "o"],
     "not an Ouro model"),
    (["convert", "--from", "ouro-tiny", "--data", str(DATA / "gsm8k" / "train.jsonl"), "--out", "o",
      "--fsdp-reshard-after-forward"], "needs --fsdp"),
]


def test_bad_flags_are_refused_before_torch_is_imported():
    """`memory --loops 1..0` once took 7-8 s to refuse (torch and the harness imported first):
    every name and number a flag carries is checked before torch loads, each in one line."""
    code = ("import json, sys; from melt_bench.cli import main\n"
            f"codes = [main(a) for a, _ in {BAD_FLAGS!r}]\n"
            "print(json.dumps([codes, 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout) == [[2] * len(BAD_FLAGS), False], done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(BAD_FLAGS), done.stderr
    for line, (argv, needle) in zip(lines, BAD_FLAGS):
        assert needle in line, (argv, line)
