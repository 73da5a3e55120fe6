"""The memory sweep end to end: child processes, results file, resume, failures as data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sweep_helpers
from conftest import one_line_error

from melt_bench.cli import main
from melt_bench.running.launcher import child_context, run_in_child
from melt_bench.running.results import ResultsFileError, ResultsStore, load_results
from melt_bench.running.sweep import in_child, run_sweep
from melt_bench.running.sweep_options import SweepFlags, resolve_sweep
from melt_bench.scenarios.memory import MemoryOptions

SMALL = ["--models", "ouro-tiny,melt-tiny", "--seq-lens", "32", "--batch-sizes", "2", "--new-tokens", "4",
         "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--no-progress"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "melt_bench", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_real_sweep_end_to_end(tmp_path):
    out = tmp_path / "mem.jsonl"
    result = cli("memory", "--loops", "1,2,8", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "ouro-tiny/melt-tiny" in result.stdout  # the ratio column of the summary table
    frame = load_results(out)
    assert len(frame) == 6 and set(frame.status) == {"ok"}
    kv = frame.set_index(["model", "loops"])["kv_cache_bytes"]
    assert kv["ouro-tiny", 8] == 8 * kv["ouro-tiny", 1]
    assert kv["melt-tiny", 8] == kv["melt-tiny", 1] == kv["ouro-tiny", 1]
    assert (frame.kv_cache_bytes == frame.kv_cache_bytes_predicted).all()
    assert (frame.rss_peak_above_baseline_bytes > 0).all() and (frame.weights_bytes > 0).all()
    assert frame["meta.torch"].notna().all() and frame["meta.host"].notna().all()
    assert frame.point_id.is_unique


def measure_rows(tmp_path, measure, loops="1..4", timeout=120.0):
    flags = SweepFlags(models="ouro-tiny", loops=loops, seq_lens="16", batch_sizes="1", new_tokens=2, device="cpu",
                       dtype="float32")
    spec = resolve_sweep("memory", flags, None).spec
    store = ResultsStore(tmp_path / "rows.jsonl")
    run_sweep("memory", spec.points(MemoryOptions()), store, in_child(measure, (), timeout), {"host": "test"},
              show_progress=False)
    return store.read()


def test_an_oom_point_is_recorded_and_the_sweep_continues(tmp_path):
    rows = measure_rows(tmp_path, sweep_helpers.oom_at_loops_3)
    statuses = {row.point["loops"]: row.status for row in rows}
    assert statuses == {1: "ok", 2: "ok", 3: "oom", 4: "ok"}
    oom = next(row for row in rows if row.status == "oom")
    assert "out of memory" in oom.error


def test_timeouts_and_crashes_are_rows(tmp_path):
    rows = measure_rows(tmp_path, sweep_helpers.sleep_forever, loops="1", timeout=1.0)
    assert rows[0].status == "timeout" and "1 s limit" in rows[0].error
    rows = measure_rows(tmp_path / "b", sweep_helpers.die_by_sigkill, loops="1")
    assert rows[0].status == "oom" and "SIGKILL" in rows[0].error
    rows = measure_rows(tmp_path / "c", sweep_helpers.raise_error, loops="1")
    assert rows[0].status == "error" and "something broke" in rows[0].error


def test_children_ignore_ctrl_c_from_their_first_instruction():
    """A child runs (unpickling, bootstrap) before `_child_main` ignores SIGINT; a Ctrl-C then
    printed "Process ForkServerProcess-N:" beside the parent's one line. A child that gets SIGINT
    at its very start now ends cleanly."""
    context = child_context()
    if context.get_start_method() != "forkserver":
        pytest.skip("only a fork server's children start with its handlers")
    proc = context.Process(target=signal.raise_signal, args=(signal.SIGINT,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def test_child_processes_are_fresh():
    pids = {run_in_child(os.getpid, (), 60).value for _ in range(3)}
    assert len(pids) == 3 and os.getpid() not in pids


def test_killed_sweep_resumes_without_duplicates(tmp_path):
    out = tmp_path / "mem.jsonl"
    args = [sys.executable, "-m", "melt_bench", "memory", "--loops", "1..6", "--out", str(out), *SMALL]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(out.read_text().splitlines())
    assert 3 <= done_before < 12
    result = cli("memory", "--loops", "1..6", "--out", str(out), "--resume", *SMALL)
    assert result.returncode == 0, result.stderr
    left = 12 - done_before
    assert f"{left} point{'' if left == 1 else 's'} run, {done_before} already recorded" in result.stdout
    ids = [json.loads(line)["point_id"] for line in out.read_text().splitlines()]
    assert len(ids) == 12 and len(set(ids)) == 12


def test_retry_failed_reruns_only_failures(tmp_path):
    store = ResultsStore(tmp_path / "rows.jsonl")
    flags = SweepFlags(models="ouro-tiny", loops="1,2", seq_lens="16", batch_sizes="1", new_tokens=2, device="cpu",
                       dtype="float32", repeats=1)
    spec = resolve_sweep("memory", flags, None).spec
    points = spec.points(MemoryOptions())
    run_sweep("memory", points, store, in_child(sweep_helpers.raise_error), {}, show_progress=False)
    status = run_sweep("memory", points, store, in_child(sweep_helpers.oom_at_loops_3), {},
                       retry_failed=True, show_progress=False)
    assert status.ran == 2
    assert [row.status for row in store.read()] == ["error", "error", "ok", "ok"]


@pytest.mark.parametrize(
    "content,needle",
    [("not json at all\n", "corrupt line"), ('{"schema": "someone-else/v3"}\n', "not a melt-bench results line"),
     ('{"schema": "melt-bench/results/v1", "kind": "memory"}\n', "malformed row")],
)
def test_corrupt_or_foreign_results_are_refused_and_untouched(tmp_path, content, needle, capsys):
    out = tmp_path / "mem.jsonl"
    out.write_text(content)
    err = one_line_error(["memory", "--loops", "1", "--out", str(out), "--resume", *SMALL], capsys)
    assert needle in err
    assert out.read_text() == content
    with pytest.raises(ResultsFileError, match=needle):
        load_results(out)


def test_existing_results_need_resume(tmp_path, capsys):
    out = tmp_path / "mem.jsonl"
    out.write_text("")
    assert main(["memory", "--loops", "1", "--out", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [(["--loops", "16..1"], "--loops: '16..1'"), (["--loops", "0"], "--loops: '0'"),
     (["--loops", "a..b"], "--loops: 'a..b'"), (["--seq-lens", "1,,2"], "--seq-lens: empty item"),
     (["--models", "gpt-5"], "unknown model 'gpt-5'"), (["--weights", "./missing-dir"], "no such directory"),
     (["--suite", "nope"], "nope"), (["--phase", "train"], "--phase"),
     (["--point-timeout", "0"], "--point-timeout")],
)
def test_bad_input_exit_2_one_line(args, needle, capsys):
    assert main(["memory", *args, "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_bad_input_through_the_console_script():
    result = cli("memory", "--loops", "4..2", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == "melt-bench: error: --loops: '4..2' descends; write the smaller bound first"


def test_dry_run_lists_the_plan(capsys):
    """For people: what every point shares on one line, a row per point with what varies (no
    latency-only settings on a memory plan); with --json a JSON line per point, for machines."""
    assert main(["memory", "--loops", "1..3", "--dry-run", *SMALL]) == 0
    text = capsys.readouterr().out
    shared = next(line for line in text.splitlines() if line.startswith("every point:"))
    assert "command memory" in shared and "engine" not in text and "warmup" not in text
    assert not any(line.startswith("{") for line in text.splitlines())
    header = next(line for line in text.splitlines() if line.startswith("point_id"))
    assert header.split()[1:] == ["model", "loops"] and "6 points" in text
    assert main(["memory", "--loops", "1..3", "--dry-run", "--json", *SMALL]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 6 and json.loads(lines[0])["loops"] == 1


def test_default_sweep_on_cpu_announces_tiny_presets(tmp_path):
    result = cli("memory", "--loops", "1", "--seq-lens", "16", "--batch-sizes", "1", "--new-tokens", "2",
                 "--out", str(tmp_path / "d.jsonl"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "tiny CPU presets" in result.stderr
    assert set(load_results(tmp_path / "d.jsonl").model) == {"ouro-tiny", "melt-tiny"}


def test_sweep_with_real_checkpoint_weights(tmp_path):
    from test_checkpoints import write_official_checkpoint

    ckpt = tmp_path / "ouro-ckpt"
    ckpt.mkdir()
    write_official_checkpoint(ckpt)
    out = tmp_path / "w.jsonl"
    assert main(["memory", "--loops", "2", "--weights", str(ckpt), "--out", str(out), *SMALL]) == 0
    frame = load_results(out)
    assert set(frame.status) == {"ok"} and set(frame.weights) == {str(ckpt.resolve())}
    # the checkpoint's own config (hidden 32, 2 KV heads of 8, fp32), not the preset's
    per_token_per_loop = 2 * 2 * 2 * 8 * 4
    kv = frame.set_index("model")["kv_cache_bytes"]
    assert kv["ouro-tiny"] == 2 * per_token_per_loop * 2 * 36 and kv["melt-tiny"] == per_token_per_loop * 2 * 36
